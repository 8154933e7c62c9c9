"""Fine-tuning runs shared by the finetune, curves and sequential stages (no CLI).

In:  the pretrained HF directory, a task's `TaskData`, a strategy name and its arm params, the
     shared `finetune` params (`FinetuneCommon`: pooling, data, train, arms, experiment).
Out: `Context` (pretrained dir, tokenizer, padding side, pretraining blocks and Fisher, built
     once per stage), `fit` (one training run with the shared loop, best-validation weights
     restored, validation/test metrics), `evaluate` / `predict`, `save_model`, `preflight`
     (everything that can fail on bad input, before training) and `run_arm` (LR search on
     the first seed, then every other seed at the chosen LR).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from ptf.common import paths
from ptf.common.cli import StageError
from ptf.data.tasks import Split, TaskData, collate
from ptf.measures.stats import mean_std
from ptf.models.lm import Penalty, block_batches, estimate_fisher, load_pretraining_blocks, pretrained_lm
from ptf.models.artifacts import META_FILE, PRETRAINED_REMEDY, check_weights
from ptf.models.strategies import (PEFT_STRATEGIES, Arm, Arms,
                                   GradualUnfreeze, TaskModel, build_classifier,
                                   count_trainable, discriminative_lr, pooled_logits, unwrap_hf)
from ptf.training.finetune_config import FinetuneCommon
from ptf.training.trainer import LoopConfig, Trainer, adamw, make_accelerator, param_groups, warmup_cosine


def accuracy_f1(pred: list[int], gold: list[int], n_classes: int) -> tuple[float, float]:
    acc = sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return acc, sum(f1s) / n_classes


@dataclass
class Context:
    """What every run of a stage shares: the pretrained dir and tokenizer, padding side, the
    pretraining blocks and the Fisher (computed once)."""
    root: Path
    cfg: FinetuneCommon
    pretrained: Path
    tokenizer: Any
    pad_left: bool
    _blocks: Any = None
    _fisher: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, cfg: FinetuneCommon) -> "Context":
        from transformers import AutoConfig, AutoTokenizer

        pre = root / paths.PRETRAINED
        if not (pre / "config.json").is_file():
            raise StageError(f"{pre}: pretrained model not found (run `dvc repro pretrain`)")
        check_weights(pre, PRETRAINED_REMEDY)
        tok = AutoTokenizer.from_pretrained(pre)
        if tok.pad_token_id is None:
            raise StageError(f"{pre}: the tokenizer has no pad token")
        arch = (AutoConfig.from_pretrained(pre).architectures or [""])[0]
        pad_left = arch.endswith("CausalLM")   # last-token / prompt pooling wants left padding
        tok.padding_side = "left" if pad_left else "right"
        return cls(root, cfg, pre, tok, pad_left)

    def loader(self, split: Split, batch_size: int, shuffle: bool, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        rows = list(zip(split.ids, split.labels))
        return torch.utils.data.DataLoader(
            rows, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
            drop_last=False, collate_fn=lambda r: collate(r, self.tokenizer.pad_token_id, self.pad_left))

    def blocks(self, block_len: int):
        if self._blocks is None:
            self._blocks = load_pretraining_blocks(self.root, block_len)[0]
        return self._blocks

    def fisher(self, arm) -> dict[str, torch.Tensor]:
        if "f" not in self._fisher:
            from accelerate import PartialState
            lm = pretrained_lm(self.pretrained).to(PartialState().device)
            self._fisher["f"] = estimate_fisher(
                lm, self.blocks(arm.block_len), arm.block_len, arm.fisher_blocks,
                arm.fisher_batch_size, seed=self.cfg.data.seed, normalize=arm.normalize)
        return self._fisher["f"]


@torch.no_grad()
def predict(clf, loader, pooling: str, device) -> tuple[list[int], list[int]]:
    clf.eval()
    pred, gold = [], []
    for b in loader:
        logits = pooled_logits(clf, b["input_ids"].to(device), b["attention_mask"].to(device), pooling)
        pred += logits.argmax(-1).tolist()
        gold += b["labels"].tolist()
    return pred, gold


def evaluate(clf, ctx: Context, split: Split, n_classes: int, device) -> dict[str, float]:
    loader = ctx.loader(split, ctx.cfg.train.eval_batch_size, shuffle=False)
    pred, gold = predict(clf, loader, ctx.cfg.pooling, device)
    acc, f1 = accuracy_f1(pred, gold, n_classes)
    return {"accuracy": acc, "macro_f1": f1}


def fit(ctx: Context, clf, strategy: str, arm: Arm, lr: float, seed: int, data: TaskData,
        train: Split, max_steps: int, desc: str, log_fn=None, penalty: Penalty | None = None,
        extras: dict | None = None) -> dict[str, Any]:
    """Train `clf` in place with the shared loop; restore its best-validation weights; return
    validation/test metrics at that point. `penalty` overrides the l2sp/ewc anchor (sequential)."""
    tc = ctx.cfg.train
    acc = make_accelerator(mixed_precision=tc.mixed_precision, grad_accum=tc.grad_accum, seed=seed)
    device = acc.device
    lm, replay_weight, replay_iter = None, 0.0, None
    hf = unwrap_hf(clf)
    if strategy == "replay":
        lm = pretrained_lm(ctx.pretrained, backbone=hf.base_model)
        replay_weight = arm.weight
        replay_iter = block_batches(ctx.blocks(arm.block_len), arm.block_len, arm.batch_size, seed)
    if penalty is None and strategy in ("l2sp", "ewc"):
        weights = ctx.fisher(arm) if strategy == "ewc" else None
        coef = arm.lam if strategy == "ewc" else arm.alpha
        penalty = Penalty(hf.base_model, coef, weights)
    if penalty is not None:
        penalty.to_device(device)
    model = TaskModel(clf, ctx.cfg.pooling, lm=lm, replay_weight=replay_weight, penalty=penalty)

    hook = None
    if strategy == "gradual_unfreeze":
        groups = param_groups(hf, lr, arm.weight_decay,
                              lr_for=discriminative_lr(hf, lr, arm.factor))
        hook = GradualUnfreeze(hf, arm.every)
    else:
        groups = param_groups(clf, lr, arm.weight_decay)
    optimizer = adamw(groups, lr=lr)
    scheduler = warmup_cosine(optimizer, min(tc.warmup_steps, max_steps // 2), max_steps,
                              acc.num_processes)
    loader = ctx.loader(train, tc.batch_size, shuffle=True, seed=seed)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    stats = extras if extras is not None else {}
    stats.setdefault("replay_blocks", 0)

    def loss_fn(m, batch):
        kw = dict(batch)
        if replay_iter is not None:
            kw["replay_ids"] = next(replay_iter).to(device)
            stats["replay_blocks"] += int(kw["replay_ids"].shape[0])
        return m(**kw)

    best: dict[str, Any] = {}

    def eval_fn() -> dict[str, float]:
        r = evaluate(clf, ctx, data.validation, data.n_classes, device)
        return {"val_acc": r["accuracy"], "val_f1": r["macro_f1"]}

    def on_best(step: int, metrics: dict[str, float]) -> None:
        best["step"] = step
        best["state"] = {k: v.detach().clone() for k, v in clf.state_dict().items()}

    loop = LoopConfig(max_steps=max_steps, grad_clip=tc.grad_clip or None,
                      eval_every=tc.eval_every, log_every=max(1, min(10, tc.eval_every)),
                      metric="val_acc", mode="max", patience=tc.patience, desc=desc)
    trainable = count_trainable(clf)
    if hook is not None:          # gradual unfreezing ends with everything trainable
        trainable = {**trainable, "trainable_params": trainable["total_params"],
                     "trainable_fraction": 1.0}
    t0 = time.perf_counter()
    result = Trainer(acc, model, optimizer, loader, scheduler, loss_fn, loop, eval_fn=eval_fn,
                     step_hook=hook, log_fn=log_fn, on_best=on_best).fit()
    train_time = time.perf_counter() - t0
    if "state" in best:
        clf.load_state_dict(best["state"])
    if hook is not None:
        for p in hf.parameters():
            p.requires_grad_(True)
    val = evaluate(clf, ctx, data.validation, data.n_classes, device)
    test = evaluate(clf, ctx, data.test, data.n_classes, device)
    acc.free_memory()
    return {"val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
            "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "best_step": best.get("step"), "steps": result.steps,
            "stopped_early": result.stopped_early, "train_time_s": train_time,
            "lr": lr, "seed": seed, **trainable}


def save_model(ctx: Context, clf, strategy: str, data: TaskData, dest: Path, extra_meta=None) -> None:
    """HF directory (or peft adapter + merged LoRA) with tokenizer and `finetune_meta.json`."""
    dest.mkdir(parents=True, exist_ok=True)
    peft = strategy in PEFT_STRATEGIES
    meta = {"strategy": strategy, "task": data.name, "label_names": data.label_names,
            "pooling": ctx.cfg.pooling, "peft": peft, "pretrained_dir": str(ctx.pretrained),
            "max_length": ctx.cfg.data.max_length, **(extra_meta or {})}
    unwrap_hf(clf).config.classifier_pooling = ctx.cfg.pooling
    clf.save_pretrained(str(dest))
    ctx.tokenizer.save_pretrained(str(dest))
    (dest / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if strategy == "lora":
        merged = copy.deepcopy(clf).merge_and_unload()
        merged.save_pretrained(str(dest / "merged"))
        ctx.tokenizer.save_pretrained(str(dest / "merged"))
        (dest / "merged" / META_FILE).write_text(json.dumps(
            {**meta, "peft": False, "merged_from": "lora"}, indent=2, sort_keys=True) + "\n")


def preflight(ctx: Context, strategy: str, data: TaskData) -> None:
    """Everything that can fail on bad input, before any training."""
    arm = getattr(ctx.cfg.arms, strategy)
    clf = build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=0,
                           pooling=ctx.cfg.pooling)
    b = collate([(data.train.ids[0], data.train.labels[0])], ctx.tokenizer.pad_token_id, ctx.pad_left)
    with torch.no_grad():
        pooled_logits(clf, b["input_ids"], b["attention_mask"], ctx.cfg.pooling)
    if strategy in ("replay", "ewc"):
        ctx.blocks(arm.block_len)


def run_arm(ctx: Context, data: TaskData, strategy: str, seeds: list[int], max_steps: int,
            train_for_seed=None, save_dir: Path | None = None, mlflow_tags=None,
            desc_prefix: str = "", stage: str = "finetune", lr_search: bool = True) -> dict[str, Any]:
    """LR search on the first seed, then every other seed at the chosen LR. Returns per-seed
    results and mean/std; saves each seed's model under `save_dir/seed<k>` if given.
    `train_for_seed(seed) -> Split` gives each seed its own training set (label fractions)."""
    from ptf.training.tracking import start_run

    arm = getattr(ctx.cfg.arms, strategy)
    train_for_seed = train_for_seed or (lambda seed: data.train)
    runs: dict[tuple[float, int], tuple[dict, Any]] = {}
    search: dict[str, float] = {}

    def one(lr: float, seed: int):
        clf = build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=seed,
                               pooling=ctx.cfg.pooling)
        tags = {"task": data.name, "strategy": strategy, "seed": str(seed), "lr": str(lr),
                **(mlflow_tags or {})}
        train = train_for_seed(seed)
        with start_run(stage, ctx.cfg.model_dump(), tags, root=ctx.root,
                       experiment=ctx.cfg.experiment) as mlrun:
            r = fit(ctx, clf, strategy, arm, lr, seed, data, train, max_steps,
                    desc=f"{desc_prefix}{data.name}/{strategy} lr={lr:g} seed={seed}",
                    log_fn=mlrun.log)
            mlrun.log({k: float(v) for k, v in r.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=r["steps"])
        r["n_train"] = len(train)
        return r, clf

    first = seeds[0]
    grid = list(arm.lrs) if lr_search else list(arm.lrs[:1])
    for lr in grid:
        r, clf = one(lr, first)
        search[f"{lr:g}"] = r["val_accuracy"]
        runs[(lr, first)] = (r, clf if save_dir is not None else None)
    chosen = max(grid, key=lambda lr: (search[f"{lr:g}"], -grid.index(lr)))
    for lr in grid:
        if lr != chosen:
            runs.pop((lr, first))
    per_seed = [runs[(chosen, first)][0]]
    if save_dir is not None:
        save_model(ctx, runs[(chosen, first)][1], strategy, data, save_dir / f"seed{first}",
                   {"seed": first, "lr": chosen})
    runs.clear()
    for seed in seeds[1:]:
        r, clf = one(chosen, seed)
        per_seed.append(r)
        if save_dir is not None:
            save_model(ctx, clf, strategy, data, save_dir / f"seed{seed}", {"seed": seed, "lr": chosen})
    summary: dict[str, Any] = {}
    for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "train_time_s"):
        ms = mean_std([r[k] for r in per_seed])
        summary[k] = {"mean": ms["mean"], "std": ms["std"]}
    return {"strategy": strategy, "chosen_lr": chosen, "lr_search_val_accuracy": search,
            "seeds": per_seed, **summary,
            "trainable_params": per_seed[0]["trainable_params"],
            "trainable_fraction": per_seed[0]["trainable_fraction"],
            "n_train": per_seed[0]["n_train"], "n_validation": len(data.validation),
            "n_test": len(data.test)}

