"""Baselines of every task: the majority class and a linear classifier on bag-of-token counts.

In:  data/tasks/<task>/ for every task of `baselines.tasks` (HF DatasetDict train/validation/test,
     columns id, text, label), data/tokenizer/ (the pipeline's tokenizer: the baselines count
     the same tokens the models see), params section `baselines` (`Config`). `baselines.data`
     takes the same caps and seed as `finetune.data`, so `ptf.data.tasks.load_task` draws the
     same train / validation / test subsets as the fine-tuning runs and the numbers compare.
Out: data/metrics/baselines.json: per task the class names and split sizes;
     `majority`: the most frequent TRAIN label applied to every test example (accuracy,
     macro-F1; also its validation accuracy); `bag_of_tokens`: multinomial logistic
     regression on token counts (`ptf.measures.baselines`), its L2 strength chosen on
     VALIDATION accuracy from `baselines.l2s` (the validation accuracy of every strength is
     kept), then test accuracy and macro-F1 read once; `test_labels` and `test_predictions`
     (per test example, in load_task's order, for paired intervals against the fine-tuned arms).

Run: python -m stages.baselines
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from tqdm.auto import tqdm

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.common.cli import StageError, main_guard
from ptf.common.config import StrictModel, load_section
from ptf.data.tasks import DataCfg, TaskData, load_task
from ptf.measures.baselines import Vocabulary, majority_label, scores, select_l2

SECTION = "baselines"
OUTPUT = paths.METRICS / "baselines.json"


def _unique(v: list, what: str) -> list:
    dup = sorted({x for x in v if v.count(x) > 1}, key=str)
    if dup:
        raise ValueError(f"duplicate {what}: {dup}")
    return v


class Config(StrictModel):
    tasks: list[str] = Field(min_length=1)        # data/tasks/<task>; the same as finetune.tasks
    data: DataCfg                                  # the same as finetune.data (same subsets)
    l2s: list[float] = Field(min_length=1)         # L2 strengths tried; chosen on validation
    max_iter: int = Field(gt=0)                    # L-BFGS iterations per fit

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return _unique(v, "tasks")

    @field_validator("l2s")
    @classmethod
    def _l2s(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError(f"every L2 strength must be > 0, got {v}")
        return _unique(v, "L2 strengths")


def check_inputs(cfg: Config, root: Path) -> None:
    """Every input present, before any work (one error naming what is missing and the remedy)."""
    missing = [t for t in cfg.tasks if not (root / paths.TASKS / t / "dataset_dict.json").is_file()]
    if missing:
        raise StageError(f"{root / paths.TASKS}: no task data for {missing} (baselines.tasks); "
                         "run `dvc repro download`, or fix baselines.tasks")
    if not (root / paths.TOKENIZER / "tokenizer_config.json").is_file():
        raise StageError(f"{root / paths.TOKENIZER}: tokenizer not found; "
                         "run `dvc repro tokenizer`")


def task_baselines(data: TaskData, cfg: Config, progress=None) -> dict[str, Any]:
    """Both baselines of one task (pure: token ids in, numbers out)."""
    n = data.n_classes
    empty = [s for s in ("train", "validation", "test") if not len(getattr(data, s))]
    if empty:
        raise StageError(f"task {data.name}: empty split(s) {empty}; check data/tasks/{data.name}")
    maj = majority_label(data.train.labels)
    maj_test = scores([maj] * len(data.test), data.test.labels, n)
    vocab = Vocabulary.from_sequences(data.train.ids)
    xtr, xva, xte = (vocab.counts(s.ids) for s in (data.train, data.validation, data.test))
    sel = select_l2(xtr, data.train.labels, xva, data.validation.labels, n, cfg.l2s,
                    cfg.max_iter, progress)
    pred = sel.model.predict(xte)                 # the test split, read once, after the choice
    bot_test = scores(pred, data.test.labels, n)
    return {
        "label_names": data.label_names, "n_classes": n, "n_train": len(data.train),
        "n_validation": len(data.validation), "n_test": len(data.test),
        "majority": {"label": maj, "label_name": data.label_names[maj],
                     "train_rate": data.train.labels.count(maj) / len(data.train),
                     "val_accuracy": data.validation.labels.count(maj) / len(data.validation),
                     "test_accuracy": maj_test["accuracy"], "test_macro_f1": maj_test["macro_f1"]},
        "bag_of_tokens": {"features": len(vocab), "l2": sel.model.l2,
                          "val_accuracy": sel.val_accuracy[sel.model.l2],
                          "val_accuracy_by_l2": {f"{k:g}": v for k, v in sel.val_accuracy.items()},
                          "lbfgs_iterations": sel.model.iterations,
                          "test_accuracy": bot_test["accuracy"],
                          "test_macro_f1": bot_test["macro_f1"]},
        "test_labels": list(data.test.labels),
        "test_predictions": {"majority": [maj] * len(data.test), "bag_of_tokens": pred},
    }


def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    from transformers import AutoTokenizer

    check_inputs(cfg, root)
    tok = AutoTokenizer.from_pretrained(str(root / paths.TOKENIZER))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"data": cfg.data.model_dump(), "l2s": list(cfg.l2s), "tasks": {}}
    with tqdm(total=len(cfg.tasks) * len(cfg.l2s), desc="baselines", dynamic_ncols=True) as bar:
        for task in cfg.tasks:
            bar.set_postfix(task=task)
            data = load_task(root, task, tok, cfg.data)
            out["tasks"][task] = task_baselines(data, cfg, progress=lambda: bar.update(1))
    out["wall_time_s"] = time.perf_counter() - t0
    write_json(root / OUTPUT, out)
    return out


def main() -> None:
    def go():
        m = run(load_section(SECTION, Config))
        for task, r in m["tasks"].items():
            print(f"{task}: majority {r['majority']['test_accuracy']:.4f}, bag of tokens "
                  f"{r['bag_of_tokens']['test_accuracy']:.4f} (l2 {r['bag_of_tokens']['l2']:g}, "
                  f"val {r['bag_of_tokens']['val_accuracy']:.4f}) test accuracy")

    main_guard(go)


if __name__ == "__main__":
    main()
