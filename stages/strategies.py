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

from stages.cli import StageError
from stages.config import ConfigError, StrictModel

STRATEGIES = ("full", "lower_lr", "linear_probe", "freeze_bottom", "gradual_unfreeze", "lora",
              "prompt_tuning", "replay", "ewc", "l2sp", "scratch")
PEFT_STRATEGIES = ("lora", "prompt_tuning")
META_FILE = "finetune_meta.json"       # beside every saved model: how to load it
HEAD_NAMES = ("score", "classifier")
PRETRAINED_REMEDY = ("restore it from the DVC cache with `dvc checkout data/models/pretrained`, or "
                     "retrain it with `dvc repro -f pretrain`")
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

def _labels_kwargs(label_names: list[str]) -> dict[str, Any]:
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
        config = AutoConfig.from_pretrained(pretrained_dir, **_labels_kwargs(label_names))
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained_dir, **_labels_kwargs(label_names))
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

def pretrained_lm(pretrained_dir: Path, backbone=None):
    """The pretrained LM (`AutoModelForCausalLM`, or `AutoModelForMaskedLM` for an MLM
    checkpoint) with its output layer untied and frozen (a copy of the pretrained LM head); if
    `backbone` is given it replaces the LM's own backbone module (shared, not copied)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = AutoConfig.from_pretrained(pretrained_dir)
    arch = (cfg.architectures or [""])[0]
    cls = AutoModelForMaskedLM if arch.endswith("MaskedLM") else AutoModelForCausalLM
    lm = cls.from_pretrained(pretrained_dir)
    out = lm.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone())
    lm.config.tie_word_embeddings = False
    if is_masked_lm(lm):
        from transformers import AutoTokenizer
        lm.mask_token_id = AutoTokenizer.from_pretrained(pretrained_dir).mask_token_id
    if backbone is not None:
        setattr(lm, lm.base_model_prefix, backbone)
    for name, p in lm.named_parameters():
        if not name.startswith(backbone_prefix(lm)):
            p.requires_grad_(False)
    return lm


def is_masked_lm(lm) -> bool:
    return type(lm).__name__.endswith("MaskedLM")


def lm_loss(lm, input_ids: torch.Tensor, generator: torch.Generator | None = None,
            mask_prob: float = 0.15) -> torch.Tensor:
    """The pretraining objective on packed blocks: next-token loss, or for a masked LM the
    loss on `mask_prob` of the tokens replaced by [MASK] (seeded by `generator`)."""
    if not is_masked_lm(lm):
        return lm(input_ids=input_ids, labels=input_ids).loss
    mask_id = getattr(lm, "mask_token_id", None)
    if mask_id is None:
        raise StageError("masked-LM replay/EWC needs a mask token in the pretrained tokenizer")
    pick = torch.rand(input_ids.shape, generator=generator).to(input_ids.device) < mask_prob
    labels = torch.where(pick, input_ids, torch.full_like(input_ids, -100))
    return lm(input_ids=torch.where(pick, torch.full_like(input_ids, mask_id), input_ids),
              labels=labels).loss


def load_pretraining_blocks(root: Path, block_len: int):
    """The pretraining train blocks (memory-mapped), cut to their first `block_len` tokens."""
    from stages import paths
    from stages.shards import load_blocks

    manifest = root / paths.SHARDS / "manifest.json"
    if not manifest.is_file():
        raise StageError(f"{manifest}: missing; replay and ewc need the pretraining shards "
                         "(run `dvc repro tokenize`)")
    entry = json.loads(manifest.read_text())["train"]
    return load_blocks(root / paths.SHARDS / "train", entry, verify=False), block_len


def block_batches(blocks, block_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded random batches of pretraining blocks (LongTensor batch x block_len)."""
    g = torch.Generator().manual_seed(seed)
    n = len(blocks)
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=g).tolist()
        rows = blocks[idx]["input_ids"]
        yield torch.tensor([r[:block_len] for r in rows], dtype=torch.long)


def estimate_fisher(lm, blocks, block_len: int, n_blocks: int, batch_size: int, seed: int,
                    normalize: bool) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the pretraining objective over the backbone parameters
    (keys relative to the backbone): mean over batches of the squared gradient."""
    backbone = getattr(lm, lm.base_model_prefix)
    params = {n: p for n, p in backbone.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(lm.parameters()).device
    it = block_batches(blocks, block_len, batch_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n_batches = max(1, -(-n_blocks // batch_size))
    lm.eval()
    req = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for _ in range(n_batches):
        lm.zero_grad(set_to_none=True)
        lm_loss(lm, next(it).to(device), g).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 / n_batches
    lm.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(req[n])
    if normalize:
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp(min=1e-30)
        fisher = {n: f / mean for n, f in fisher.items()}
    return fisher


class Penalty(torch.nn.Module):
    """coef/2 * sum_i w_i (theta_i - anchor_i)^2 over the backbone (w = 1: L2-SP; w = F: EWC)."""

    def __init__(self, backbone, coef: float, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.coef = coef
        self.names = [n for n, _ in backbone.named_parameters()]
        self._anchor = {n: p.detach().clone() for n, p in backbone.named_parameters()}
        self._weights = weights

    def to_device(self, device) -> "Penalty":
        self._anchor = {n: a.to(device) for n, a in self._anchor.items()}
        if self._weights is not None:
            self._weights = {n: w.to(device) for n, w in self._weights.items()}
        return self

    def forward(self, backbone) -> torch.Tensor:
        total = None
        for n, p in backbone.named_parameters():
            d = (p - self._anchor[n]) ** 2
            if self._weights is not None:
                d = d * self._weights[n]
            s = d.sum()
            total = s if total is None else total + s
        return 0.5 * self.coef * total


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

def check_weights(model_dir: Path, remedy: str) -> None:
    """A model directory must hold safetensors weights that open whole (header and every byte it
    declares): a truncated or corrupt file is a `StageError` naming the file and `remedy`, not a
    deserialisation error deep in `from_pretrained`."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise StageError(f"{model_dir}: no *.safetensors weights; {remedy}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: all mean "bad file"
            raise StageError(f"{f}: truncated or corrupt safetensors file ({e}); {remedy}") from None

def read_meta(model_dir: Path) -> dict[str, Any]:
    f = Path(model_dir) / META_FILE
    if not f.is_file():
        raise StageError(f"{f}: missing; not a fine-tuned model directory")
    return json.loads(f.read_text())


def load_classifier(model_dir: Path, pretrained_dir: Path | None = None, merge: bool = False):
    """A saved fine-tuned classifier: `AutoModelForSequenceClassification` for full-weight
    strategies, `PeftModel` (on the pretrained base) for lora/prompt_tuning; `merge=True` merges
    LoRA into the weights and returns the plain transformers model."""
    from transformers import AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    check_weights(model_dir, f"restore it with `dvc checkout {model_dir}` or rebuild it with "
                             "`dvc repro -f` of the stage that wrote it")
    if not meta["peft"]:
        return AutoModelForSequenceClassification.from_pretrained(model_dir)
    from peft import PeftModel
    base_dir = Path(pretrained_dir or meta["pretrained_dir"])
    base = AutoModelForSequenceClassification.from_pretrained(
        base_dir, **_labels_kwargs(meta["label_names"]))
    base.config.classifier_pooling = meta["pooling"]
    model = PeftModel.from_pretrained(base, model_dir)
    if merge and meta["strategy"] == "lora":
        return model.merge_and_unload()
    return model


def load_backbone_as_lm(finetuned_dir: Path, pretrained_dir: Path):
    """The fine-tuned backbone under the PRETRAINED LM head (an untied copy of the pretrained
    output layer), as `AutoModelForCausalLM` (or MaskedLM): for measuring forgetting.
    LoRA is merged first; prompt tuning leaves the backbone as pretrained (the soft prompt is not
    part of the LM input)."""
    clf = load_classifier(finetuned_dir, pretrained_dir, merge=True)
    clf = unwrap_hf(clf)
    lm = pretrained_lm(pretrained_dir)
    target = getattr(lm, lm.base_model_prefix)
    missing, unexpected = target.load_state_dict(clf.base_model.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise StageError(f"{finetuned_dir}: backbone does not match the pretrained LM "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.eval()


@torch.no_grad()
def classify(model, tokenizer, texts: list[str], max_length: int = 128) -> list[int]:
    """Predicted class ids for raw texts (the pooling recorded in the model's config)."""
    model.eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return pooled_logits(model, enc["input_ids"], enc["attention_mask"]).argmax(-1).tolist()
