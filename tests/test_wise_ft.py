"""Stage `wise_ft` on the tiny fixtures (a 2-layer Llama, task movies, the full arm trained for
two seeds by the finetune stage): at alpha 0 the held-out LM loss is the pretrained backbone's
and at 1 the fine-tuned model's, exactly as the forgetting stage measures them; at 1 the
predictions are the fine-tune's own; the alpha is chosen on validation; bad input names its key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.data.tasks import DataCfg
from ptf.measures import outputs as out
from ptf.measures.drift import EvalSet
from stages import wise_ft as W
from tests.finetune_fixtures import cfg_of, make_root, params, runs_of

EVAL = {"max_blocks": 8, "batch_size": 4, "mask_prob": 0.15, "mask_seed": 0, "worse_margin": 0.0}
SECTION = {"task": "movies", "source": "full", "alphas": [0.0, 0.5, 1.0],
           "experiment": "pretrain-finetune-forgetting"}


def add_validation_shards(root: Path) -> None:
    """Held-out blocks for the drift: the train blocks' shard, listed as validation too."""
    import shutil

    shards = root / "data" / "shards"
    shutil.copytree(shards / "train", shards / "validation")
    m = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**m, "validation": m["train"]}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from stages.finetune import Config, run

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    root = make_root(tmp_path_factory.mktemp("wise"))
    add_validation_shards(root)
    p = params(runs=runs_of("movies", ["full", "lora"]), seeds=[0, 1])
    for s in ("full", "lora"):
        run(cfg_of(p, Config), "movies", s, root=root)
    cfg = parse_section("wise_ft", SECTION, W.Config)
    res = W.run(cfg, parse_section("forgetting", EVAL, W.EvalKeys), DataCfg(**p["data"]), root)
    yield root, p, res
    mp.undo()


def test_alpha_0_and_1_reproduce_the_pretrained_and_the_finetuned_lm_loss_exactly(trained):
    root, _, res = trained
    ev = EvalSet.build(root, root / "data/models/pretrained", EVAL["max_blocks"], EVAL["batch_size"],
                       EVAL["mask_prob"], EVAL["mask_seed"])
    pts = {p["alpha"]: p for p in res["points"].values()}
    ft = json.loads(out.finetune_file(root, "movies", "full").read_text())
    for k, rec in enumerate(pts[0.0]["seeds"]):
        assert rec["block_sums"] == [float(x) for x in ev.base_sums]
        assert rec["delta_loss"] == 0.0 and rec["share_worse"] == 0.0
    for k, rec in enumerate(pts[1.0]["seeds"]):
        # the forgetting stage's own measure of the saved full model, bit for bit
        measured = ev.measure(out.model_dir(root, "movies", "full", f"seed{k}"))
        assert rec["block_sums"] == [float(x) for x in measured]
        assert rec["test_predictions"] == ft["seeds"][k]["test_predictions"]
        assert rec["val_accuracy"] == ft["seeds"][k]["val_accuracy"]
        assert rec["test_accuracy"] == ft["seeds"][k]["test_accuracy"]
    assert all(r["delta_loss"] != 0.0 for r in pts[1.0]["seeds"])
    assert res["eval"]["block_indices"] == ev.indices
    assert json.loads((root / W.OUTPUT).read_text()) == json.loads(json.dumps(res))


def test_the_alpha_is_chosen_on_validation(trained):
    _, _, res = trained
    best = max(res["points"].values(), key=lambda p: (p["mean_std"]["val_accuracy"]["mean"], -p["alpha"]))
    assert res["chosen_alpha"]["alpha"] == best["alpha"]
    pts = {f"{a:g}": {"alpha": a, "mean_std": {"val_accuracy": {"mean": v}, "test_accuracy": {"mean": t}}}
           for a, v, t in [(0.0, 0.5, 0.99), (0.5, 0.8, 0.1), (1.0, 0.8, 0.2)]}
    assert W.choose_alpha(pts)["alpha"] == 0.5          # test accuracy plays no part; ties: smaller


@pytest.mark.parametrize("over, match", [
    ({"alphas": []}, r"wise_ft\.alphas: got \[\]"),
    ({"alphas": [0.5, 1.5]}, r"wise_ft\.alphas: .*got 1\.5"),
    ({"alphas": [-0.1]}, r"wise_ft\.alphas: .*got -0\.1"),
    ({"alphas": "0.5"}, r"wise_ft\.alphas"),
    ({"task": ""}, r"wise_ft\.task"),
    ({"extra": 1}, r"wise_ft\.extra: unknown key"),
])
def test_bad_params_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        parse_section("wise_ft", {**SECTION, **over}, W.Config)


def test_load_reads_its_section_the_measure_and_the_subsets(tmp_path):
    from ptf.common.config import read_params

    p = read_params(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    f = tmp_path / "params.yaml"
    f.write_text(json.dumps(p))
    cfg, ev, data = W.load(f)
    assert cfg.alphas == [0.0, 0.5, 1.0] and ev.max_blocks == p["forgetting"]["max_blocks"]
    assert data.model_dump() == p["finetune"]["data"]
    p["forgetting"]["max_blocks"] = 0
    f.write_text(json.dumps(p))
    with pytest.raises(ConfigError, match=r"forgetting\.max_blocks"):
        W.load(f)


def test_a_peft_source_or_a_missing_arm_is_refused_before_compute(trained, monkeypatch):
    root, p, _ = trained
    ev = parse_section("forgetting", EVAL, W.EvalKeys)
    data = DataCfg(**p["data"])
    with pytest.raises(ConfigError, match=r"wise_ft\.source: got 'lora'.*full-weight"):
        W.run(parse_section("wise_ft", {**SECTION, "source": "lora"}, W.Config), ev, data, root)
    with pytest.raises(StageError, match=r"finetune/movies/l2sp.json: missing.*dvc repro finetune@movies-l2sp"):
        W.run(parse_section("wise_ft", {**SECTION, "source": "l2sp"}, W.Config), ev, data, root)


def test_a_foundation_without_an_lm_head_gets_accuracy_per_alpha_and_null_drift(trained, tmp_path):
    """A bare encoder: every alpha is still mixed and scored on validation and test (alpha 1 is
    the fine-tune itself), and its drift is null with the reason, not measured under a random head."""
    import shutil

    from ptf.measures.drift import NO_LM_HEAD
    from tests.test_forgetting import headless

    root, p, res = trained
    copy = shutil.copytree(root, tmp_path / "root")
    headless(copy)
    cfg = parse_section("wise_ft", SECTION, W.Config)
    got = W.run(cfg, parse_section("forgetting", EVAL, W.EvalKeys), DataCfg(**p["data"]), copy)
    assert got["eval"] == {"applicable": False, "objective": None, "note": NO_LM_HEAD}
    for key, pt in got["points"].items():
        assert [r["test_accuracy"] for r in pt["seeds"]] == [r["test_accuracy"] for r in res["points"][key]["seeds"]]
        assert all(r["delta_loss"] is None and r["block_sums"] is None for r in pt["seeds"])
        assert pt["mean_std"]["delta_loss"]["n"] == 0
    assert got["chosen_alpha"] == res["chosen_alpha"]


def test_its_mlflow_run_spans_the_measuring(trained):
    """The stage run opens before the mixing and scoring (it used to open after, lasting ~0 s)."""
    import os

    from mlflow.tracking import MlflowClient

    _, _, res = trained
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(SECTION["experiment"])
    r = client.search_runs([exp.experiment_id], "tags.`dvc.stage` = 'wise_ft'",
                           order_by=["attributes.start_time ASC"])[0]   # the fixture's (others may follow)
    assert (r.info.end_time - r.info.start_time) / 1000 >= res["wall_time_s"]
    assert r.data.metrics["chosen_alpha"] == res["chosen_alpha"]["alpha"]
