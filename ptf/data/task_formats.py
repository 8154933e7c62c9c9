"""Labelled tasks from any table (no CLI): the `download.tasks` params, reading, splitting, labelling.

In:  `TasksConfig` (the `download.tasks` params): named tables (`files`), each a CSV / TSV /
     JSONL / Parquet file (a member of the shared `source`, or its own source) or a Hugging Face
     data set, with a named `text` column, an optional `id` column (default: line/row number),
     an optional `group` (a column, or a regex over one, whose value keeps a document on one
     side of the split) or given splits (`split`: a column, or one split for the whole table);
     named label rules (`labels`, a registry: `column` with an optional mapping, `bins` of a
     numeric column, `table`: which table a row comes from); and tasks = tables + a label rule.
Out: `read_rows` (validated `TaskRow`s of one table), `table_splits` (seeded or given split of
     every row: each table is split once, and every task built from it uses that split),
     `build_task` (label names and {split: {id, text, label}} columns), `save_task` (an HF
     DatasetDict train/validation/test with columns id, text, label: ClassLabel).
     Malformed input is one `StageError`: "<source> -> <member>: line N: <what>; expected <what>".

The VADER files of the default run are one instance: `tsv` with columns [id, rating, text], a
`bins` rule on `rating` (polarity) and the `table` rule (source).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from ptf.common.cli import StageError
from ptf.common.config import StrictModel
from ptf.data.fetch import SHA256, AnySource, Member
from ptf.data.tables import ColumnName, Row, TableFormatCfg, column

SPLITS = ("train", "validation", "test")
SplitName = Literal["train", "validation", "test"]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
Fraction = Annotated[float, Field(gt=0, lt=1)]


# ----------------------------------------------------------------------------- tables
class GroupSpec(StrictModel):
    column: ColumnName
    pattern: str | None = None  # regex with one capture group, matched in full; null: the whole value

    @model_validator(mode="after")
    def _one_group(self) -> GroupSpec:
        if self.pattern is not None:
            try:
                n = re.compile(self.pattern).groups
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {e}") from None
            if n != 1:
                raise ValueError(f"pattern {self.pattern!r} must have exactly one capture group, has {n}")
        return self


class GivenSplit(StrictModel):
    column: ColumnName | None = None     # each row's split is in this column ...
    value: SplitName | None = None       # ... or the whole table is this split
    names: dict[str, SplitName] = {}     # column value -> split (default: the value itself)

    @model_validator(mode="after")
    def _one(self) -> GivenSplit:
        if (self.column is None) == (self.value is None):
            raise ValueError("give exactly one of `column` and `value`")
        return self


class TableSpec(StrictModel):
    source: AnySource | None = None      # default: tasks.source
    member: Member | None = None         # path inside the source's (final) archive
    sha256: SHA256 | None = None         # of the member (required with `member`)
    format: TableFormatCfg
    text: ColumnName
    id: ColumnName | None = None         # unique row ids; null: the line/row number
    group: GroupSpec | None = None       # seeded split by group instead of by row
    split: GivenSplit | None = None      # given splits instead of the seeded split

    @model_validator(mode="after")
    def _consistent(self) -> TableSpec:
        if (self.member is None) != (self.sha256 is None):
            raise ValueError("`member` and `sha256` go together (the sha256 pins the member)")
        if self.group is not None and self.split is not None:
            raise ValueError("`group` applies to the seeded split; a table with given `split`s has none")
        return self


# ----------------------------------------------------------------------------- label rules
@dataclass
class TaskRow:
    id: str
    text: str
    group: str | None
    split: str | None    # given split, or None
    loc: str             # "line N" / "row N"
    row: Row


def _label_error(where: str, r: TaskRow, what: str) -> StageError:
    return StageError(f"{where}: {r.loc}: {what}")


class ColumnLabels(StrictModel):
    """Labels from a column (strings or integers); `map` renames values (null drops the row)."""

    kind: Literal["column"]
    column: ColumnName
    map: dict[str | int, str | None] | None = None   # raw value (as written) -> name; null drops
    names: list[str] | None = None       # class order; default: map values, else sorted values

    @field_validator("map")
    @classmethod
    def _str_keys(cls, v):
        return None if v is None else {str(k): x for k, x in v.items()}

    def label_names(self, rows: list[tuple[str, TaskRow]], where: dict[str, str]) -> list[str]:
        if self.names is not None:
            return list(self.names)
        if self.map is not None:
            return list(dict.fromkeys(v for v in self.map.values() if v is not None))
        vals = {self._raw(r, where[f]) for f, r in rows}
        ints = all(re.fullmatch(r"-?\d+", v) for v in vals)
        return sorted(vals, key=lambda v: int(v) if ints else v)

    def _raw(self, r: TaskRow, where: str) -> str:
        v = column(r.row, self.column, r.loc, where)
        if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v).strip() == "":
            raise _label_error(where, r, f"label {v!r} in column {self.column!r}; expected a "
                               "non-empty string or an integer")
        return str(v).strip()

    def label(self, r: TaskRow, table: str, names: list[str], where: str) -> int | None:
        v = self._raw(r, where)
        if self.map is not None:
            if v not in self.map:
                raise _label_error(where, r, f"label {v!r} in column {self.column!r} is not in the "
                                   f"mapping; expected one of {sorted(self.map)}")
            v = self.map[v]
            if v is None:
                return None
        if v not in names:
            raise _label_error(where, r, f"label {v!r} in column {self.column!r}; expected one of {names}")
        return names.index(v)


class BinsLabels(StrictModel):
    """A numeric column cut into named closed intervals; values in no interval are dropped."""

    kind: Literal["bins"]
    column: ColumnName
    range: Annotated[list[float], Field(min_length=2, max_length=2)]  # values outside: an error
    classes: Annotated[dict[str, Annotated[list[float], Field(min_length=2, max_length=2)]],
                       Field(min_length=2)]

    @model_validator(mode="after")
    def _disjoint(self) -> BinsLabels:
        bins = sorted((lo, hi, n) for n, (lo, hi) in self.classes.items())
        for lo, hi, n in bins:
            if lo > hi:
                raise ValueError(f"classes.{n}: [{lo}, {hi}] is empty")
        for (_, hi, a), (lo, _, b) in zip(bins, bins[1:]):
            if lo <= hi:
                raise ValueError(f"classes {a!r} and {b!r} overlap")
        return self

    def label_names(self, rows, where) -> list[str]:
        return list(self.classes)

    def label(self, r: TaskRow, table: str, names: list[str], where: str) -> int | None:
        raw = column(r.row, self.column, r.loc, where)
        try:
            v = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            v = math.nan
        lo, hi = self.range
        if not (math.isfinite(v) and lo <= v <= hi):
            raise _label_error(where, r, f"{self.column} {raw!r} is not a number in [{lo:g}, {hi:g}]")
        for i, (a, b) in enumerate(self.classes.values()):
            if a <= v <= b:
                return i
        return None


class TableLabels(StrictModel):
    """The label is the table a row comes from (e.g. which domain)."""

    kind: Literal["table"]

    def label_names(self, rows, where) -> list[str]:
        return list(dict.fromkeys(f for f, _ in rows))

    def label(self, r: TaskRow, table: str, names: list[str], where: str) -> int | None:
        return names.index(table)


LabelRule = Annotated[Union[ColumnLabels, BinsLabels, TableLabels], Field(discriminator="kind")]


class TaskSpec(StrictModel):
    files: Annotated[list[Name], Field(min_length=1)]   # the tables, in label order for `table`
    labels: Name                                        # a rule of `tasks.labels`


class TasksConfig(StrictModel):
    source: AnySource | None             # shared source of the tables' members (null: none)
    files: Annotated[dict[Name, TableSpec], Field(min_length=1)]
    labels: Annotated[dict[Name, LabelRule], Field(min_length=1)]
    tasks: Annotated[dict[Name, TaskSpec], Field(min_length=1)]
    validation_fraction: Fraction        # of each table's rows (groups) in the seeded split
    test_fraction: Fraction
    max_train: Annotated[int, Field(ge=1)] | None
    dedup_across_splits: bool            # near-duplicate texts kept on one side (ptf/data/dedup.py)

    @model_validator(mode="after")
    def _consistent(self) -> TasksConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(f"validation_fraction + test_fraction must be below 1, got "
                             f"{self.validation_fraction} + {self.test_fraction}")
        for name, t in self.files.items():
            src = t.source or self.source
            if src is None:
                raise ValueError(f"files.{name}: no `source`, and tasks.source is null")
            if (src.kind == "hf") != (t.format.kind == "hf") or (src.kind == "hf" and t.member):
                raise ValueError(f"files.{name}: format {t.format.kind!r} does not fit a source of kind "
                                 f"{src.kind!r} (an hf source needs format hf and no member, and only it)")
        for name, spec in self.tasks.items():
            unknown = [f for f in spec.files if f not in self.files]
            if unknown:
                raise ValueError(f"tasks.{name}.files: {unknown} not among files {list(self.files)}")
            if len(set(spec.files)) != len(spec.files):
                raise ValueError(f"tasks.{name}.files lists a file twice: {spec.files}")
            if spec.labels not in self.labels:
                raise ValueError(f"tasks.{name}.labels: {spec.labels!r} not among labels {list(self.labels)}")
            if self.labels[spec.labels].kind == "table" and len(spec.files) < 2:
                raise ValueError(f"tasks.{name}: labels {spec.labels!r} (kind table) needs at least 2 files")
        return self


# ----------------------------------------------------------------------------- reading
def _cell(row: Row, name: str, loc: str, where: str, what: str) -> str:
    v = column(row, name, loc, where)
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
        raise StageError(f"{where}: {loc}: empty or non-text {what} {v!r} in column {name!r}; "
                         f"expected a non-empty {what}")
    return str(v).strip()


def read_rows(spec: TableSpec, rows, where: str) -> list[TaskRow]:
    """Validated rows of one table (`rows`: `(loc, row)` pairs from `ptf.data.tables`)."""
    out, seen = [], set()
    for loc, row in rows:
        rid = _cell(row, spec.id, loc, where, "id") if spec.id else loc.split()[-1]
        text = column(row, spec.text, loc, where)
        if not isinstance(text, str) or not text.strip():
            raise StageError(f"{where}: {loc}: empty text {text!r} in column {spec.text!r}; "
                             "expected a non-empty string")
        group = split = None
        if spec.group is not None:
            group = _cell(row, spec.group.column, loc, where, "group")
            if spec.group.pattern is not None:
                m = re.fullmatch(spec.group.pattern, group)
                if m is None:
                    raise StageError(f"{where}: {loc}: {spec.group.column} {group!r} does not match "
                                     f"the group pattern {spec.group.pattern!r}")
                group = m.group(1)
        if spec.split is not None:
            split = spec.split.value or _cell(row, spec.split.column, loc, where, "split")
            split = spec.split.names.get(split, split)
            if split not in SPLITS:
                raise StageError(f"{where}: {loc}: split {split!r} in column {spec.split.column!r}; "
                                 f"expected one of {list(SPLITS)} (or map it with `names`)")
        if rid in seen:
            raise StageError(f"{where}: {loc}: duplicate id {rid!r}")
        seen.add(rid)
        out.append(TaskRow(rid, text.strip(), group, split, loc, row))
    if not out:
        raise StageError(f"{where}: no rows; expected a table with at least one row")
    return out


# ----------------------------------------------------------------------------- splitting
def split_groups(keys: list[str], seed: str, val_frac: float, test_frac: float) -> dict[str, str]:
    """Seeded assignment of each distinct key to train/validation/test (each non-empty)."""
    uniq = sorted(set(keys))
    if len(uniq) < 3:
        raise ValueError(f"only {len(uniq)} groups, need at least 3 for train/validation/test")
    rng = random.Random(seed)
    rng.shuffle(uniq)
    n_test = max(1, round(test_frac * len(uniq)))
    n_val = max(1, round(val_frac * len(uniq)))
    if n_test + n_val >= len(uniq):
        raise ValueError(f"{len(uniq)} groups leave no training group")
    out = {k: "test" for k in uniq[:n_test]}
    out.update({k: "validation" for k in uniq[n_test:n_test + n_val]})
    out.update({k: "train" for k in uniq[n_test + n_val:]})
    return out


def split_keys(rows: list[TaskRow]) -> list[str]:
    """The unit each row is split with: its group, else its id."""
    return [r.group if r.group is not None else r.id for r in rows]


def table_splits(rows: list[TaskRow], cfg: TasksConfig, seed: int, name: str) -> list[str]:
    """The split of every row of one table: given, or seeded by group/id."""
    if cfg.files[name].split is not None:
        return [r.split for r in rows]
    keys = split_keys(rows)
    try:
        assign = split_groups(keys, f"{seed}:{name}", cfg.validation_fraction, cfg.test_fraction)
    except ValueError as e:
        raise StageError(f"tasks file {name!r}: cannot split: {e}") from None
    return [assign[k] for k in keys]


# ----------------------------------------------------------------------------- tasks
def build_task(name: str, spec: TaskSpec, cfg: TasksConfig, seed: int, rows: dict[str, list[TaskRow]],
               splits: dict[str, list[str]], where: dict[str, str]) -> tuple[list[str], dict]:
    """Label names and {split: {"id": [...], "text": [...], "label": [...]}} of one task."""
    rule = cfg.labels[spec.labels]
    names = rule.label_names([(f, r) for f in spec.files for r in rows[f]], where)
    out = {s: {"id": [], "text": [], "label": []} for s in SPLITS}
    for fname in spec.files:
        for row, split in zip(rows[fname], splits[fname]):
            label = rule.label(row, fname, names, where[fname])
            if label is None:
                continue
            out[split]["id"].append(f"{fname}:{row.id}")
            out[split]["text"].append(row.text)
            out[split]["label"].append(label)
    train = out["train"]
    if cfg.max_train is not None and len(train["id"]) > cfg.max_train:
        keep = sorted(random.Random(f"{seed}:{name}:train").sample(range(len(train["id"])), cfg.max_train))
        out["train"] = {k: [v[i] for i in keep] for k, v in train.items()}
    for s in SPLITS:
        if not out[s]["id"]:
            raise StageError(f"task {name!r}: split {s!r} is empty after labelling "
                             f"(labels {spec.labels!r}: {rule.model_dump(mode='json')})")
    seen = sorted({y for s in SPLITS for y in out[s]["label"]})
    if len(seen) < 2:
        got = names[seen[0]] if seen else None
        raise StageError(f"task {name!r}: labels {spec.labels!r} give one class ({got!r}) over "
                         f"{', '.join(where[f] for f in spec.files)}; expected at least 2 classes")
    return names, out


def save_task(dest, names: list[str], data: dict) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"id": Value("string"), "text": Value("string"),
                         "label": ClassLabel(names=names)})
    DatasetDict({s: Dataset.from_dict(data[s], features=features) for s in SPLITS}).save_to_disk(str(dest))


def describe_rows(data: dict, names: list[str]) -> dict[str, Any]:
    """The manifest entry of one task's splits: rows and label counts."""
    from collections import Counter

    return {s: {"rows": len(data[s]["id"]),
                "labels": {names[k]: v for k, v in sorted(Counter(data[s]["label"]).items())}}
            for s in SPLITS}
