"""One run of sequential fine-tuning, and GEM's random-init reference (no CLI).

In:  the `Context` of the stage (pretrained model, tokenizer, the `finetune` section), the
     tasks' `TaskData` in training order, a strategy name, a seed, the device.
Out: `run_sequence(...) -> {"matrix", "correct"}`: the (T+1) x T test accuracies (row 0 before
     any training: pretrained backbone, fresh heads; row i after training task i-1) and, per
     cell, the per-example test correctness as a string of "0"/"1" in test-split order (what
     Toneva et al.'s forgetting events are counted from, `ptf.measures.cl_metrics`);
     `random_init_accuracy(...) -> {task: accuracy}`: the test accuracy of the same architecture
     at random initialisation with the head the run starts from (GEM's FWT reference b_j);
     `majority_rate(labels)`; `head_seed(...)`.

Every task keeps its own classification head (created at the start, seeded, kept); the backbone
is shared and updated by each task in turn through the strategy's registry entry
(ptf.models.strategies), as in the finetune stage: what trains, the peft wrapper, the regulariser
(L2-SP and EWC anchor at the pretrained weights) and, after the task, the merge of a peft adapter
into the backbone (LoRA). The best-validation weights of each task are kept before moving on.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ptf.data.tasks import TaskData
from ptf.models import trainable as T
from ptf.models.strategies import build_classifier, check_strategy, unwrap_hf
from ptf.training.finetuning import Context, evaluate, fit


def head_seed(seed: int, task_index: int, n_tasks: int) -> int:
    """The seed of task `task_index`'s head (its index in the first order, so a task gets the
    same head in every order of a seed): distinct over (seed, task) for distinct seeds >= 0,
    where `seed + index` would give seed 0's second head to seed 1's first."""
    return seed * n_tasks + task_index


def majority_rate(labels: Sequence[int]) -> float:
    """Share of the most frequent label (what always answering it scores)."""
    return max(labels.count(c) for c in set(labels)) / len(labels)


def _correct(pred: Sequence[int], labels: Sequence[int]) -> str:
    return "".join("1" if p == y else "0" for p, y in zip(pred, labels))


def _score(clfs, ctx: Context, datas: Sequence[TaskData], device) -> tuple[list[float], list[str]]:
    accs, cors = [], []
    for c, d in zip(clfs, datas):
        e = evaluate(unwrap_hf(c), ctx, d.test, d.n_classes, device)
        accs.append(e["accuracy"])
        cors.append(_correct(e["predictions"], d.test.labels))
    return accs, cors


def pretrained_backbone(ctx: Context, data: TaskData, device):
    """The pretrained backbone, untouched: the anchor of L2-SP and EWC in every run."""
    cfg = ctx.cfg
    return build_classifier(ctx.pretrained, data.label_names, "full", cfg.arms.full, seed=0,
                            pooling=cfg.pooling).base_model.to(device)


def run_sequence(ctx: Context, datas: Sequence[TaskData], seeds: Sequence[int], strategy: str,
                 seed: int, max_steps: int, anchor, device,
                 log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
    """Train `datas` in order with `strategy` on one shared backbone. `seeds[j]`: task j's head
    seed (`head_seed`); `seed` the run's (data order, peft init). Returns the matrix and the
    per-example correctness of every row."""
    cfg = ctx.cfg
    entry, arm = check_strategy(strategy), getattr(cfg.arms, strategy)
    clfs = [build_classifier(ctx.pretrained, d.label_names, "full", cfg.arms.full, seed=s,
                             pooling=cfg.pooling) for d, s in zip(datas, seeds)]
    prefix = clfs[0].base_model_prefix
    shared = getattr(clfs[0], prefix)
    for c in clfs[1:]:
        setattr(c, prefix, shared)      # one backbone, a head per task
    for c in clfs:
        c.to(device)
    acc, cor = _score(clfs, ctx, datas, device)
    matrix, correct = [acc], [cor]
    for i, d in enumerate(datas):
        torch.manual_seed(seed * len(datas) + i)   # a peft wrapper's init (LoRA) is this task's own
        clf = entry.prepare(clfs[i], arm)
        fit(ctx, clf, entry.name, arm, arm.lrs[0], seed, d, d.train, max_steps,
            desc=f"sequential {i + 1}/{len(datas)} {d.name}/{entry.name} seed {seed}", anchor=anchor,
            log_fn=None if log_fn is None else
            (lambda m, step, i=i: log_fn({f"task{i}.{k}": v for k, v in m.items()}, step)))
        clfs[i] = entry.merge(clf) if entry.merge is not None else clf
        for p in clfs[i].parameters():
            p.requires_grad_(True)
        acc, cor = _score(clfs, ctx, datas, device)
        matrix.append(acc)
        correct.append(cor)
    return {"matrix": matrix, "correct": correct}


def random_init_accuracy(ctx: Context, datas: Sequence[TaskData], seeds: Sequence[int],
                         device) -> dict[str, float]:
    """GEM's b_j: test accuracy of task j by the same architecture at random initialisation
    (`scratch`'s init: no pretraining) carrying the head the run starts task j with (the
    pretrained-init classifier of seed `seeds[j]`, head copied), untrained."""
    cfg = ctx.cfg
    out = {}
    for d, s in zip(datas, seeds):
        head = build_classifier(ctx.pretrained, d.label_names, "full", cfg.arms.full, seed=s,
                                pooling=cfg.pooling)
        rand = build_classifier(ctx.pretrained, d.label_names, "scratch", cfg.arms.scratch, seed=s,
                                pooling=cfg.pooling)
        rand.load_state_dict({k: v for k, v in head.state_dict().items() if T.is_head(head, k)},
                             strict=False)
        out[d.name] = evaluate(rand.to(device), ctx, d.test, d.n_classes, device)["accuracy"]
    return out
