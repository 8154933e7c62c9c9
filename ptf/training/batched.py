"""Train K fine-tuning configurations of one Llama classifier together, in one process (no
CLI): a sweep's seeds, learning rates and knob values at a fraction of the CPU time of K
separate runs, with their results.

In:  K `LlamaForSequenceClassification` models built as a one-at-a-time run builds them
     (`ptf.models.strategies.build_classifier(..., seed)`: the same initial weights and
     trainability), each with its learning rate, seed, training split and its strategy's
     regulariser (`ptf.models.strategies.Regulariser`: an L2-SP / EWC penalty, or replay of
     pretraining blocks, as the registry's factory makes it for a one-at-a-time run); a
     `loader_fn(split, seed)` giving the run's shuffled, padded training batches (the stage's
     `Context.loader`); the `finetune.train` params (`tc`); the validation and test splits.
Out: `fit_together` trains the K models in place (best-validation weights restored, as
     `ptf.training.finetuning.fit` does) and returns one result per configuration: validation
     and test accuracy / macro-F1 and predictions at the best validation step, best step,
     steps, early stop, lr, seed, pretraining blocks replayed.

Same results. Every configuration keeps its own parameters, its own AdamW
(`ptf.training.trainer.adamw` over `param_groups`), its own warmup-cosine schedule
(`warmup_cosine`), gradient clipping, data order (`loader_fn` prepared by Accelerate with the
run's seed, as the shared loop prepares it), loss (the task loss + replay weight x the LM loss
of its own replay batch + its penalty, as `ptf.models.strategies.TaskModel` adds them; the
penalty enters as its gradient, `_Penalty`), and the same evaluation cadence, best-weights
copy and patience; so each result is that of its own run up to float rounding
(tests/test_batched.py checks weights and predictions against `fit`).

Less work per configuration (bench/sweep_speed.py measures it): each model runs through
`ptf.training.packed.PackedLlama` (real tokens only, the top layer at the pooled token alone),
evaluation runs on packed, length-sorted chunks, the second validation pass after restoring the
best weights is skipped (its numbers are those of the best evaluation), and there is no
Accelerate or model-loading setup per run. When only the heads train and every run starts from
the same backbone (linear probing), `FrozenFeatures` sends each text through the backbone once
for all runs and steps.

Scope: what `ptf.training.packed.check_batchable` accepts (float32 Llama classifiers without
dropout or biases, plain or with peft LoRA on their projections) and strategies with one LR
per run and no step hook (`together_reason`: full, lower_lr, linear_probe, freeze_bottom,
scratch, l2sp, ewc, replay, lora); everything else runs one at a time.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ptf.data.tasks import Split
from ptf.measures.baselines import scores
from ptf.training.packed import (EVAL_CHUNK, FrozenFeatures, Packed, PackedLlama, check_batchable,
                                 pack_split, predict, split_outputs)
from ptf.training.trainer import adamw, param_groups, warmup_cosine


@dataclass
class Run:
    """One configuration of the sweep."""
    model: Any                    # LlamaForSequenceClassification, as build_classifier made it
    lr: float
    seed: int
    train: Split
    reg: Any = None               # its strategy's Regulariser (penalty or replay); None: task loss only


def together_reason(strategy: str) -> str | None:
    """None if `strategy`'s runs can train together (one LR per run, no step hook, no peft
    wrapper but LoRA's), else why not (one line). Whether a built model qualifies (e.g. LoRA
    without dropout) is `check_batchable`'s to say."""
    from ptf.models.strategies import check_strategy, lora

    e = check_strategy(strategy)
    if e.lr_for is not None or e.step_hook is not None or e.optimizer_hook is not None:
        return f"{strategy} sets per-parameter LRs or runs a step hook"
    if e.peft is not None and e.peft is not lora:
        return f"{strategy} wraps the model with a peft method other than LoRA"
    return None


def regulariser(ctx, model, strategy: str, arm, seed: int):
    """The regulariser `ptf.training.finetuning.fit` gives this run: its strategy's factory with
    `ctx` (the seed's backbone context), anchored at `model`'s backbone as it starts."""
    from ptf.models.strategies import check_strategy

    factory = check_strategy(strategy).regulariser
    return None if factory is None else factory(ctx, model.base_model, model.base_model, arm, seed)


def _endless(loader) -> Iterator[dict[str, torch.Tensor]]:
    """Epoch after epoch, as the shared loop draws them (`set_epoch` before each pass)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class _Penalty:
    """Run's L2-SP / EWC penalty (`ptf.models.lm.Penalty`, coef/2 sum w (theta - anchor)^2) as
    its gradient, coef w (theta - anchor), added to the trained parameters' gradients with
    foreach ops: what backward through the penalty adds, up to float rounding, without
    building its graph (through autograd it cost 6.4 ms a model-step at the default size,
    about a third of a step). The anchor and weights are read from the `Penalty` itself
    (`_anchor`, `_weights`): an accessor in ptf/models/lm.py would change a file that
    pretraining depends on, and so make every stage stale."""

    def __init__(self, pen, backbone):
        ws = pen._weights
        named = [(n, p) for n, p in backbone.named_parameters()
                 if p.requires_grad and (ws is None or n in ws)]
        self.pen, self.backbone, self.params = pen, backbone, [p for _, p in named]
        self.anchors = [pen._anchor[n] for n, _ in named]
        self.weights = None if ws is None else [ws[n] for n, _ in named]

    @torch.no_grad()
    def add_grad(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        d = torch._foreach_sub(self.params, self.anchors)
        if self.weights is not None:
            torch._foreach_mul_(d, self.weights)
        torch._foreach_add_([p.grad for p in self.params], d, alpha=self.pen.coef)

    @torch.no_grad()
    def value(self) -> float:
        return float(self.pen(self.backbone))


def _replay(run: Run) -> tuple[torch.Tensor, int]:
    """(replay weight x the LM loss of run's next replay batch, blocks in it), as
    `TaskModel.forward` adds it. Through the LM's own forward: run packed instead, a step's
    replay ran 4 % faster (32.1 against 33.5 ms), because two thirds of it are the frozen LM
    head's products and softmax over the vocabulary, which no packing removes."""
    from ptf.models.lm import lm_loss

    ids = next(run.reg.batches)
    return run.reg.weight * lm_loss(run.reg.lm, ids), int(ids.shape[0])


def fit_together(runs: list[Run], tc: Any, max_steps: int, loader_fn: Callable[[Split, int], Any],
                 validation: Split, test: Split, n_classes: int, weight_decay: float,
                 desc: str = "together", log_fn: Callable[[int, dict, int], None] | None = None
                 ) -> list[dict[str, Any]]:
    """Train every run's model in place, step by step together; see the module docstring.
    `tc` has the `finetune.train` fields (batch_size is the loader's; grad_accum, warmup_steps,
    eval_every, patience, grad_clip, mixed_precision); `log_fn(i, metrics, step)` receives run
    i's train loss (every 10 steps) and validation metrics (every evaluation)."""
    from accelerate.data_loader import prepare_data_loader

    if tc.mixed_precision != "no":
        raise ValueError("fit_together trains in float32 only (finetune.train.mixed_precision: no)")
    reason = check_batchable([r.model for r in runs])
    if reason:
        raise ValueError(f"cannot train these models together: {reason}")
    nets = [PackedLlama(r.model) for r in runs]
    pad_id = runs[0].model.config.pad_token_id
    frozen = None
    if all(r.reg is None for r in runs) and FrozenFeatures.applies([r.model for r in runs]):
        frozen = FrozenFeatures(nets[0], pad_id)
    splits = {"validation": pack_split(validation, EVAL_CHUNK, pad_id),
              "test": pack_split(test, EVAL_CHUNK, pad_id)}
    features = ({name: split_outputs(nets[0].pooled, sp) for name, sp in splits.items()}
                if frozen else {})

    def train_logits(i: int, batch) -> torch.Tensor:
        if frozen:
            return F.linear(frozen.of_batch(batch), runs[i].model.score.weight)
        return nets[i].logits(Packed.of(batch, pad_id))

    def predictions(i: int, name: str) -> list[int]:
        if frozen:
            with torch.no_grad():
                return F.linear(features[name], runs[i].model.score.weight).argmax(-1).tolist()
        return predict(nets[i], splits[name])

    opts, scheds, data = [], [], []
    for r in runs:
        opt = adamw(param_groups(r.model, r.lr, weight_decay), lr=r.lr)
        opts.append(opt)
        scheds.append(warmup_cosine(opt, min(tc.warmup_steps, max_steps // 2), max_steps, 1))
        data.append(_endless(prepare_data_loader(loader_fn(r.train, r.seed), num_processes=1,
                                                 process_index=0, use_seedable_sampler=True,
                                                 data_seed=r.seed)))
    replays = [r.reg is not None and r.reg.lm is not None and r.reg.batches is not None
               for r in runs]
    penalties = [None if r.reg is None or r.reg.penalty is None
                 else _Penalty(r.reg.penalty, r.model.base_model) for r in runs]
    K = len(runs)
    best: list[dict[str, Any]] = [{} for _ in runs]
    stopped, steps, replayed = [False] * K, [0] * K, [0] * K
    active = list(range(K))
    t0 = time.perf_counter()
    for step in tqdm(range(1, max_steps + 1), desc=f"{desc} x{K}", dynamic_ncols=True):
        for i in active:
            runs[i].model.train()
            loss = 0.0
            for _ in range(tc.grad_accum):
                batch = next(data[i])
                total = F.cross_entropy(train_logits(i, batch).float(), batch["labels"])
                if replays[i]:
                    extra, blocks = _replay(runs[i])
                    total, replayed[i] = total + extra, replayed[i] + blocks
                total = total / tc.grad_accum
                total.backward()
                loss += float(total.detach())
            logging = log_fn is not None and step % 10 == 0
            if penalties[i] is not None:
                penalties[i].add_grad()
                loss += penalties[i].value() if logging else 0.0
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(runs[i].model.parameters(), tc.grad_clip)
            opts[i].step()
            scheds[i].step()
            opts[i].zero_grad(set_to_none=True)
            steps[i] = step
            if logging:
                log_fn(i, {"train_loss": loss}, step)
        if (tc.eval_every and step % tc.eval_every == 0) or step == max_steps:
            for i in active:
                _evaluate(i, runs[i].model, predictions(i, "validation"), validation, n_classes,
                          step, best[i], log_fn)
                stopped[i] = tc.patience is not None and best[i]["bad_evals"] >= tc.patience
            active = [i for i in active if not stopped[i]]
        if not active:
            break
    train_time = time.perf_counter() - t0
    out = []
    for i, r in enumerate(runs):
        r.model.load_state_dict(best[i]["state"])
        r.model.eval()
        pred = predictions(i, "test")
        te = scores(pred, test.labels, n_classes)
        out.append({"val_accuracy": best[i]["val"]["accuracy"],
                    "val_macro_f1": best[i]["val"]["macro_f1"],
                    "test_accuracy": te["accuracy"], "test_macro_f1": te["macro_f1"],
                    "best_step": best[i]["step"], "steps": steps[i], "stopped_early": stopped[i],
                    "train_time_s": train_time / K, "trained_with": K, "lr": r.lr,
                    "seed": r.seed, "val_predictions": best[i]["pred"], "test_predictions": pred,
                    "replay_blocks": replayed[i], "frozen_features": frozen is not None})
    return out


def _evaluate(i: int, model, pred: list[int], validation: Split, n_classes: int, step: int,
              best: dict[str, Any], log_fn) -> None:
    """Run i's validation: a strictly better accuracy keeps a copy of its weights (the shared
    loop's `on_best`), otherwise counts a bad eval (its `patience`)."""
    s = scores(pred, validation.labels, n_classes)
    if log_fn:
        log_fn(i, {"val_acc": s["accuracy"], "val_f1": s["macro_f1"]}, step)
    if not best or s["accuracy"] > best["val"]["accuracy"]:
        best.update(step=step, val=s, pred=pred, bad_evals=0,
                    state={k: v.detach().clone() for k, v in model.state_dict().items()})
    else:
        best["bad_evals"] += 1
