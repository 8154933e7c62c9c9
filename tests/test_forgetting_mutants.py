"""The forgetting stage's readers (ptf/measures/outputs.py), per-arm measures (arms.py) and
block selection (drift.py): what tests/test_forgetting.py and tests/test_results.py leave open,
found by mutation testing (`make mutate GROUPS=forgetting`). Small hand-made files and records,
every value and message worked out here; fast, so they run first in the group."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ptf.common.cli import StageError
from ptf.measures import arms as am
from ptf.measures import drift as dr
from ptf.measures import outputs as out


def _write(root: Path, rel: str, obj) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _raises(fn, *args) -> str:
    with pytest.raises(StageError) as e:
        fn(*args)
    return str(e.value)


# ---------------------------------------------------------------- drift.py

def test_select_blocks_evenly_spaced():
    assert dr.select_blocks(10, 4) == [0, 2, 5, 7]          # i * 10 // 4
    assert dr.select_blocks(3, 5) == [0, 1, 2]              # at most the blocks there are
    assert dr.select_blocks(7, 1) == [0]


# ---------------------------------------------------------------- outputs.py: the matrix

def test_matrix_grid_arms_tasks_describe(tmp_path):
    m = out.Matrix.grid(["news", "movies"], ["lora", "full"])
    assert m.arms() == [("movies", "full"), ("movies", "lora"), ("news", "full"), ("news", "lora")]
    assert m.tasks == ["movies", "news"]
    assert m.describe() == {"runs": ["movies-full", "movies-lora", "news-full", "news-lora"],
                            "tasks": ["movies", "news"]}
    p = _write(tmp_path, "params.yaml", "finetune:\n  runs:\n    a-full: {task: a, strategy: full}\n")
    assert out.read_matrix(p).arms() == [("a", "full")]
    q = _write(tmp_path, "bad.yaml", "finetune: 3\n")
    assert _raises(out.read_matrix, q) == f"{q}: no `finetune` section"


def test_read_json_messages(tmp_path):
    assert out.read_json(_write(tmp_path, "a.json", {"x": 1}), "r") == {"x": 1}
    assert _raises(out.read_json, tmp_path / "no.json", "run it") == f"{tmp_path / 'no.json'}: missing; run it"
    bad = _write(tmp_path, "bad.json", "{")
    assert _raises(out.read_json, bad, "r").startswith(f"{bad}: not valid JSON (Expecting property name")


def test_num_and_labels():
    assert out._num(2) == 2.0 and type(out._num(2)) is float and out._num(0.5) == 0.5
    for bad in (True, None, "1", float("nan"), float("inf")):
        assert out._num(bad) is None
    assert out._labels(None, "w") is None and out._labels([0, 2], "w") == [0, 2]
    for bad in ([0, True], [0.0], "01", (0, 1)):
        with pytest.raises(StageError) as e:
            out._labels(bad, "w")
        assert str(e.value) == "w: expected a list of class ids"


# ---------------------------------------------------------------- outputs.py: fine-tune metrics

GOOD = {"seeds": [{"seed": 1, "test_accuracy": 0.5, "test_macro_f1": 0.4, "trainable_fraction": 1,
                   "trainable_params": 10, "test_predictions": [1, 1]},
                  {"seed": 0, "test_accuracy": 1.0}],
        "test_labels": [1, 0]}


def test_parse_finetune_records():
    got = out.parse_finetune(GOOD, "f")
    assert got == {"test_labels": [1, 0], "seeds": {
        "seed1": {"test_accuracy": 0.5, "macro_f1": 0.4, "trainable_fraction": 1.0, "trainable_params": 10.0,
                  "test_predictions": [1, 1]},
        "seed0": {"test_accuracy": 1.0, "macro_f1": None, "trainable_fraction": None,
                  "trainable_params": None, "test_predictions": None}}}
    # predictions without labels are kept unchecked
    assert out.parse_finetune({"seeds": [{"seed": 0, "test_accuracy": 0.1, "test_predictions": [1]}]},
                              "f")["seeds"]["seed0"]["test_predictions"] == [1]


@pytest.mark.parametrize("obj, message", [
    ([], "f: expected a non-empty list of per-seed records under `seeds`"),
    ({"seeds": []}, "f: expected a non-empty list of per-seed records under `seeds`"),
    ({"seeds": {"seed": 0}}, "f: expected a non-empty list of per-seed records under `seeds`"),
    ({"seeds": [{"seed": 0, "test_accuracy": 1.0}], "test_labels": [0.5]}, "f: test_labels: expected a list of class ids"),
    ({"seeds": [3]}, "f: seeds[0]: expected an object with an integer `seed`"),
    ({"seeds": [{"test_accuracy": 1.0}]}, "f: seeds[0]: expected an object with an integer `seed`"),
    ({"seeds": [{"seed": 0, "test_accuracy": 1.0}, {"seed": True, "test_accuracy": 1.0}]},
     "f: seeds[1]: expected an object with an integer `seed`"),
    ({"seeds": [{"seed": 2, "test_accuracy": "0.5"}]}, "f: seed 2: no numeric `test_accuracy`"),
    ({"seeds": [{"seed": 2, "test_accuracy": 1.0, "test_predictions": [1, None]}]},
     "f: seed 2: test_predictions: expected a list of class ids"),
    ({"seeds": [{"seed": 2, "test_accuracy": 1.0, "test_predictions": [1]}], "test_labels": [1, 0]},
     "f: seed 2: 1 test_predictions for 2 test_labels"),
    ({"seeds": [{"seed": 2, "test_accuracy": 1.0, "test_predictions": [1, 1]}], "test_labels": [1, 0]},
     "f: seed 2: test_predictions do not give its test_accuracy 1.0; rerun `dvc repro` of the stage that wrote it"),
])
def test_parse_finetune_refuses(obj, message):
    assert _raises(out.parse_finetune, obj, "f") == message


def test_parse_finetune_accuracy_tolerance():
    # 2 of 3 right = 0.6666...; a recorded 0.6666666667 is within 1e-9, 0.6667 is not
    ok = {"seeds": [{"seed": 0, "test_accuracy": 0.6666666667, "test_predictions": [1, 1, 1]}], "test_labels": [1, 1, 0]}
    assert out.parse_finetune(ok, "f")["seeds"]["seed0"]["test_accuracy"] == 0.6666666667
    ok["seeds"][0]["test_accuracy"] = 0.6667
    assert "do not give its test_accuracy 0.6667" in _raises(out.parse_finetune, ok, "f")
    # one test example, right: accuracy 1 (1 / max(1, 1))
    one = {"seeds": [{"seed": 0, "test_accuracy": 1.0, "test_predictions": [1]}], "test_labels": [1]}
    assert out.parse_finetune(one, "f")["seeds"]["seed0"]["test_accuracy"] == 1.0
    # no labels and no predictions: the empty-label guard is not a division by zero
    empty = {"seeds": [{"seed": 0, "test_accuracy": 0.0, "test_predictions": []}], "test_labels": []}
    assert out.parse_finetune(empty, "f")["seeds"]["seed0"]["test_predictions"] == []


def test_paths_and_read_finetune_and_models(tmp_path):
    assert out.finetune_file(tmp_path, "t", "s") == tmp_path / "data/metrics/finetune/t/s.json"
    assert out.model_dir(tmp_path, "t", "s", "seed0") == tmp_path / "data/models/finetuned/t/s/seed0"
    m = out.Matrix.grid(["movies"], ["full"])
    msg = _raises(out.read_finetune, tmp_path, m)
    assert msg == (f"{tmp_path}/data/metrics/finetune/movies/full.json: missing; the arm movies/full is "
                   "declared by params.yaml (finetune.runs); run `dvc repro finetune@movies-full` (or `dvc pull`)")
    _write(tmp_path, "data/metrics/finetune/movies/full.json", {"seeds": []})
    assert _raises(out.read_finetune, tmp_path, m) == (f"{tmp_path}/data/metrics/finetune/movies/full.json: "
                                                       "expected a non-empty list of per-seed records under `seeds`")
    _write(tmp_path, "data/metrics/finetune/movies/full.json", GOOD)
    _write(tmp_path, "data/metrics/finetune/movies/lora.json", {"seeds": []})      # not declared: not read
    runs = out.read_finetune(tmp_path, m)
    assert list(runs) == ["movies"] and list(runs["movies"]) == ["full"]
    assert runs["movies"]["full"]["test_labels"] == [1, 0]
    msg = _raises(out.read_models, tmp_path, runs)
    meta = tmp_path / "data/models/finetuned/movies/full/seed1"
    assert msg.startswith(f"{meta}: the fine-tuned model of movies/full seed1 (listed in "
                          f"{tmp_path}/data/metrics/finetune/movies/full.json) is missing; the arm movies/full")
    _write(tmp_path, "data/models/finetuned/movies/full/seed1/finetune_meta.json", {"label_names": ["a", "b", "c"]})
    _write(tmp_path, "data/models/finetuned/movies/full/seed0/finetune_meta.json", {})
    out.read_models(tmp_path, runs)
    assert runs["movies"]["full"]["seeds"]["seed1"]["n_classes"] == 3
    assert runs["movies"]["full"]["seeds"]["seed0"]["n_classes"] is None


# ---------------------------------------------------------------- outputs.py: curves, sequential, WiSE-FT

def test_read_curves(tmp_path):
    assert out.read_curves(tmp_path) == []
    _write(tmp_path, "data/plots/curves.csv", "strategy,fraction,n_labels,seed,test_accuracy\nfull,0.5,20,1,0.75\n")
    _write(tmp_path, "data/metrics/curves.json", {"task": "movies"})
    assert out.read_curves(tmp_path) == [{"task": "movies", "strategy": "full", "fraction": 0.5, "n_labels": 20,
                                          "seed": "seed1", "test_accuracy": 0.75}]
    _write(tmp_path, "data/metrics/curves.json", {})
    assert out.read_curves(tmp_path)[0]["task"] == ""
    _write(tmp_path, "data/plots/curves.csv", "strategy,fraction,n_labels,seed,test_accuracy\nfull,0.5,x,1,0.7\n")
    assert _raises(out.read_curves, tmp_path) == (f"{tmp_path}/data/plots/curves.csv:2: invalid literal for int() "
                                                  "with base 10: 'x'")
    _write(tmp_path, "data/plots/curves.csv", "strategy,fraction,seed\nfull,0.5,1\n")
    assert _raises(out.read_curves, tmp_path) == (
        f"{tmp_path}/data/plots/curves.csv: expected columns ['strategy', 'fraction', 'n_labels', 'seed', "
        "'test_accuracy'], got ['strategy', 'fraction', 'seed']")
    (tmp_path / "data/metrics/curves.json").unlink()
    _write(tmp_path, "data/plots/curves.csv", "strategy,fraction,n_labels,seed,test_accuracy\n")
    assert _raises(out.read_curves, tmp_path) == (f"{tmp_path}/data/metrics/curves.json: missing; "
                                                  "run `dvc repro curves`")


def test_read_sequential(tmp_path):
    from tests.sequential_fixtures import fake_sequential

    assert out.read_sequential(tmp_path) is None
    p = tmp_path / "data/metrics/sequential.json"
    keys = "tasks, orders, strategies, seeds, n_classes, majority, random_init, runs"
    _write(tmp_path, "data/metrics/sequential.json", [])
    assert _raises(out.read_sequential, tmp_path) == f"{p}: expected an object with {keys}; rerun `dvc repro sequential`"
    good = fake_sequential(seeds=(0, 1))
    _write(tmp_path, "data/metrics/sequential.json", {k: v for k, v in good.items() if k != "runs"})
    assert _raises(out.read_sequential, tmp_path) == f"{p}: expected an object with {keys}; rerun `dvc repro sequential`"
    _write(tmp_path, "data/metrics/sequential.json", good)
    assert out.read_sequential(tmp_path) == good
    for key, value, message in [
            ("majority", {"movies": 0.5}, "`majority` must give every task of ['movies', 'tweets']"),
            ("n_classes", [2, 2], "`n_classes` must give every task of ['movies', 'tweets']"),
            ("random_init", {"0": good["random_init"]["0"]}, "`random_init` lacks seed 1 or a task of it"),
            ("runs", [], "`runs` must be a non-empty list"),
            ("runs", [{**good["runs"][0], "seed": 7}], "run 0 needs an order, strategy and seed of the file's "
             "and a 3 x 2 `matrix` and `correct`"),
            ("runs", [{**good["runs"][0], "correct": good["runs"][0]["correct"][:2]}],
             "run 0 needs an order, strategy and seed of the file's and a 3 x 2 `matrix` and `correct`"),
            # each of order / strategy alone undeclared, a row one task short
            ("runs", [{**good["runs"][0], "order": ["movies", "nyt"]}], "run 0 needs an order, strategy and "
             "seed of the file's and a 3 x 2 `matrix` and `correct`"),
            ("runs", [{**good["runs"][0], "strategy": "ewc"}], "run 0 needs an order, strategy and seed of the "
             "file's and a 3 x 2 `matrix` and `correct`"),
            ("runs", [{**good["runs"][0], "matrix": [[0.5, 0.5], [0.9], [0.6, 0.9]]}], "run 0 needs an order, "
             "strategy and seed of the file's and a 3 x 2 `matrix` and `correct`")]:
        _write(tmp_path, "data/metrics/sequential.json", {**good, key: value})
        assert _raises(out.read_sequential, tmp_path) == f"{p}: {message}; rerun `dvc repro sequential`", key


def _wise(**over):
    seed = {"seed": 0, "test_accuracy": 0.5, "val_accuracy": 0.6, "test_predictions": [1, 0], "block_sums": [1.0]}
    obj = {"task": "movies", "source": "full", "test_labels": [1, 1], "n_classes": 2,
           "points": {"0.5": {"alpha": 0.5, "seeds": [seed]}}, "chosen_alpha": {"alpha": 0.5, "rule": "r"}}
    obj.update(over)
    return obj


@pytest.mark.parametrize("obj, message", [
    ([], "expected an object with a non-empty mapping `points`"),
    (_wise(points={}), "expected an object with a non-empty mapping `points`"),
    (_wise(points=[1]), "expected an object with a non-empty mapping `points`"),
    (_wise(source="lora"), "mixes the arm movies-lora, which finetune.runs does not declare; fix wise_ft.task / "
                           "wise_ft.source, or declare the arm"),
    (_wise(test_labels=None), "needs `test_labels` and `n_classes`; rerun `dvc repro wise_ft`"),
    (_wise(n_classes=2.0), "needs `test_labels` and `n_classes`; rerun `dvc repro wise_ft`"),
    (_wise(test_labels=[1.0]), "test_labels: expected a list of class ids"),
    (_wise(points={"x": {"alpha": "0.5", "seeds": [{}]}}), "every point needs a numeric `alpha` and per-seed records"),
    (_wise(points={"x": {"alpha": 0.5, "seeds": []}}), "every point needs a numeric `alpha` and per-seed records"),
    (_wise(points={"x": 3}), "every point needs a numeric `alpha` and per-seed records"),
    (_wise(points={"x": {"alpha": 0.5, "seeds": [{"seed": 0, "test_accuracy": 0.5, "val_accuracy": 0.6,
                                                  "test_predictions": [1], "block_sums": []}]}}),
     "alpha 0.5: a seed record lacks seed, val/test accuracy, test_predictions or block_sums; rerun `dvc repro wise_ft`"),
    (_wise(points={"x": {"alpha": 0.5, "seeds": [{"seed": 0, "test_accuracy": 0.5, "test_predictions": [1, 1],
                                                  "block_sums": []}]}}),
     "alpha 0.5: a seed record lacks seed, val/test accuracy, test_predictions or block_sums; rerun `dvc repro wise_ft`"),
    (_wise(points={"x": {"alpha": 0.5, "seeds": [{"seed": "0", "test_accuracy": 0.5, "val_accuracy": 0.6,
                                                  "test_predictions": [1, 1], "block_sums": []}]}}),
     "alpha 0.5: a seed record lacks seed, val/test accuracy, test_predictions or block_sums; rerun `dvc repro wise_ft`"),
    (_wise(points={"x": {"alpha": 0.5, "seeds": [{"seed": 0, "val_accuracy": 0.6,
                                                  "test_predictions": [1, 1], "block_sums": []}]}}),
     "alpha 0.5: a seed record lacks seed, val/test accuracy, test_predictions or block_sums; rerun `dvc repro wise_ft`"),
    (_wise(points={"x": {"alpha": 0.5, "seeds": [{"seed": 0, "test_accuracy": 0.5, "val_accuracy": 0.6,
                                                  "test_predictions": [1, 1], "block_sums": None}]}}),
     "alpha 0.5: a seed record lacks seed, val/test accuracy, test_predictions or block_sums; rerun `dvc repro wise_ft`"),
    (_wise(points={"x": {"alpha": 0.5, "seeds": [{"seed": 0, "test_accuracy": 0.5, "val_accuracy": 0.6,
                                                  "block_sums": []}]}}),
     "alpha 0.5: a seed record lacks seed, val/test accuracy, test_predictions or block_sums; rerun `dvc repro wise_ft`"),
    (_wise(chosen_alpha={}), "no `chosen_alpha`; rerun `dvc repro wise_ft`"),
    (_wise(chosen_alpha=None), "no `chosen_alpha`; rerun `dvc repro wise_ft`"),
])
def test_read_wise_ft_refuses(tmp_path, obj, message):
    p = _write(tmp_path, "data/metrics/wise_ft.json", obj)
    assert _raises(out.read_wise_ft, tmp_path, out.Matrix.grid(["movies"], ["full"])) == f"{p}: {message}"


def test_read_wise_ft_reads(tmp_path):
    m = out.Matrix.grid(["movies"], ["full"])
    assert out.read_wise_ft(tmp_path, m) is None
    _write(tmp_path, "data/metrics/wise_ft.json", _wise())
    assert out.read_wise_ft(tmp_path, m) == _wise()


# ---------------------------------------------------------------- arms.py

def test_per_model_record_by_hand():
    drift = {k: i + 0.5 for i, k in enumerate(am.DRIFT_KEYS)}
    ft = {"test_accuracy": 0.75, "macro_f1": 0.7, "trainable_fraction": 0.1, "trainable_params": 5.0, "n_classes": 4}
    rec = am.per_model_record(ft, drift, 0.6, applicable=True)
    # chance 1/4; gains 0.75 - 0.25 = 0.5 and 0.75 - 0.6 = 0.15
    assert rec == {"test_accuracy": 0.75, "macro_f1": 0.7, "trainable_fraction": 0.1, "trainable_params": 5.0,
                   "chance": 0.25, "gain_over_chance": 0.5, "gain_over_scratch": pytest.approx(0.15),
                   "drift_applicable": True, **drift}
    bare = am.per_model_record({"test_accuracy": 0.5}, drift, None, applicable=False)
    assert bare["chance"] is None and bare["gain_over_chance"] is None and bare["gain_over_scratch"] is None
    assert bare["macro_f1"] is None and bare["drift_applicable"] is False
    assert all(bare[k] is None for k in am.DRIFT_KEYS)
    assert bare["drift_note"] == "not applicable: no pretrained backbone to drift from"
    nodrift = am.per_model_record({"test_accuracy": 0.5, "n_classes": 2}, None, 0.5, applicable=True)
    assert all(nodrift[k] is None for k in am.DRIFT_KEYS) and "drift_note" not in nodrift
    assert nodrift["gain_over_scratch"] == 0.0


def _runs():
    def rec(acc, preds=None):
        return {"test_accuracy": acc, "macro_f1": acc - 0.1, "trainable_fraction": 1.0, "trainable_params": 9.0,
                "n_classes": 2, "test_predictions": preds}
    return {"movies": {
        "full": {"seeds": {"seed1": rec(0.75, [1, 1, 1, 0]), "seed0": rec(0.5, [1, 0, 1, 0])}, "test_labels": [1, 1, 1, 1]},
        "scratch": {"seeds": {"seed0": rec(0.25), "seed1": rec(0.75)}, "test_labels": None}}}


def test_task_table_and_scratch_mean():
    runs = _runs()
    assert am.scratch_mean(runs["movies"], "scratch") == 0.5 and am.scratch_mean(runs["movies"], "nope") is None
    drifts = {("movies", "full", "seed0"): {k: 0.1 for k in am.DRIFT_KEYS},
              ("movies", "full", "seed1"): {k: 0.3 for k in am.DRIFT_KEYS}}
    t = am.task_table(runs, drifts, "scratch")
    full, scratch = t["movies"]["full"], t["movies"]["scratch"]
    assert list(full["seeds"]) == ["seed0", "seed1"] and full["drift_applicable"] is True
    assert scratch["drift_applicable"] is False
    ms = full["mean_std"]
    assert set(ms) == set(am.STAT_KEYS)
    assert ms["test_accuracy"] == {"mean": 0.625, "std": pytest.approx(math.sqrt(0.03125)), "n": 2}
    # gains: over chance 0.5 -> 0.0 and 0.25; over the scratch mean 0.5 -> the same
    assert ms["gain_over_chance"]["mean"] == pytest.approx(0.125)
    assert ms["gain_over_scratch"]["mean"] == pytest.approx(0.125)
    assert ms["delta_loss"]["mean"] == pytest.approx(0.2) and ms["ppl_finetuned"]["n"] == 2
    assert scratch["mean_std"]["delta_loss"] == {"mean": None, "std": None, "n": 0}
    assert scratch["mean_std"]["gain_over_scratch"]["mean"] == pytest.approx(0.0)


def test_samples_of_the_claims():
    runs = _runs()
    base, counts = np.array([10.0, 10.0]), np.array([5.0, 5.0])
    sums = {("movies", "full", "seed0"): np.array([11.0, 12.0]), ("movies", "full", "seed1"): np.array([10.0, 10.0])}
    s = am.claim_samples(runs, sums, lambda _k: base, counts)
    full, scratch = s[("movies", "full")], s[("movies", "scratch")]
    assert full["accuracy"].units == "test examples" and full["accuracy"].values() == pytest.approx([0.5, 0.75])
    assert full["delta"].units == "held-out blocks" and full["delta"].values() == pytest.approx([0.3, 0.0])
    assert scratch["delta"] is None
    assert scratch["accuracy"].units == "" and scratch["accuracy"].note == "no test_predictions in the fine-tune metrics"
    assert scratch["accuracy"].values() == pytest.approx([0.25, 0.75])
    # one seed without predictions: the seeds alone
    runs["movies"]["full"]["seeds"]["seed1"]["test_predictions"] = None
    assert am.accuracy_sample(runs["movies"]["full"]).units == ""
    runs["movies"]["scratch"]["test_labels"] = [0, 0, 0, 0]
    assert _raises(am.claim_samples, runs, sums, lambda _k: base, counts) == (
        "task movies: the fine-tune metrics of ['full', 'scratch'] record different test_labels; their test "
        "predictions cannot be paired (rerun `dvc repro finetune`)")


def test_wise_ft_arm_by_hand():
    base, counts = np.array([10.0]), np.array([10.0])
    wise = {"task": "movies", "source": "full", "n_classes": 2, "test_labels": [1, 1], "trainable_fraction": 1.0,
            "chosen_alpha": {"alpha": 0.5, "rule": "highest mean validation accuracy"},
            "points": {"0": {"alpha": 0.0, "seeds": [
                           {"seed": 0, "test_accuracy": 0.5, "val_accuracy": 0.4, "test_predictions": [1, 0],
                            "block_sums": [10.0]}]},
                       "0.5": {"alpha": 0.5, "seeds": [
                           {"seed": 0, "test_accuracy": 1.0, "val_accuracy": 0.6, "test_predictions": [1, 1],
                            "block_sums": [12.0], "test_macro_f1": 0.9},
                           {"seed": 1, "test_accuracy": 0.5, "val_accuracy": 0.8, "test_predictions": [0, 1],
                            "block_sums": [14.0]}]}}}
    arm, samples, points = am.wise_ft_arm(wise, lambda _k: base, counts, 0.0, 0.25)
    assert arm["alpha"] == 0.5 and arm["alpha_rule"] == "highest mean validation accuracy" and arm["source"] == "full"
    # delta per seed: (12 - 10) / 10 = 0.2, (14 - 10) / 10 = 0.4
    assert arm["mean_std"]["delta_loss"]["mean"] == pytest.approx(0.3)
    assert arm["mean_std"]["val_accuracy"] == {"mean": pytest.approx(0.7), "std": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert arm["mean_std"]["gain_over_scratch"]["mean"] == pytest.approx(0.75 - 0.25)
    assert arm["seeds"]["seed0"]["macro_f1"] == 0.9 and arm["seeds"]["seed1"]["macro_f1"] is None
    assert arm["seeds"]["seed0"]["val_accuracy"] == 0.6 and arm["drift_applicable"] is True
    assert samples["accuracy"].values() == pytest.approx([1.0, 0.5])
    assert samples["delta"].values() == pytest.approx([0.2, 0.4])
    assert [p["chosen"] for p in points.values()] == [False, True] and points["0"]["alpha"] == 0.0
    assert points["0"]["mean_std"]["delta_loss"]["mean"] == 0.0
    assert points["0"]["mean_std"]["val_accuracy"]["mean"] == 0.4
    # worse_margin reaches the drift: with a margin of 0.3 nats/token only seed 1 (0.4) is worse
    arm2, _, _ = am.wise_ft_arm(wise, lambda _k: base, counts, 0.3, 0.25)
    assert arm2["mean_std"]["share_worse"]["mean"] == pytest.approx(0.5)
    wise["chosen_alpha"]["alpha"] = 0.7
    assert _raises(am.wise_ft_arm, wise, lambda _k: base, counts, 0.0, None) == (
        "wise_ft.json: chosen_alpha 0.7 is not one of its points; rerun `dvc repro wise_ft`")


# ---------------------------------------------------------------- no LM head: no drift, said why

def _no_lm_seed(block_sums):
    return {"seed": 0, "test_accuracy": 0.5, "val_accuracy": 0.6, "test_predictions": [1, 0], "block_sums": block_sums}


def test_read_wise_ft_without_lm_drift(tmp_path):
    m = out.Matrix.grid(["movies"], ["full"])
    lacks = ("alpha 0.5: a seed record lacks seed, val/test accuracy, test_predictions or block_sums; "
             "rerun `dvc repro wise_ft`")
    # `eval.applicable` false: null block sums are what it should have
    obj = _wise(points={"0.5": {"alpha": 0.5, "seeds": [_no_lm_seed(None)]}},
                eval={"applicable": False, "note": "no LM head"})
    _write(tmp_path, "data/metrics/wise_ft.json", obj)
    assert out.read_wise_ft(tmp_path, m) == obj
    # ... but not block sums of another type
    obj["points"]["0.5"]["seeds"][0]["block_sums"] = "x"
    p = _write(tmp_path, "data/metrics/wise_ft.json", obj)
    assert _raises(out.read_wise_ft, tmp_path, m) == f"{p}: {lacks}"
    # with the LM drift applicable (said, or by default) null block sums are refused
    for ev in ({"applicable": True}, {}, None):
        obj = _wise(points={"0.5": {"alpha": 0.5, "seeds": [_no_lm_seed(None)]}}, eval=ev)
        p = _write(tmp_path, "data/metrics/wise_ft.json", obj)
        assert _raises(out.read_wise_ft, tmp_path, m) == f"{p}: {lacks}"


def test_per_model_record_says_why_there_is_no_drift():
    drift = {k: 1.0 for k in am.DRIFT_KEYS}
    rec = am.per_model_record({"test_accuracy": 0.5, "n_classes": 2}, drift, None, False, "no LM head here")
    assert rec["drift_note"] == "no LM head here" and all(rec[k] is None for k in am.DRIFT_KEYS)
    assert am.NO_BACKBONE == "not applicable: no pretrained backbone to drift from"


def test_task_table_without_lm_drift():
    runs = _runs()
    drifts = {("movies", "full", "seed0"): {k: 0.1 for k in am.DRIFT_KEYS},
              ("movies", "full", "seed1"): {k: 0.3 for k in am.DRIFT_KEYS}}
    t = am.task_table(runs, drifts, "scratch", no_drift="why: no LM head")
    full, scratch = t["movies"]["full"], t["movies"]["scratch"]
    assert full["drift_applicable"] is False and scratch["drift_applicable"] is False
    assert [r["drift_note"] for r in full["seeds"].values()] == ["why: no LM head"] * 2
    assert [r["drift_note"] for r in scratch["seeds"].values()] == [am.NO_BACKBONE] * 2   # scratch: its own reason
    assert full["mean_std"]["delta_loss"] == {"mean": None, "std": None, "n": 0}
    assert full["mean_std"]["test_accuracy"]["mean"] == 0.625
    # the default: the drift of every arm but scratch, and scratch's note
    t = am.task_table(runs, drifts, "scratch")
    assert "drift_note" not in t["movies"]["full"]["seeds"]["seed0"]
    assert t["movies"]["scratch"]["seeds"]["seed0"]["drift_note"] == am.NO_BACKBONE


def test_claim_samples_without_lm_drift():
    s = am.claim_samples(_runs(), {}, None, None)
    assert s[("movies", "full")]["delta"] is None and s[("movies", "scratch")]["delta"] is None
    assert s[("movies", "full")]["accuracy"].values() == pytest.approx([0.5, 0.75])


def test_wise_ft_arm_without_lm_drift():
    wise = {"task": "movies", "source": "full", "n_classes": 2, "test_labels": [1, 1], "trainable_fraction": 0.25,
            "chosen_alpha": {"alpha": 0.5, "rule": "r"}, "eval": {"applicable": False, "note": "no head"},
            "points": {"0.5": {"alpha": 0.5, "seeds": [
                {"seed": 0, "test_accuracy": 1.0, "val_accuracy": 0.6, "test_predictions": [1, 1], "block_sums": None},
                {"seed": 1, "test_accuracy": 0.5, "val_accuracy": 0.8, "test_predictions": [0, 1], "block_sums": None}]}}}
    arm, samples, points = am.wise_ft_arm(wise, None, None, 0.0, 0.25)
    assert samples["delta"] is None and samples["accuracy"].values() == pytest.approx([1.0, 0.5])
    assert arm["drift_applicable"] is False
    assert [r["drift_note"] for r in arm["seeds"].values()] == ["no head", "no head"]
    assert all(r[k] is None for r in arm["seeds"].values() for k in am.DRIFT_KEYS)
    assert arm["mean_std"]["delta_loss"] == {"mean": None, "std": None, "n": 0}
    assert arm["mean_std"]["test_accuracy"]["mean"] == 0.75 and points["0.5"]["chosen"] is True
    # the point's trainable fraction is wise_ft.json's, per seed
    assert [r["trainable_fraction"] for r in arm["seeds"].values()] == [0.25, 0.25]
    assert arm["mean_std"]["trainable_fraction"] == {"mean": 0.25, "std": 0.0, "n": 2}
    # no note in `eval` (or no `eval`): the generic reason
    for ev in ({"applicable": False}, None):
        if ev is None:
            del wise["eval"]
        else:
            wise["eval"] = ev
        arm, _, _ = am.wise_ft_arm(wise, None, None, 0.0, 0.25)
        assert arm["seeds"]["seed0"]["drift_note"] == am.NO_BACKBONE


@pytest.mark.parametrize("archs, objective", [
    (["BertForMaskedLM"], "mlm"), (["RobertaForMaskedLM"], "mlm"), (["LlamaForCausalLM"], "clm"),
    (["GPT2LMHeadModel"], "clm"), (["BertModel"], None), (["BertModel", "BertForMaskedLM"], None),
    ([], None), (None, None)])
def test_lm_objective_from_the_first_architecture(tmp_path, archs, objective):
    cfg = {"model_type": "bert"} if archs is None else {"model_type": "bert", "architectures": archs}
    _write(tmp_path, "m/config.json", cfg)
    assert dr.lm_objective(tmp_path / "m") == objective
    if objective is not None:
        assert dr.objective_of(tmp_path / "m") == objective
        return
    shown = archs[0] if archs else "(none)"
    assert _raises(dr.objective_of, tmp_path / "m") == (
        f"{tmp_path / 'm' / 'config.json'}: architecture {shown} has no LM head, so the held-out LM-loss "
        "drift is not applicable (a head added here would be random); measure its forgetting with the "
        "representation stage (CKA, probe retention)")


@pytest.mark.parametrize("text, message", [
    ("finetune:\n  runs:\n    a-full: {task: a}\n",
     "invalid params: finetune.runs.a-full.strategy: missing key; expected field required"),
    ("finetune:\n  lr: 1\n", "invalid params: finetune.runs: got None; expected: Input should be a valid dictionary"),
])
def test_read_matrix_names_the_key_it_refuses(tmp_path, text, message):
    from ptf.common.config import ConfigError

    p = _write(tmp_path, "params.yaml", text)
    with pytest.raises(ConfigError) as e:
        out.read_matrix(p)
    assert str(e.value) == message
    _write(tmp_path, "other.yaml", "pretrain: {}\n")
    assert _raises(out.read_matrix, tmp_path / "other.yaml") == f"{tmp_path / 'other.yaml'}: no `finetune` section"


def test_read_wise_ft_names_the_alpha_of_bad_predictions(tmp_path):
    obj = _wise()
    obj["points"]["0.5"]["seeds"][0]["test_predictions"] = [1.5, 0]
    p = _write(tmp_path, "data/metrics/wise_ft.json", obj)
    assert _raises(out.read_wise_ft, tmp_path, out.Matrix.grid(["movies"], ["full"])) == (
        f"{p}: alpha 0.5: test_predictions: expected a list of class ids")


def test_each_seed_drifts_from_its_own_backbone():
    """Several pretrained backbones: `base_of(seed key)` gives each seed its backbone's sums, in
    the arms' samples and in WiSE-FT's drift alike."""
    bases = {"seed0": np.array([10.0]), "seed1": np.array([13.0])}
    counts = np.array([10.0])
    runs = {"movies": {"full": {"seeds": {k: {"test_accuracy": 1.0} for k in bases}}}}
    sums = {("movies", "full", "seed0"): np.array([12.0]), ("movies", "full", "seed1"): np.array([14.0])}
    s = am.claim_samples(runs, sums, bases.__getitem__, counts)
    assert s[("movies", "full")]["delta"].values() == pytest.approx([0.2, 0.1])
    wise = {"task": "movies", "source": "full", "n_classes": 2, "test_labels": [1, 1],
            "chosen_alpha": {"alpha": 0.5, "rule": "r"},
            "points": {"0.5": {"alpha": 0.5, "seeds": [
                {"seed": k, "test_accuracy": 1.0, "val_accuracy": 0.6, "test_predictions": [1, 1],
                 "block_sums": [14.0]} for k in (0, 1)]}}}
    arm, samples, _ = am.wise_ft_arm(wise, bases.__getitem__, counts, 0.0, None)
    assert [arm["seeds"][k]["delta_loss"] for k in ("seed0", "seed1")] == pytest.approx([0.4, 0.1])
    assert samples["delta"].values() == pytest.approx([0.4, 0.1])
