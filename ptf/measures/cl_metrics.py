"""Continual-learning and forgetting measures: pure functions, numbers in, numbers out.

In:  accuracy matrices, per-block losses, per-seed values (plain lists or numpy arrays).
Out: floats, lists and dicts of floats (JSON-ready; `None` where a measure is undefined).
No file I/O, no torch: used by the forgetting stage (`ptf/measures/arms.py`) and unit-tested on
hand-made inputs. The verdicts of the claims live in `ptf/measures/claims.py`.

Accuracy-matrix convention (the `matrix` of `data/metrics/sequential.json`)
--------------------------------------------------------------------------
`R` has T+1 rows and T columns, tasks numbered 0..T-1 in training order:
  - row 0: before any training in the sequence (the pretrained backbone with fresh heads);
  - row i (1 <= i <= T): right after training task i-1, i.e. after i tasks;
  - R[i][j]: test accuracy on task j at that point.
So R[j+1][j] is task j's accuracy just after learning it, R[T][j] its final accuracy, and
R[j][j] its accuracy just *before* learning it.

Measures (written with this indexing):
  - ACC (Lopez-Paz & Ranzato 2017, GEM):  mean_j R[T][j].
  - learning accuracy:  a_j = R[j+1][j]  (just-learned accuracy of each task).
  - BWT (GEM):  1/(T-1) * sum_{j=0}^{T-2} (R[T][j] - R[j+1][j]).  Negative = forgetting.
  - FWT (GEM):  1/(T-1) * sum_{j=1}^{T-1} (R[j][j] - b[j]), the accuracy on task j before
    training it, after the tasks before it, minus a baseline b[j]. GEM's b is the test accuracy
    of the same architecture at random initialisation, which the sequential stage measures and
    passes as `baseline`; without one, b is row 0 of the matrix (before any training of the
    sequence).
  - Forgetting (Chaudhry et al. 2018, "Riemannian Walk", eq. 1-2): for every task j < T-1,
    f_j = max_{l in 1..T-1} R[l][j] - R[T][j]: the best accuracy on task j at any earlier
    point of the sequence (rows 1..T-1, after each earlier training step; row 0 is not a
    point of the sequence) minus the final accuracy. Average forgetting F = mean_j f_j. The
    last task has no forgetting (it was just learned). f_j may be negative only if every
    earlier accuracy is below the final one (backward transfer).
  - Majority adjustment: every accuracy rescaled as a' = (a - m_j) / (1 - m_j), m_j the
    majority-class rate of task j's test split (0 = what always answering the most frequent
    class gets, 1 = perfect, < 0 = worse than that), then the same measures on the rescaled
    matrix. This makes tasks with different numbers of classes and different imbalance
    comparable (1/n would not: a binary task with a 0.7 majority class is at 0.4 "above
    chance" while it has learned nothing).
  With T = 1 there is no earlier task: BWT, FWT and forgetting are `None`.

Forgetting events (Toneva et al. 2019, "An empirical study of example forgetting")
--------------------------------------------------------------------------------
`C[i][j]` is the per-example correctness (a sequence of 0/1 over task j's test examples) at row
i of R. For task j, an event is an example correct at one evaluation and incorrect at the next,
counted over the rows from j+1 (task j just learned) to T: pairs (i, i+1) with i >= j+1. Per
task: `events` (their total), `forgotten` (examples with at least one event), `never_forgotten`
(the share of examples with no event, whether or not they were ever correct), `n` examples.
The last task has no later evaluation: its counts are `None`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class MatrixError(ValueError):
    """An accuracy matrix, chance vector or baseline of the wrong shape or range."""


# ---------------------------------------------------------------- accuracy matrices

def as_matrix(R: Any) -> np.ndarray:
    """`R` as a float64 array of shape (T+1, T), T >= 1, finite; else `MatrixError`."""
    try:
        a = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MatrixError(f"accuracy matrix is not a rectangular table of numbers: {e}") from None
    if a.ndim != 2 or a.shape[1] < 1 or a.shape[0] != a.shape[1] + 1:
        raise MatrixError(f"accuracy matrix must have T+1 rows and T >= 1 columns, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise MatrixError("accuracy matrix has non-finite entries")
    return a


def _vector(v: Any, T: int, name: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 0:
        a = np.full(T, float(a))
    if a.shape != (T,):
        raise MatrixError(f"{name} must be a number or a vector of length T={T}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise MatrixError(f"{name} has non-finite entries")
    return a


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def final_accuracy(R: Any) -> float:
    """ACC: mean final accuracy over all tasks, mean_j R[T][j]."""
    a = as_matrix(R)
    return float(a[-1].mean())


def learning_accuracy(R: Any) -> list[float]:
    """R[j+1][j] for each task j: its accuracy right after it was trained."""
    a = as_matrix(R)
    T = a.shape[1]
    return [float(a[j + 1, j]) for j in range(T)]


def forgetting_per_task(R: Any) -> list[float]:
    """Chaudhry et al. 2018: f_j = max_{l=1..T-1} R[l][j] - R[T][j] for j = 0..T-2 (T-1 values)."""
    a = as_matrix(R)
    T = a.shape[1]
    if T < 2:
        return []
    best_earlier = a[1:T, : T - 1].max(axis=0)  # rows 1..T-1
    return [float(x) for x in best_earlier - a[T, : T - 1]]


def average_forgetting(R: Any) -> float | None:
    """Mean of `forgetting_per_task`, `None` with a single task."""
    return _mean_or_none(np.asarray(forgetting_per_task(R)))


def backward_transfer(R: Any) -> float | None:
    """GEM BWT: mean_{j<T-1} (R[T][j] - R[j+1][j]); `None` with a single task."""
    a = as_matrix(R)
    T = a.shape[1]
    return _mean_or_none(np.array([a[T, j] - a[j + 1, j] for j in range(T - 1)]))


def forward_transfer(R: Any, baseline: Any = None) -> float | None:
    """GEM FWT: mean_{j>=1} (R[j][j] - b[j]); b = row 0 of R unless `baseline` is given."""
    a = as_matrix(R)
    T = a.shape[1]
    b = a[0] if baseline is None else _vector(baseline, T, "baseline")
    return _mean_or_none(np.array([a[j, j] - b[j] for j in range(1, T)]))


def majority_adjust(R: Any, majority: Any) -> np.ndarray:
    """Rescale column j as (a - m_j) / (1 - m_j); `majority` a number or a length-T vector of
    majority-class rates in [0, 1)."""
    a = np.asarray(R, dtype=np.float64)
    T = a.shape[-1]
    m = _vector(majority, T, "majority")
    if np.any(m < 0) or np.any(m >= 1):
        raise MatrixError(f"majority-class rates must be in [0, 1), got {m.tolist()}")
    return (a - m) / (1.0 - m)


def sequential_measures(R: Any, majority: Any = None, baseline: Any = None) -> dict[str, Any]:
    """All the measures of the module docstring, raw and (when `majority` is given)
    majority-adjusted. `baseline`: FWT's b (GEM: random-init accuracies), adjusted with the same
    majority rates in the adjusted variant; None: row 0."""
    a = as_matrix(R)

    def block(m: np.ndarray, b: Any) -> dict[str, Any]:
        return {
            "acc": final_accuracy(m),
            "learning_accuracy": learning_accuracy(m),
            "forgetting": forgetting_per_task(m),
            "avg_forgetting": average_forgetting(m),
            "bwt": backward_transfer(m),
            "fwt": forward_transfer(m, b),
            "matrix": [[float(x) for x in row] for row in m],
        }

    out: dict[str, Any] = {"raw": block(a, baseline),
                           "fwt_baseline": "row 0" if baseline is None else "given"}
    if majority is not None:
        adj_b = None if baseline is None else majority_adjust(_vector(baseline, a.shape[1], "baseline"), majority)
        out["majority_adjusted"] = block(majority_adjust(a, majority), adj_b)
    return out


def forgetting_events(C: Any) -> list[dict[str, Any] | None]:
    """Toneva et al. (2019) forgetting events per task from the correctness table `C` ((T+1) x T
    cells, each a 0/1 sequence over that task's test examples; see the module docstring):
    [{"events", "forgotten", "never_forgotten", "n"} for tasks 0..T-2] + [None] (the last task
    has no later evaluation)."""
    rows = [[np.asarray([int(x) for x in cell], dtype=np.int8) for cell in row] for row in C]
    T = len(rows[0]) if rows else 0
    if T < 1 or len(rows) != T + 1 or any(len(r) != T for r in rows):
        raise MatrixError(f"correctness table must have T+1 rows of T cells, got {[len(r) for r in rows]}")
    out: list[dict[str, Any] | None] = []
    for j in range(T):
        cells = [rows[i][j] for i in range(j + 1, T + 1)]    # task j just learned, then after each later task
        n = cells[0].size
        if any(c.size != n for c in cells) or any(np.any((c != 0) & (c != 1)) for c in cells):
            raise MatrixError(f"correctness of task {j}: every row needs the same {n} examples, as 0/1")
        if j == T - 1:
            out.append(None)
            continue
        drops = np.stack([(cells[k] == 1) & (cells[k + 1] == 0) for k in range(len(cells) - 1)])
        per_example = drops.sum(axis=0)
        out.append({"events": int(per_example.sum()), "forgotten": int((per_example > 0).sum()),
                    "never_forgotten": float((per_example == 0).mean()) if n else None, "n": int(n)})
    return out


# ---------------------------------------------------------------- drift of the pretraining loss

def pooled_loss(nll_sums: Sequence[float], counts: Sequence[float]) -> float:
    """Token-weighted mean loss: sum of per-block NLL sums over the number of predicted tokens."""
    n = float(np.sum(counts))
    if n <= 0:
        raise ValueError("no predicted tokens")
    return float(np.sum(nll_sums) / n)


def drift(base_sums: Sequence[float], ft_sums: Sequence[float], counts: Sequence[float],
          worse_margin: float = 0.0) -> dict[str, float]:
    """Paired drift of the held-out LM loss between a reference and a fine-tuned model.

    `base_sums[i]`, `ft_sums[i]`: summed NLL (nats) of block i under each model, over the same
    `counts[i]` predicted tokens. Returns the pooled losses, their perplexities, the absolute
    change `delta_loss` (fine-tuned minus reference: > 0 is forgetting), the relative change
    `rel_delta_pct` (100 * delta / reference loss), the perplexity ratio, and `share_worse`: the
    fraction of blocks whose mean loss rose by more than `worse_margin` nats/token.
    """
    b, f, c = (np.asarray(x, dtype=np.float64) for x in (base_sums, ft_sums, counts))
    if not (b.shape == f.shape == c.shape) or b.ndim != 1 or b.size == 0:
        raise ValueError(f"need equal, non-empty 1-d per-block vectors, got {b.shape}, {f.shape}, {c.shape}")
    if np.any(c <= 0):
        raise ValueError("every block needs at least one predicted token")
    lb, lf = pooled_loss(b, c), pooled_loss(f, c)
    per_block = (f - b) / c
    return {
        "loss_pretrained": lb,
        "loss_finetuned": lf,
        "ppl_pretrained": _exp(lb),
        "ppl_finetuned": _exp(lf),
        "delta_loss": lf - lb,
        "rel_delta_pct": 100.0 * (lf - lb) / lb if lb > 0 else float("nan"),
        "ppl_ratio": _exp(lf - lb),
        "share_worse": float(np.mean(per_block > worse_margin)),
        "blocks": int(b.size),
        "tokens": int(c.sum()),
    }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
