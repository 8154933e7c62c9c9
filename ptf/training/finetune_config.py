"""The typed `finetune` params section, shared by the finetune, curves and sequential stages.

In:  the `finetune` section of params.yaml.
Out: `FinetuneSection` (the whole section, strict: an unknown or misspelt key anywhere is an
     error), and the subsets each stage reads: `FinetuneCommon` (pooling, data, train, arms,
     experiment) plus the stage's own keys (`FinetuneKeys`, `CurvesKeys`, `SequentialKeys`);
     `Runs`, the declared fine-tune arms (`finetune.runs`: "<task>-<strategy>" -> {task,
     strategy}, a ragged set: not every task runs every strategy), which the finetune stage
     (DVC `foreach`) and the forgetting stage read.
     `load_stage_config(model)` validates the whole section, then builds `model` from it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field, field_validator

from ptf.common.config import PARAMS_FILE, ConfigError, StrictModel, parse_section, read_params
from ptf.data.tasks import DataCfg
from ptf.models.pooling import PoolingName
from ptf.models.strategies import REGISTRY, Arms, StrategyName

SECTION = "finetune"


class TrainCfg(StrictModel):
    batch_size: int = Field(gt=0)
    eval_batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0)
    max_steps: int = Field(gt=0)        # optimizer steps, every arm
    warmup_steps: int = Field(ge=0)
    eval_every: int = Field(gt=0)       # optimizer steps between validation evals
    patience: int | None = Field(default=None, ge=0)   # evals without improvement; null: off
    grad_clip: float = Field(ge=0.0)    # 0: off
    mixed_precision: Literal["no", "fp16", "bf16"]


class SectionSubset(StrictModel):
    """Some keys of the shared section; the others belong to the other stages (validated whole
    by `FinetuneSection`)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class CurvesCfg(StrictModel):
    task: str
    strategies: list[StrategyName] = Field(min_length=1)
    fractions: list[float] = Field(min_length=1)   # of the (capped) training split, in (0, 1]
    seeds: list[int] = Field(min_length=1)
    # The budget grows with the labels, so that every fraction's arms see all their labels:
    # ceil(epochs x n_labels / examples per optimizer step) steps, at least min_steps.
    epochs: float = Field(gt=0)
    min_steps: int = Field(gt=0)
    lr_search: bool                     # true: search each arm's grid per fraction; false: its first LR

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"label fractions must be in (0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"a label fraction is repeated: {v}")
        return v

    @field_validator("seeds", "strategies")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"a value is repeated: {v}")
        return v

    def steps_for(self, n_labels: int, per_step: int) -> int:
        """Optimizer steps for a subset of `n_labels` examples, `per_step` examples a step."""
        return max(self.min_steps, math.ceil(self.epochs * n_labels / per_step))


def _no_repeats(v: list, what: str) -> list:
    seen = [x for i, x in enumerate(v) if x in v[:i]]
    if seen:
        raise ValueError(f"{what} repeated: {seen[0]!r} (in {v})")
    return v


class SequentialCfg(StrictModel):
    """`finetune.sequential`: one run per (order, strategy, seed); each trains every task of its
    order with its strategy (the first LR of the arm's grid)."""
    orders: list[list[str]] = Field(min_length=1)     # each a permutation of the first
    strategies: list[StrategyName] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    max_steps: int = Field(gt=0)

    @field_validator("orders")
    @classmethod
    def _orders(cls, v: list[list[str]]) -> list[list[str]]:
        for i, order in enumerate(v):
            if not order:
                raise ValueError(f"order {i} is empty")
            _no_repeats(order, f"order {i}: a task is")
            if i and sorted(order) != sorted(v[0]):
                raise ValueError(f"order {i} {order} is not a permutation of order 0 {v[0]}: every "
                                 "order must train the same tasks")
        _no_repeats(v, "an order is")
        return v

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v: list[str]) -> list[str]:
        _no_repeats(v, "a strategy is")
        for s in v:   # names already checked by StrategyName (the registry)
            if not REGISTRY[s].sequential:
                usable = [n for n, e in REGISTRY.items() if e.sequential]
                raise ValueError(f"{s!r} is not a sequential strategy (those are: {', '.join(usable)})")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _no_repeats(v, "a seed is")

    @property
    def tasks(self) -> list[str]:
        """The tasks of every order, in the first order's order."""
        return list(self.orders[0])


class Run(StrictModel):
    """One declared arm: DVC stage `finetune@<task>-<strategy>`."""
    task: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.]+$")   # data/tasks/<task>
    strategy: StrategyName


def _run_keys(runs: dict[str, Run]) -> dict[str, Run]:
    if not runs:
        raise ValueError("expected at least one arm, e.g. {source-full: {task: source, strategy: full}}")
    for key, r in runs.items():
        if key != f"{r.task}-{r.strategy}":
            raise ValueError(f"key {key!r} must be '<task>-<strategy>' of its value, i.e. "
                             f"{r.task}-{r.strategy!s} (the DVC stage finetune@<key>)")
    return runs


Runs = Annotated[dict[str, Run], AfterValidator(_run_keys)]


def arms_of(runs: dict[str, Run]) -> list[tuple[str, str]]:
    """The declared (task, strategy) pairs, sorted."""
    return sorted((r.task, r.strategy) for r in runs.values())


class FinetuneCommon(SectionSubset):
    pooling: PoolingName                # checked against the architecture by the stages
    data: DataCfg
    train: TrainCfg
    arms: Arms
    experiment: str = "pretrain-finetune-forgetting"


class FinetuneKeys(FinetuneCommon):
    """What the finetune stage reads: its declared arms and seeds."""
    runs: Runs
    seeds: list[int] = Field(min_length=1)

    def declared_arms(self) -> list[tuple[str, str]]:
        return arms_of(self.runs)


class CurvesKeys(FinetuneCommon):
    curves: CurvesCfg


class SequentialKeys(FinetuneCommon):
    sequential: SequentialCfg


class FinetuneSection(FinetuneKeys, CurvesKeys, SequentialKeys):
    """The whole section, strict."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def load_stage_config(model, path: Path = PARAMS_FILE):
    """The section validated whole (a typo in another stage's key fails every stage), then the
    keys `model` declares."""
    params = read_params(path)
    if SECTION not in params:
        raise ConfigError(f"invalid params: {SECTION}: missing section in {path}")
    parse_section(SECTION, params[SECTION], FinetuneSection)
    return parse_section(SECTION, params[SECTION], model)
