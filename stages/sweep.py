"""Learning-forgetting sweep of one task and one strategy: every configuration of its grid
(`sweep.lengths` x `sweep.grids.<strategy>.lrs` x its knob's values) for every seed, each
model's task accuracy AND its forgetting measured before it is let go (DVC `foreach` item
sweep@<task>-<strategy>, an item of `sweep.runs`).

In:  data/models/pretrained, data/tasks/<task>/, data/shards/ (the held-out blocks; replay and
     ewc also read the training blocks), params: the `sweep` section (`SweepSection`), the
     `finetune` section's shared keys (pooling, data caps, training budget other than its
     length, each strategy's arm: the knob's other values), the forgetting stage's held-out
     measure (`forgetting.max_blocks`, `batch_size`, `mask_prob`, `mask_seed`).
Out: data/metrics/sweep/<task>/<strategy>.json (git-tracked): the grid, the gold validation and
     test labels, the held-out blocks (indices, the pretrained LM's per-block summed NLL, tokens
     per block; null for a foundation without an LM head, whose drift is not applicable), and per
     configuration and seed: validation and test accuracy at the
     best-validation step, best step, train time, test predictions and the per-block summed NLL
     of its backbone under the pretrained LM head; one MLflow run per configuration
     and seed under the stage's run (stage `sweep`, tags task, strategy, seed, lr, steps, knob).

Protocol. Each configuration is a run of the shared loop at its own length (warmup-cosine over
its steps) that keeps its best-validation weights, as the finetune stage's runs do. Nothing is
chosen here: the frontier stage chooses on validation accuracy and on one half of the held-out
blocks, and reports on the other half. The held-out loss is the forgetting stage's measure
(`ptf.measures.drift`: the fine-tuned backbone under an untied copy of the pretrained LM head,
the same blocks), computed on the model in memory: a sweep of ~100 models does not write ~100
model directories to the DVC cache. Every strategy with one LR per run, no step hook and no
peft wrapper but LoRA (full, lower LR, linear probing, freezing, L2-SP, EWC, replay, LoRA)
trains all its configurations of one length together on the CPU
(`ptf.training.batched.fit_together`: the same results as one at a time, bench/sweep_speed.py);
the others (DoRA, OSF, prompt tuning, gradual unfreezing), and every strategy on a GPU or in
mixed precision, one at a time on Accelerate's device. The held-out measure runs where the
classifier trained.

Run: python -m stages.sweep --task source --strategy lora
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.common.cli import main_guard
from ptf.common.config import PARAMS_FILE, ConfigError, load_section
from ptf.models.strategies import check_strategy
from ptf.training.finetune_config import FinetuneCommon, load_stage_config
from ptf.training.sweep_config import HeldOutKeys, Point, SweepSection, arm_for, load_sweep

Config = SweepSection      # the stage's own section (tests/test_dag.py builds it from every params file)


def output_file(root: Path, task: str, strategy: str) -> Path:
    return Path(root) / paths.METRICS / "sweep" / task / f"{strategy}.json"


class InMemoryDrift:
    """Per-block summed NLL of a classifier's backbone (as it is in memory) under the pretrained
    LM head: `ptf.measures.drift.EvalSet.measure` without saving and reloading the model (a
    backbone still as pretrained, a linear probe's, gets the pretrained sums: `EvalSet.scores`)."""

    def __init__(self, es):
        from ptf.models.lm import pretrained_lm

        self.es = es
        self.lm = pretrained_lm(es.pretrained)

    def sums(self, clf) -> np.ndarray:
        from ptf.models.strategies import unwrap_hf

        # LoRA / DoRA layers are injected into the backbone's modules: their output is the merged one
        backbone = unwrap_hf(clf).base_model
        self.lm.to(next(backbone.parameters()).device)   # the LM head where the classifier trained
        setattr(self.lm, self.lm.base_model_prefix, backbone)
        return self.es.scores(self.lm)


def check_task(cfg: SweepSection, task: str, strategy: str) -> None:
    """`--task`/`--strategy` must be an item of `sweep.runs` (what DVC runs, the frontier reads)."""
    check_strategy(strategy, "--strategy")
    if not cfg.declared(task, strategy):
        raise ConfigError(f"sweep.runs: no item {task}-{strategy} (--task {task} --strategy {strategy}); "
                          f"declared: {', '.join(cfg.runs)}")


def trains_together(ctx, data, strategy: str, arm) -> bool:
    """Whether `strategy`'s runs on this model go through `fit_together` (`together_reason`:
    one LR per run, no step hook; `check_batchable`: a float32 Llama classifier, plain or with
    LoRA; the CPU: it trains there); otherwise they run one at a time (`fit`, on Accelerate's
    device: the GPU where there is one)."""
    from ptf.measures.drift import compute_device
    from ptf.models.strategies import build_classifier
    from ptf.training.batched import together_reason
    from ptf.training.packed import check_batchable

    if together_reason(strategy) is not None or ctx.cfg.train.mixed_precision != "no":
        return False
    if compute_device().type != "cpu":     # together is the CPU path; on a GPU, `fit` through Accelerate
        return False
    probe = build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=0, pooling=ctx.cfg.pooling)
    return check_batchable([probe]) is None


def _train(ctx, data, strategy: str, cfg: SweepSection, points: list[Point], arms: dict[Point, Any],
           together: bool):
    """(point, seed, trained classifier, fit result) for every point and seed."""
    from ptf.models.strategies import build_classifier
    from ptf.training.batched import Run, fit_together, regulariser
    from ptf.training.finetuning import fit

    tc = ctx.cfg.train
    for steps in cfg.lengths:
        at = [p for p in points if p.steps == steps]
        if together:
            for wd in sorted({arms[p].weight_decay for p in at}):
                group = [(p, s) for p in at if arms[p].weight_decay == wd for s in cfg.seeds]
                runs = []
                for p, s in group:
                    on = ctx.for_seed(s)      # the backbone seed s starts from
                    clf = build_classifier(on.pretrained, data.label_names, strategy, arms[p], seed=s,
                                           pooling=ctx.cfg.pooling)
                    runs.append(Run(clf, p.lr, s, data.train, regulariser(on, clf, strategy, arms[p], s)))
                res = fit_together(runs, tc, steps, lambda split, seed: ctx.loader(split, tc.batch_size, True, seed),
                                   data.validation, data.test, data.n_classes, wd,
                                   desc=f"sweep {data.name}/{strategy} {steps} steps")
                for (p, s), run, r in zip(group, runs, res):
                    yield p, s, run.model, r
        else:
            for p in at:
                for s in cfg.seeds:
                    clf = build_classifier(ctx.for_seed(s).pretrained, data.label_names, strategy, arms[p],
                                           seed=s, pooling=ctx.cfg.pooling)
                    r = fit(ctx.for_seed(s), clf, strategy, arms[p], p.lr, s, data, data.train, steps,
                            desc=f"sweep {data.name}/{strategy} {p.key} seed={s}")
                    yield p, s, clf, r


def run(fc: FinetuneCommon, cfg: SweepSection, held: HeldOutKeys, task: str, strategy: str,
        root: Path = Path(".")) -> dict[str, Any]:
    from ptf.data.tasks import load_task
    from ptf.measures.drift import NO_LM_HEAD, EvalSet, lm_objective
    from ptf.models.backbones import backbone_index
    from ptf.models.strategies import build_classifier
    from ptf.training.finetuning import Context, preflight
    from ptf.training.tracking import check_reachable, start_run, tracking_uri

    root = Path(root)
    check_task(cfg, task, strategy)
    points = cfg.points(strategy)
    arms = {p: arm_for(strategy, getattr(fc.arms, strategy), p) for p in points}   # bad knob values: now
    ctx = Context.create(root, fc)
    data = load_task(root, task, ctx.tokenizer, fc.data)
    preflight(ctx, strategy, data)
    for arm in {id(a): a for a in arms.values()}.values():   # each knob value builds (e.g. frozen layers)
        build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=0, pooling=fc.pooling)
    es = None        # a foundation without an LM head: accuracy only (its drift is not applicable)
    if lm_objective(ctx.pretrained) is not None:
        es = EvalSet.build(root, ctx.pretrained, held.max_blocks, held.batch_size, held.mask_prob,
                           held.mask_seed)
    # one reference per pretrained backbone: a model's drift is from the backbone it started from
    dirs = ctx.backbones
    drifts = [InMemoryDrift(es.for_backbone(d)) for d in dirs] if es is not None else None
    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {p.key: {"lr": p.lr, "steps": p.steps, "knob": p.knob,
                                                  "value": p.value, "seeds": {}} for p in points}
    together = trains_together(ctx, data, strategy, arms[points[0]])
    for p, seed, clf, r in _train(ctx, data, strategy, cfg, points, arms, together):
        rec = {k: r[k] for k in ("val_accuracy", "test_accuracy", "best_step", "steps", "train_time_s")}
        b = backbone_index(seed, len(dirs))
        rec.update(delta_loss=None, test_predictions=r["test_predictions"], lm_sums=None, backbone=b)
        if drifts is not None:
            ref = drifts[b].es
            sums = drifts[b].sums(clf)
            rec.update(delta_loss=float((sums - ref.base_sums).sum() / ref.counts.sum()),
                       lm_sums=[float(x) for x in sums])
            if b:      # another backbone than the first: its own reference (blocks.base_sums is the first's)
                rec["base_sums"] = [float(x) for x in ref.base_sums]
        results[p.key]["seeds"][str(seed)] = rec
        tags = {"task": task, "strategy": strategy, "seed": str(seed), "lr": f"{p.lr:g}",
                "steps": str(p.steps), **({"knob": f"{p.knob}={p.value:g}"} if p.knob else {})}
        with start_run("sweep", {"sweep": cfg.model_dump(), "arm": arms[p].model_dump()}, tags, root=root,
                       experiment=cfg.experiment) as mlrun:   # a configuration run under the stage's run
            mlrun.log({k: float(rec[k]) for k in ("val_accuracy", "test_accuracy", "delta_loss", "train_time_s")
                       if rec[k] is not None}, step=rec["steps"])
    grid = cfg.grid(strategy)
    metrics = {"task": task, "strategy": strategy, "seeds": list(cfg.seeds), "lengths": list(cfg.lengths),
               "lrs": list(grid.lrs), "knob": grid.knob.model_dump() if grid.knob else None,
               "trained_together": together, "objective": es.objective if es is not None else None,
               "backbones": [str(d.relative_to(root)) for d in dirs],
               "validation_labels": list(data.validation.labels), "test_labels": list(data.test.labels),
               "blocks": None if es is None else {"indices": list(es.indices),
                                                  "base_sums": [float(x) for x in es.base_sums],
                                                  "counts": [int(x) for x in es.counts]},
               **({"not_applicable": NO_LM_HEAD} if es is None else {}),
               "configs": results, "wall_time_s": time.perf_counter() - t0}
    write_json(output_file(root, task, strategy), metrics)
    return metrics


def load_configs(path: Path = PARAMS_FILE) -> tuple[FinetuneCommon, SweepSection, HeldOutKeys]:
    """The three sections, validated; every strategy of `sweep.runs` has its grid."""
    return load_stage_config(FinetuneCommon, path), load_sweep(path), load_section("forgetting", HeldOutKeys, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--strategy", required=True)
    args = ap.parse_args()

    def go():
        check_strategy(args.strategy, "--strategy")   # before reading params
        fc, cfg, held = load_configs()
        m = run(fc, cfg, held, args.task, args.strategy)
        print(f"{args.task}/{args.strategy}: {len(m['configs'])} configurations x {len(m['seeds'])} seeds "
              f"({m['wall_time_s']:.0f} s)")

    main_guard(go)


if __name__ == "__main__":
    main()
