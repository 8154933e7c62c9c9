"""Fine-tuning runs shared by the finetune, curves and sequential stages (no CLI).

In:  the pretrained HF directory, a task's `TaskData`, a strategy name (its registry entry,
     ptf.models.strategies) and its arm params, the shared `finetune` params (`FinetuneCommon`:
     pooling, data, train, arms, experiment).
Out: `Context` (pretrained dir, tokenizer, padding side, pretraining blocks and Fisher, built
     once per stage; the pooling checked against the architecture), `fit` (one training run
     with the shared loop, best-validation weights restored, validation/test metrics and
     predictions), `evaluate`, `save_model`, `preflight` (everything that can fail on bad
     input, before training) and `run_arm` (LR search on the first seed, then every other seed
     at the chosen LR).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ptf.common import paths
from ptf.common.cli import StageError
from ptf.data.tasks import Split, TaskData, collate
from ptf.measures.stats import mean_std
from ptf.models.backbones import backbone_dirs, backbone_index, seed_key
from ptf.models.artifacts import PRETRAINED_REMEDY, check_weights, predict_ids, save_classifier
from ptf.models.lm import estimate_fisher, load_pretraining_blocks, pretrained_lm
from ptf.models.pooling import check_pooling, pooled_logits
from ptf.models.strategies import Arm, TaskModel, build_classifier, check_strategy, unwrap_hf
from ptf.models.trainable import count_trainable
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
    pretraining blocks and the Fisher (computed once per backbone). `pretrained` is the first
    backbone; `for_seed(seed)` gives the context of the backbone fine-tune seed `seed` starts
    from (ptf.models.backbones). `backbones`: every backbone directory, the first first, as
    `create` read them once from backbones.json (empty: `pretrained` is the only one)."""
    root: Path
    cfg: FinetuneCommon
    pretrained: Path
    tokenizer: Any
    pad_left: bool
    backbones: tuple[Path, ...] = ()
    _blocks: dict[int, Any] = field(default_factory=dict)   # shared by every for_seed copy
    _fisher: dict[str, Any] = field(default_factory=dict)   # keyed by backbone dir

    @classmethod
    def create(cls, root: Path, cfg: FinetuneCommon) -> "Context":
        """Checks the pretrained model (weights whole, a pad token, `finetune.pooling` native to
        its architecture's HF head) before any work."""
        from transformers import AutoConfig, AutoTokenizer

        pre = root / paths.PRETRAINED
        if not (pre / "config.json").is_file():
            raise StageError(f"{pre}: pretrained model not found (run `dvc repro pretrain`)")
        backbones = tuple(backbone_dirs(pre))
        for d in backbones:
            check_weights(d, PRETRAINED_REMEDY)
        tok = AutoTokenizer.from_pretrained(pre)
        if tok.pad_token_id is None:
            raise StageError(f"{pre}: the tokenizer has no pad token")
        config = AutoConfig.from_pretrained(pre)
        check_pooling(cfg.pooling, config.model_type)
        arch = (config.architectures or [""])[0]
        pad_left = arch.endswith("CausalLM")   # last-token / prompt pooling wants left padding
        tok.padding_side = "left" if pad_left else "right"
        return cls(root, cfg, pre, tok, pad_left, backbones)

    def for_seed(self, seed: int) -> "Context":
        """This context on the backbone of fine-tune seed `seed` (the same object when there is
        one backbone); the caches stay shared. In: an int seed. Out: a Context (no file read)."""
        dirs = self.backbones or (self.pretrained,)
        pre = dirs[backbone_index(seed, len(dirs))]
        return self if pre == self.pretrained else replace(self, pretrained=pre)

    def loader(self, split: Split, batch_size: int, shuffle: bool, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        rows = list(zip(split.ids, split.labels))
        return torch.utils.data.DataLoader(
            rows, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
            drop_last=False, collate_fn=lambda r: collate(r, self.tokenizer.pad_token_id, self.pad_left))

    def blocks(self, block_len: int):
        if block_len not in self._blocks:
            self._blocks[block_len] = load_pretraining_blocks(self.root, block_len)[0]
        return self._blocks[block_len]

    def fisher(self, arm) -> dict[str, torch.Tensor]:
        key = str(self.pretrained)
        if key not in self._fisher:
            from accelerate import PartialState
            lm = pretrained_lm(self.pretrained).to(PartialState().device)
            self._fisher[key] = estimate_fisher(
                lm, self.blocks(arm.block_len), arm.block_len, arm.fisher_blocks,
                arm.fisher_batch_size, seed=self.cfg.data.seed, normalize=arm.normalize)
        return self._fisher[key]


def evaluate(clf, ctx: Context, split: Split, n_classes: int, device) -> dict[str, Any]:
    """Accuracy, macro-F1 and the predicted class ids (in split order) of `clf` on `split`,
    through the one prediction path every client shares (`ptf.models.artifacts.predict_ids`)."""
    pred = predict_ids(clf, split.ids, ctx.cfg.train.eval_batch_size, device)
    acc, f1 = accuracy_f1(pred, split.labels, n_classes)
    return {"accuracy": acc, "macro_f1": f1, "predictions": pred}


def fit(ctx: Context, clf, strategy: str, arm: Arm, lr: float, seed: int, data: TaskData,
        train: Split, max_steps: int, desc: str, log_fn=None, anchor=None) -> dict[str, Any]:
    """Train `clf` in place with the shared loop, as its registry entry says (regulariser, LR
    per parameter, step hook); restore its best-validation weights; return validation/test
    metrics and predictions at that point, and the pretraining blocks replayed. `anchor`: the
    backbone whose weights a penalty pulls towards (default: `clf`'s own, as it starts)."""
    entry = check_strategy(strategy)
    tc = ctx.cfg.train
    acc = make_accelerator(mixed_precision=tc.mixed_precision, grad_accum=tc.grad_accum, seed=seed)
    device = acc.device
    hf = unwrap_hf(clf)
    reg = None
    if entry.regulariser is not None:
        reg = entry.regulariser(ctx, hf.base_model, hf.base_model if anchor is None else anchor,
                                arm, seed)
        if reg.penalty is not None:
            reg.penalty.to_device(device)
    model = TaskModel(clf, reg)

    hook = entry.step_hook(hf, arm) if entry.step_hook is not None else None
    if entry.lr_for is not None:   # per-parameter LRs cover frozen parameters too (hf's names)
        groups = param_groups(hf, lr, arm.weight_decay, lr_for=entry.lr_for(hf, lr, arm))
    else:
        groups = param_groups(clf, lr, arm.weight_decay)
    optimizer = adamw(groups, lr=lr)
    if entry.optimizer_hook is not None:     # before prepare: runs once per optimizer step
        optimizer.register_step_post_hook(entry.optimizer_hook(clf))
    scheduler = warmup_cosine(optimizer, min(tc.warmup_steps, max_steps // 2), max_steps,
                              acc.num_processes)
    loader = ctx.loader(train, tc.batch_size, shuffle=True, seed=seed)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    replayed = {"blocks": 0}

    def loss_fn(m, batch):
        kw = dict(batch)
        if reg is not None and reg.batches is not None:
            kw["replay_ids"] = next(reg.batches).to(device)
            replayed["blocks"] += int(kw["replay_ids"].shape[0])
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
            "lr": lr, "seed": seed, "replay_blocks": replayed["blocks"], **trainable,
            "val_predictions": val["predictions"], "test_predictions": test["predictions"]}


def save_model(ctx: Context, clf, strategy: str, data: TaskData, dest: Path, result: dict[str, Any],
               publish: Path | None = None) -> None:
    """One seed's model in its strategy's layout (ptf.models.artifacts.save_classifier), its
    card reporting `result` (a `fit` result) and the training parameters."""
    arm = getattr(ctx.cfg.arms, strategy)
    tc, dc = ctx.cfg.train, ctx.cfg.data
    meta = {"strategy": strategy, "task": data.name, "label_names": data.label_names,
            "pooling": ctx.cfg.pooling, "pretrained_dir": str(ctx.pretrained),
            "max_length": dc.max_length, "padding_side": ctx.tokenizer.padding_side,
            "seed": result["seed"], "lr": result["lr"]}
    results = {k: result[k] for k in ("val_accuracy", "val_macro_f1", "test_accuracy",
                                      "test_macro_f1")}
    results.update(n_validation=len(data.validation), n_test=len(data.test))
    train = {"lr (chosen on validation)": result["lr"], "seed": result["seed"],
             "optimizer steps": result["steps"], "best validation step": result["best_step"],
             "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
             "warmup_steps": tc.warmup_steps, "max_length": dc.max_length,
             "training examples": result.get("n_train", len(data.train)),
             "pooling": ctx.cfg.pooling, "trainable_params": result["trainable_params"],
             f"finetune.arms.{strategy}": arm.model_dump()}
    save_classifier(clf, ctx.tokenizer, dest, meta, results, train, publish)


def preflight(ctx: Context, strategy: str, data: TaskData) -> None:
    """Everything that can fail on bad input, before any training: the strategy name, its arm
    on this model (LoRA targets, frozen layers), a forward pass, the pretraining shards."""
    entry = check_strategy(strategy)
    arm = getattr(ctx.cfg.arms, strategy)
    clf = build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=0,
                           pooling=ctx.cfg.pooling)
    b = collate([(data.train.ids[0], data.train.labels[0])], ctx.tokenizer.pad_token_id, ctx.pad_left)
    with torch.no_grad():
        pooled_logits(clf, b["input_ids"], b["attention_mask"])
    if entry.blocks:
        ctx.blocks(arm.block_len)


def run_arm(ctx: Context, data: TaskData, strategy: str, seeds: list[int], max_steps: int,
            train_for_seed=None, save_dir: Path | None = None, mlflow_tags=None,
            desc_prefix: str = "", stage: str = "finetune", lr_search: bool = True,
            publish_dir: Path | None = None) -> dict[str, Any]:
    """LR search on the first seed, then every other seed at the chosen LR. Returns per-seed
    results (with validation/test predictions in split order) and mean/std, and the gold
    labels; saves each seed's model under `save_dir/seed<k>` if given (`publish_dir`: where
    `save_dir` will be renamed to). `train_for_seed(seed) -> Split` gives each seed its own
    training set (label fractions)."""
    from ptf.training.tracking import start_run

    arm = getattr(ctx.cfg.arms, strategy)
    train_for_seed = train_for_seed or (lambda seed: data.train)
    publish_dir = publish_dir or save_dir
    runs: dict[tuple[float, int], tuple[dict, Any]] = {}
    search: dict[str, float] = {}

    def one(lr: float, seed: int):
        sctx = ctx.for_seed(seed)
        clf = build_classifier(sctx.pretrained, data.label_names, strategy, arm, seed=seed,
                               pooling=ctx.cfg.pooling)
        tags = {"task": data.name, "strategy": strategy, "seed": str(seed), "lr": str(lr),
                **(mlflow_tags or {})}
        train = train_for_seed(seed)
        with start_run(stage, ctx.cfg.model_dump(), tags, root=ctx.root,
                       experiment=ctx.cfg.experiment) as mlrun:
            r = fit(sctx, clf, strategy, arm, lr, seed, data, train, max_steps,
                    desc=f"{desc_prefix}{data.name}/{strategy} lr={lr:g} seed={seed}",
                    log_fn=mlrun.log)
            mlrun.log({k: float(v) for k, v in r.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=r["steps"])
        r["n_train"] = len(train)
        return r, clf

    def save(r: dict[str, Any], clf) -> None:
        if save_dir is not None:
            name = seed_key(r["seed"])
            save_model(ctx.for_seed(r["seed"]), clf, strategy, data, save_dir / name, r, publish_dir / name)

    first = seeds[0]
    grid = list(arm.lrs) if lr_search else list(arm.lrs[:1])
    for lr in grid:
        r, clf = one(lr, first)
        search[f"{lr:g}"] = r["val_accuracy"]
        runs[(lr, first)] = (r, clf if save_dir is not None else None)
    chosen = max(grid, key=lambda lr: (search[f"{lr:g}"], -grid.index(lr)))
    per_seed = [runs[(chosen, first)][0]]
    save(*runs[(chosen, first)])
    runs.clear()
    for seed in seeds[1:]:
        r, clf = one(chosen, seed)
        per_seed.append(r)
        save(r, clf)
    summary: dict[str, Any] = {}
    for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "train_time_s"):
        ms = mean_std([r[k] for r in per_seed])
        summary[k] = {"mean": ms["mean"], "std": ms["std"]}
    return {"strategy": strategy, "chosen_lr": chosen, "lr_search_val_accuracy": search,
            "seeds": per_seed, **summary,
            "trainable_params": per_seed[0]["trainable_params"],
            "trainable_fraction": per_seed[0]["trainable_fraction"],
            "n_train": per_seed[0]["n_train"], "n_validation": len(data.validation),
            "n_test": len(data.test), "validation_labels": list(data.validation.labels),
            "test_labels": list(data.test.labels)}
