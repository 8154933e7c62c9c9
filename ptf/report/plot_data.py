"""Plot data of the forgetting stage (no CLI, no I/O): the rows of its DVC plot CSVs.

tradeoff.csv: one point per task x strategy with drift (x = delta LM loss, y = gain, mean and
std over seeds), and one per WiSE-FT alpha (strategy "wise_ft a=<alpha>", "*" on the alpha chosen
on validation); learning_curves.csv: curves.csv averaged over seeds; accuracy_matrix.csv: the
sequential accuracy matrices (mean over seeds per strategy x order) in long format.
"""
from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from ptf.measures.stats import mean_std

TRADEOFF_COLUMNS = ["task", "strategy", "delta_loss", "delta_loss_std", "gain", "gain_std",
                    "test_accuracy", "trainable_pct", "seeds"]
CURVES_COLUMNS = ["series", "task", "strategy", "fraction", "n_labels", "test_accuracy", "std", "seeds"]
MATRIX_COLUMNS = ["run", "after", "task", "accuracy", "accuracy_majority_adjusted", "seeds"]


def _point(task: str, strategy: str, ms: dict[str, Any], gkey: str) -> dict[str, Any]:
    tf = ms["trainable_fraction"]["mean"]
    return {"task": task, "strategy": strategy,
            "delta_loss": ms["delta_loss"]["mean"], "delta_loss_std": ms["delta_loss"]["std"],
            "gain": ms[gkey]["mean"], "gain_std": ms[gkey]["std"],
            "test_accuracy": ms["test_accuracy"]["mean"],
            "trainable_pct": 100 * tf if tf is not None else None, "seeds": ms["delta_loss"]["n"]}


def wise_ft_label(alpha: float, chosen: bool) -> str:
    return f"wise_ft a={alpha:g}" + ("*" if chosen else "")


def tradeoff_rows(tasks: dict[str, dict[str, Any]], gain: str,
                  wise: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One point per task x strategy with drift, and one per WiSE-FT alpha with drift (`wise`: the
    forgetting result's `wise_ft`; its chosen arm in `tasks` is not repeated); `gain` is
    "chance" or "scratch"."""
    rows = []
    gkey = "gain_over_chance" if gain == "chance" else "gain_over_scratch"
    for task in sorted(tasks):
        for s in sorted(tasks[task]):
            a = tasks[task][s]
            ms = a["mean_std"]
            if (s == "wise_ft" or not a["drift_applicable"] or ms["delta_loss"]["mean"] is None
                    or ms[gkey]["mean"] is None):
                continue
            rows.append(_point(task, s, ms, gkey))
    for p in ((wise or {}).get("points") or {}).values():
        if p["mean_std"][gkey]["mean"] is not None and p["mean_std"]["delta_loss"]["mean"] is not None:
            rows.append(_point(wise["task"], wise_ft_label(p["alpha"], p["chosen"]), p["mean_std"], gkey))
    return rows


def curve_rows(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """curves.csv averaged over seeds: one row per task x strategy x fraction."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in curves:
        groups.setdefault((r["task"], r["strategy"], r["fraction"]), []).append(r)
    out = []
    for (task, s, frac), rs in sorted(groups.items()):
        ms = mean_std([r["test_accuracy"] for r in rs])
        out.append({"series": f"{task}/{s}" if task else s, "task": task, "strategy": s,
                    "fraction": frac, "n_labels": int(round(float(np.mean([r["n_labels"] for r in rs])))),
                    "test_accuracy": ms["mean"], "std": ms["std"], "seeds": ms["n"]})
    return out


def matrix_rows(sequential: dict[str, Any]) -> list[dict[str, Any]]:
    """Long format of every strategy x order's matrix, mean over its seeds: one row per
    (after, task) cell; `run` is "<strategy>/<t1-t2-..>", `after` "<run> <i> after <task>"."""
    rows = []
    for name, g in (sequential.get("groups") or {}).items():
        raw, adj, order = g["matrix"], g["matrix_majority_adjusted"], [str(t) for t in g["order"]]
        after = ["0 before"] + [f"{i} after {order[i - 1]}" for i in range(1, len(order) + 1)]
        for i, row in enumerate(raw):
            for j, a in enumerate(row):   # one heatmap: a row per group x step, a column per task
                rows.append({"run": name, "after": f"{name} {after[i]}", "task": order[j], "accuracy": a,
                             "accuracy_majority_adjusted": adj[i][j], "seeds": len(g["seeds"])})
    return rows


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})
    return buf.getvalue()
