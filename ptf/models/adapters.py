"""Bottleneck adapters in the pipeline: validation, trainability, saving and loading (no CLI).

Hand-written because no maintained library does it for this stack: peft 0.21 has no bottleneck
adapter (its only activation-space bottleneck, ShadowPEFT, is a parallel shadow network; PEANuT is
nonlinear in weight space), and the `adapters` package pins transformers 4.x. The module itself is
`ptf.models.adapter_modeling` (self-contained, so that it can ship as a model's remote code).

In:  a transformers model the pipeline built or loaded (a classifier, or the LM whose backbone the
     forgetting stage scores), the arm's params (`finetune.arms.adapter`: reduction_factor,
     placement, activation).
Out: - `add_adapters`: adapters inserted (exact identity at insertion), only adapter + head
       parameters trainable; a bad value is a `ConfigError` naming `finetune.arms.adapter.<key>`
       and the value, raised before any training;
     - `save_adapters` / `load_adapters`: just the adapter (+ head) tensors in safetensors plus a
       small JSON config, loaded back onto a freshly built base model (classifier or LM);
     - `export_hf`: a complete HF directory that `AutoModelForSequenceClassification` and
       `pipeline("text-classification")` load with `trust_remote_code=True` and that predicts
       exactly like the pipeline (its remote code is `adapter_modeling.py` itself); without
       `trust_remote_code` those clients refuse it with transformers' error, never silently.

"Head" = the parameters outside the backbone (Llama/GPT-2 `score`, BERT `classifier`) plus the
backbone's `pooler` (absent from an MLM checkpoint, so it is initialised fresh like the head).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, StrictModel
from ptf.models import adapter_modeling as M
from ptf.models.adapter_modeling import AdapterSpec, is_adapter_param

ARM = "finetune.arms.adapter"
ADAPTER_FILE = "bottleneck_adapters.safetensors"
ADAPTER_CONFIG = "bottleneck_adapters.json"
REMOTE_FILE = "modeling_bottleneck_adapters.py"
FORMAT = "ptf-bottleneck-adapters/1"


class AdapterParams(StrictModel):
    """The adapter's own arm fields (the registry's arm adds lrs / weight_decay); all required,
    as every value lives in params.yaml."""
    reduction_factor: int = Field(gt=0)         # adapter units = hidden_size // reduction_factor
    placement: Literal["both", "attention", "ffn"]
    activation: str                             # a transformers ACT2FN key (relu, gelu, silu...)


def make_spec(model, reduction_factor: int, placement: str = "both",
              activation: str = "relu") -> AdapterSpec:
    """The spec for this model, or a `ConfigError` naming the arm key and the value."""
    from transformers.activations import ACT2FN

    mt = M.base_model_type(model.config)
    if mt not in M.SUBLAYERS:
        raise ConfigError(f"{ARM}: model_type {mt!r} has no known attention/feed-forward sublayers "
                          f"for adapters; supported: {sorted(M.SUBLAYERS)}")
    if placement not in M.PLACEMENTS:
        raise ConfigError(f"{ARM}.placement: got {placement!r}; expected one of "
                          f"{', '.join(M.PLACEMENTS)}")
    if activation not in ACT2FN:
        raise ConfigError(f"{ARM}.activation: got {activation!r}; expected one of "
                          f"{', '.join(sorted(ACT2FN))}")
    hidden = model.config.hidden_size
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int):
        raise ConfigError(f"{ARM}.reduction_factor: got {reduction_factor!r}; expected an integer "
                          f"from 1 to {hidden} (adapter units = hidden size // reduction_factor)")
    if reduction_factor < 1 or hidden // reduction_factor < 1:
        units = hidden // reduction_factor if reduction_factor > 0 else 0
        raise ConfigError(f"{ARM}.reduction_factor: got {reduction_factor}, which leaves {units} "
                          f"adapter units (hidden size {hidden} // reduction_factor); it must be "
                          f"an integer from 1 to {hidden}")
    return AdapterSpec(reduction_factor, placement, activation)


def is_head(model, name: str) -> bool:
    prefix = model.base_model_prefix + "."
    return not name.startswith(prefix) or name.startswith(prefix + "pooler.")


def mark_trainable(model) -> None:
    """requires_grad only for adapter and head parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name) or is_head(model, name))


def add_adapters(model, reduction_factor: int, placement: str = "both",
                 activation: str = "relu") -> list[str]:
    """Insert adapters (recorded in `model.config.bottleneck_adapters`) and freeze everything
    but them and the head. Seed torch first: the down-projections draw from its RNG."""
    spec = make_spec(model, reduction_factor, placement, activation)
    names = M.insert_adapters(model, spec)
    model.config.bottleneck_adapters = spec.to_dict()
    mark_trainable(model)
    return names


def _spec_of(model) -> AdapterSpec:
    d = getattr(model.config, "bottleneck_adapters", None)
    if not d:
        raise StageError(f"{type(model).__name__} has no bottleneck adapters (call add_adapters)")
    return AdapterSpec.from_dict(d)


def adapter_state(model, head: bool = True) -> dict:
    """The adapter (+ head) tensors, under the model's own parameter names."""
    return {n: t.detach().contiguous() for n, t in model.state_dict().items()
            if is_adapter_param(n) or (head and is_head(model, n))}


def save_adapters(model, dest: Path) -> Path:
    """`bottleneck_adapters.safetensors` (adapter + head tensors) and `bottleneck_adapters.json`
    (spec, base model type, hidden size, the head keys) into `dest`."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    spec = _spec_of(model)
    state = adapter_state(model)
    save_file(state, str(dest / ADAPTER_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "spec": spec.to_dict(),
            "base_model_type": M.base_model_type(model.config),
            "hidden_size": model.config.hidden_size,
            "head": sorted(n for n in state if not is_adapter_param(n)),
            "adapters": len([n for n in state if is_adapter_param(n)])}
    (dest / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return dest


def read_adapter_config(src: Path) -> dict:
    f = Path(src) / ADAPTER_CONFIG
    if not f.is_file():
        raise StageError(f"{f}: missing; not a bottleneck-adapter model directory")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise StageError(f"{f}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_adapters(model, src: Path, head: bool = True):
    """Insert the saved adapters into a freshly built base `model` (the pretrained classifier with
    the task's labels, or the pretrained LM: then `head=False`) and load their tensors; every
    adapter tensor must match. Returns the model (eval mode not set)."""
    from safetensors.torch import load_file

    src = Path(src)
    meta = read_adapter_config(src)
    mt = M.base_model_type(model.config)
    if mt != meta["base_model_type"] or model.config.hidden_size != meta["hidden_size"]:
        raise StageError(f"{src / ADAPTER_CONFIG}: adapters for {meta['base_model_type']} (hidden "
                         f"{meta['hidden_size']}), not for this {mt} (hidden "
                         f"{model.config.hidden_size}); rebuild the base from the pretrained model")
    spec = AdapterSpec.from_dict(meta["spec"])
    M.insert_adapters(model, spec)
    model.config.bottleneck_adapters = spec.to_dict()
    try:
        tensors = load_file(str(src / ADAPTER_FILE))
    except Exception as e:  # noqa: BLE001 - missing, truncated or corrupt: one message
        raise StageError(f"{src / ADAPTER_FILE}: unreadable ({e}); restore it with "
                         f"`dvc checkout {src}` or rebuild it with `dvc repro -f`") from None
    wanted = {k: v for k, v in tensors.items() if is_adapter_param(k) or (head and k in meta["head"])}
    own = set(model.state_dict())
    expected = {n for n in own if is_adapter_param(n)} | (set(meta["head"]) if head else set())
    if set(wanted) != expected:
        raise StageError(f"{src / ADAPTER_FILE}: tensors do not match the model (missing "
                         f"{sorted(expected - set(wanted))[:5]}, unexpected "
                         f"{sorted(set(wanted) - expected)[:5]})")
    model.load_state_dict(wanted, strict=False)
    return model


def export_hf(model, dest: Path) -> Path:
    """A complete HF directory for plain clients: config.json (model type
    `<arch>_bottleneck_adapters`, `auto_map` to the shipped remote code), model.safetensors (all
    weights), `modeling_bottleneck_adapters.py` (= adapter_modeling.py), plus the adapter-only
    files of `save_adapters`. The caller adds the tokenizer (and the pipeline's metadata).
    Load: `AutoModelForSequenceClassification.from_pretrained(dest, trust_remote_code=True)`,
    or, in a process that imported `ptf.models.adapter_modeling`, without the flag."""
    mt = M.base_model_type(model.config)
    if mt not in M.REMOTE:
        raise ConfigError(f"{ARM}: no exportable classifier for model_type {mt!r} (supported: "
                          f"{sorted(M.REMOTE)}); save with save_adapters and load with load_adapters")
    cfg_cls, clf_cls = M.REMOTE[mt]
    base_cls = clf_cls.__mro__[2]       # (clf, _WithAdapters, <Arch>ForSequenceClassification, ...)
    if type(model) is not base_cls:
        raise StageError(f"export_hf needs a {base_cls.__name__} with adapters, got "
                         f"{type(model).__name__}")
    spec = _spec_of(model)
    dest = Path(dest)
    model.save_pretrained(str(dest))
    cfg_file = dest / "config.json"
    cfg = json.loads(cfg_file.read_text())
    module = Path(REMOTE_FILE).stem
    cfg.update(model_type=cfg_cls.model_type, architectures=[clf_cls.__name__],
               bottleneck_adapters=spec.to_dict(),
               auto_map={"AutoConfig": f"{module}.{cfg_cls.__name__}",
                         "AutoModelForSequenceClassification": f"{module}.{clf_cls.__name__}"})
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (dest / REMOTE_FILE).write_bytes(Path(M.__file__).read_bytes())
    save_adapters(model, dest)
    return dest
