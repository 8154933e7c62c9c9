"""The paradigm's claims and the statistics their verdicts rest on (no CLI, no torch, no I/O).

In:  per-arm samples (`Sample`: per seed, per test example or held-out block, the numbers a
     measure is made of), the curves' rows and the per-arm aggregates of the forgetting stage,
     its `Config` (strategies compared, `alpha`, `bootstrap_resamples`, `bootstrap_seed`).
Out: per comparison {diff, se, df, p, p_holm, ci, ci_level, verdict, reason, resampled, and
     `backbones` when the samples were tagged with theirs}; per claim {claim, rule, comparisons,
     by_task (each task's verdict and counts), verdict, counts}. JSON-ready.

Statistics (`RULE` says the same to a reader):
- Paired bootstrap of the difference of two arms' means over seeds: each resample draws the seeds
  (the same draw for both arms when they ran the same seeds, so seed k is paired with seed k)
  and, within them, the test examples (or held-out blocks) with replacement, the same draw for
  both arms (paired: same test set, same blocks). A seed's value on a resample is its measure
  recomputed on the drawn examples (accuracy = mean correctness; delta LM loss = pooled over the
  drawn blocks). Where an arm has no per-example data, the seeds alone are resampled and
  `resampled` says so.
- The seed draw. One pretrained backbone: the seeds with replacement. Several (the samples
  tagged by `Sample.on_backbones`, fine-tune seed k on backbone k mod N, and at least two
  backbones among the seeds): two stages, first the backbones with replacement, then, each time
  a backbone is drawn, its own seeds with replacement (a fresh draw each time), so that the
  spread includes pretraining variance, not only fine-tuning's; `resampled` then starts with
  "pretrained backbones". A tagged comparison records `backbones` (how many the seeds came
  from); the interval's df stays seeds - 1.
- Few seeds: the interval is diff ± t(df = seeds - 1) x the bootstrap standard error, the latter
  scaled by sqrt(n / (n - 1)) (the bootstrap's plug-in variance of a mean of n seeds is
  (n - 1) / n of the unbiased one). A percentile interval over 3 seeds would be far too narrow.
- Holm within each claim: with m testable comparisons, the one with the k-th smallest p-value
  gets a 1 - alpha / (m - k + 1) interval; going up the ranks, a comparison is decisive when its
  interval excludes 0 and every comparison before it was decisive.
- Verdict of a comparison: `reproduced` (the corrected interval lies wholly on the claimed
  side), `not reproduced` (wholly on the other side), `inconclusive` (it contains 0, Holm
  stopped before it, fewer than 2 seeds, or missing data). Of a claim: `reproduced` when every
  comparison is, `not reproduced` when any is, `partly reproduced` when some are and the others
  are inconclusive, else `inconclusive`.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ptf.measures.stats import mean_std
from ptf.models.backbones import backbone_index, seed_number

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
PARTLY = "partly reproduced"
INCONCLUSIVE = "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)


def rule(alpha: float, resamples: int, seed: int) -> str:
    """The decision rule, in words, with its parameters."""
    return (f"Each difference gets a paired bootstrap interval ({resamples} resamples, seed {seed}): "
            "the seeds are drawn with replacement (the same draw for both arms when they ran the same "
            "seeds; with several pretrained backbones, first the backbones, then the seeds within each "
            "drawn backbone) and, within them, the test examples (for Δ LM loss: the held-out blocks), the same "
            "draw for both arms; where an arm has no per-example data only the seeds are drawn, and "
            "the comparison says so. The interval is the difference ± t(seeds − 1) × the bootstrap "
            "standard error (scaled by √(n/(n−1)) for n seeds). Holm's correction within each claim "
            f"at α = {alpha:g}: of m comparisons, the one with the k-th smallest p-value gets a "
            "1 − α/(m − k + 1) interval, and is decisive only if every one before it was. A comparison "
            "is *reproduced* when its corrected interval lies wholly on the claimed side of 0, *not "
            "reproduced* when wholly on the other side, *inconclusive* otherwise (or with fewer than 2 "
            "seeds). A claim is reproduced when every comparison is, not reproduced when any is not, "
            "partly reproduced when some are and the rest are inconclusive, inconclusive otherwise.")


# ---------------------------------------------------------------- Student's t (integer df)

def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer `df` >= 1 (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    t = abs(float(t))
    if math.isinf(t):
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        a = 2 / math.pi * (theta + math.sin(theta) * total)
    else:
        term = total = 1.0
        for k in range(2, df - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        a = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - a))


def t_critical(alpha: float, df: int) -> float:
    """The t with P(|T| >= t) = alpha (two-sided critical value), by bisection."""
    hi = 1.0
    while t_two_sided_p(hi, df) > alpha:
        hi *= 2
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > alpha else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


# ---------------------------------------------------------------- samples and the bootstrap

@dataclass(frozen=True)
class Sample:
    """One arm's data for a measure: seed s's value is sum_u num[s, u] / sum_u den[s, u] over
    its units u (test examples, held-out blocks; one unit when only per-seed values exist)."""

    seeds: tuple[str, ...]
    num: np.ndarray                 # seeds x units
    den: np.ndarray                 # seeds x units
    units: str = ""                 # "test examples" | "held-out blocks" | "" (per-seed values)
    note: str = ""                  # why only the seeds are resampled, when they are
    groups: tuple[int, ...] | None = None   # per seed, its pretrained backbone (None: one backbone)

    def values(self) -> np.ndarray:
        return self.num.sum(1) / self.den.sum(1)

    def seeds_only(self, note: str) -> Sample:
        v = self.values()[:, None]
        return Sample(self.seeds, v, np.ones_like(v), "", self.note or note, self.groups)

    def on_backbones(self, n_backbones: int) -> Sample:
        """This sample with each seed's backbone (`ptf.models.backbones`: seed mod N; the keys
        are "seed3" or "3", `seed_number`), so that the bootstrap resamples backbones."""
        if n_backbones < 2:
            return self
        groups = tuple(backbone_index(seed_number(k), n_backbones) for k in self.seeds)
        return replace(self, groups=groups)


def seed_sample(values: Mapping[str, float], note: str = "") -> Sample:
    seeds = tuple(sorted(values))
    v = np.asarray([[values[s]] for s in seeds], dtype=np.float64).reshape(len(seeds), 1)
    return Sample(seeds, v, np.ones_like(v), "", note)


def prediction_sample(predictions: Mapping[str, Sequence[int]], labels: Sequence[int]) -> Sample:
    seeds = tuple(sorted(predictions))
    y = np.asarray(labels)
    num = np.asarray([np.asarray(predictions[s]) == y for s in seeds], dtype=np.float64)
    return Sample(seeds, num, np.ones_like(num), "test examples")


def block_sample(ft_sums: Mapping[str, np.ndarray], base_of: Callable[[str], np.ndarray],
                 counts: np.ndarray) -> Sample:
    """Delta LM loss: per seed, (sum of fine-tuned - pretrained NLL) / tokens over the blocks.

    In: `ft_sums` {seed key: the fine-tuned model's per-block summed NLL}, `base_of(seed key)`:
    the per-block sums of the pretrained backbone that seed started from (one backbone:
    `lambda _k: base_sums`), `counts`: per-block scored tokens. Out: the seeds' Sample over
    the held-out blocks."""
    seeds = tuple(sorted(ft_sums))
    num = np.asarray([np.asarray(ft_sums[s], dtype=np.float64) - np.asarray(base_of(s), dtype=np.float64)
                      for s in seeds])
    den = np.broadcast_to(np.asarray(counts, dtype=np.float64), num.shape).copy()
    return Sample(seeds, num, den, "held-out blocks")


def _draw(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """resamples x n counts: how often each of n items is drawn in each resample of size n."""
    idx = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(idx.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def _draw_seeds(rng: np.random.Generator, resamples: int, s: Sample) -> np.ndarray:
    """resamples x seeds counts. One backbone: the seeds drawn with replacement. Several: a
    two-stage draw (the backbones with replacement, then for each drawn backbone its seeds with
    replacement), so that the spread includes pretraining variance, not only fine-tuning's."""
    if s.groups is None or len(set(s.groups)) < 2:
        return _draw(rng, resamples, len(s.seeds))
    groups = np.asarray(s.groups)
    names = sorted(set(s.groups))
    picked = _draw(rng, resamples, len(names))          # how often each backbone is drawn
    out = np.zeros((resamples, len(s.seeds)))
    for gi, g in enumerate(names):
        members = np.flatnonzero(groups == g)
        for k in range(1, int(picked[:, gi].max()) + 1):
            draw = _draw(rng, resamples, len(members))
            out[:, members] += draw * (picked[:, gi] >= k)[:, None]
    return out


def _stat(s: Sample, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mean over the drawn seeds (counts `v`) of each seed's value on the drawn units (`w`)."""
    per_seed = (w @ np.ascontiguousarray(s.num.T)) / (w @ np.ascontiguousarray(s.den.T))
    return (v * per_seed).sum(1) / v.sum(1)


def paired_bootstrap(a: Sample, b: Sample, resamples: int, rng: np.random.Generator) -> dict[str, Any]:
    """The difference mean(a) - mean(b) over seeds, its bootstrap standard error and df."""
    if a.units != b.units or a.num.shape[1] != b.num.shape[1]:
        why = next((x.note for x in (a, b) if x.note), "per-example data missing for one arm")
        a, b = a.seeds_only(why), b.seeds_only(why)
    note = a.note or b.note
    resampled = f"seeds and {a.units}" if a.units else "seeds only" + (f" ({note})" if note else "")
    if a.groups is not None and len(set(a.groups)) > 1:
        resampled = "pretrained backbones, " + resampled
    n = min(len(a.seeds), len(b.seeds))
    ones = np.ones((1, a.num.shape[1]))
    diff = float(_stat(a, ones, np.ones((1, len(a.seeds))))[0] - _stat(b, ones, np.ones((1, len(b.seeds))))[0])
    out = {"diff": diff, "se": None, "df": max(n - 1, 0), "seeds": n,
           **({"backbones": len(set(a.groups))} if a.groups is not None else {}),
           "paired_seeds": a.seeds == b.seeds, "resampled": resampled}
    if n < 2:
        return {**out, "reason": "fewer than 2 seeds"}
    w = _draw(rng, resamples, a.num.shape[1]) if a.num.shape[1] > 1 else np.ones((resamples, 1))
    va = _draw_seeds(rng, resamples, a)
    vb = va if out["paired_seeds"] else _draw_seeds(rng, resamples, b)
    boot = _stat(a, w, va) - _stat(b, w, vb)
    out["se"] = float(boot.std(ddof=1) * math.sqrt(n / (n - 1)))
    return out


def comparison_rng(seed: int, key: str) -> np.random.Generator:
    """One generator per comparison: its resamples do not depend on what else is compared."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def missing(reason: str) -> dict[str, Any]:
    return {"diff": None, "se": None, "df": 0, "seeds": 0, "resampled": None,
            "reason": f"missing data: {reason}"}


def holm(comps: dict[str, dict[str, Any]], expect: str, alpha: float, field: str = "verdict") -> None:
    """Holm-corrected intervals and verdicts, in place, for the claim "a - b > 0" (`expect`
    "greater") or "< 0" ("less"); comparisons without a standard error are inconclusive."""
    if expect not in ("greater", "less"):
        raise ValueError(f"expect must be 'greater' or 'less', got {expect!r}")
    p: dict[str, float] = {}
    for k, c in comps.items():
        if c.get("se") is None:
            c.update({"p": None, "p_holm": None, "ci": None, "ci_level": None, field: INCONCLUSIVE})
        elif c["se"] == 0:
            p[k] = 0.0 if c["diff"] != 0 else 1.0
        else:
            p[k] = t_two_sided_p(c["diff"] / c["se"], c["df"])
    order = sorted(p, key=lambda k: (p[k], k))
    m, going, p_holm = len(order), True, 0.0
    for rank, k in enumerate(order):
        c = comps[k]
        a_k = alpha / (m - rank)
        half = t_critical(a_k, c["df"]) * c["se"] if c["se"] > 0 else 0.0
        ci = [c["diff"] - half, c["diff"] + half]
        p_holm = max(p_holm, min(1.0, (m - rank) * p[k]))
        decisive = going and (ci[0] > 0 or ci[1] < 0)
        if decisive:
            verdict, reason = (REPRODUCED if (c["diff"] > 0) == (expect == "greater") else NOT_REPRODUCED), ""
        else:
            verdict = INCONCLUSIVE
            reason = ("Holm: a comparison with a smaller p-value was inconclusive" if not going
                      else "the corrected interval contains 0")
            going = False
        c.update({"p": p[k], "p_holm": p_holm, "ci": ci, "ci_level": 1 - a_k, field: verdict})
        if field == "verdict":
            c["reason"] = reason


def overall(verdicts: Sequence[str]) -> dict[str, Any]:
    """A claim's verdict from its comparisons' verdicts, and their counts."""
    counts = {v: sum(x == v for x in verdicts) for v in VERDICTS}
    n = len(verdicts)
    if n and counts[REPRODUCED] == n:
        verdict = REPRODUCED
    elif counts[NOT_REPRODUCED]:
        verdict = NOT_REPRODUCED
    elif counts[REPRODUCED]:
        verdict = PARTLY
    else:
        verdict = INCONCLUSIVE
    return {"verdict": verdict, "counts": {**counts, "total": n}}


def by_task(comps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{task: overall(...)} of each task's comparisons (their Holm-corrected verdicts: the
    correction runs over the whole claim, every task together)."""
    tasks = sorted({str(c.get("task") or "") for c in comps.values()})
    return {t: overall([c["verdict"] for c in comps.values() if str(c.get("task") or "") == t]) for t in tasks}


def _claim(text: str, comps: dict[str, dict[str, Any]], cfg, why_empty: str) -> dict[str, Any]:
    res = overall([c["verdict"] for c in comps.values()])
    return {"claim": text, "rule": rule(cfg.alpha, cfg.bootstrap_resamples, cfg.bootstrap_seed),
            "alpha": cfg.alpha, "comparisons": comps, "by_task": by_task(comps), **res,
            **({"missing": why_empty} if not comps else {})}


# ---------------------------------------------------------------- the two claims

def claim_few_labels(curves: list[dict[str, Any]], cfg, n_backbones: int = 1) -> dict[str, Any]:
    """Claim 1 on the curves: at each task's smallest fraction, each of `few_label_strategies`
    has a higher test accuracy than `scratch_strategy` (per-seed accuracies: seeds only; with
    `n_backbones` > 1 the backbones too)."""
    comps: dict[str, dict[str, Any]] = {}
    note = "curves.csv records per-seed accuracies only"
    for task in sorted({r["task"] for r in curves}):
        rows = [r for r in curves if r["task"] == task]
        fmin = min(r["fraction"] for r in rows)
        at = [r for r in rows if r["fraction"] == fmin]
        scratch = {r["seed"]: r["test_accuracy"] for r in at if r["strategy"] == cfg.scratch_strategy}
        for s in cfg.few_label_strategies:
            arm = {r["seed"]: r["test_accuracy"] for r in at if r["strategy"] == s}
            key = f"{task or 'all'}/{s}"
            if arm and scratch:
                test = paired_bootstrap(seed_sample(arm, note).on_backbones(n_backbones),
                                        seed_sample(scratch, note).on_backbones(n_backbones),
                                        cfg.bootstrap_resamples, comparison_rng(cfg.bootstrap_seed, key))
            else:
                test = missing(f"no curves rows of {s if not arm else cfg.scratch_strategy} "
                               f"at fraction {fmin:g}")
            comps[key] = {"task": task, "strategy": s, "fraction": fmin,
                          "n_labels": sorted({r["n_labels"] for r in at}),
                          "accuracy": mean_std(list(arm.values())),
                          "scratch_accuracy": mean_std(list(scratch.values())), **test}
    holm(comps, "greater", cfg.alpha)
    return _claim(f"pretrained ({', '.join(cfg.few_label_strategies)}) beats {cfg.scratch_strategy} "
                  "at the smallest label fraction", comps, cfg, "no curves.csv")


def claim_forget_less(tasks: dict[str, dict[str, Any]], samples: dict[tuple[str, str], dict[str, Sample]],
                      cfg, not_applicable: str | None = None) -> dict[str, Any]:
    """Claim 2: each compared arm's delta LM loss is below the reference's (`samples[(task, s)]
    ["delta"]`), with its accuracy cost (`["accuracy"]`, Holm-corrected as a family of its own).
    `not_applicable`: why no LM drift exists (a pretrained model without an LM head): the claim
    is then not measured (no comparison, inconclusive, `missing` says why)."""
    comps: dict[str, dict[str, Any]] = {}
    costs: dict[str, dict[str, Any]] = {}
    ref = cfg.reference_strategy
    text = f"the other strategies forget less than {ref} (smaller Δ held-out LM loss)"
    if not_applicable is not None:
        return {**_claim(text, comps, cfg, f"not measured on LM drift: {not_applicable}"), "applicable": False}
    for task in sorted(tasks):
        arms = tasks[task]
        if ref not in arms:
            continue
        names = cfg.forget_less_strategies or [s for s in sorted(arms) if s not in (ref, cfg.scratch_strategy)]
        for s in (n for n in names if n in arms):
            key = f"{task}/{s}"
            rng = comparison_rng(cfg.bootstrap_seed, key)
            test = paired_bootstrap(samples[(task, s)]["delta"], samples[(task, ref)]["delta"],
                                    cfg.bootstrap_resamples, rng)
            costs[key] = paired_bootstrap(samples[(task, s)]["accuracy"], samples[(task, ref)]["accuracy"],
                                          cfg.bootstrap_resamples, rng)
            comps[key] = {"task": task, "strategy": s, "delta_loss": arms[s]["mean_std"]["delta_loss"],
                          "reference_delta_loss": arms[ref]["mean_std"]["delta_loss"], **test}
    holm(comps, "less", cfg.alpha)
    holm(costs, "less", cfg.alpha, field="verdict_lower_accuracy")
    for key, cost in costs.items():
        comps[key]["accuracy_cost"] = cost
    compared = sorted({c["strategy"] for c in comps.values()})
    return _claim(f"{', '.join(compared) or 'the other strategies'} "
                  f"{'forgets' if len(compared) == 1 else 'forget'} less than {ref} "
                  "(smaller Δ held-out LM loss)", comps, cfg,
                  f"{ref} or every compared strategy is not in the declared matrix")
