"""The sequential runs' measures, per run and over seeds (no CLI, no I/O).

In:  the object of data/metrics/sequential.json as `ptf.measures.outputs.read_sequential`
     returns it (one run per order x strategy x seed, with its matrix, per-example test
     correctness, and the tasks' majority rates and random-init accuracies per seed).
Out: `sequential_block(obj)` -> forgetting.json's `sequential`:
       {"fwt_reference", "adjustment",
        "runs":       {"<strategy>/<t1-t2-..>/seed<k>": {strategy, order, seed, majority,
                       random_init, n_classes, raw, majority_adjusted, events, scalars}},
        "groups":     {"<strategy>/<t1-t2-..>": {strategy, order, seeds, mean_std, matrix,
                       matrix_majority_adjusted}},
        "strategies": {"<strategy>": {strategy, orders, seeds, mean_std}}}
     `scalars` are the numbers a table shows (SCALARS, and per task `events.<t>`,
     `forgotten.<t>`, `never_forgotten.<t>`, `learned_above_majority.<t>`); a group's `mean_std`
     is `ptf.measures.stats.mean_std` of each over its seeds, `matrix` the mean matrix over seeds;
     a strategy's `mean_std` pools its orders: per seed the mean over orders, then mean ± std
     over seeds (n = seeds). `{}` when there is no sequential run.
The measures themselves are `ptf.measures.cl_metrics` (GEM ACC/BWT/FWT with the random-init
reference, Chaudhry forgetting, majority adjustment, Toneva forgetting events).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ptf.common.cli import StageError
from ptf.measures import cl_metrics as cl
from ptf.measures.stats import mean_std

SCALARS = ("acc", "bwt", "fwt", "avg_forgetting", "acc_adj", "bwt_adj", "fwt_adj", "avg_forgetting_adj")
PER_TASK = ("events", "forgotten", "never_forgotten", "learned_above_majority")
FWT_REFERENCE = ("GEM (Lopez-Paz & Ranzato 2017): test accuracy of the same architecture at random "
                 "initialisation (no pretraining) with the run's untrained heads, per seed")
ADJUSTMENT = "a' = (a - m) / (1 - m), m the majority-class rate of the task's test split"


def order_key(order: list[str]) -> str:
    return "-".join(order)


def group_key(strategy: str, order: list[str]) -> str:
    return f"{strategy}/{order_key(order)}"


def run_key(strategy: str, order: list[str], seed: int) -> str:
    return f"{group_key(strategy, order)}/seed{seed}"


def run_measures(run: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """One run's measures, raw and majority-adjusted, its forgetting events and `scalars`."""
    order, seed = run["order"], run["seed"]
    majority = [obj["majority"][t] for t in order]
    base = [obj["random_init"][str(seed)][t] for t in order]
    m = cl.sequential_measures(run["matrix"], majority=majority, baseline=base)
    events = dict(zip(order, cl.forgetting_events(run["correct"])))
    r, a = m["raw"], m["majority_adjusted"]
    scalars: dict[str, Any] = {k: r[k] for k in ("acc", "bwt", "fwt", "avg_forgetting")}
    scalars.update({f"{k}_adj": a[k] for k in ("acc", "bwt", "fwt", "avg_forgetting")})
    for t, la, mj in zip(order, r["learning_accuracy"], majority):
        ev = events[t] or {}
        scalars.update({f"events.{t}": ev.get("events"), f"forgotten.{t}": ev.get("forgotten"),
                        f"never_forgotten.{t}": ev.get("never_forgotten"),
                        f"learned_above_majority.{t}": la - mj})
    return {"strategy": run["strategy"], "order": order, "seed": seed, "majority": majority,
            "random_init": base, "n_classes": [obj["n_classes"][t] for t in order],
            **m, "fwt_baseline": "random init", "events": events, "scalars": scalars}


def _stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: mean_std([r.get(k) for r in records]) for k in keys}


def _mean_over_orders(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's scalars averaged over its orders (a task last in an order has no events there:
    the mean is over the orders that measure it)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: mean_std([r.get(k) for r in records])["mean"] for k in keys}


def sequential_block(obj: dict[str, Any] | None) -> dict[str, Any]:
    """forgetting.json's `sequential` (see the module docstring)."""
    if obj is None:
        return {}
    runs: dict[str, Any] = {}
    for r in obj["runs"]:
        key = run_key(r["strategy"], r["order"], r["seed"])
        try:
            runs[key] = run_measures(r, obj)
        except cl.MatrixError as e:
            raise StageError(f"sequential run {key!r}: {e}") from None
    groups: dict[str, Any] = {}
    for s in obj["strategies"]:
        for o in obj["orders"]:
            rs = [m for m in runs.values() if m["strategy"] == s and m["order"] == o]
            if not rs:
                continue
            groups[group_key(s, o)] = {
                "strategy": s, "order": o, "seeds": [m["seed"] for m in rs],
                "mean_std": _stats([m["scalars"] for m in rs]),
                "matrix": np.mean([m["raw"]["matrix"] for m in rs], axis=0).tolist(),
                "matrix_majority_adjusted": np.mean([m["majority_adjusted"]["matrix"] for m in rs],
                                                    axis=0).tolist()}
    strategies: dict[str, Any] = {}
    for s in obj["strategies"]:
        per_seed = [_mean_over_orders([m["scalars"] for m in runs.values()
                                       if m["strategy"] == s and m["seed"] == seed])
                    for seed in obj["seeds"]]
        strategies[s] = {"strategy": s, "orders": obj["orders"], "seeds": list(obj["seeds"]),
                         "mean_std": _stats(per_seed)}
    return {"fwt_reference": FWT_REFERENCE, "adjustment": ADJUSTMENT, "tasks": obj["tasks"],
            "majority": obj["majority"], "runs": runs, "groups": groups, "strategies": strategies}
