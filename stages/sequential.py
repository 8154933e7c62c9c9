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
weights of each task are kept before moving on). L2-SP and EWC anchor at the pretrained
weights. LoRA is merged into the backbone after its task. prompt_tuning and scratch are not
sequential strategies (a ConfigError).

Run: python -m stages.sequential
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.common.cli import main_guard
from ptf.common.config import ConfigError
from ptf.data.tasks import load_task
from ptf.training.finetune_config import SequentialKeys, load_stage_config
from ptf.training.finetuning import Context, evaluate, fit
from ptf.models.strategies import Penalty, build_classifier, check_strategy, unwrap_hf



class Config(SequentialKeys):
    """The keys of the `finetune` section this stage reads (`sequential` + the shared ones)."""


UNSUPPORTED = ("prompt_tuning", "scratch")


def check_plan(cfg: Config) -> dict[str, str]:
    sc = cfg.sequential
    plan = {}
    for t in sc.order:
        if t not in sc.strategy:
            raise ConfigError(f"finetune.sequential.strategy: no strategy for task {t!r}")
        s = check_strategy(sc.strategy[t])
        if s in UNSUPPORTED:
            raise ConfigError(f"finetune.sequential.strategy.{t}: {s!r} is not a sequential "
                              f"strategy (not one of {UNSUPPORTED})")
        plan[t] = s
    if len(set(sc.order)) != len(sc.order):
        raise ConfigError(f"finetune.sequential.order: a task is repeated: {sc.order}")
    return plan


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification

    from ptf.training.tracking import check_reachable, start_run, tracking_uri

    sc = cfg.sequential
    plan = check_plan(cfg)
    ctx = Context.create(root, cfg)
    datas = [load_task(root, t, ctx.tokenizer, cfg.data) for t in sc.order]
    for t, s in plan.items():
        if s in ("replay", "ewc"):
            ctx.blocks(getattr(cfg.arms, s).block_len)
        if s == "lora":
            from ptf.models.strategies import check_lora_targets
            check_lora_targets(AutoModelForSequenceClassification.from_pretrained(ctx.pretrained),
                               cfg.arms.lora.target_modules)
    check_reachable(tracking_uri(root))
    t0 = time.perf_counter()
    # one classifier per task, all sharing the first one's backbone module
    clfs = [build_classifier(ctx.pretrained, d.label_names, "full", cfg.arms.full,
                             seed=sc.seed + j, pooling=cfg.pooling) for j, d in enumerate(datas)]
    prefix = clfs[0].base_model_prefix
    shared = getattr(clfs[0], prefix)
    for c in clfs[1:]:
        setattr(c, prefix, shared)
    anchor = build_classifier(ctx.pretrained, datas[0].label_names, "full", cfg.arms.full,
                              seed=0, pooling=cfg.pooling).base_model
    from accelerate import PartialState
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
            s, arm = plan[t], getattr(cfg.arms, plan[t])
            clf = clfs[i]
            penalty = None
            if s in ("l2sp", "ewc"):
                penalty = Penalty(anchor, arm.lam if s == "ewc" else arm.alpha,
                                  ctx.fisher(arm) if s == "ewc" else None)
            if s == "lora":
                from peft import LoraConfig, TaskType, get_peft_model
                clf = get_peft_model(clf, LoraConfig(
                    task_type=TaskType.SEQ_CLS, r=arm.r, lora_alpha=arm.alpha,
                    lora_dropout=arm.dropout, target_modules=list(arm.target_modules)))
            else:
                from ptf.models.strategies import set_trainable
                set_trainable(clf, s, arm)
            r = fit(ctx, clf, s, arm, arm.lrs[0], sc.seed, d, d.train, sc.max_steps,
                    desc=f"sequential {i + 1}/{len(datas)} {t}/{s}", penalty=penalty,
                    log_fn=lambda m, step, i=i: mlrun.log({f"task{i}.{k}": v for k, v in m.items()},
                                                          step))
            if s == "lora":
                clfs[i] = clf.merge_and_unload()
            for p in clfs[i].parameters():
                p.requires_grad_(True)
            matrix.append(row())
            mlrun.log({f"acc_after_{i + 1}.{u}": a for u, a in zip(sc.order, matrix[-1])}, step=i + 1)
            del r
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
