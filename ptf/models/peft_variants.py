"""DoRA and OSF through peft: their configs, checked against the model before training (no CLI).

Nothing here re-implements a method: DoRA is peft's `LoraConfig(use_dora=True)` (Liu et al. 2024,
weight-decomposed LoRA: a trained magnitude per output row times the LoRA-updated direction), OSF
is peft's `OSFConfig` (orthogonal subspace fine-tuning for continual learning: each target
weight's top `effective_rank` singular directions are frozen, its remaining low singular
subspace trains, and gradients are projected orthogonally to the frozen one). What is hand-written
is the check that turns peft's silent or late failures into one `ConfigError` naming the arm key
and the value before any training:

- DoRA target names the model lacks (peft: `NoMatchingPeftModuleError` at wrap time), or that
  name a module type LoRA/DoRA cannot wrap (LayerNorm, ...);
- OSF on a model whose targets are not `torch.nn.Linear`: peft 0.21.2's OSF dispatches only
  `nn.Linear`; on GPT-2 (its projections are `transformers.Conv1D`) `get_peft_model` succeeds,
  wraps nothing and trains only the head, silently;
- an OSF `effective_rank` that leaves no trainable rank (or no frozen rank) in some target.

One addition to OSF: peft projects only the GRADIENT of U_low / V_low onto the subspace orthogonal
to the frozen one, which keeps the update there for SGD but not for AdamW, whose elementwise
scaling turns a projected gradient into an update with a component in the frozen subspace
(measured on the tiny Llama, 5 steps: |U_high^T dU| / |dU| = 0.37 with AdamW, 6e-4 with SGD).
`project_osf_` puts U_low / V_low back into the trainable subspace; `osf_projection_hook(model)`
does it after every optimizer step (`optimizer.register_step_post_hook`), so that the frozen
singular directions stay frozen with the pipeline's AdamW.

In:  a transformers classifier (not yet wrapped) and the arm's values.
Out: `lora_config` / `dora_config` -> `LoraConfig`, `osf_config` -> `OSFConfig` (task type SEQ_CLS:
     peft adds the head, `score` / `classifier`, to `modules_to_save`, so it trains and is saved);
     `wrap(model, config, arm)` -> the `PeftModel`, checked to have wrapped every target;
     `osf_projection_hook(model)` for the optimizer.

Saving and loading (tested in tests/test_peft_variants.py): `save_pretrained` writes
`adapter_config.json` + `adapter_model.safetensors`; `AutoPeftModelForSequenceClassification.
from_pretrained(dir)` rebuilds the base from `base_model_name_or_path` and predicts identically.
For OSF the saved tensors are only the trained U/S/V factors and the head: the frozen SVD factors
are recomputed from the base weights at load time (identical on the same torch build; on other
hardware equal to float precision). `merge_and_unload()` gives a plain transformers model for both
(equal to float precision, not bit for bit: the merged weight is W + delta in one rounding).
"""
from __future__ import annotations

from pydantic import Field

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, StrictModel

DORA_ARM = "finetune.arms.dora"
OSF_ARM = "finetune.arms.osf"


class OsfParams(StrictModel):
    """OSF's own arm fields (the registry's arm adds lrs / weight_decay); all required."""
    effective_rank: float = Field(gt=0.0, lt=1.0)   # share of each target's smaller dimension FROZEN
    target_modules: list[str] | None                # null: peft's default for the architecture


def _types():
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
            torch.nn.Conv3d, Conv1D)


def _matches(model, target: str) -> list[tuple[str, object]]:
    """peft's rule for a list entry: the module's full name equals it or ends with `.target`."""
    return [(n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)]


def _linear_leaves(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, _types())})


def check_targets(model, targets: list[str], key: str, allowed: tuple) -> dict[str, object]:
    """name -> module for every module the targets select; a `ConfigError` naming `key` for a
    target that selects nothing or a module of a type outside `allowed`."""
    found: dict[str, object] = {}
    for t in targets:
        hits = _matches(model, t)
        if not hits:
            raise ConfigError(f"{key}: {t!r} not found in the model ({model.config.model_type}); "
                              f"its wrappable layers are: {_linear_leaves(model)}")
        bad = sorted({type(m).__name__ for _, m in hits if not isinstance(m, allowed)})
        if bad:
            raise ConfigError(f"{key}: {t!r} selects {bad} modules, which peft cannot wrap here "
                              f"(allowed: {sorted(c.__name__ for c in allowed)})")
        found.update(hits)
    return found


def lora_config(model, r: int, alpha: float, dropout: float, target_modules: list[str],
                use_dora: bool = False, key: str = "finetune.arms.lora"):
    """peft `LoraConfig` (SEQ_CLS) after checking the targets; `use_dora=True` is DoRA."""
    from peft import LoraConfig, TaskType

    check_targets(model, list(target_modules), f"{key}.target_modules", _types())
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules), use_dora=use_dora)


def dora_config(model, r: int, alpha: float, dropout: float, target_modules: list[str]):
    return lora_config(model, r, alpha, dropout, target_modules, use_dora=True, key=DORA_ARM)


def osf_targets(model, target_modules: list[str] | None) -> dict[str, object]:
    """The modules OSF will wrap (peft's choice when `target_modules` is None: its list for the
    architecture, else every linear layer but the head), checked to be `nn.Linear`."""
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING as DEFAULTS

    key = f"{OSF_ARM}.target_modules"
    if target_modules is None:
        mt = model.config.model_type
        if mt in DEFAULTS:
            target_modules, key = DEFAULTS[mt], f"{OSF_ARM} (peft's default targets for {mt})"
        else:
            head = {"score", "classifier"}
            target_modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                     if isinstance(m, _types()) and n.rsplit(".", 1)[-1] not in head
                                     and not isinstance(m, torch.nn.Embedding)})
            key = f"{OSF_ARM} (peft's all-linear default for {mt})"
    try:
        return check_targets(model, list(target_modules), key, (torch.nn.Linear,))
    except ConfigError as e:
        raise ConfigError(f"{e}; peft's OSF wraps only torch.nn.Linear, so it cannot wrap this "
                          f"{model.config.model_type} model with these targets") from None


def osf_config(model, effective_rank: float, target_modules: list[str] | None = None):
    """peft `OSFConfig` (SEQ_CLS) after checking that OSF can wrap every target and that
    `effective_rank` (share of the smaller dimension frozen) leaves >= 1 frozen and >= 1
    trainable direction in each."""
    from peft import OSFConfig, TaskType

    if isinstance(effective_rank, bool) or not 0.0 < float(effective_rank) < 1.0:
        raise ConfigError(f"{OSF_ARM}.effective_rank: got {effective_rank!r}; expected a share "
                          "in (0, 1) of each target's smaller dimension to keep frozen")
    targets = osf_targets(model, target_modules)
    for name, m in targets.items():
        d = min(m.weight.shape)
        k = int(d * float(effective_rank))       # peft's rule for a float in (0, 1]
        if not 1 <= k < d:
            raise ConfigError(f"{OSF_ARM}.effective_rank: {effective_rank!r} keeps {k} of {d} "
                              f"directions of {name} frozen; it must keep from 1 to {d - 1}")
    names = sorted({n.rsplit(".", 1)[-1] for n in targets})
    return OSFConfig(task_type=TaskType.SEQ_CLS, effective_rank=float(effective_rank),
                     target_modules=names)


def wrap(model, config, key: str):
    """`get_peft_model`, then a check that every selected module was wrapped (peft's OSF skips
    what it cannot wrap without a word)."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = config.target_modules
    want = {n for t in ([targets] if isinstance(targets, str) else targets)
            for n, _ in _matches(model, t)}
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    wrapped = {n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)}
    missing = sorted(want - wrapped)
    if missing or not wrapped:
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise StageError(f"{key}: peft ({kind}) left {missing[:5] or 'everything'} unwrapped; "
                         "check the target modules")
    return peft_model


def project_osf_(model) -> None:
    """In place, for every OSF layer: U_low <- (I - U_high U_high^T) U_low and
    V_low <- V_low (I - V_high^T V_high), with peft's own frozen factors (where a factor is
    square peft stores the complement's basis U_low_init / V_low_init instead, as its hook does)."""
    import torch
    from peft.tuners.osf.layer import OSFLayer

    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, OSFLayer):
                continue
            for name, svd in layer.osf_svd_params.items():
                u, v = svd["U_low"], svd["V_low"]
                if name in layer._osf_U_high:
                    hi = layer._osf_U_high[name]
                    u.sub_(hi @ (hi.T @ u))
                else:
                    lo = layer._osf_U_low_init[name]
                    u.copy_(lo @ (lo.T @ u))
                if name in layer._osf_V_high:
                    hi = layer._osf_V_high[name]
                    v.sub_((v @ hi.T) @ hi)
                else:
                    lo = layer._osf_V_low_init[name]
                    v.copy_((v @ lo.T) @ lo)


def osf_projection_hook(model):
    """A `register_step_post_hook` callable: `opt.register_step_post_hook(osf_projection_hook(m))`
    on the optimizer before `accelerator.prepare` (its inner step runs once per optimizer step,
    after gradient accumulation)."""
    return lambda optimizer, args, kwargs: project_osf_(model)
