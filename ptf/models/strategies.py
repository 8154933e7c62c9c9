"""Fine-tuning strategies: which weights train, at which LR, with which extra loss (no CLI).

In:  the pretrained HF directory (its config gives the architecture), a strategy name and its
     typed hyperparameters (the `finetune.arms.<strategy>` params).
Out: a `TaskModel` (the classifier, plus for replay/ewc/l2sp the pieces its extra loss needs)
     whose `forward(batch)` returns `(loss, logs)`, AdamW param groups, an optional per-step
     hook (gradual unfreezing), and the loaders used by the forgetting stage:
     `load_classifier(dir)` and `load_backbone_as_lm(finetuned_dir, pretrained_dir)`.

Strategies (hand-written only where no library does it: freezing, gradual unfreezing, replay
mixing, EWC and L2-SP penalties; LoRA and prompt tuning are `peft`):
  full             all weights, usual LR
  lower_lr         all weights, much lower LR (its own LR grid)
  linear_probe     backbone frozen, head only
  freeze_bottom    embeddings + lowest `layers` transformer layers frozen
  gradual_unfreeze ULMFiT: head first, one more layer group from the top every `every` steps,
                   discriminative LRs lr / factor**depth (depth 0 = head and final norm)
  lora             peft LoRA (task_type SEQ_CLS: the head trains in full), `target_modules`
  prompt_tuning    peft prompt tuning, `virtual_tokens` soft tokens (+ the head)
  replay           task loss + weight x pretraining-objective loss on pretraining blocks, every
                   step, through the backbone and a frozen copy of the pretrained LM head
  ewc              task loss + lam/2 sum F_i (theta_i - theta*_i)^2 over the backbone, F the
                   diagonal empirical Fisher of the pretraining objective on `fisher_blocks`
  l2sp             task loss + alpha/2 ||theta_backbone - theta*||^2
  scratch          same architecture, random init

Pooling: `last` is the HF head (Llama: the last non-pad token; BERT: the [CLS] pooler);
`mean` is the masked mean over tokens of the per-token head output (exactly the head applied to
the mean hidden state, the head being linear), for heads that run per token (Llama's `score`).
A model saved with `mean` carries `classifier_pooling: mean` in its config; classify with
`classify()` / `pooled_logits()` which read it (a bare `AutoModel...(**x).logits` is last-token).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, StrictModel
from ptf.models.lm import Penalty, lm_loss, pretrained_lm

STRATEGIES = ("full", "lower_lr", "linear_probe", "freeze_bottom", "gradual_unfreeze", "lora",
              "prompt_tuning", "replay", "ewc", "l2sp", "scratch")
PEFT_STRATEGIES = ("lora", "prompt_tuning")
HEAD_NAMES = ("score", "classifier")
Pooling = Literal["last", "mean"]


# --------------------------------------------------------------------------- hyperparameters

class Arm(StrictModel):
    lrs: list[float] = Field(min_length=1)      # grid; the best on validation is kept
    weight_decay: float = Field(ge=0.0)

    @field_validator("lrs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(lr <= 0 for lr in v):
            raise ValueError(f"every lr must be > 0, got {v}")
        return v


class FreezeBottomArm(Arm):
    layers: int = Field(ge=0)                   # lowest k transformer layers frozen (+ embeddings)


class GradualUnfreezeArm(Arm):
    every: int = Field(gt=0)                    # optimizer steps between unfreezing two groups
    factor: float = Field(ge=1.0)               # discriminative LR: lr / factor**depth


class LoraArm(Arm):
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)


class PromptTuningArm(Arm):
    virtual_tokens: int = Field(gt=0)


class ReplayArm(Arm):
    weight: float = Field(ge=0.0)               # loss = task + weight * LM loss
    batch_size: int = Field(gt=0)               # pretraining blocks mixed into every step
    block_len: int = Field(gt=0)                # tokens of each block used (a prefix; bounds cost)


class EwcArm(Arm):
    lam: float = Field(ge=0.0)
    fisher_blocks: int = Field(gt=0)
    fisher_batch_size: int = Field(gt=0)
    block_len: int = Field(gt=0)
    normalize: bool                             # divide F by its mean (so lam is scale-free)


class L2spArm(Arm):
    alpha: float = Field(ge=0.0)


class Arms(StrictModel):
    full: Arm
    lower_lr: Arm
    linear_probe: Arm
    freeze_bottom: FreezeBottomArm
    gradual_unfreeze: GradualUnfreezeArm
    lora: LoraArm
    prompt_tuning: PromptTuningArm
    replay: ReplayArm
    ewc: EwcArm
    l2sp: L2spArm
    scratch: Arm


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; expected one of: {', '.join(STRATEGIES)}")
    return name


# --------------------------------------------------------------------------- parameter naming

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    return "embed" in name or ".wte." in name or ".wpe." in name


def backbone_prefix(model) -> str:
    return model.base_model_prefix + "."


def is_head(model, name: str) -> bool:
    """A parameter outside the backbone (Llama `score`, BERT `classifier`)."""
    return not name.startswith(backbone_prefix(model))


def depth(model, name: str) -> int:
    """Layer-group depth from the top: 0 head (and final norm / pooler), 1 top layer, ...,
    n_layers bottom layer, n_layers + 1 embeddings."""
    n = model.config.num_hidden_layers
    if is_head(model, name):
        return 0
    i = layer_index(name)
    if i is not None:
        return n - i
    if is_embedding(name):
        return n + 1
    return 0


def set_trainable(model, strategy: str, arm: Arm) -> None:
    """requires_grad per strategy for the non-peft strategies (peft sets its own)."""
    n = model.config.num_hidden_layers
    for name, p in model.named_parameters():
        if strategy == "linear_probe":
            p.requires_grad_(is_head(model, name))
        elif strategy == "freeze_bottom":
            if arm.layers > n:
                raise ConfigError(f"finetune.arms.freeze_bottom.layers: {arm.layers} > the model's "
                                  f"{n} layers")
            i = layer_index(name)
            frozen = not is_head(model, name) and (
                is_embedding(name) or (i is not None and i < arm.layers))
            p.requires_grad_(not frozen)
        elif strategy == "gradual_unfreeze":
            p.requires_grad_(depth(model, name) == 0)
        else:
            p.requires_grad_(True)


class GradualUnfreeze:
    """Step hook: at step s the groups of depth <= s // every are trainable (a function of the
    step alone, so a resumed run reconstructs it)."""

    def __init__(self, model, every: int):
        self.model, self.every = model, every

    def __call__(self, step: int, _model=None) -> None:
        top = step // self.every
        for name, p in self.model.named_parameters():
            p.requires_grad_(depth(self.model, name) <= top)


def discriminative_lr(model, lr: float, factor: float):
    return lambda name: lr / factor ** depth(model, name)


def count_trainable(model) -> dict[str, float]:
    seen, total, train = set(), 0, 0
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return {"trainable_params": train, "total_params": total,
            "trainable_fraction": train / total if total else 0.0}


# --------------------------------------------------------------------------- building

def labels_kwargs(label_names: list[str]) -> dict[str, Any]:
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)}}


def check_lora_targets(model, targets: list[str]) -> None:
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves and not any(
        name == t or name.endswith("." + t) for name, _ in model.named_modules())]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"finetune.arms.lora.target_modules: {missing} not found in the model "
                          f"({model.config.model_type}); its linear modules are: {linear}")


def build_classifier(pretrained_dir: Path, label_names: list[str], strategy: str, arm: Arm,
                     seed: int, pooling: Pooling = "last"):
    """The classifier for one arm: pretrained backbone + new head (or random init for scratch),
    trainability set, wrapped in peft for lora/prompt_tuning."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_strategy(strategy)
    torch.manual_seed(seed)
    if strategy == "scratch":
        config = AutoConfig.from_pretrained(pretrained_dir, **labels_kwargs(label_names))
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained_dir, **labels_kwargs(label_names))
    model.config.classifier_pooling = pooling
    if strategy == "lora":
        from peft import LoraConfig, TaskType, get_peft_model
        check_lora_targets(model, arm.target_modules)
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=arm.r, lora_alpha=arm.alpha, lora_dropout=arm.dropout,
            target_modules=list(arm.target_modules)))
    elif strategy == "prompt_tuning":
        from peft import PromptTuningConfig, TaskType, get_peft_model
        model = get_peft_model(model, PromptTuningConfig(
            task_type=TaskType.SEQ_CLS, num_virtual_tokens=arm.virtual_tokens))
    else:
        set_trainable(model, strategy, arm)
    return model


def unwrap_hf(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    from peft import PeftModel
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _head_module(model):
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            return m
    raise StageError(f"{type(model).__name__}: no classification head named {HEAD_NAMES}")


def pooled_logits(model, input_ids, attention_mask, pooling: Pooling | None = None):
    """Class logits (batch, n_labels) with `last` (the HF head) or `mean` pooling."""
    if pooling is None:
        pooling = getattr(unwrap_hf(model).config, "classifier_pooling", "last")
    if pooling == "last":
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    captured: dict[str, torch.Tensor] = {}
    hook = _head_module(model).register_forward_hook(lambda m, i, o: captured.__setitem__("o", o))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    tok = captured["o"]
    if tok.ndim != 3:
        raise ConfigError("finetune.pooling: mean needs a head applied per token (Llama `score`); "
                          f"{unwrap_hf(model).config.model_type} pools before its head: use last")
    mask = attention_mask.to(tok.dtype)
    if tok.shape[1] > mask.shape[1]:      # prompt tuning prepends virtual tokens
        extra = torch.ones(mask.shape[0], tok.shape[1] - mask.shape[1], dtype=mask.dtype,
                           device=mask.device)
        mask = torch.cat([extra, mask], dim=1)
    return (tok * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


# --------------------------------------------------------------------------- pretraining objective















# --------------------------------------------------------------------------- the model the loop trains

class TaskModel(torch.nn.Module):
    """What the training loop sees: `forward(batch) -> (loss, logs)`. Holds the classifier and,
    for replay, the pretrained LM sharing its backbone, so that every loss goes through one
    module (one DDP wrapper)."""

    def __init__(self, clf, pooling: Pooling = "last", lm=None, replay_weight: float = 0.0,
                 penalty: Penalty | None = None):
        super().__init__()
        self.clf, self.lm = clf, lm
        self.pooling, self.replay_weight = pooling, replay_weight
        self.penalty = penalty

    def backbone(self):
        return unwrap_hf(self.clf).base_model

    def forward(self, input_ids, attention_mask, labels, replay_ids=None):
        logits = pooled_logits(self.clf, input_ids, attention_mask, self.pooling)
        task = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss, logs = task, {"task_loss": task.detach()}
        if self.lm is not None and replay_ids is not None:
            rl = lm_loss(self.lm, replay_ids)
            loss = loss + self.replay_weight * rl
            logs["replay_lm_loss"] = rl.detach()
            logs["replay_blocks"] = float(replay_ids.shape[0])
        if self.penalty is not None:
            pen = self.penalty(self.backbone())
            loss = loss + pen
            logs["penalty"] = pen.detach()
        return loss, logs


# --------------------------------------------------------------------------- loading saved models








