"""Learning-forgetting frontiers of the sweep, and claim 2 decided on them (stage `frontier`).

In:  data/metrics/sweep/<task>/<strategy>.json for every item of `sweep.runs` (each must hold
     every configuration and seed its grid declares), data/metrics/baselines.json (each task's
     majority-class rate on validation), params: `sweep` (runs, seeds, lengths, grids, levels)
     and the forgetting stage's decision keys (`reference_strategy`, `alpha`,
     `bootstrap_resamples`, `bootstrap_seed`).
Out: data/metrics/frontier.json (git-tracked): per task, per strategy its points (grid values,
     mean validation and test accuracy, mean Δ held-out LM loss on each half of the blocks), its
     Pareto frontier and validation-best configuration; claim 2 at matched accuracy and at the
     validation-best points, with their corrected intervals and verdicts (`ptf.measures.frontier`);
     data/plots/frontier.csv (one row per point, DVC plot data) and data/plots/frontier.png (per
     task: accuracy gain over the majority class against forgetting, every point, each
     strategy's frontier, the matched levels).

Run: python -m stages.frontier
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from ptf.common import paths
from ptf.common.atomic import write_bytes, write_json, write_text
from ptf.common.cli import StageError, main_guard
from ptf.common.config import PARAMS_FILE, StrictModel, load_section
from ptf.measures import frontier as fr
from ptf.measures.outputs import read_json
from ptf.training.sweep_config import SweepSection, load_sweep

OUTPUT = paths.METRICS / "frontier.json"
CSV = paths.PLOTS / "frontier.csv"
PNG = paths.PLOTS / "frontier.png"
Config = SweepSection      # the stage's own section (tests/test_dag.py builds it from every params file)
CSV_FIELDS = ["task", "strategy", "config", "lr", "steps", "knob", "value", "val_accuracy", "gain",
              "test_accuracy", "delta_select", "delta_report", "frontier"]


class DecisionKeys(StrictModel):
    """The forgetting stage's decision rule (its keys; the others are its own)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    reference_strategy: str = Field(min_length=1)
    alpha: float = Field(gt=0.0, lt=0.5)
    bootstrap_resamples: int = Field(ge=100)
    bootstrap_seed: int = Field(ge=0)


def read_sweep(root: Path, cfg: SweepSection, task: str, strategy: str) -> dict[str, Any]:
    """One sweep record, refused (naming what is missing) unless it holds every configuration
    and seed the params declare."""
    rel = paths.METRICS / "sweep" / task / f"{strategy}.json"
    sw = read_json(Path(root) / rel, f"run `dvc repro sweep@{task}-{strategy}`")
    for p in cfg.points(strategy):
        c = sw.get("configs", {}).get(p.key)
        if c is None:
            raise StageError(f"{rel}: no configuration `{p.key}`, which sweep.grids.{strategy} declares; "
                             f"rerun `dvc repro sweep@{task}-{strategy}`")
        lacking = [s for s in cfg.seeds if str(s) not in c.get("seeds", {})]
        if lacking:
            raise StageError(f"{rel}: configuration `{p.key}` has no seed {lacking[0]} of sweep.seeds; "
                             f"rerun `dvc repro sweep@{task}-{strategy}`")
    return sw


def majority_rates(root: Path, tasks: list[str]) -> dict[str, float]:
    rel = paths.METRICS / "baselines.json"
    base = read_json(Path(root) / rel, "run `dvc repro baselines`").get("tasks") or {}
    lacking = [t for t in tasks if t not in base]
    if lacking:
        raise StageError(f"{rel}: no baselines of the sweep task {lacking[0]!r}; add it to baselines.tasks")
    return {t: float(base[t]["majority"]["val_accuracy"]) for t in tasks}


def rows(tasks: dict[str, dict[str, Any]], majority: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for t, by_s in tasks.items():
        for s, f in by_s.items():
            for p in f["points"]:
                out.append({"task": t, "strategy": s, "config": p["key"], "lr": p["lr"], "steps": p["steps"],
                            "knob": p["knob"] or "", "value": "" if p["value"] is None else p["value"],
                            "val_accuracy": p["val_accuracy"], "gain": p["val_accuracy"] - majority[t],
                            "test_accuracy": p["test_accuracy"], "delta_select": p["delta_select"],
                            "delta_report": p["delta_report"], "frontier": int(p["key"] in f["frontier"])})
    return out


def figure(tasks: dict[str, dict[str, Any]], majority: dict[str, float], claims: dict[str, Any],
           missing: bool = False) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9})
    n = max(1, len(tasks))
    ncols = min(n, 3)             # a grid of panels, at most 3 a row: five tasks stay readable
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.8 * nrows), squeeze=False)
    panels = axes.ravel()
    for ax in panels[len(tasks):]:
        ax.set_axis_off()
    if missing:   # said on the figure, as the forgetting stage's trade-off says it
        panels[0].set_axis_on()
        panels[0].text(0.5, 0.5, "no Δ LM loss measured\n(the pretrained model has no LM head)",
                       ha="center", va="center", transform=panels[0].transAxes)
    cmap = plt.get_cmap("tab10")
    order = sorted({s for by_s in tasks.values() for s in by_s})   # one colour per strategy on every panel
    for ax, (t, by_s) in zip(panels, sorted(tasks.items())):
        for s, f in sorted(by_s.items()):
            i = order.index(s)
            pts = f["points"]
            ax.scatter([p["delta_select"] for p in pts], [p["val_accuracy"] - majority[t] for p in pts],
                       s=14, alpha=0.45, color=cmap(i % 10))
            front = [p for k in f["frontier"] for p in pts if p["key"] == k]
            ax.plot([p["delta_select"] for p in front], [p["val_accuracy"] - majority[t] for p in front],
                    "-o", ms=4, color=cmap(i % 10), label=f"{s} ({len(pts)} configs)")
        levels = sorted({c["level"] for c in claims["matched"]["comparisons"].values() if c["task"] == t})
        for lv in levels:
            ax.axhline(lv - majority[t], color="grey", lw=0.5, ls=":", alpha=0.6)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("symlog", linthresh=0.01)   # drifts span 0.001 to ~1 nats/token: linear below 0.01
        lo = min([0.0] + [p["delta_select"] for f in by_s.values() for p in f["points"]])
        ax.set_xlim(left=1.5 * lo if lo < 0 else -0.002)   # no empty negative half when nothing drifts below 0
        ax.set_title(f"{t}: learning vs forgetting, every configuration (mean over seeds)")
        ax.set_xlabel("forgetting: Δ held-out LM loss, selection half (nats/token; log scale above 0.01)")
        ax.set_ylabel(f"learning: validation accuracy − majority rate ({majority[t]:.3f})")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def run(cfg: SweepSection, dec: DecisionKeys, root: Path = Path(".")) -> dict[str, Any]:
    root = Path(root)
    t0 = time.perf_counter()
    sweeps: dict[str, dict[str, Any]] = {}
    for r in cfg.runs.values():
        sweeps.setdefault(r.task, {})[r.strategy] = read_sweep(root, cfg, r.task, r.strategy)
    majority = majority_rates(root, cfg.tasks)
    why = next((sw["not_applicable"] for by_s in sweeps.values() for sw in by_s.values()
                if sw.get("blocks") is None), None)
    if why is None:
        tasks = {t: fr.task_frontiers(by_s) for t, by_s in sweeps.items()}
        claims = fr.claims(sweeps, majority, dec, cfg.levels)
        out = {"reference": dec.reference_strategy, "levels": list(cfg.levels), "majority_val": majority,
               "seeds": list(cfg.seeds), "lengths": list(cfg.lengths),
               "halves": {"select": "the blocks at even positions", "report": "the blocks at odd positions"},
               "tasks": tasks, "claims": claims}
    else:   # no LM head: no drift, no frontier; said, not judged
        tasks, claims = {}, {}
        out = {"reference": dec.reference_strategy, "applicable": False, "missing": why, "tasks": {}, "claims": {}}
    out["wall_time_s"] = time.perf_counter() - t0
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows(tasks, majority))
    write_text(root / CSV, buf.getvalue())
    write_bytes(root / PNG, figure(tasks, majority, claims, missing=why is not None))
    write_json(root / OUTPUT, out)
    return out


def load_configs(path: Path = PARAMS_FILE) -> tuple[SweepSection, DecisionKeys]:
    return load_sweep(path), load_section("forgetting", DecisionKeys, path)


def main() -> None:
    def go():
        m = run(*load_configs())
        for name, c in m["claims"].items():
            print(f"claim 2 ({name}): {c['verdict']} {c['counts']}")
    main_guard(go)


if __name__ == "__main__":
    main()
