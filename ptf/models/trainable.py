"""Which parameters train: naming of a classifier's parameters and the freezing rules (no CLI).

In:  a `transformers` sequence-classification model (Llama, BERT, ...: anything whose backbone
     sits under `model.base_model_prefix` and whose transformer blocks are numbered
     `layers.<i>` / `layer.<i>` / `h.<i>` / `blocks.<i>`).
Out: `depth` (layer group counted from the top: 0 head, n_layers + 1 embeddings), the
     `requires_grad` rules the strategy registry names (`train_all`, `head_only`,
     `freeze_bottom`, `head_and_top_norm`), `GradualUnfreeze` (ULMFiT's step hook),
     `discriminative_lr`, and `count_trainable`.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from ptf.common.config import ConfigError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a parameter belongs to, or None (embeddings, head, final norm)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    return "embed" in name or ".wte." in name or ".wpe." in name


def is_head(model, name: str) -> bool:
    """A parameter outside the backbone (Llama `score`, BERT `classifier`)."""
    return not name.startswith(model.base_model_prefix + ".")


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


def _set(model, trainable: Callable[[str], bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))


def train_all(model, arm) -> None:
    _set(model, lambda name: True)


def head_only(model, arm) -> None:
    """Linear probing: the backbone frozen, the new head trains."""
    _set(model, lambda name: is_head(model, name))


def freeze_bottom(model, arm) -> None:
    """Embeddings and the lowest `arm.layers` transformer blocks frozen."""
    n = model.config.num_hidden_layers
    if arm.layers > n:
        raise ConfigError(f"finetune.arms.freeze_bottom.layers: {arm.layers} > the model's "
                          f"{n} layers")

    def frozen(name: str) -> bool:
        i = layer_index(name)
        return not is_head(model, name) and (is_embedding(name) or (i is not None and i < arm.layers))
    _set(model, lambda name: not frozen(name))


def head_and_top_norm(model, arm) -> None:
    """The start of gradual unfreezing: depth 0 (head, final norm, pooler) only."""
    _set(model, lambda name: depth(model, name) == 0)


class GradualUnfreeze:
    """Step hook: at step s the groups of depth <= s // every are trainable (a function of the
    step alone, so a resumed run reconstructs it)."""

    def __init__(self, model, every: int):
        self.model, self.every = model, every

    def __call__(self, step: int, _model=None) -> None:
        top = step // self.every
        for name, p in self.model.named_parameters():
            p.requires_grad_(depth(self.model, name) <= top)


def discriminative_lr(model, lr: float, factor: float) -> Callable[[str], float]:
    """ULMFiT's per-parameter LR: lr / factor**depth."""
    return lambda name: lr / factor ** depth(model, name)


def count_trainable(model) -> dict[str, float]:
    """Trainable and total parameter counts (shared tensors counted once)."""
    seen, total, train = set(), 0, 0
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return {"trainable_params": train, "total_params": total,
            "trainable_fraction": train / total if total else 0.0}
