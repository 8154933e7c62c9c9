"""WiSE-FT: weight-space ensembles of the pretrained and the fine-tuned backbone (no CLI).

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models"): after full fine-tuning, the
backbone (1 - alpha) * pretrained + alpha * fine-tuned, for several alpha, each one point of the
learning-forgetting trade-off at no extra training. Hand-written: a dozen lines, no maintained
library does this for HF classifiers (peft's `add_weighted_adapter` mixes adapters, not a full
fine-tune with its starting point).

In:  the pretrained backbone's state (`pretrained_backbone_state(pretrained_dir)`: the backbone of
     the pretrained LM, keys relative to the backbone), a fine-tuned classifier of a full-weight
     strategy (a plain transformers model, not a peft wrapper), coefficients alpha in [0, 1]
     (`finetune.arms.wise_ft.alphas`; `check_alphas` refuses an empty list or a value outside
     with a `ConfigError` naming that key and the value).
Out: `WiseFtParams` (the arm's own fields), `interpolate(pre_state, finetuned, alpha)`: a new classifier (a deep copy; the input is left
     as it is) whose backbone is the mix and whose head is the fine-tuned one; `wise_ft_models`
     yields (alpha, classifier) for a list.

Exact at the ends: `torch.lerp(pre, ft, a)` is computed as pre + a * (ft - pre) for a < 0.5 and
ft - (1 - a) * (ft - pre) otherwise, so alpha 0 gives the pretrained tensor and alpha 1 the
fine-tuned one bit for bit (and LM losses measured through them are identical).

Which tensors: floating-point backbone tensors present in both states are mixed; tensors only the
fine-tuned backbone has (BERT's `pooler`, which an MLM checkpoint lacks and the classifier
initialises fresh) stay fine-tuned, like the head; a tensor only the pretrained state has, a shape
mismatch, or a differing non-float buffer (position ids) is a `StageError`: the models do not
belong together.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from ptf.common.cli import StageError
from ptf.common.config import ConfigError

ARM = "wise_ft"


def check_alphas(alphas) -> list[float]:
    """The mixing coefficients as floats, or a `ConfigError` naming `wise_ft.alphas`."""
    if not isinstance(alphas, (list, tuple)) or not alphas:
        raise ConfigError(f"{ARM}.alphas: got {alphas!r}; expected a non-empty list of "
                          "coefficients in [0, 1] (0 = pretrained backbone, 1 = fine-tuned)")
    out = []
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or math.isnan(a) or not 0 <= a <= 1:
            raise ConfigError(f"{ARM}.alphas: got {a!r} in {list(alphas)!r}; every coefficient "
                              "must be a number in [0, 1]")
        out.append(float(a))
    if len(set(out)) != len(out):
        raise ConfigError(f"{ARM}.alphas: {list(alphas)!r} repeats a coefficient")
    return out


def backbone(model):
    return getattr(model, model.base_model_prefix)


def pretrained_backbone_state(pretrained_dir: Path) -> dict[str, torch.Tensor]:
    """The pretrained backbone's tensors (keys relative to the backbone), taken from the
    pretrained LM so that nothing the checkpoint lacks (a pooler) is invented; a foundation
    saved without an LM head (a bare `BertModel`) is that backbone itself, pooler included."""
    from transformers import AutoModel

    from ptf.measures.drift import lm_objective
    from ptf.models.lm import pretrained_lm

    pretrained_dir = Path(pretrained_dir)
    body = (backbone(pretrained_lm(pretrained_dir)) if lm_objective(pretrained_dir)
            else AutoModel.from_pretrained(pretrained_dir))
    return {k: v.detach().clone() for k, v in body.state_dict().items()}


def _check(pre: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor]) -> None:
    only_pre = sorted(set(pre) - set(ft))
    shapes = sorted(k for k in set(pre) & set(ft) if pre[k].shape != ft[k].shape)
    buffers = sorted(k for k in set(pre) & set(ft) if k not in shapes
                     and not ft[k].is_floating_point() and not torch.equal(pre[k], ft[k]))
    if only_pre or shapes or buffers:
        raise StageError(f"{ARM}: the fine-tuned backbone does not match the pretrained one "
                         f"(missing {only_pre[:5]}, other shapes {shapes[:5]}, other buffers "
                         f"{buffers[:5]}); fine-tune from this pretrained model")


def interpolate(pre_state: Mapping[str, torch.Tensor], finetuned, alpha: float):
    """A copy of `finetuned` with backbone (1 - alpha) * pretrained + alpha * fine-tuned."""
    from peft import PeftModel

    if isinstance(finetuned, PeftModel):
        raise ConfigError(f"{ARM}: needs a full-weight fine-tuned classifier (full, lower_lr, "
                          f"l2sp, ...), got a peft model ({type(finetuned).__name__})")
    (alpha,) = check_alphas([alpha])
    out = copy.deepcopy(finetuned)
    ft_state = backbone(out).state_dict()
    _check(pre_state, ft_state)
    mixed = {}
    with torch.no_grad():
        for k, t in ft_state.items():
            if k in pre_state and t.is_floating_point():
                p = pre_state[k].to(device=t.device, dtype=t.dtype)
                mixed[k] = torch.lerp(p, t, alpha)
    missing, unexpected = backbone(out).load_state_dict(mixed, strict=False)
    if unexpected:
        raise StageError(f"{ARM}: unexpected backbone keys {unexpected[:5]}")
    return out


def wise_ft_models(pre_state: Mapping[str, torch.Tensor], finetuned,
                   alphas) -> Iterator[tuple[float, object]]:
    """(alpha, interpolated classifier) for every coefficient, in the given order."""
    for a in check_alphas(alphas):
        yield a, interpolate(pre_state, finetuned, a)
