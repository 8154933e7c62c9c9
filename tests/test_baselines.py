"""The baselines stage (stages/baselines.py) and its measures (ptf/measures/baselines.py):
majority computed by hand, a separable task recovered, the L2 strength chosen on validation
without reading the test split, strict params and one-line errors, and params that keep the
baselines on the fine-tuning subsets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section, read_params
from ptf.data.tasks import DataCfg, Split, TaskData
from ptf.measures.baselines import Vocabulary, fit_logreg, majority_label, scores, select_l2
from stages.baselines import Config, run, task_baselines

ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def _cfg(**over) -> Config:
    raw = {"tasks": ["movies"], "data": {"max_train": 1000, "max_eval": 1000, "max_length": 32,
                                         "seed": 0},
           "l2s": [1e-3, 1e-1], "max_iter": 100, **over}
    return parse_section("baselines", raw, Config)


# --------------------------------------------------------------------------- measures

def test_majority_by_hand_and_ties():
    assert majority_label([0, 1, 1, 2, 1, 0]) == 1
    assert majority_label([2, 0, 2, 0]) == 0          # tie: the smallest label id
    with pytest.raises(ValueError):
        majority_label([])


def test_scores_by_hand():
    # gold 0 0 1 1 2, pred 0 1 1 1 0: class 0 tp1 fp1 fn1 -> 0.5; class 1 tp2 fp1 fn0 -> 0.8;
    # class 2 tp0 fp0 fn1 -> 0; class 3 absent and never predicted -> 0
    s = scores([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], n_classes=4)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0 + 0.0) / 4)


def test_vocabulary_counts_train_tokens_only():
    v = Vocabulary.from_sequences([[5, 3, 5], [7]])
    assert v.token_ids == (3, 5, 7)
    x = v.counts([[5, 5, 5, 9], [3, 7, 7]]).to_dense()
    assert x.tolist() == [[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]]     # 9 never seen in train: dropped


def _separable(n: int, seed: int) -> Split:
    import random
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        y = rng.randrange(3)
        seq = [rng.randrange(20, 40) for _ in range(rng.randint(2, 6))]
        seq.insert(rng.randint(0, len(seq)), 10 + y)       # the class token, among noise tokens
        ids.append(seq)
        labels.append(y)
    return Split(ids, labels)


def test_linear_model_recovers_a_separable_task():
    tr, te = _separable(90, 0), _separable(60, 1)
    v = Vocabulary.from_sequences(tr.ids)
    m = fit_logreg(v.counts(tr.ids), tr.labels, 3, l2=1e-3, max_iter=200)
    assert scores(m.predict(v.counts(te.ids)), te.labels, 3)["accuracy"] == 1.0
    again = fit_logreg(v.counts(tr.ids), tr.labels, 3, l2=1e-3, max_iter=200)
    assert m.weight.equal(again.weight)                     # deterministic (DVC-stable output)


def _contradicting_task() -> tuple[TaskData, list[float]]:
    """Train: class 1 is the majority; token 7 appears only in class-0 examples. A weak L2 follows
    token 7 (-> class 0), a strong one predicts the majority. Validation labels the token-7
    examples 1 (the strong L2 wins there); test labels them 0 (the weak L2 would win there)."""
    filler = [[20 + i % 5, 30 + i % 3] for i in range(60)]
    train_ids = [f + [7] for f in filler[:12]] + filler[12:]
    train_y = [0] * 12 + [1] * 48
    held = [[21, 7, 31]] * 10 + [[22, 30]] * 10
    val = Split(held, [1] * 20)
    test = Split(held, [0] * 10 + [1] * 10)
    return TaskData("t", ["a", "b"], Split(train_ids, train_y), val, test), [1e-4, 10.0]


def test_l2_chosen_on_validation_never_on_test():
    data, grid = _contradicting_task()
    v = Vocabulary.from_sequences(data.train.ids)
    xtr, xva, xte = (v.counts(s.ids) for s in (data.train, data.validation, data.test))
    fits = {l2: fit_logreg(xtr, data.train.labels, 2, l2, 300) for l2 in grid}
    on_test = {l2: scores(m.predict(xte), data.test.labels, 2)["accuracy"]
               for l2, m in fits.items()}
    on_val = {l2: scores(m.predict(xva), data.validation.labels, 2)["accuracy"]
              for l2, m in fits.items()}
    assert on_val[10.0] > on_val[1e-4] and on_test[1e-4] > on_test[10.0]   # the splits disagree

    cfg = _cfg(l2s=grid)
    r = task_baselines(data, cfg)["bag_of_tokens"]
    assert r["l2"] == 10.0                                   # validation's choice
    assert r["test_accuracy"] == pytest.approx(on_test[10.0])
    sel = select_l2(xtr, data.train.labels, xva, data.validation.labels, 2, grid, 300)
    assert sel.model.l2 == 10.0
    # the test split plays no part in the choice: other test labels, the same choice
    flipped = TaskData("t", data.label_names, data.train, data.validation,
                       Split(data.test.ids, [1 - y for y in data.test.labels]))
    r2 = task_baselines(flipped, cfg)["bag_of_tokens"]
    assert (r2["l2"], r2["val_accuracy_by_l2"]) == (r["l2"], r["val_accuracy_by_l2"])


# --------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from tests.finetune_fixtures import make_task, make_tokenizer

    root = tmp_path_factory.mktemp("baselines")
    make_tokenizer().save_pretrained(str(root / "data" / "tokenizer"))
    make_task(root / "data" / "tasks" / "movies", "polarity", seed=1)
    make_task(root / "data" / "tasks" / "source", "topic", seed=2)
    return root


def test_stage_writes_both_baselines_per_task(root):
    from datasets import load_from_disk

    m = run(_cfg(tasks=["movies", "source"]), root)
    assert json.loads((root / "data/metrics/baselines.json").read_text()) == json.loads(
        json.dumps(m))
    for task in ("movies", "source"):
        dd = load_from_disk(str(root / "data/tasks" / task))   # caps above the sizes: all rows
        r = m["tasks"][task]
        counts = Counter(dd["train"]["label"])
        maj = min(counts, key=lambda y: (-counts[y], y))
        assert r["majority"]["label"] == maj
        assert r["majority"]["test_accuracy"] == pytest.approx(
            sum(y == maj for y in dd["test"]["label"]) / len(dd["test"]))
        assert r["test_labels"] == list(dd["test"]["label"])
        pred = r["test_predictions"]["bag_of_tokens"]
        assert len(pred) == r["n_test"] == len(dd["test"])
        assert r["bag_of_tokens"]["test_accuracy"] == pytest.approx(
            sum(p == y for p, y in zip(pred, r["test_labels"])) / len(pred))
        assert r["bag_of_tokens"]["l2"] in (1e-3, 1e-1)
        # the fixture's class words make both tasks nearly separable by their tokens
        assert r["bag_of_tokens"]["test_accuracy"] > r["majority"]["test_accuracy"]
    assert m["data"] == _cfg().data.model_dump()


def test_same_subsets_as_fine_tuning(root):
    """Caps below the split sizes: the baselines see load_task's seeded subsets."""
    from ptf.data.tasks import load_task
    from transformers import AutoTokenizer

    cfg = _cfg(data={"max_train": 20, "max_eval": 10, "max_length": 16, "seed": 3})
    m = run(cfg, root)["tasks"]["movies"]
    data = load_task(root, "movies", AutoTokenizer.from_pretrained(str(root / "data/tokenizer")),
                     DataCfg(max_train=20, max_eval=10, max_length=16, seed=3))
    assert (m["n_train"], m["n_test"]) == (20, 10)
    assert m["test_labels"] == data.test.labels
    assert m["majority"]["label"] == majority_label(data.train.labels)


def test_missing_task_is_one_error_naming_it(root):
    with pytest.raises(StageError, match=r"nope.*dvc repro download"):
        run(_cfg(tasks=["movies", "nope"]), root)


def test_main_prints_one_error_line(root, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "params.yaml").write_text(
        "baselines: {tasks: [gone], data: {max_train: 8, max_eval: 8, max_length: 8, seed: 0}, "
        "l2s: [0.1], max_iter: 10}\n")
    p = subprocess.run([sys.executable, "-m", "stages.baselines"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "gone" in lines[0]
    assert "dvc repro download" in lines[0]


@pytest.mark.parametrize("over, key", [
    ({"l2s": [0.1, 0.1]}, "baselines.l2s"), ({"l2s": [0.0]}, "baselines.l2s"),
    ({"l2s": []}, "baselines.l2s"), ({"tasks": ["a", "a"]}, "baselines.tasks"),
    ({"max_iter": 0}, "baselines.max_iter"), ({"extra": 1}, "baselines.extra")])
def test_bad_params_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(**over)


@pytest.mark.parametrize("params_file", PARAM_FILES, ids=lambda p: p.name)
def test_baselines_use_the_fine_tuning_subsets(params_file):
    """Every fine-tuned task has its baselines, drawn from the same capped, seeded subsets."""
    p = read_params(params_file)
    assert p["baselines"]["data"] == p["finetune"]["data"], \
        f"{params_file.name}: baselines.data must equal finetune.data (the same subsets)"
    missing = {r["task"] for r in p["finetune"]["runs"].values()} - set(p["baselines"]["tasks"])
    assert not missing, f"{params_file.name}: baselines.tasks lacks {sorted(missing)}"
