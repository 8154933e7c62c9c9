"""Task baselines that need no pretraining (no CLI): the majority class and a linear classifier on
bag-of-token counts.

In:  token-id sequences and labels of a task's train / validation / test splits (the pipeline's
     tokenizer and the fine-tuning caps, see `stages/baselines.py`), the number of classes, a
     grid of L2 strengths.
Out: `majority_label` (the most frequent TRAIN label), `Vocabulary` (the token ids seen in train,
     as feature columns) and its `counts` (a sparse count matrix), `fit_logreg` (multinomial
     logistic regression by full-batch L-BFGS in float64) and `select_l2` (one fit per L2
     strength, the strength chosen on validation accuracy only), `scores` (accuracy and
     macro-F1 from a confusion matrix).

The logistic regression minimises mean cross-entropy + l2 / 2 * ||W||^2 (the bias is not
penalised); sklearn's `C` is 1 / (l2 * n_train). Token ids never seen in train get no column:
their weight would stay at its zero start under any L2, so dropping them changes nothing.
L-BFGS from a zero start in float64 is deterministic, so the stage's JSON is reproducible.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def majority_label(labels: Sequence[int]) -> int:
    """The most frequent label (ties: the smallest label id)."""
    if not labels:
        raise ValueError("majority of an empty label list")
    counts = Counter(labels)
    return min(counts, key=lambda y: (-counts[y], y))


@dataclass(frozen=True)
class Vocabulary:
    """Feature columns: the sorted token ids that occur in the training sequences."""
    token_ids: tuple[int, ...]

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]]) -> "Vocabulary":
        return cls(tuple(sorted({t for s in seqs for t in s})))

    def __len__(self) -> int:
        return len(self.token_ids)

    def counts(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(n, len(self)) sparse float64 token counts; ids outside the vocabulary are dropped."""
        col = {t: j for j, t in enumerate(self.token_ids)}
        rows, cols, vals = [], [], []
        for i, s in enumerate(seqs):
            for t, c in sorted(Counter(s).items()):
                if t in col:
                    rows.append(i)
                    cols.append(col[t])
                    vals.append(float(c))
        return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).view(2, -1),
                                       torch.tensor(vals, dtype=torch.float64),
                                       (len(seqs), len(col)), check_invariants=True).coalesce()


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(x, w) if x.layout != torch.strided else x @ w


@dataclass
class LinearModel:
    weight: torch.Tensor          # (features, classes)
    bias: torch.Tensor            # (classes,)
    l2: float
    iterations: int               # L-BFGS iterations used
    loss: float                   # final regularised training loss

    def predict(self, x: torch.Tensor) -> list[int]:
        return (_matmul(x.to(torch.float64), self.weight) + self.bias).argmax(-1).tolist()


def fit_logreg(x: torch.Tensor, y: Sequence[int], n_classes: int, l2: float,
               max_iter: int = 500) -> LinearModel:
    """Multinomial logistic regression, full-batch L-BFGS (strong Wolfe line search) from zero.
    The gradient is written out (X^T (softmax - onehot) / n + l2 W), with X and X^T kept as
    CSR matrices: autograd through a sparse product re-transposes X at every evaluation."""
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    x = x.to(torch.float64)
    xt = (x.t().coalesce() if x.is_sparse else x.t().contiguous())
    if x.is_sparse:
        with warnings.catch_warnings():      # "Sparse CSR tensor support is in beta state"
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
            x, xt = x.to_sparse_csr(), xt.to_sparse_csr()
    target = torch.as_tensor(list(y), dtype=torch.long)
    onehot = torch.nn.functional.one_hot(target, n_classes).to(torch.float64)
    n = x.shape[0]
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    @torch.no_grad()
    def objective() -> torch.Tensor:
        logp = torch.log_softmax(_matmul(x, w) + b, dim=-1)
        resid = (logp.exp() - onehot) / n
        w.grad = _matmul(xt, resid) + l2 * w
        b.grad = resid.sum(0)
        return -(logp * onehot).sum() / n + 0.5 * l2 * (w * w).sum()

    opt.step(objective)
    final = float(objective())
    iters = int(opt.state[w].get("n_iter", 0))   # LBFGS keeps its state under the first param
    return LinearModel(w.detach(), b.detach(), l2, iters, final)


def scores(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (per class 2tp / (2tp + fp + fn), 0 for a class never predicted
    nor present, averaged over all `n_classes`), the same definitions as the fine-tuning runs."""
    p = torch.as_tensor(list(pred), dtype=torch.long)
    g = torch.as_tensor(list(gold), dtype=torch.long)
    conf = torch.bincount(g * n_classes + p, minlength=n_classes ** 2).view(n_classes, n_classes)
    tp = conf.diag().double()
    denom = 2 * tp + (conf.sum(0) - conf.diag()).double() + (conf.sum(1) - conf.diag()).double()
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return {"accuracy": float(tp.sum() / max(1, len(g))), "macro_f1": float(f1.mean())}


@dataclass
class Selection:
    model: LinearModel
    val_accuracy: dict[float, float]      # per L2 strength


def select_l2(xtr: torch.Tensor, ytr: Sequence[int], xva: torch.Tensor, yva: Sequence[int],
              n_classes: int, grid: Sequence[float], max_iter: int = 500,
              progress: Callable[[], None] | None = None) -> Selection:
    """Fit one model per L2 strength; keep the best validation accuracy (ties: the stronger L2,
    the simpler model). Only train and validation are read here."""
    best: tuple[float, float, LinearModel] | None = None
    by_l2: dict[float, float] = {}
    for l2 in grid:
        m = fit_logreg(xtr, ytr, n_classes, l2, max_iter)
        acc = scores(m.predict(xva), yva, n_classes)["accuracy"]
        by_l2[l2] = acc
        if best is None or (acc, l2) > (best[0], best[1]):
            best = (acc, l2, m)
        if progress:
            progress()
    assert best is not None, "empty L2 grid"
    return Selection(best[2], by_l2)
