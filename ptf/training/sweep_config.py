"""The typed `sweep` params section: the learning-forgetting frontier sweep (stage
sweep@<task>-<strategy>, a DVC `foreach` over `sweep.runs`, a ragged set of task x strategy items
as `finetune.runs` is: every task can be swept with the cheap strategies and one task with the
costly ones).

In:  the `sweep` section of params.yaml; each strategy's other parameters come from its arm in
     `finetune.arms` (weight decay, LoRA alpha and targets, replay batch, ...), the training
     budget's other settings from `finetune.train`, the data caps from `finetune.data`.
Out: `SweepSection` (strict: one `ConfigError` naming the key, before any work, for an empty or
     non-positive axis, a repeated value, fewer than 2 seeds, a knob that is not a key of the
     strategy's arm, a run whose key is not `<task>-<strategy>` or whose strategy has no grid),
     `Point` (one configuration: lr, steps, knob value) and `SweepSection.points(strategy)`,
     the grid in a fixed order; `SweepSection.tasks` and `.strategies` (those of `runs`, in
     their first appearance's order); `arm_for` (the strategy's arm
     with the knob's value, validated by the arm's own model); `HeldOutKeys` (the forgetting
     stage's held-out measure, read from its section so that both measure the same blocks).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, create_model, field_validator

from ptf.common.config import ConfigError, StrictModel
from ptf.models.strategies import REGISTRY, Arm
from ptf.training.finetune_config import Run

# Strategies whose fine-tuned backbone is the classifier's own `base_model` module, so that its
# held-out LM loss can be measured in memory (`ptf.measures.sweep_drift`) exactly as the
# forgetting stage measures a saved model. Scratch has no pretrained backbone to drift from;
# prompt tuning leaves the backbone as pretrained; bottleneck adapters and OSF are saved in
# layouts whose LM view is rebuilt from files.
SWEEPABLE = ("full", "lower_lr", "linear_probe", "freeze_bottom", "gradual_unfreeze", "lora",
             "dora", "replay", "ewc", "l2sp")


def _distinct(v: list, what: str) -> list:
    seen = [x for i, x in enumerate(v) if x in v[:i]]
    if seen:
        raise ValueError(f"{what} repeated: {seen[0]!r} (in {v})")
    return v


class Knob(StrictModel):
    """A strategy's own hyperparameter and the values swept (a key of its `finetune.arms` entry)."""
    name: str = Field(min_length=1)
    values: list[int | float] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _values(cls, v: list) -> list:
        # the range of each value is the arm's own rule (`arm_for`): r > 0, alpha >= 0, ...
        return _distinct(v, "a knob value is")


class Grid(StrictModel):
    """One strategy's grid: its learning rates x (optionally) its knob's values."""
    lrs: list[float] = Field(min_length=1)
    knob: Knob | None = None

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, v: list[float]) -> list[float]:
        if any(lr <= 0 for lr in v):
            raise ValueError(f"every lr must be > 0, got {v}")
        return _distinct(v, "an lr is")


def _grid_of(strategy: str) -> type[Grid]:
    """The grid model of one strategy: its knob must be a key of its arm (other than `lrs`)."""
    keys = sorted(set(REGISTRY[strategy].arm.model_fields) - {"lrs"})

    def _knob(cls, v: Knob | None) -> Knob | None:
        if v is not None and v.name not in keys:
            raise ValueError(f"{v.name!r} is not a key of finetune.arms.{strategy} (its keys: {', '.join(keys)})")
        return v

    return create_model(f"Grid_{strategy}", __base__=Grid,
                        __validators__={"_knob": field_validator("knob")(classmethod(_knob))})


Grids = create_model("Grids", __base__=StrictModel,
                     **{name: (_grid_of(name) | None, None) for name in REGISTRY})


@dataclass(frozen=True)
class Point:
    """One configuration of a strategy's grid."""
    lr: float
    steps: int
    knob: str | None = None
    value: int | float | None = None

    @property
    def key(self) -> str:
        """A stable name, e.g. `lr=0.0003 steps=60 r=8`."""
        k = f"lr={self.lr:g} steps={self.steps}"
        return k + (f" {self.knob}={self.value:g}" if self.knob else "")


class SweepSection(StrictModel):
    runs: dict[str, Run] = Field(min_length=1)   # <task>-<strategy> -> {task, strategy}: stage sweep@<key>
    seeds: list[int] = Field(min_length=2)       # an interval needs at least 2 seeds
    lengths: list[int] = Field(min_length=1)     # optimizer steps (warmup-cosine over each)
    grids: Grids                                 # per strategy (a key of finetune.arms)
    levels: list[float] = Field(min_length=1)    # matched accuracy: shares of the way from the
                                                 # majority rate to the lower of two frontiers' tops
    experiment: str = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _distinct(v, "a seed is")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if any(n <= 0 for n in v):
            raise ValueError(f"every length (optimizer steps) must be > 0, got {v}")
        return _distinct(v, "a length is")

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < q <= 1.0 for q in v):
            raise ValueError(f"every level must be in (0, 1], got {v}")
        return _distinct(v, "a level is")

    @field_validator("runs")
    @classmethod
    def _runs(cls, v: dict[str, Run]) -> dict[str, Run]:
        for key, r in v.items():
            if key != f"{r.task}-{r.strategy}":
                raise ValueError(f"key {key!r} must be '<task>-<strategy>' of its value, i.e. "
                                 f"{r.task}-{r.strategy} (the DVC stage sweep@<key>)")
            if r.strategy not in SWEEPABLE:
                raise ValueError(f"{key}: {r.strategy!r} cannot be swept yet (its forgetting is not measured in "
                                 f"memory); sweepable: {', '.join(SWEEPABLE)}")
        return v

    @property
    def tasks(self) -> list[str]:
        """The swept tasks, in `runs` order."""
        return list(dict.fromkeys(r.task for r in self.runs.values()))

    @property
    def strategies(self) -> list[str]:
        """The swept strategies, in `runs` order."""
        return list(dict.fromkeys(r.strategy for r in self.runs.values()))

    def declared(self, task: str, strategy: str) -> bool:
        return f"{task}-{strategy}" in self.runs

    def grid(self, strategy: str) -> Grid:
        """`strategy`'s grid, or a `ConfigError` naming the key it needs."""
        g = getattr(self.grids, strategy, None)
        if g is None:
            raise ConfigError(f"invalid params: sweep.grids.{strategy}: missing; every strategy of "
                              "sweep.runs needs a grid {lrs: [...], knob: {name, values}}")
        return g

    def points(self, strategy: str) -> list[Point]:
        """The grid: lengths x lrs x knob values, in that order."""
        g = self.grid(strategy)
        values: list[Any] = list(g.knob.values) if g.knob else [None]
        return [Point(lr, steps, g.knob.name if g.knob else None, v)
                for steps, lr, v in itertools.product(self.lengths, g.lrs, values)]


def arm_for(strategy: str, base: Arm, point: Point) -> Arm:
    """`base` (finetune.arms.<strategy>) with the point's knob value, validated by its model."""
    if point.knob is None:
        return base
    try:
        return type(base).model_validate({**base.model_dump(), point.knob: point.value})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"invalid params: sweep.grids.{strategy}.knob.values: {point.value!r} for "
                          f"{point.knob}: {err['msg']}") from None


def load_sweep(path) -> SweepSection:
    """The `sweep` section, validated; every strategy of `sweep.runs` has its grid."""
    from ptf.common.config import load_section

    cfg = load_section("sweep", SweepSection, path)
    for s in cfg.strategies:
        cfg.grid(s)
    return cfg


class HeldOutKeys(StrictModel):
    """The forgetting stage's held-out measure (its keys; the others are its own)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    max_blocks: int = Field(ge=2)
    batch_size: int = Field(ge=1)
    mask_prob: float = Field(gt=0.0, lt=1.0)
    mask_seed: int = Field(ge=0)
