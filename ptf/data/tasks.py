"""Labelled task data for fine-tuning (no CLI): `data/tasks/<task>/` as token-id splits.

In:  a task's HF DatasetDict (train/validation/test, columns text, label; written by the
     download stage), a tokenizer and the `finetune.data` params (`DataCfg`).
Out: `TaskData` (label names and tokenized, seeded, capped `Split`s), seeded and stratified
     subsets, and `collate` (padded batches, left- or right-padded).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from ptf.common import paths
from ptf.common.cli import StageError
from ptf.common.config import ConfigError, StrictModel

class DataCfg(StrictModel):
    max_train: int = Field(gt=0)        # training examples kept (seeded subset of the split)
    max_eval: int = Field(gt=0)         # validation and test examples kept (each)
    max_length: int = Field(gt=0)       # tokens per example (truncation)
    seed: int                           # subset selection


@dataclass
class Split:
    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int]) -> "Split":
        return Split([self.ids[i] for i in idx], [self.labels[i] for i in idx])


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split

    @property
    def n_classes(self) -> int:
        return len(self.label_names)


def seeded_subset(n: int, k: int, seed: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return sorted(idx[:min(k, n)])


def stratified_fraction(labels: list[int], fraction: float, seed: int) -> list[int]:
    """A seeded subset with round(fraction * n_c) examples of every class c (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction {fraction} is outside (0, 1]")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    out: list[int] = []
    for c in sorted(by_class):
        idx = by_class[c][:]
        rng.shuffle(idx)
        out += idx[:max(1, round(fraction * len(idx)))]
    return sorted(out)


def load_task(root: Path, task: str, tokenizer, data: DataCfg) -> TaskData:
    """Tokenized, capped splits of `data/tasks/<task>` (StageError if missing or malformed)."""
    from datasets import load_from_disk

    d = root / paths.TASKS / task
    if not (d / "dataset_dict.json").is_file():
        raise StageError(f"{d}: task data not found (expected a DatasetDict saved with "
                         "save_to_disk; run `dvc repro download`, or fix finetune.tasks)")
    dd = load_from_disk(str(d))
    for split in ("train", "validation", "test"):
        if split not in dd or not {"text", "label"} <= set(dd[split].column_names):
            raise StageError(f"{d}: needs splits train/validation/test with columns text, label")
    names = list(getattr(dd["train"].features["label"], "names", None) or [])
    if not names:
        names = [str(i) for i in range(max(dd["train"]["label"]) + 1)]

    def enc(split: str, cap: int, salt: int) -> Split:
        ds = dd[split]
        idx = seeded_subset(len(ds), cap, data.seed + salt)
        texts, labels = ds["text"], ds["label"]
        ids = tokenizer([texts[i] for i in idx], truncation=True, max_length=data.max_length,
                        add_special_tokens=True)["input_ids"]
        return Split([x if x else [tokenizer.pad_token_id] for x in ids], [int(labels[i]) for i in idx])

    return TaskData(task, names, enc("train", data.max_train, 0),
                    enc("validation", data.max_eval, 1), enc("test", data.max_eval, 2))


def collate(rows: list[tuple[list[int], int]], pad_id: int, pad_left: bool) -> dict[str, torch.Tensor]:
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, _) in enumerate(rows):
        sl = slice(n - len(x), n) if pad_left else slice(0, len(x))
        ids[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([y for _, y in rows], dtype=torch.long)}

