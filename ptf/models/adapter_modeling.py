"""Bottleneck adapters (Houlsby et al. 2019) on Hugging Face models: the self-contained core.

This file imports only torch and transformers, because it is ALSO the remote code of an exported
adapter model: `ptf.models.adapters.export_hf` copies it byte for byte into the model directory as
`modeling_bottleneck_adapters.py`, and `AutoModelForSequenceClassification.from_pretrained(dir,
trust_remote_code=True)` / `pipeline("text-classification", model=dir, trust_remote_code=True)` run
this very code: the pipeline and a plain client compute with the same functions and the same
weights, so they give the same logits bit for bit. (Pipeline-side validation with `ConfigError`,
trainability and saving live in `ptf.models.adapters`.)

In:  any supported HF model (classifier or LM) and an `AdapterSpec` (reduction factor, placement
     `both` | `attention` | `ffn`, activation).
Out: the same model object with one adapter after the attention and/or the feed-forward sublayer of
     every block: y -> y + up(act(down(y))), down: hidden -> hidden // reduction_factor, `up`
     zero-initialised, so at insertion the model computes exactly what it computed before (adding
     an exact 0.0 changes no float).

Why forward hooks and not module replacement: the adapter is registered as a child of the
sublayer's output projection (`...self_attn.o_proj.bottleneck_adapter.down.weight`) and applied by
a forward hook on that projection. Every original parameter keeps its name and its module, so the
pretrained checkpoint, `load_backbone_as_lm`, L2-SP anchors and peft target names see the model
unchanged, and the adapter's tensors are just extra keys. Replacing `o_proj` by a wrapper would
rename the original weights (`o_proj.inner.weight`) and break every one of those. The hook is a
module-level function that finds the adapter through the hooked module, so `copy.deepcopy` and
pickling keep it pointing at the right adapter.

Where: the output of each sublayer's last projection, before the residual add (and, for post-LN
BERT, before dropout + LayerNorm): Llama/Mistral/Qwen2 `self_attn.o_proj`, `mlp.down_proj`; BERT/
RoBERTa `attention.output.dense`, `output.dense`; GPT-2 `attn.c_proj`, `mlp.c_proj`.

Remote classes (for the export): `<Arch>BottleneckConfig` (model_type `<arch>_bottleneck_adapters`,
a subclass of the architecture's config carrying `bottleneck_adapters`) and
`<Arch>BottleneckForSequenceClassification` (the architecture's classifier + adapters). The model
type is deliberately NOT the base one: with `model_type: llama` a client without
`trust_remote_code` would silently load a plain Llama and drop the adapters; with a model type of
its own it gets transformers' error asking for `trust_remote_code=True`. `classifier_pooling: mean`
is honoured in `forward` (the masked mean of the per-token head output, as the pipeline computes it).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          LlamaConfig, LlamaForSequenceClassification, LlamaModel)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

PLACEMENTS = ("both", "attention", "ffn")
ADAPTER = "bottleneck_adapter"          # child name under each hooked projection
SUFFIX = "_bottleneck_adapters"         # model_type of an exported model: <base> + SUFFIX
# base model_type -> (attention output projection, feed-forward output projection), block-relative
SUBLAYERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}
_BLOCK = r"(?:^|\.)(?:layers|layer|h)\.\d+\."


@dataclass(frozen=True)
class AdapterSpec:
    reduction_factor: int
    placement: str = "both"
    activation: str = "relu"

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterSpec":
        return cls(int(d["reduction_factor"]), str(d["placement"]), str(d["activation"]))

    def to_dict(self) -> dict:
        return asdict(self)


def base_model_type(config) -> str:
    mt = config.model_type
    return mt[: -len(SUFFIX)] if mt.endswith(SUFFIX) else mt


def adapter_units(config, spec: AdapterSpec) -> int:
    return config.hidden_size // spec.reduction_factor if spec.reduction_factor > 0 else 0


def check_spec(config, spec: AdapterSpec) -> None:
    """ValueError for a spec this model cannot take (the pipeline re-raises it as ConfigError)."""
    mt = base_model_type(config)
    if mt not in SUBLAYERS:
        raise ValueError(f"model_type {mt!r} has no known sublayers; supported: {sorted(SUBLAYERS)}")
    if spec.placement not in PLACEMENTS:
        raise ValueError(f"placement {spec.placement!r}; expected one of {PLACEMENTS}")
    if spec.activation not in ACT2FN:
        raise ValueError(f"activation {spec.activation!r}; expected a transformers ACT2FN key")
    if adapter_units(config, spec) < 1:
        raise ValueError(f"reduction_factor {spec.reduction_factor} leaves "
                         f"{adapter_units(config, spec)} units of hidden size {config.hidden_size}")


class BottleneckAdapter(nn.Module):
    """y + up(act(down(y))), `up` zero-initialised: exactly the identity when inserted."""

    def __init__(self, hidden: int, units: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, units)
        self.act = ACT2FN[activation]
        self.up = nn.Linear(units, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.act(self.down(y)))


def _apply_adapter(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, ADAPTER)(output)


def target_names(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Names of the projections that get an adapter, in model order."""
    attn, ffn = SUBLAYERS[base_model_type(model.config)]
    suffixes = {"both": (attn, ffn), "attention": (attn,), "ffn": (ffn,)}[spec.placement]
    pattern = re.compile(_BLOCK + "(?:" + "|".join(re.escape(s) for s in suffixes) + ")$")
    return [n for n, _ in model.named_modules() if pattern.search(n)]


def insert_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Add an adapter (and its hook) under every target projection; returns their names."""
    check_spec(model.config, spec)
    names = target_names(model, spec)
    if not names:
        raise ValueError(f"no {spec.placement} sublayers found in {type(model).__name__}")
    units = adapter_units(model.config, spec)
    ref = next(model.parameters())
    for name in names:
        proj = model.get_submodule(name)
        if hasattr(proj, ADAPTER):
            raise ValueError(f"{name} already has a bottleneck adapter")
        adapter = BottleneckAdapter(model.config.hidden_size, units, spec.activation)
        proj.add_module(ADAPTER, adapter.to(device=ref.device, dtype=ref.dtype))
        proj.register_forward_hook(_apply_adapter)
    return names


def is_adapter_param(name: str) -> bool:
    return f".{ADAPTER}." in name


# --------------------------------------------------------------------------- remote classes

class _WithAdapters:
    """Mixin of the exported classifiers: adapters from `config.bottleneck_adapters`, and
    `classifier_pooling: mean` (masked mean of the per-token head output, as the pipeline)."""

    def __init__(self, config):
        super().__init__(config)
        insert_adapters(self, AdapterSpec.from_dict(config.bottleneck_adapters))

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if getattr(self.config, "classifier_pooling", "last") != "mean":
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   labels=labels, **kwargs)
        head = getattr(self, "score", None)                 # per-token heads only (Llama, GPT-2)
        if head is None:
            raise ValueError(f"classifier_pooling mean needs a per-token head; "
                             f"{type(self).__name__} pools before its head")
        captured = {}
        hook = head.register_forward_hook(lambda m, i, o: captured.__setitem__("o", o))
        try:
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            hook.remove()
        tok = captured["o"]
        if attention_mask is None:
            attention_mask = torch.ones(tok.shape[:2], dtype=torch.long, device=tok.device)
        mask = attention_mask.to(tok.dtype)
        logits = (tok * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits,
                                                hidden_states=out.hidden_states,
                                                attentions=out.attentions)


class LlamaBottleneckConfig(LlamaConfig):
    model_type = "llama" + SUFFIX


class _LlamaBottleneckModel(LlamaModel):          # the backbone AutoModel builds for this config
    config_class = LlamaBottleneckConfig


class LlamaBottleneckForSequenceClassification(_WithAdapters, LlamaForSequenceClassification):
    config_class = LlamaBottleneckConfig


class BertBottleneckConfig(BertConfig):
    model_type = "bert" + SUFFIX


class BertBottleneckForSequenceClassification(_WithAdapters, BertForSequenceClassification):
    config_class = BertBottleneckConfig


class GPT2BottleneckConfig(GPT2Config):
    model_type = "gpt2" + SUFFIX


class GPT2BottleneckForSequenceClassification(_WithAdapters, GPT2ForSequenceClassification):
    config_class = GPT2BottleneckConfig


# base model_type -> (config class, classifier class) of the export
REMOTE = {"llama": (LlamaBottleneckConfig, LlamaBottleneckForSequenceClassification),
          "bert": (BertBottleneckConfig, BertBottleneckForSequenceClassification),
          "gpt2": (GPT2BottleneckConfig, GPT2BottleneckForSequenceClassification)}

for _cfg, _clf in REMOTE.values():
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForSequenceClassification.register(_cfg, _clf, exist_ok=True)
AutoModel.register(LlamaBottleneckConfig, _LlamaBottleneckModel, exist_ok=True)
