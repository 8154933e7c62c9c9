"""The pretrained backbones a run fine-tunes from, and which one each fine-tune seed starts from
(no CLI, no torch).

In:  data/models/pretrained/ as the pretrain stage wrote it: the first backbone's HF directory,
     and, when `pretrain.extra_seeds` asked for more, `backbones/<seed>/` (each a whole HF
     directory with the tokenizer) listed in `backbones.json` {"seeds": [first, ...]}.
Out: `backbone_dirs(pretrained)` (every backbone, the first first), `backbone_for(pretrained,
     seed)` (the directory fine-tune seed `seed` starts from: backbone `seed mod N`), and
     `backbone_index(seed, n)`.

Why seed mod N: every stage pairs its arms by fine-tune seed (the same seed, the same
backbone, the same data order), and the claims' bootstrap resamples the backbones and the seeds
within them (`ptf.measures.claims`), so the spread includes pretraining variance. With N
backbones, use fine-tune seeds 0..k*N-1 so that each backbone gets k of them.
"""
from __future__ import annotations

import json
from pathlib import Path

BACKBONES_DIR = "backbones"
BACKBONES_FILE = "backbones.json"


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
