"""The pretrained backbones a run fine-tunes from, and which one each fine-tune seed starts from
(no CLI, no torch).

In:  data/models/pretrained/ as the pretrain stage wrote it: the first backbone's HF directory,
     and, when `pretrain.extra_seeds` asked for more, `backbones/<seed>/` (each a whole HF
     directory with the tokenizer) listed in `backbones.json` {"seeds": [first, ...]}.
Out: `backbone_dirs(pretrained)` (every backbone, the first first), `backbone_for(pretrained,
     seed)` (the directory fine-tune seed `seed` starts from: backbone `seed mod N`),
     `backbone_index(seed, n)`, `per_backbone(pretrained, make)` (a reference per backbone, made
     once), and the seed keys: `seed_key(3)` -> "seed3", `seed_number("seed3")` -> 3.

Why seed mod N: every stage pairs its arms by fine-tune seed (the same seed, the same
backbone, the same data order), and the claims' bootstrap resamples the backbones and the seeds
within them (`ptf.measures.claims`), so the spread includes pretraining variance. With N
backbones, use fine-tune seeds 0..k*N-1 so that each backbone gets k of them.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

BACKBONES_DIR = "backbones"
BACKBONES_FILE = "backbones.json"
_SEED_KEY = re.compile(r"(?:seed)?(\d+)")

T = TypeVar("T")


def seed_key(seed: int) -> str:
    """In: a fine-tune seed (an int, or its digits as text). Out: its key "seed<k>", as the
    fine-tune metrics and the model directories name it."""
    return f"seed{int(seed)}"


def seed_number(key: str | int) -> int:
    """In: a seed key "seed<k>", its bare number "<k>" (the sweep's keys), or the int itself.
    Out: k. Raises ValueError on anything else."""
    if isinstance(key, int):
        return key
    m = _SEED_KEY.fullmatch(str(key))
    if m is None:
        raise ValueError(f"not a seed key: {key!r} (expected 'seed<k>' or '<k>', k a whole number >= 0)")
    return int(m.group(1))


def backbone_seeds(pretrained: Path) -> list[int] | None:
    """The pretraining seeds of the backbones, the first first; None for one backbone (no
    backbones.json: one seed, or a foundation used as it is)."""
    f = Path(pretrained) / BACKBONES_FILE
    return json.loads(f.read_text(encoding="utf-8"))["seeds"] if f.is_file() else None


def backbone_dirs(pretrained: Path) -> list[Path]:
    seeds = backbone_seeds(pretrained)
    pretrained = Path(pretrained)
    return [pretrained] + [pretrained / BACKBONES_DIR / str(s) for s in (seeds or [])[1:]]


def backbone_index(seed: int, n_backbones: int) -> int:
    return int(seed) % n_backbones


def backbone_for(pretrained: Path, seed: int) -> Path:
    dirs = backbone_dirs(pretrained)
    return dirs[backbone_index(seed, len(dirs))]


def per_backbone(pretrained: Path, make: Callable[[Path], T]) -> Callable[[str | int], T]:
    """In: the pretrained directory and `make(backbone_dir)`, which builds a reference from one
    backbone (its EvalSet, its features...). Out: seed (key or number) -> make(the directory
    that seed starts from), made at most once per backbone. backbones.json is read here, once."""
    dirs = backbone_dirs(pretrained)
    made = functools.lru_cache(maxsize=None)(make)
    return lambda seed: made(dirs[backbone_index(seed_number(seed), len(dirs))])
