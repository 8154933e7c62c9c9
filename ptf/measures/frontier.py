"""Learning-forgetting frontiers and the verdicts decided on them (no CLI, no torch, no I/O).

In:  the sweep stage's records of one task (`data/metrics/sweep/<task>/<strategy>.json`: per
     configuration and seed, validation / test accuracy, test predictions and the per-block
     summed NLL of the held-out blocks), the task's majority-class rate on validation, and the
     decision parameters (reference strategy, levels, alpha, bootstrap resamples and seed).
Out: per strategy its configurations' points and its Pareto frontier; the comparisons of claim 2
     ("strategy X forgets less than the reference") at matched accuracy and at each strategy's
     validation-best point, with paired-bootstrap intervals, Holm-corrected within each claim
     (`ptf.measures.claims`: the same statistics as the forgetting stage's claims). JSON-ready.

Protocol (every choice on validation data):
- A configuration's accuracy is its mean over seeds of the validation accuracy at its best
  validation step; its forgetting the mean over seeds of the Δ held-out LM loss (nats/token,
  pooled over blocks) against the pretrained model.
- The held-out blocks are split in two halves by position (even: `select`, odd: `report`).
  Choices use the `select` half (the frontier, the configuration chosen at a level); the
  intervals and the reported Δ use the `report` half, so that picking the least-forgetting of
  many configurations does not bias the number that is reported (a strategy with more
  configurations would otherwise get more chances at a lucky low).
- The frontier: the configurations that no other of the same strategy beats on both accuracy
  (higher or equal) and forgetting (lower or equal, one strictly better).
- Matched accuracy: for strategy X and the reference, the levels are `lo + q (top - lo)` for each
  q of `levels`, lo the majority rate, top the lower of the two strategies' best accuracies, so
  both reach every level. At a level, each strategy's configuration is its least-forgetting one
  (select half) among those whose accuracy reaches the level. X's and the reference's chosen
  configurations are compared on the report half (Δ LM loss, seeds and blocks resampled) and on
  test accuracy (its cost; seeds and test examples resampled).
- Validation-best: each strategy's configuration of highest accuracy (ties: less forgetting on the
  select half, then the key), compared with the reference's the same way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ptf.measures.claims import (Sample, _claim, block_sample, comparison_rng, holm, paired_bootstrap,
                                 prediction_sample)

HALVES = ("select", "report")


def half_index(n_blocks: int, half: str) -> np.ndarray:
    """Positions of the `select` (even) or `report` (odd) half of `n_blocks` held-out blocks."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    return np.arange(0 if half == "select" else 1, n_blocks, 2)


def _seed_delta(lm_sums: Sequence[float], base: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> float:
    return float((np.asarray(lm_sums, dtype=np.float64)[idx] - base[idx]).sum() / counts[idx].sum())


def base_of(sweep: Mapping[str, Any], rec: Mapping[str, Any]) -> np.ndarray:
    """A seed record's pretrained reference sums: its own when it started from another backbone
    than the first (stages/sweep.py), else the sweep's."""
    return np.asarray(rec.get("base_sums") or sweep["blocks"]["base_sums"], dtype=np.float64)


def points(sweep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One point per configuration: its grid values, mean validation / test accuracy over seeds,
    and mean Δ LM loss on each half and on all blocks."""
    base = np.asarray(sweep["blocks"]["base_sums"], dtype=np.float64)
    counts = np.asarray(sweep["blocks"]["counts"], dtype=np.float64)
    idx = {h: half_index(len(base), h) for h in HALVES} | {"all": np.arange(len(base))}
    out = []
    for key, c in sweep["configs"].items():
        seeds = c["seeds"]
        p = {"key": key, "lr": c["lr"], "steps": c["steps"], "knob": c["knob"], "value": c["value"],
             "seeds": sorted(seeds, key=int),
             "val_accuracy": float(np.mean([r["val_accuracy"] for r in seeds.values()])),
             "test_accuracy": float(np.mean([r["test_accuracy"] for r in seeds.values()]))}
        for h, ix in idx.items():
            p[f"delta_{h}"] = float(np.mean([_seed_delta(r["lm_sums"], base_of(sweep, r), counts, ix)
                                             for r in seeds.values()]))
        p["unchanged"] = all(np.array_equal(np.asarray(r["lm_sums"], dtype=np.float64), base_of(sweep, r))
                             for r in seeds.values())
        out.append(p)
    return out


def pareto(pts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys of the non-dominated points (higher accuracy, lower select-half Δ), by accuracy
    ascending."""
    keep = []
    for p in pts:
        dominated = any(q["val_accuracy"] >= p["val_accuracy"] and q["delta_select"] <= p["delta_select"]
                        and (q["val_accuracy"] > p["val_accuracy"] or q["delta_select"] < p["delta_select"])
                        for q in pts)
        if not dominated:
            keep.append(p)
    return [p["key"] for p in sorted(keep, key=lambda p: (p["val_accuracy"], p["key"]))]


def at_level(pts: Sequence[Mapping[str, Any]], level: float) -> Mapping[str, Any] | None:
    """The least-forgetting point (select half) whose accuracy reaches `level` (ties: higher
    accuracy, then the key); None when none does."""
    ok = [p for p in pts if p["val_accuracy"] >= level]
    return min(ok, key=lambda p: (p["delta_select"], -p["val_accuracy"], p["key"])) if ok else None


def val_best(pts: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The point of highest accuracy (ties: lower select-half Δ, then the key)."""
    return min(pts, key=lambda p: (-p["val_accuracy"], p["delta_select"], p["key"]))


def matched_levels(majority: float, top_a: float, top_b: float, qs: Sequence[float]) -> list[float]:
    """Accuracy levels both strategies reach, above the majority rate; [] when one of them never
    rises above it."""
    top = min(top_a, top_b)
    if top <= majority:
        return []
    return [majority + q * (top - majority) for q in qs]


def _samples(sweep: Mapping[str, Any], key: str) -> dict[str, Sample]:
    """A configuration's report-half Δ and its test correctness, per seed."""
    c = sweep["configs"][key]["seeds"]
    base = np.asarray(sweep["blocks"]["base_sums"], dtype=np.float64)
    counts = np.asarray(sweep["blocks"]["counts"], dtype=np.float64)
    ix = half_index(len(base), "report")
    n = len(sweep.get("backbones") or [None])
    return {"delta": block_sample({s: np.asarray(r["lm_sums"], dtype=np.float64)[ix] for s, r in c.items()},
                                  lambda s: base_of(sweep, c[s])[ix], counts[ix]).on_backbones(n),
            "accuracy": prediction_sample({s: r["test_predictions"] for s, r in c.items()},
                                          sweep["test_labels"]).on_backbones(n)}


def _compare(task: str, strategy: str, tag: str, a: tuple[Mapping, Mapping[str, Any]],
             b: tuple[Mapping, Mapping[str, Any]], cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Δ comparison of point a vs point b, its test-accuracy cost): a, b = (sweep, point)."""
    key = f"{task}/{strategy}/{tag}"
    rng = comparison_rng(cfg.bootstrap_seed, key)
    sa, sb = _samples(a[0], a[1]["key"]), _samples(b[0], b[1]["key"])
    test = paired_bootstrap(sa["delta"], sb["delta"], cfg.bootstrap_resamples, rng)
    cost = paired_bootstrap(sa["accuracy"], sb["accuracy"], cfg.bootstrap_resamples, rng)
    comp = {"task": task, "strategy": strategy, "at": tag, "config": a[1]["key"], "reference_config": b[1]["key"],
            "val_accuracy": a[1]["val_accuracy"], "reference_val_accuracy": b[1]["val_accuracy"],
            "test_accuracy": a[1]["test_accuracy"], "reference_test_accuracy": b[1]["test_accuracy"],
            "delta_loss": a[1]["delta_report"], "reference_delta_loss": b[1]["delta_report"],
            "unchanged_backbone": a[1]["unchanged"], **test}
    return comp, cost


def _finish(text: str, comps: dict[str, dict[str, Any]], costs: dict[str, dict[str, Any]], cfg,
            why_empty: str) -> dict[str, Any]:
    """Holm over the Δ comparisons and, as a family of its own, over their accuracy costs; the
    claim record as the forgetting stage's claims have it (`ptf.measures.claims._claim`)."""
    holm(comps, "less", cfg.alpha)
    holm(costs, "less", cfg.alpha, field="verdict_lower_accuracy")
    for k, c in costs.items():
        comps[k]["accuracy_cost"] = c
    return _claim(text, comps, cfg, why_empty)


def task_frontiers(sweeps: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{strategy: {points, frontier, val_best}} of one task."""
    out = {}
    for s, sw in sorted(sweeps.items()):
        pts = points(sw)
        out[s] = {"points": pts, "frontier": pareto(pts), "val_best": val_best(pts)["key"]}
    return out


def claims(tasks: Mapping[str, Mapping[str, Mapping[str, Any]]], majority: Mapping[str, float], cfg,
           qs: Sequence[float]) -> dict[str, dict[str, Any]]:
    """The two forms of claim 2 over every task: `matched` (at matched accuracy levels) and
    `val_best` (at each strategy's validation-best point). `tasks[task][strategy]` is that
    strategy's sweep record; `cfg` has reference_strategy, alpha, bootstrap_resamples,
    bootstrap_seed."""
    ref = cfg.reference_strategy
    m_comps: dict[str, dict[str, Any]] = {}
    m_costs: dict[str, dict[str, Any]] = {}
    b_comps: dict[str, dict[str, Any]] = {}
    b_costs: dict[str, dict[str, Any]] = {}
    for task in sorted(tasks):
        sweeps = tasks[task]
        if ref not in sweeps:
            continue
        pts = {s: points(sw) for s, sw in sweeps.items()}
        ref_best = val_best(pts[ref])
        for s in sorted(x for x in sweeps if x != ref):
            best = val_best(pts[s])
            b_comps[f"{task}/{s}/val_best"], b_costs[f"{task}/{s}/val_best"] = _compare(
                task, s, "val_best", (sweeps[s], best), (sweeps[ref], ref_best), cfg)
            lv = matched_levels(majority[task], best["val_accuracy"], ref_best["val_accuracy"], qs)
            for q, level in zip(qs, lv):
                a, b = at_level(pts[s], level), at_level(pts[ref], level)
                tag = f"level {q:g}"
                comp, cost = _compare(task, s, tag, (sweeps[s], a), (sweeps[ref], b), cfg)
                comp.update(level=level, q=q)
                m_comps[f"{task}/{s}/{tag}"], m_costs[f"{task}/{s}/{tag}"] = comp, cost
    text = f"the other strategies forget less than {ref} (Δ held-out LM loss)"
    return {"matched": _finish(f"{text}, at matched validation accuracy", m_comps, m_costs, cfg,
                               f"no sweep of {ref}, or no strategy rises above the majority rate"),
            "val_best": _finish(f"{text}, each at its validation-best configuration", b_comps, b_costs, cfg,
                                f"no sweep of {ref} beside another strategy")}
