"""Sequential fine-tuning: tasks one after another on one shared backbone, one head per task.

In:  data/models/pretrained, data/tasks/<t>/ for every task of `finetune.sequential.orders`,
     data/shards/ (if a strategy uses replay or ewc), params section `finetune` (`sequential`:
     orders, strategies, seeds, max_steps; `arms` for hyperparameters: the first LR of the
     arm's grid is used, there is no LR search here).
Out: data/metrics/sequential.json:
       {"tasks", "orders", "strategies", "seeds", "max_steps",
        "n_classes": {task: n}, "majority": {task: majority-class rate of its test split},
        "test_size": {task: n examples},
        "random_init": {"<seed>": {task: test accuracy at random init}}  (GEM's FWT reference),
        "runs": [{"order", "strategy", "seed", "matrix", "correct", "wall_time_s"}, ...],
        "wall_time_s"}
     one run per (order, strategy, seed): `matrix` is (T+1) x T test accuracies in the run's
     order, row 0 before any training (pretrained backbone, fresh heads), row i after training
     task i-1 (see ptf/measures/cl_metrics.py); `correct[i][j]` the per-example correctness
     ("0"/"1" per test example, split order) behind `matrix[i][j]`. An MLflow run tagged stage
     `sequential` with every run's matrix rows.

Each run trains every task of its order with its strategy through the registry entry
(`ptf.training.sequential_run`); strategies whose entry is not `sequential` (prompt_tuning,
scratch) are refused by the config. A task's head seed depends on the seed and the task, not on
its place in the order, so the orders of a seed start from the same heads, and the random-init
reference (measured once per seed) carries those heads.

Run: python -m stages.sequential
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.common.cli import main_guard
from ptf.data.tasks import load_task
from ptf.training.finetune_config import SequentialKeys, load_stage_config
from ptf.training.finetuning import Context, preflight
from ptf.training.sequential_run import (head_seed, majority_rate, pretrained_backbone,
                                         random_init_accuracy, run_sequence)


class Config(SequentialKeys):
    """The keys of the `finetune` section this stage reads (`sequential` + the shared ones)."""


def plan(cfg: Config) -> list[tuple[list[str], str, int]]:
    """Every (order, strategy, seed) run, orders outermost."""
    sc = cfg.sequential
    return [(list(o), s, seed) for o in sc.orders for s in sc.strategies for seed in sc.seeds]


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    from accelerate import PartialState
    from tqdm import tqdm

    from ptf.training.tracking import check_reachable, start_run, tracking_uri
    from ptf.training.tracking_tree import sequential_tags

    sc = cfg.sequential
    tasks = sc.tasks
    ctx = Context.create(root, cfg)
    data = {t: load_task(root, t, ctx.tokenizer, cfg.data) for t in tasks}
    for s in sc.strategies:          # every strategy's arm checked against the model, before any work
        for d in data.values():
            preflight(ctx, s, d)
    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    t0 = time.perf_counter()
    device = PartialState().device   # the device the loop's Accelerator trains on
    anchors: dict = {}                # per backbone: the L2-SP / EWC anchor of the runs from it

    def anchor_of(seed: int):
        sctx = ctx.for_seed(seed)
        if sctx.pretrained not in anchors:
            anchors[sctx.pretrained] = pretrained_backbone(sctx, data[tasks[0]], device)
        return anchors[sctx.pretrained]

    def seeds_of(order: list[str], seed: int) -> list[int]:
        return [head_seed(seed, tasks.index(t), len(tasks)) for t in order]

    random_init = {str(seed): random_init_accuracy(ctx.for_seed(seed), [data[t] for t in tasks], seeds_of(tasks, seed),
                                                   device) for seed in sc.seeds}
    runs = []
    tags = sequential_tags(sc.orders, sc.strategies, sc.seeds)
    with start_run("sequential", cfg.model_dump(), tags, root=root, experiment=cfg.experiment) as mlrun:
        for order, strategy, seed in tqdm(plan(cfg), desc="sequential runs", unit="run"):
            t1 = time.perf_counter()
            name = f"{strategy}/{'-'.join(order)}/seed{seed}"
            r = run_sequence(ctx.for_seed(seed), [data[t] for t in order], seeds_of(order, seed),
                             strategy, seed, sc.max_steps, anchor_of(seed), device,
                             log_fn=lambda m, step, name=name: mlrun.log(
                                 {f"{name}.{key}": v for key, v in m.items()}, step))
            runs.append({"order": order, "strategy": strategy, "seed": seed, **r,
                         "wall_time_s": time.perf_counter() - t1})
            for i, row in enumerate(r["matrix"]):
                mlrun.log({f"{name}.acc.{t}": a for t, a in zip(order, row)}, step=i)
    out = {"tasks": tasks, "orders": [list(o) for o in sc.orders], "strategies": list(sc.strategies),
           "seeds": list(sc.seeds), "max_steps": sc.max_steps,
           "n_classes": {t: data[t].n_classes for t in tasks},
           "majority": {t: majority_rate(data[t].test.labels) for t in tasks},
           "test_size": {t: len(data[t].test) for t in tasks},
           "random_init": random_init, "runs": runs, "wall_time_s": time.perf_counter() - t0}
    write_json(root / paths.METRICS / "sequential.json", out)
    return out


def main() -> None:
    def go():
        m = run(load_stage_config(Config))
        for r in m["runs"]:
            print(f"{r['strategy']} {' → '.join(r['order'])} seed {r['seed']}")
            for i, row in enumerate(r["matrix"]):
                print(f"  R[{i}]", " ".join(f"{a:.3f}" for a in row))
    main_guard(go)


if __name__ == "__main__":
    main()
