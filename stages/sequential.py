"""Sequential fine-tuning: tasks one after another on one shared backbone, one head per task.

In:  data/models/pretrained, data/tasks/<t>/ for every t in `finetune.sequential.order`,
     data/shards/ (if a task uses replay or ewc), params section `finetune` (`sequential`:
     order, strategy per task, seed, max_steps; `arms` for hyperparameters: the first LR of the
     arm's grid is used, there is no LR search here).
Out: data/metrics/sequential.json {"order", "strategy", "matrix", "chance", "n_classes",
     "majority"}: `matrix` is (T+1) x T test accuracies, row 0 before any training (pretrained
     backbone, fresh heads), row i after training task i-1 (see ptf/measures/cl_metrics.py);
     `chance` = 1 / n_classes per task. An MLflow run tagged stage `sequential`.

Every task keeps its own classification head (created at the start, seeded, kept); the backbone
is shared and updated by each task in turn with that task's strategy (the best-validation
weights of each task are kept before moving on). Each task trains through its strategy's registry
entry (ptf.models.strategies), as in the finetune stage: what trains, the peft wrapper, the
regulariser (L2-SP and EWC anchor at the pretrained weights) and, after the task, the merge of a
peft adapter into the backbone (LoRA). Strategies whose entry is not `sequential`
(prompt_tuning, scratch) are refused by the config.

Run: python -m stages.sequential
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.common.cli import main_guard
from ptf.data.tasks import load_task
from ptf.models.strategies import build_classifier, check_strategy, unwrap_hf
from ptf.training.finetune_config import SequentialKeys, load_stage_config
from ptf.training.finetuning import Context, evaluate, fit, preflight


class Config(SequentialKeys):
    """The keys of the `finetune` section this stage reads (`sequential` + the shared ones)."""


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    from accelerate import PartialState

    from ptf.training.tracking import check_reachable, start_run, tracking_uri

    sc = cfg.sequential
    plan = {t: sc.strategy[t] for t in sc.order}     # names and usability checked by the config
    ctx = Context.create(root, cfg)
    datas = [load_task(root, t, ctx.tokenizer, cfg.data) for t in sc.order]
    for d in datas:
        preflight(ctx, plan[d.name], d)
    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    t0 = time.perf_counter()
    # one classifier per task (seeded head), all sharing the first one's backbone module
    clfs = [build_classifier(ctx.pretrained, d.label_names, "full", cfg.arms.full,
                             seed=sc.seed + j, pooling=cfg.pooling) for j, d in enumerate(datas)]
    prefix = clfs[0].base_model_prefix
    shared = getattr(clfs[0], prefix)
    for c in clfs[1:]:
        setattr(c, prefix, shared)
    anchor = build_classifier(ctx.pretrained, datas[0].label_names, "full", cfg.arms.full,
                              seed=0, pooling=cfg.pooling).base_model
    device = PartialState().device       # the device the loop's Accelerator trains on
    for c in clfs:
        c.to(device)
    anchor.to(device)

    def row() -> list[float]:
        return [evaluate(unwrap_hf(c), ctx, d.test, d.n_classes, device)["accuracy"]
                for c, d in zip(clfs, datas)]

    matrix = [row()]
    with start_run("sequential", cfg.model_dump(), {"order": ",".join(sc.order),
                   "strategy": ",".join(plan[t] for t in sc.order)}, root=root,
                   experiment=cfg.experiment) as mlrun:
        for i, (t, d) in enumerate(zip(sc.order, datas)):
            entry, arm = check_strategy(plan[t]), getattr(cfg.arms, plan[t])
            torch.manual_seed(sc.seed + i)   # a peft wrapper's init (LoRA) is this task's own
            clf = entry.prepare(clfs[i], arm)
            fit(ctx, clf, entry.name, arm, arm.lrs[0], sc.seed, d, d.train, sc.max_steps,
                desc=f"sequential {i + 1}/{len(datas)} {t}/{entry.name}", anchor=anchor,
                log_fn=lambda m, step, i=i: mlrun.log({f"task{i}.{k}": v for k, v in m.items()},
                                                      step))
            clfs[i] = entry.merge(clf) if entry.merge is not None else clf
            for p in clfs[i].parameters():
                p.requires_grad_(True)
            matrix.append(row())
            mlrun.log({f"acc_after_{i + 1}.{u}": a for u, a in zip(sc.order, matrix[-1])}, step=i + 1)
    n_classes = [d.n_classes for d in datas]
    majority = [max(d.test.labels.count(c) for c in set(d.test.labels)) / len(d.test)
                for d in datas]
    out = {"order": list(sc.order), "strategy": [plan[t] for t in sc.order], "matrix": matrix,
           "chance": [1.0 / k for k in n_classes], "n_classes": n_classes, "majority": majority,
           "max_steps": sc.max_steps, "seed": sc.seed, "wall_time_s": time.perf_counter() - t0}
    write_json(root / paths.METRICS / "sequential.json", out)
    return out


def main() -> None:
    def go():
        m = run(load_stage_config(Config))
        for i, r in enumerate(m["matrix"]):
            print(f"R[{i}]", " ".join(f"{a:.3f}" for a in r))
    main_guard(go)


if __name__ == "__main__":
    main()
