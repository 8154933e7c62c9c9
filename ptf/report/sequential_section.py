"""The sequential runs in Markdown (no CLI, no I/O): shared by the forgetting summary and the
results page.

In:  forgetting.json's `sequential` block (`ptf.measures.sequential.sequential_block`: `groups`
     per strategy x order and `strategies` pooled over orders, each with `mean_std` over seeds).
Out: `measures_table(block)` (one row per strategy x order and per strategy pooled: seeds,
     ACC, BWT, FWT, forgetting, majority-adjusted ACC/BWT/FWT, forgetting events per task),
     `events_table(block)` (per strategy x order x task: events, examples forgotten at least
     once, share never forgotten), `matrix_tables(block)` (the mean matrix of each group),
     `sentences(block, reference)` (from `ptf.report.prose`), `section(block, fig)` (the page's).
Every cell is a mean ± sample std over seeds of the block; a strategy's pooled row is the mean
over orders per seed, then mean ± std over seeds.
"""
from __future__ import annotations

from typing import Any

from ptf.report import prose
from ptf.report.fmt import plural, pm, table

MEASURES = (("ACC", "acc", False), ("BWT", "bwt", True), ("FWT", "fwt", True),
            ("forgetting", "avg_forgetting", False), ("ACC adj", "acc_adj", False),
            ("BWT adj", "bwt_adj", True), ("FWT adj", "fwt_adj", True))


def _arrow(order: list[str]) -> str:
    return " → ".join(map(str, order))


def _row(strategy: str, order: str, ms: dict[str, Any], tasks: list[str]) -> list[str]:
    n = max((v.get("n") or 0 for v in ms.values()), default=0)
    return [f"`{strategy}`", order, str(n), *[pm(ms.get(k), sign=s) for _, k, s in MEASURES],
            *[pm(ms.get(f"events.{t}"), 1) if (ms.get(f"events.{t}") or {}).get("n") else "—" for t in tasks]]


def measures_table(block: dict[str, Any]) -> list[str]:
    tasks = [str(t) for t in block.get("tasks") or []]
    rows = [_row(g["strategy"], _arrow(g["order"]), g["mean_std"], tasks) for g in block["groups"].values()]
    rows += [_row(s["strategy"], f"pooled over {plural(len(s['orders']), 'order')}", s["mean_std"], tasks)
             for s in block["strategies"].values()]
    return table(["strategy", "order", "seeds", *[h for h, _, _ in MEASURES], *[f"events {t}" for t in tasks]],
                 rows)


def events_table(block: dict[str, Any]) -> list[str]:
    rows = []
    for g in block["groups"].values():
        ms = g["mean_std"]
        for t in g["order"][:-1]:       # the last task of an order has no later evaluation
            rows.append([f"`{g['strategy']}`", _arrow(g["order"]), str(t), pm(ms.get(f"events.{t}"), 1),
                         pm(ms.get(f"forgotten.{t}"), 1), pm(ms.get(f"never_forgotten.{t}"), 1, scale=100)])
    return table(["strategy", "order", "task", "forgetting events", "examples forgotten ≥ 1",
                  "never forgotten %"], rows)


def matrix_tables(block: dict[str, Any]) -> list[str]:
    L: list[str] = []
    for g in block["groups"].values():
        order = [str(t) for t in g["order"]]
        labels = ["before"] + [f"after {t}" for t in order]
        L += ["", f"`{g['strategy']}`, {_arrow(order)} (mean over {len(g['seeds'])} seeds):", ""]
        L += table(["", *order], [[labels[i], *[f"{a:.3f}" for a in row]] for i, row in enumerate(g["matrix"])])
    return L


def sentences(block: dict[str, Any], reference: str) -> list[str]:
    out = []
    for g in block["groups"].values():
        said = prose.bwt_sentences(g)
        if said:
            out.append(f"`{g['strategy']}`, {_arrow(g['order'])}: " + " ".join(said))
    return out + prose.strategy_sentences(block["strategies"], reference)


DEFINITIONS = (
    "R[i][j] = test accuracy on task j after training the first i tasks of the order (row 0: before any "
    "training, pretrained backbone with fresh heads). ACC = mean final accuracy; BWT = mean change of each "
    "earlier task from just after learning it to the end (< 0: forgotten); FWT = accuracy on a task "
    "before training it minus the same architecture's at random initialisation with the same heads "
    "(GEM, Lopez-Paz & Ranzato 2017); forgetting = Chaudhry et al.'s mean drop from the best earlier "
    "accuracy; *adj* = the same on majority-adjusted accuracies (a − m) / (1 − m), m the task's "
    "majority-class rate on test; events = Toneva et al. (2019) forgetting events, examples correct at "
    "one evaluation and wrong at the next, from the row where the task was just learned on. Mean ± "
    "sample std over seeds; a pooled row averages the orders per seed first.")


def section(block: dict[str, Any] | None, reference: str, fig: str = "figures") -> list[str]:
    """The results page's section on the sequential runs."""
    L = ["## Sequential fine-tuning: accuracy matrices and forgetting", ""]
    if not block:
        return L + ["No sequential run in `data/metrics/sequential.json`."]
    L += [DEFINITIONS + " (`data/metrics/sequential.json`, `data/metrics/forgetting.json` `sequential`)", ""]
    L += measures_table(block) + [""] + [" ".join(sentences(block, reference))]
    L += ["", "Forgetting events per task:", ""] + events_table(block)
    L += matrix_tables(block)
    return L + ["", f"![Accuracy matrices of the sequential runs, mean over seeds]({fig}/accuracy_matrix.png)"]
