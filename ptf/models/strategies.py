"""The strategy registry: every fine-tuning strategy is one `Strategy` entry (no CLI).

In:  a strategy name (from params `finetune.strategies`, `finetune.curves.strategies`,
     `finetune.sequential.strategies`, or `--strategy`), its typed arm (`finetune.arms.<name>`),
     the pretrained HF directory and the task's label names.
Out: `REGISTRY` / `STRATEGIES` (the names), `check_strategy` (the one place a name is validated,
     with the known names in the error), `StrategyName` (the same check as a pydantic type),
     `Arms` (the `finetune.arms` params model, derived from the registry), `build_classifier`
     (the model of one arm, ready to train) and `TaskModel` (task loss + the entry's regulariser).

One entry says, for its strategy:
  arm          typed hyperparameters (`Arm` subclass: strict, `lrs` grid + its own knobs)
  init         "pretrained" backbone or "random" (same architecture, scratch)
  trainable    which parameters train (a rule of `ptf.models.trainable`), if not peft
  peft         the peft config that wraps the model (LoRA, DoRA, OSF, prompt tuning)
  merge        how a trained peft model folds into plain HF weights (LoRA, DoRA, OSF), for the `merged/`
               directory, the sequential run and the forgetting measures
  regulariser  what joins the task loss (replay, EWC, L2-SP): see `Regulariser`
  lr_for, step_hook   per-parameter LRs and a per-step hook (gradual unfreezing)
  optimizer_hook      a post-step hook on the optimizer (OSF: project the trained factors back
               into the subspace orthogonal to the frozen one, which AdamW leaks into)
  remote_code  saved as an HF directory whose model class ships as remote code (bottleneck
               adapters: no library carries them; plain clients load with trust_remote_code=True)
  sequential   usable as one task of the sequential run
  blocks       reads the pretraining shards (replay, EWC: checked before training)
How the model is saved and loaded follows from `peft`, `merge` and `remote_code` (`Strategy.artifact`,
implemented in `ptf.models.artifacts`). Adding a strategy = one `register(Strategy(...))` here
plus its `finetune.arms.<name>` params (docs/DEVELOPING.md).

Hand-written only where no library does it (freezing, gradual unfreezing, replay mixing, the
EWC / L2-SP penalties); LoRA, DoRA, OSF and prompt tuning are `peft`; bottleneck adapters are
our own small module (ptf.models.adapters), as no library carries them for transformers 5.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, create_model, field_validator

from ptf.common.config import ConfigError, StrictModel
from ptf.models import peft_variants as PV
from ptf.models.peft_variants import OsfParams
from ptf.models import trainable as T
from ptf.models.adapters import AdapterParams, add_adapters
from ptf.models.lm import Penalty, block_batches, lm_loss, pretrained_lm
from ptf.models.pooling import apply_pooling, pooled_logits


# --------------------------------------------------------------------------- typed arms

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


class AdapterArm(Arm, AdapterParams):
    """Bottleneck adapters: reduction_factor, placement, activation (ptf.models.adapters)."""


class OsfArm(Arm, OsfParams):
    """OSF: effective_rank (share of each target's smaller dimension frozen), target_modules
    (null: peft's default for the architecture)."""


# --------------------------------------------------------------------------- regularisers

@dataclass
class Regulariser:
    """What a strategy adds to the task loss. Replay: `weight` x the pretraining objective of
    `lm` (the pretrained LM head on the classifier's own backbone) on `batches` of pretraining
    blocks, every step. EWC / L2-SP: `penalty(backbone)`."""
    lm: Any = None
    weight: float = 0.0
    batches: Iterator[torch.Tensor] | None = None
    penalty: Penalty | None = None


# A regulariser factory gets the stage's context (`.pretrained`, `.blocks(block_len)`,
# `.fisher(arm)`: ptf.training.finetuning.Context), the backbone being trained, the backbone
# whose current weights are the anchor (the same one in `finetune`; the pretrained one in
# `sequential`, where the shared backbone has moved), the arm and the seed.
RegulariserFactory = Callable[[Any, Any, Any, Any, int], Regulariser]


def replay(ctx, backbone, anchor, arm: ReplayArm, seed: int) -> Regulariser:
    """The pretrained LM head on the trained backbone, and seeded batches of pretraining blocks."""
    return Regulariser(lm=pretrained_lm(ctx.pretrained, backbone=backbone), weight=arm.weight,
                       batches=block_batches(ctx.blocks(arm.block_len), arm.block_len,
                                             arm.batch_size, seed))


def l2sp(ctx, backbone, anchor, arm: L2spArm, seed: int) -> Regulariser:
    """alpha/2 ||theta - theta_anchor||^2 over the backbone."""
    return Regulariser(penalty=Penalty(anchor, arm.alpha))


def ewc(ctx, backbone, anchor, arm: EwcArm, seed: int) -> Regulariser:
    """lam/2 sum F (theta - theta_anchor)^2, F the pretraining objective's diagonal Fisher."""
    return Regulariser(penalty=Penalty(anchor, arm.lam, ctx.fisher(arm)))


# --------------------------------------------------------------------------- peft wrappers

def check_lora_targets(model, targets: list[str]) -> None:
    """A `ConfigError` naming the targets the model lacks and the linear modules it has."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves and not any(
        name == t or name.endswith("." + t) for name, _ in model.named_modules())]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"finetune.arms.lora.target_modules: {missing} not found in the model "
                          f"({model.config.model_type}); its linear modules are: {linear}")


def lora(model, arm: LoraArm):
    """peft LoRA, task_type SEQ_CLS (peft then trains the head in full too)."""
    from peft import LoraConfig, TaskType
    check_lora_targets(model, arm.target_modules)
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=arm.r, lora_alpha=arm.alpha,
                      lora_dropout=arm.dropout, target_modules=list(arm.target_modules))


def dora(model, arm: LoraArm):
    """peft DoRA (`LoraConfig(use_dora=True)`), task_type SEQ_CLS (the head trains in full)."""
    return PV.dora_config(model, arm.r, arm.alpha, arm.dropout, list(arm.target_modules))


def osf(model, arm: OsfArm):
    """peft OSF (`OSFConfig`), task_type SEQ_CLS (the head trains in full)."""
    return PV.osf_config(model, arm.effective_rank, arm.target_modules)


def adapters(model, arm: AdapterArm) -> None:
    """Bottleneck adapters inserted; only they and the head train. In the sequential run the
    backbone is shared: where an earlier task already inserted them, the same adapters train on
    (with this task's head), the rest of the backbone frozen."""
    from ptf.models.adapters import make_spec, mark_trainable
    from ptf.models.adapter_modeling import is_adapter_param

    if not any(is_adapter_param(n) for n, _ in model.named_parameters()):
        add_adapters(model, arm.reduction_factor, arm.placement, arm.activation)
        return
    spec = make_spec(model, arm.reduction_factor, arm.placement, arm.activation)
    model.config.bottleneck_adapters = spec.to_dict()
    mark_trainable(model)


def prompt_tuning(model, arm: PromptTuningArm):
    """peft prompt tuning: `virtual_tokens` soft tokens before the text (+ the head)."""
    from peft import PromptTuningConfig, TaskType
    return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=arm.virtual_tokens)


# --------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Strategy:
    """One fine-tuning strategy: the fields are described in the module docstring."""
    name: str
    arm: type[Arm]
    doc: str
    init: Literal["pretrained", "random"] = "pretrained"
    trainable: Callable[[Any, Any], None] = T.train_all
    peft: Callable[[Any, Any], Any] | None = None
    merge: Callable[[Any], Any] | None = None
    regulariser: RegulariserFactory | None = None
    lr_for: Callable[[Any, float, Any], Callable[[str], float]] | None = None
    step_hook: Callable[[Any, Any], Callable[[int], None]] | None = None
    optimizer_hook: Callable[[Any], Callable] | None = None
    sequential: bool = True
    blocks: bool = False
    remote_code: bool = False

    @property
    def artifact(self) -> Literal["model", "remote_code", "adapter", "adapter+merged"]:
        """How its trained model is saved (ptf.models.artifacts)."""
        if self.peft is None:
            return "remote_code" if self.remote_code else "model"
        return "adapter+merged" if self.merge is not None else "adapter"

    def prepare(self, model, arm):
        """Set what trains on a fresh classifier: wrap it in peft, or set `requires_grad`."""
        if self.peft is not None:
            from peft import get_peft_model
            return get_peft_model(model, self.peft(model, arm))
        self.trainable(model, arm)
        return model


REGISTRY: dict[str, Strategy] = {}


def register(entry: Strategy) -> Strategy:
    """Add `entry` to the registry (a name is registered once)."""
    if entry.name in REGISTRY:
        raise ValueError(f"strategy {entry.name!r} registered twice")
    REGISTRY[entry.name] = entry
    return entry


register(Strategy("full", Arm, "all weights, usual LR"))
register(Strategy("lower_lr", Arm, "all weights, much lower LR (its own LR grid)"))
register(Strategy("linear_probe", Arm, "backbone frozen, head only", trainable=T.head_only))
register(Strategy("freeze_bottom", FreezeBottomArm,
                  "embeddings + lowest `layers` transformer layers frozen",
                  trainable=T.freeze_bottom))
register(Strategy("gradual_unfreeze", GradualUnfreezeArm,
                  "ULMFiT: head first, one more layer group from the top every `every` steps, "
                  "discriminative LRs lr / factor**depth", trainable=T.head_and_top_norm,
                  lr_for=lambda m, lr, arm: T.discriminative_lr(m, lr, arm.factor),
                  step_hook=lambda m, arm: T.GradualUnfreeze(m, arm.every)))
register(Strategy("lora", LoraArm, "peft LoRA on `target_modules` (the head trains in full)",
                  peft=lora, merge=lambda m: m.merge_and_unload()))
register(Strategy("prompt_tuning", PromptTuningArm,
                  "peft prompt tuning: `virtual_tokens` soft tokens (+ the head)",
                  peft=prompt_tuning, sequential=False))   # a per-task prompt: no shared backbone
register(Strategy("replay", ReplayArm,
                  "task loss + weight x pretraining-objective loss on pretraining blocks, every "
                  "step, through the backbone and a frozen copy of the pretrained LM head",
                  regulariser=replay, blocks=True))
register(Strategy("ewc", EwcArm,
                  "task loss + lam/2 sum F_i (theta_i - theta*_i)^2 over the backbone, F the "
                  "diagonal empirical Fisher of the pretraining objective on `fisher_blocks`",
                  regulariser=ewc, blocks=True))
register(Strategy("l2sp", L2spArm, "task loss + alpha/2 ||theta_backbone - theta*||^2",
                  regulariser=l2sp))
register(Strategy("scratch", Arm, "same architecture, random init", init="random",
                  sequential=False))                       # it would re-initialise the backbone
register(Strategy("dora", LoraArm, "peft DoRA (weight-decomposed LoRA) on `target_modules` "
                  "(the head trains in full)", peft=dora, merge=lambda m: m.merge_and_unload()))
register(Strategy("adapter", AdapterArm,
                  "bottleneck adapters (Houlsby) after the attention and/or feed-forward sublayer "
                  "of every block, hidden // `reduction_factor` units; only they and the head "
                  "train", trainable=adapters, remote_code=True))
register(Strategy("osf", OsfArm,
                  "peft OSF (orthogonal subspace fine-tuning): each target's top `effective_rank` "
                  "singular directions frozen, the rest trains, kept orthogonal after every "
                  "optimizer step (the head trains in full)", peft=osf,
                  merge=lambda m: m.merge_and_unload(), optimizer_hook=PV.osf_projection_hook))

STRATEGIES: tuple[str, ...] = tuple(REGISTRY)


def unknown_strategy(name: str) -> str:
    """The one message for a name no entry has, with the known names."""
    return f"unknown strategy {name!r}; known strategies: {', '.join(REGISTRY)}"


def check_strategy(name: str, where: str = "strategy") -> Strategy:
    """The registry entry of `name`, or a `ConfigError` naming `where` and the known names."""
    if name not in REGISTRY:
        raise ConfigError(f"{where}: {unknown_strategy(name)}")
    return REGISTRY[name]


def _known(name: str) -> str:
    if name not in REGISTRY:   # pydantic prefixes the params key
        raise ValueError(unknown_strategy(name))
    return name


StrategyName = Annotated[str, AfterValidator(_known)]

def arms_model(registry: dict[str, Strategy]) -> type[StrictModel]:
    """The `finetune.arms` params model: one required, typed field per registry entry."""
    return create_model("Arms", __base__=StrictModel,
                        **{name: (e.arm, ...) for name, e in registry.items()})


Arms = arms_model(REGISTRY)


# --------------------------------------------------------------------------- building

def labels_kwargs(label_names: list[str]) -> dict[str, Any]:
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)}}


def new_classifier(pretrained_dir: Path, label_names: list[str], random_init: bool = False,
                   pooling: str = "last"):
    """`AutoModelForSequenceClassification` on the pretrained backbone with a new head (or the
    same architecture at random init), labels named, pooling set in its config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if random_init:
        config = AutoConfig.from_pretrained(pretrained_dir, **labels_kwargs(label_names))
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained_dir, **labels_kwargs(label_names))
    apply_pooling(model.config, pooling)
    return model


def build_classifier(pretrained_dir: Path, label_names: list[str], strategy: str, arm: Arm,
                     seed: int, pooling: str = "last"):
    """The classifier for one arm, seeded (head init, LoRA init, soft prompt), ready to train."""
    entry = check_strategy(strategy)
    torch.manual_seed(seed)
    model = new_classifier(pretrained_dir, label_names, entry.init == "random", pooling)
    return entry.prepare(model, arm)


def unwrap_hf(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    from peft import PeftModel
    return model.get_base_model() if isinstance(model, PeftModel) else model


# --------------------------------------------------------------------------- the model the loop trains

class TaskModel(torch.nn.Module):
    """What the training loop sees: `forward(batch) -> (loss, logs)`. Holds the classifier and
    the regulariser's modules (for replay the pretrained LM sharing its backbone), so that every
    loss goes through one module (one DDP wrapper)."""

    def __init__(self, clf, regulariser: Regulariser | None = None):
        super().__init__()
        reg = regulariser or Regulariser()
        self.clf, self.lm = clf, reg.lm
        self.replay_weight, self.penalty = reg.weight, reg.penalty

    def backbone(self):
        return unwrap_hf(self.clf).base_model

    def forward(self, input_ids, attention_mask, labels, replay_ids=None):
        logits = pooled_logits(self.clf, input_ids, attention_mask)
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
