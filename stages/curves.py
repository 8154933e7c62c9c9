"""Data efficiency: learning curves over label fractions (pretrained vs scratch, probe vs full).

In:  data/models/pretrained, data/tasks/<finetune.curves.task>/, params section `finetune`
     (`curves`: task, strategies, fractions, seeds, epochs, min_steps; `arms` for each
     strategy's LR grid; `data`, `train`, `pooling` as in the finetune stage).
Out: data/plots/curves.csv (strategy, fraction, n_labels, seed, test_accuracy: DVC plot data),
     data/metrics/curves.json ({"task", "seeds", "epochs", "min_steps", "examples_per_step",
     "results": {strategy: {fraction: {mean, std, n_labels, steps, best_steps (the
     best-validation step of each seed), chosen_lr}}}}); MLflow runs tagged task, strategy,
     seed, fraction (stage `curves`).

Each seed draws its own stratified subset of the (capped) training split: round(fraction x n_c)
examples of every class c, at least one. With `curves.lr_search` the LR is chosen on the
validation split (full size) from the arm's grid with the first seed, per fraction; without it
(the CPU default, for the time budget) every fraction uses the first LR of the arm's grid.
The budget grows with the labels: ceil(epochs x n_labels / examples per step) optimizer steps,
at least `min_steps`, so that every arm sees all its labels (a fixed number of steps would leave
the largest subsets mostly unseen). Each seed keeps its best-validation weights; the step they
come from (`best_steps`) shows whether an arm was still improving when its budget ran out.

Run: python -m stages.curves
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.atomic import write_json, write_text
from ptf.common.cli import main_guard
from ptf.data.tasks import load_task, stratified_fraction
from ptf.training.finetune_config import CurvesKeys, load_stage_config
from ptf.training.finetuning import Context, preflight, run_arm


class Config(CurvesKeys):
    """The keys of the `finetune` section this stage reads (`curves` + the shared ones)."""


CSV_FIELDS = ["strategy", "fraction", "n_labels", "seed", "test_accuracy"]


def curves_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in CSV_FIELDS})
    return buf.getvalue()


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    from ptf.training.tracking import check_reachable, tracking_uri

    cc = cfg.curves
    ctx = Context.create(root, cfg)
    data = load_task(root, cc.task, ctx.tokenizer, cfg.data)
    for s in cc.strategies:
        preflight(ctx, s, data)
    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    for strategy in cc.strategies:
        for frac in cc.fractions:
            def train_for_seed(seed: int, frac=frac):
                return data.train.subset(stratified_fraction(data.train.labels, frac, seed))
            # every seed's subset has the same size (round(frac x n_c) of each class c)
            steps = cc.steps_for(len(train_for_seed(cc.seeds[0])), per_step)
            res = run_arm(ctx, data, strategy, cc.seeds, steps, train_for_seed,
                          mlflow_tags={"fraction": str(frac)}, stage="curves",
                          desc_prefix=f"curves {frac:g} ", lr_search=cc.lr_search)
            for r in res["seeds"]:
                rows.append({"strategy": strategy, "fraction": frac, "n_labels": r["n_train"],
                             "seed": r["seed"], "test_accuracy": r["test_accuracy"]})
            results.setdefault(strategy, {})[f"{frac:g}"] = {
                "mean": res["test_accuracy"]["mean"], "std": res["test_accuracy"]["std"],
                "n_labels": res["n_train"], "steps": steps,
                "best_steps": [r["best_step"] for r in res["seeds"]], "chosen_lr": res["chosen_lr"]}
    metrics = {"task": cc.task, "seeds": list(cc.seeds), "epochs": cc.epochs,
               "min_steps": cc.min_steps, "examples_per_step": per_step,
               "results": results, "wall_time_s": time.perf_counter() - t0}
    write_text(root / paths.PLOTS / "curves.csv", curves_csv(rows))
    write_json(root / paths.METRICS / "curves.json", metrics)
    return metrics


def main() -> None:
    def go():
        m = run(load_stage_config(Config))
        for s, by_f in m["results"].items():
            print(s, {f: f"{v['mean']:.3f}±{v['std']:.3f}" for f, v in by_f.items()})
    main_guard(go)


if __name__ == "__main__":
    main()
