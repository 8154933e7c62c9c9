"""Readers of the outputs of the fine-tune, curves and sequential stages (no CLI).

One reader per file format that a stage writes, shared by the forgetting stage and the results
page (`scripts/results.py`), and only those formats:
  data/metrics/finetune/<task>/<strategy>.json   `stages.finetune`: per-seed records under
      `seeds` (a list, each with `seed`, `test_accuracy`, `test_macro_f1`, `trainable_params`,
      `trainable_fraction`, optionally `test_predictions`), optionally top-level `test_labels`;
  data/models/finetuned/<task>/<strategy>/seed<k>/finetune_meta.json   its `label_names`;
  data/plots/curves.csv + data/metrics/curves.json   `stages.curves`: rows strategy, fraction,
      n_labels, seed, test_accuracy; the task is the JSON's `task`;
  data/metrics/sequential.json   `stages.sequential`: {tasks, orders, strategies, seeds,
      n_classes, majority, random_init, runs: [{order, strategy, seed, matrix, correct}]}.

  data/metrics/wise_ft.json   `stages.wise_ft`: the WiSE-FT points (`read_wise_ft`).

What is read is exactly the arms that params.yaml declares (`finetune.runs`, "<task>-<strategy>"
-> {task, strategy}: a ragged set, `Matrix`): files of arms that are not declared (left over
from another params set) are never read, and a declared arm whose metrics or model is missing is
a `StageError` naming it and the command that makes it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.cli import StageError
from ptf.common.config import StrictModel, parse_section, read_params
from ptf.models.artifacts import META_FILE
from ptf.models.backbones import seed_key
from ptf.training.finetune_config import Run, Runs, arms_of

FT_METRICS = paths.METRICS / "finetune"
CURVES_CSV = paths.PLOTS / "curves.csv"
CURVES_JSON = paths.METRICS / "curves.json"
SEQUENTIAL_JSON = paths.METRICS / "sequential.json"
WISE_FT_JSON = paths.METRICS / "wise_ft.json"
CURVES_COLUMNS = ("strategy", "fraction", "n_labels", "seed", "test_accuracy")


class Matrix(StrictModel):
    """The fine-tune arms that params.yaml declares (`finetune.runs`)."""

    runs: Runs

    @classmethod
    def grid(cls, tasks: list[str], strategies: list[str]) -> Matrix:
        """Every task with every strategy (tests, and `dvc exp run` variants built by hand)."""
        return cls(runs={f"{t}-{s}": Run(task=t, strategy=s) for t in tasks for s in strategies})

    def arms(self) -> list[tuple[str, str]]:
        return arms_of(self.runs)

    @property
    def tasks(self) -> list[str]:
        return sorted({t for t, _ in self.arms()})

    def describe(self) -> dict[str, list[str]]:
        """JSON-ready: the declared arm keys and the tasks they cover."""
        return {"runs": sorted(self.runs), "tasks": self.tasks}


def read_matrix(params_file: Path) -> Matrix:
    """`finetune.runs` of a params file (the key the forgetting stage lists as a DVC param)."""
    ft = read_params(params_file).get("finetune")
    if not isinstance(ft, dict):
        raise StageError(f"{params_file}: no `finetune` section")
    return parse_section("finetune", {"runs": ft.get("runs")}, Matrix)


def read_json(path: Path, remedy: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: missing; {remedy}") from None
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e.msg})") from None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _labels(x: Any, where: str) -> list[int] | None:
    if x is None:
        return None
    if not isinstance(x, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise StageError(f"{where}: expected a list of class ids")
    return x


def parse_finetune(obj: Any, where: str) -> dict[str, Any]:
    """{"seeds": {"seed<k>": {test_accuracy, macro_f1, trainable_fraction, trainable_params,
    test_predictions}}, "test_labels": [...] | None} of one fine-tune metrics file."""
    raw = obj.get("seeds") if isinstance(obj, dict) else None
    if not isinstance(raw, list) or not raw:
        raise StageError(f"{where}: expected a non-empty list of per-seed records under `seeds`")
    labels = _labels(obj.get("test_labels"), f"{where}: test_labels")
    seeds: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(raw):
        seed = rec.get("seed") if isinstance(rec, dict) else None
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise StageError(f"{where}: seeds[{i}]: expected an object with an integer `seed`")
        acc = _num(rec.get("test_accuracy"))
        if acc is None:
            raise StageError(f"{where}: seed {seed}: no numeric `test_accuracy`")
        preds = _labels(rec.get("test_predictions"), f"{where}: seed {seed}: test_predictions")
        if preds is not None and labels is not None:
            if len(preds) != len(labels):
                raise StageError(f"{where}: seed {seed}: {len(preds)} test_predictions for "
                                 f"{len(labels)} test_labels")
            if abs(sum(p == y for p, y in zip(preds, labels)) / max(1, len(labels)) - acc) > 1e-9:
                raise StageError(f"{where}: seed {seed}: test_predictions do not give its test_accuracy "
                                 f"{acc}; rerun `dvc repro` of the stage that wrote it")
        seeds[seed_key(seed)] = {"test_accuracy": acc, "macro_f1": _num(rec.get("test_macro_f1")),
                                "trainable_fraction": _num(rec.get("trainable_fraction")),
                                "trainable_params": _num(rec.get("trainable_params")),
                                "test_predictions": preds}
    return {"seeds": seeds, "test_labels": labels}


def finetune_file(root: Path, task: str, strategy: str) -> Path:
    return Path(root) / FT_METRICS / task / f"{strategy}.json"


def model_dir(root: Path, task: str, strategy: str, seed: str) -> Path:
    return Path(root) / paths.FINETUNED / task / strategy / seed


def _remedy(task: str, strategy: str) -> str:
    return (f"the arm {task}/{strategy} is declared by params.yaml (finetune.runs); "
            f"run `dvc repro finetune@{task}-{strategy}` (or `dvc pull`)")


def read_finetune(root: Path, matrix: Matrix) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {strategy: parse_finetune(...)}} for exactly the declared arms."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for t, s in matrix.arms():
        f = finetune_file(root, t, s)
        runs.setdefault(t, {})[s] = parse_finetune(read_json(f, _remedy(t, s)), str(f))
    return runs


def read_models(root: Path, runs: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Check that every seed of every arm has its saved model, and set each seed record's
    `n_classes` from the model's `label_names` (the fine-tune metrics do not record it)."""
    for t, arms in runs.items():
        for s, arm in arms.items():
            for seed, rec in arm["seeds"].items():
                meta = model_dir(root, t, s, seed) / META_FILE
                if not meta.is_file():
                    raise StageError(f"{meta.parent}: the fine-tuned model of {t}/{s} {seed} (listed in "
                                     f"{finetune_file(root, t, s)}) is missing; {_remedy(t, s)}")
                names = read_json(meta, _remedy(t, s)).get("label_names") or []
                rec["n_classes"] = len(names) or None


def read_curves(root: Path) -> list[dict[str, Any]]:
    """Rows of curves.csv with the task of curves.json; [] when the stage wrote neither."""
    path, summary = Path(root) / CURVES_CSV, Path(root) / CURVES_JSON
    if not path.is_file():
        return []
    task = str(read_json(summary, "run `dvc repro curves`").get("task") or "")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CURVES_COLUMNS:
            raise StageError(f"{path}: expected columns {list(CURVES_COLUMNS)}, got {reader.fieldnames}")
        for i, r in enumerate(reader, start=2):
            try:
                rows.append({"task": task, "strategy": r["strategy"], "fraction": float(r["fraction"]),
                             "n_labels": int(r["n_labels"]), "seed": seed_key(r["seed"]),
                             "test_accuracy": float(r["test_accuracy"])})
            except (TypeError, ValueError) as e:
                raise StageError(f"{path}:{i}: {e}") from None
    return rows


SEQUENTIAL_KEYS = ("tasks", "orders", "strategies", "seeds", "n_classes", "majority", "random_init", "runs")


def read_sequential(root: Path) -> dict[str, Any] | None:
    """The sequential runs of sequential.json, or None when the file is absent. Checked: its
    keys, each run's order / strategy / seed among the declared ones, a (T+1) x T `matrix` and
    `correct` table, and the per-task majority rates and per-seed random-init accuracies."""
    path = Path(root) / SEQUENTIAL_JSON
    if not path.is_file():
        return None
    obj = read_json(path, "run `dvc repro sequential`")
    rerun = "rerun `dvc repro sequential`"
    if not isinstance(obj, dict) or any(k not in obj for k in SEQUENTIAL_KEYS):
        raise StageError(f"{path}: expected an object with {', '.join(SEQUENTIAL_KEYS)}; {rerun}")
    tasks = obj["tasks"]
    for k in ("n_classes", "majority"):
        if not isinstance(obj[k], dict) or set(obj[k]) != set(tasks):
            raise StageError(f"{path}: `{k}` must give every task of {tasks}; {rerun}")
    for seed in obj["seeds"]:
        if set((obj["random_init"] or {}).get(str(seed)) or {}) != set(tasks):
            raise StageError(f"{path}: `random_init` lacks seed {seed} or a task of it; {rerun}")
    if not isinstance(obj["runs"], list) or not obj["runs"]:
        raise StageError(f"{path}: `runs` must be a non-empty list; {rerun}")
    for i, r in enumerate(obj["runs"]):
        T = len(tasks)
        if (not isinstance(r, dict) or r.get("order") not in obj["orders"]
                or r.get("strategy") not in obj["strategies"] or r.get("seed") not in obj["seeds"]
                or not _table(r.get("matrix"), T) or not _table(r.get("correct"), T)):
            raise StageError(f"{path}: run {i} needs an order, strategy and seed of the file's and a "
                             f"{T + 1} x {T} `matrix` and `correct`; {rerun}")
    return obj


def _table(rows: Any, T: int) -> bool:
    return isinstance(rows, list) and len(rows) == T + 1 and all(isinstance(r, list) and len(r) == T
                                                                 for r in rows)


def read_wise_ft(root: Path, matrix: Matrix) -> dict[str, Any] | None:
    """The WiSE-FT points of wise_ft.json, or None when the file is absent. Its source arm must
    be a declared arm; every point needs per-seed accuracies, predictions and block sums (null
    when its `eval` says the LM drift is not applicable)."""
    path = Path(root) / WISE_FT_JSON
    if not path.is_file():
        return None
    obj = read_json(path, "run `dvc repro wise_ft`")
    where = str(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("points"), dict) or not obj["points"]:
        raise StageError(f"{where}: expected an object with a non-empty mapping `points`")
    if (obj.get("task"), obj.get("source")) not in matrix.arms():
        raise StageError(f"{where}: mixes the arm {obj.get('task')}-{obj.get('source')}, which finetune.runs "
                         "does not declare; fix wise_ft.task / wise_ft.source, or declare the arm")
    labels = _labels(obj.get("test_labels"), f"{where}: test_labels")
    if labels is None or not isinstance(obj.get("n_classes"), int):
        raise StageError(f"{where}: needs `test_labels` and `n_classes`; rerun `dvc repro wise_ft`")
    lm = (obj.get("eval") or {}).get("applicable", True)   # False: no LM head, so no block sums
    for p in obj["points"].values():
        if not isinstance(p, dict) or _num(p.get("alpha")) is None or not isinstance(p.get("seeds"), list) or not p["seeds"]:
            raise StageError(f"{where}: every point needs a numeric `alpha` and per-seed records")
        for r in p["seeds"]:
            preds = _labels(r.get("test_predictions"), f"{where}: alpha {p['alpha']}: test_predictions")
            if (not isinstance(r.get("seed"), int) or _num(r.get("test_accuracy")) is None
                    or _num(r.get("val_accuracy")) is None or preds is None or len(preds) != len(labels)
                    or not (isinstance(r.get("block_sums"), list) or (r.get("block_sums") is None and not lm))):
                raise StageError(f"{where}: alpha {p['alpha']}: a seed record lacks seed, val/test "
                                 "accuracy, test_predictions or block_sums; rerun `dvc repro wise_ft`")
    if _num((obj.get("chosen_alpha") or {}).get("alpha")) is None:
        raise StageError(f"{where}: no `chosen_alpha`; rerun `dvc repro wise_ft`")
    return obj
