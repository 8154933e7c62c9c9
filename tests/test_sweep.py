"""Stages `sweep` and `frontier` on the tiny fixtures (a 2-layer Llama, task movies): every
configuration of a grid is trained for every seed and measured; the in-memory held-out loss is
the forgetting stage's measure of the saved model; the frontier stage refuses a sweep record
that lacks a declared configuration; bad params fail with one error line before any work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.measures.drift import EvalSet
from ptf.training.finetune_config import FinetuneCommon
from ptf.training.sweep_config import HeldOutKeys, SweepSection
from stages import frontier as F
from stages import sweep as S
from tests.finetune_fixtures import cfg_of, make_root, params, runs_of
from tests.test_wise_ft import add_validation_shards

ROOT = Path(__file__).resolve().parents[1]
HELD = {"max_blocks": 8, "batch_size": 4, "mask_prob": 0.15, "mask_seed": 0}
SWEEP = {"runs": {f"movies-{s}": {"task": "movies", "strategy": s}
                  for s in ("full", "lora", "replay", "gradual_unfreeze")}, "seeds": [0, 1],
         "lengths": [2, 3],
         "grids": {"full": {"lrs": [1e-3, 3e-3]}, "lora": {"lrs": [1e-2], "knob": {"name": "r", "values": [2, 4]}},
                   "replay": {"lrs": [3e-3], "knob": {"name": "weight", "values": [0.5, 4.0]}},
                   "gradual_unfreeze": {"lrs": [3e-3]}},      # a step hook: one run at a time
         "levels": [0.5, 1.0], "experiment": "pretrain-finetune-forgetting"}
DECIDE = F.DecisionKeys(reference_strategy="full", alpha=0.05, bootstrap_resamples=200, bootstrap_seed=0)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    root = make_root(tmp_path_factory.mktemp("sweep"))
    add_validation_shards(root)
    fc = cfg_of(params(runs=runs_of("movies", ["full", "lora", "replay", "gradual_unfreeze"])), FinetuneCommon)
    cfg, held = parse_section("sweep", SWEEP, SweepSection), parse_section("forgetting", HELD, HeldOutKeys)
    res = {s: S.run(fc, cfg, held, "movies", s, root=root) for s in cfg.strategies}
    (root / "data/metrics/baselines.json").write_text(json.dumps(
        {"tasks": {"movies": {"majority": {"val_accuracy": 0.5}}}}))
    yield root, fc, cfg, held, res
    mp.undo()


def test_every_configuration_and_seed_is_trained_and_measured(swept):
    root, _, cfg, _, res = swept
    for s, m in res.items():
        assert json.loads(S.output_file(root, "movies", s).read_text()) == json.loads(json.dumps(m))
        assert sorted(m["configs"]) == sorted(p.key for p in cfg.points(s))
        n_blocks = len(m["blocks"]["base_sums"])
        for key, c in m["configs"].items():
            assert sorted(c["seeds"]) == ["0", "1"]
            for r in c["seeds"].values():
                assert len(r["lm_sums"]) == n_blocks and len(r["test_predictions"]) == len(m["test_labels"])
                assert r["steps"] == c["steps"]
                d = (np.asarray(r["lm_sums"]) - m["blocks"]["base_sums"]).sum() / sum(m["blocks"]["counts"])
                assert r["delta_loss"] == pytest.approx(d)
    assert res["full"]["trained_together"] is True and res["lora"]["trained_together"] is True
    assert res["replay"]["trained_together"] is True     # its replayed LM loss goes along (test_batched)
    assert res["gradual_unfreeze"]["trained_together"] is False
    # the knob reached the model: LoRA r=2 and r=4 train differently, and so do replay weights
    c = res["lora"]["configs"]
    assert c["lr=0.01 steps=3 r=2"]["seeds"]["0"]["lm_sums"] != c["lr=0.01 steps=3 r=4"]["seeds"]["0"]["lm_sums"]
    c = res["replay"]["configs"]
    low, high = (c[f"lr=0.003 steps=3 weight={w}"]["seeds"]["0"] for w in ("0.5", "4"))
    assert low["lm_sums"] != high["lm_sums"]
    assert sum(high["lm_sums"]) < sum(low["lm_sums"])    # more replay: less drift from the pretrained LM


@pytest.mark.parametrize("strategy", ["full", "lora", "linear_probe"])
def test_in_memory_drift_equals_the_forgetting_stage_measure_of_the_saved_model(swept, strategy, tmp_path):
    """Train one model, save it as the finetune stage does, and measure it both ways: from the
    directory (LoRA merged, `EvalSet.measure`) and in memory (LoRA layers live)."""
    from ptf.data.tasks import load_task
    from ptf.models.strategies import build_classifier
    from ptf.training.finetuning import Context, fit, save_model

    root, fc, _, held, _ = swept
    ctx = Context.create(root, fc)
    data = load_task(root, "movies", ctx.tokenizer, fc.data)
    arm = getattr(fc.arms, strategy)
    clf = build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=0, pooling=fc.pooling)
    r = fit(ctx, clf, strategy, arm, arm.lrs[0] * 10, 0, data, data.train, 3, desc="t")
    save_model(ctx, clf, strategy, data, tmp_path / "m", r)
    es = EvalSet.build(root, ctx.pretrained, held.max_blocks, held.batch_size, held.mask_prob, held.mask_seed)
    saved, live = es.measure(tmp_path / "m"), S.InMemoryDrift(es).sums(clf)
    if strategy == "linear_probe":                        # the backbone as pretrained, saved and loaded
        np.testing.assert_array_equal(saved, es.base_sums)
        np.testing.assert_array_equal(live, es.base_sums)
    else:
        assert not np.allclose(saved, es.base_sums)      # it moved
        np.testing.assert_allclose(live, saved, rtol=1e-5)


def test_a_backbone_still_pretrained_gets_the_pretrained_sums_bit_for_bit(swept):
    """`EvalSet.scores`' shortcut: a linear probe's backbone equals the pretrained one, and the
    pretrained sums it is given are exactly what the forward pass gives (in memory and from the
    saved model); a backbone that moved (full fine-tuning) and one with LoRA layers are measured."""
    from ptf.data.tasks import load_task
    from ptf.measures.drift import block_nll
    from ptf.models.strategies import build_classifier, unwrap_hf
    from ptf.training.finetuning import Context, fit

    root, fc, _, held, _ = swept
    ctx = Context.create(root, fc)
    data = load_task(root, "movies", ctx.tokenizer, fc.data)
    es = EvalSet.build(root, ctx.pretrained, held.max_blocks, held.batch_size, held.mask_prob, held.mask_seed)
    drift = S.InMemoryDrift(es)

    def forward(clf):     # the measure without the shortcut
        drift.sums(clf)
        return block_nll(drift.lm, es.inputs, es.labels, es.objective, es.batch_size)[0]

    models = {}
    for s in ("linear_probe", "full", "lora"):
        arm = getattr(fc.arms, s)
        models[s] = build_classifier(ctx.pretrained, data.label_names, s, arm, seed=0, pooling=fc.pooling)
        fit(ctx, models[s], s, arm, arm.lrs[0] * 10, 0, data, data.train, 3, desc="t")
    assert es.unchanged(unwrap_hf(models["linear_probe"]).base_model)
    np.testing.assert_array_equal(drift.sums(models["linear_probe"]), es.base_sums)
    np.testing.assert_array_equal(forward(models["linear_probe"]), es.base_sums)
    for s in ("full", "lora"):
        assert not es.unchanged(unwrap_hf(models[s]).base_model), s
        np.testing.assert_array_equal(drift.sums(models[s]), forward(models[s]))
        assert not np.array_equal(drift.sums(models[s]), es.base_sums), s


def test_on_a_gpu_every_strategy_trains_one_at_a_time_on_it(swept, monkeypatch):
    """`fit_together` is the CPU path: where Accelerate's device is a GPU, `trains_together` sends
    every strategy to `fit` (Accelerate, on that device; the held-out measure then runs where the
    model is). Not checked here, for want of a second device: that `block_nll` moves each batch."""
    import torch

    from ptf.data.tasks import load_task
    from ptf.measures import drift
    from ptf.training.finetuning import Context

    root, fc, _, _, _ = swept
    ctx = Context.create(root, fc)
    data = load_task(root, "movies", ctx.tokenizer, fc.data)
    assert drift.compute_device().type == "cpu"           # this machine: the sweep trains together
    assert S.trains_together(ctx, data, "full", fc.arms.full)
    monkeypatch.setattr(drift, "compute_device", lambda: torch.device("cuda"))
    for s in ("full", "linear_probe", "lora"):
        assert not S.trains_together(ctx, data, s, getattr(fc.arms, s)), s


def test_frontier_stage_writes_its_outputs_and_refuses_a_missing_configuration(swept, tmp_path):
    import shutil

    root, _, cfg, _, _ = swept
    out = F.run(cfg, DECIDE, root)
    assert json.loads((root / F.OUTPUT).read_text())["claims"].keys() == {"matched", "val_best"}
    assert set(out["tasks"]["movies"]) == {"full", "lora", "replay", "gradual_unfreeze"}
    rows = (root / F.CSV).read_text().splitlines()
    assert len(rows) == 1 + sum(len(cfg.points(s)) for s in cfg.strategies)
    assert (root / F.PNG).read_bytes()[:4] == b"\x89PNG"
    copy = tmp_path / "r"
    shutil.copytree(root / "data/metrics", copy / "data/metrics")
    f = S.output_file(copy, "movies", "lora")
    m = json.loads(f.read_text())
    del m["configs"]["lr=0.01 steps=2 r=4"]
    f.write_text(json.dumps(m))
    with pytest.raises(StageError, match=r"lora\.json: no configuration `lr=0\.01 steps=2 r=4`, which "
                                         r"sweep\.grids\.lora declares"):
        F.run(cfg, DECIDE, copy)
    m = json.loads(S.output_file(root, "movies", "lora").read_text())
    del m["configs"]["lr=0.01 steps=3 r=2"]["seeds"]["1"]
    f.write_text(json.dumps(m))
    with pytest.raises(StageError, match="has no seed 1 of sweep.seeds"):
        F.run(cfg, DECIDE, copy)


def test_the_frontier_reads_exactly_the_items_of_a_ragged_sweep(swept, tmp_path):
    """`sweep.runs` is ragged: a second task swept with two strategies only gets its own
    frontiers and comparisons, and no strategy it was not swept with is asked for."""
    import shutil

    root, _, cfg, _, _ = swept
    copy = tmp_path / "r"
    shutil.copytree(root / "data/metrics", copy / "data/metrics")
    for s in ("full", "lora"):          # the same records under a second task's name
        dest = S.output_file(copy, "tweets", s)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(S.output_file(root, "movies", s), dest)
    (copy / "data/metrics/baselines.json").write_text(json.dumps(
        {"tasks": {t: {"majority": {"val_accuracy": 0.5}} for t in ("movies", "tweets")}}))
    runs = {**SWEEP["runs"], **{f"tweets-{s}": {"task": "tweets", "strategy": s} for s in ("full", "lora")}}
    ragged = parse_section("sweep", {**SWEEP, "runs": runs}, SweepSection)
    out = F.run(ragged, DECIDE, copy)
    assert set(out["tasks"]) == {"movies", "tweets"}
    assert set(out["tasks"]["tweets"]) == {"full", "lora"}
    assert out["tasks"]["tweets"]["lora"] == out["tasks"]["movies"]["lora"]   # the same records, the same frontier
    tasks_compared = {c["task"] for c in out["claims"]["val_best"]["comparisons"].values()}
    assert tasks_compared == {"movies", "tweets"}
    assert {c["strategy"] for c in out["claims"]["val_best"]["comparisons"].values() if c["task"] == "tweets"} == {"lora"}
    rows = (copy / F.CSV).read_text().splitlines()
    assert len(rows) == 1 + sum(len(cfg.points(s)) for s in cfg.strategies) + len(cfg.points("full")) + len(cfg.points("lora"))


def test_a_knob_value_the_arm_refuses_fails_before_training(swept):
    root, fc, _, held, _ = swept
    bad = parse_section("sweep", {**SWEEP, "grids": {**SWEEP["grids"], "lora": {"lrs": [1e-2], "knob": {"name": "r", "values": [0]}}}},
                        SweepSection)
    with pytest.raises(ConfigError, match=r"sweep\.grids\.lora\.knob\.values: 0 for r"):
        S.run(fc, bad, held, "movies", "lora", root=root)
    with pytest.raises(ConfigError, match="sweep.runs: no item source-full"):
        S.run(fc, bad, held, "source", "full", root=root)


def write_params(dest: Path, change) -> Path:
    """params.yaml with its `sweep` section changed by `change`."""
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load((ROOT / "params.yaml").read_text())
    sweep = json.loads(json.dumps(params["sweep"]))
    change(sweep)
    params["sweep"] = sweep
    with open(dest / "params.yaml", "w") as f:
        yaml.dump(params, f)
    return dest / "params.yaml"


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(seeds=[0]), "sweep.seeds: got [0]; expected: List should have at least 2 items"),
    (lambda s: s.update(seeds=[0, 0]), "a seed is repeated: 0"),
    (lambda s: s.update(lengths=[10, 0]), "every length (optimizer steps) must be > 0"),
    (lambda s: s["grids"]["full"].update(lrs=[]), "sweep.grids.full.lrs: got []"),
    (lambda s: s["grids"]["lora"]["knob"].update(name="rank"), "'rank' is not a key of finetune.arms.lora"),
    (lambda s: s["grids"].pop("linear_probe"), "sweep.grids.linear_probe: missing"),
    (lambda s: s["runs"].update({"source-scratch": {"task": "source", "strategy": "scratch"}}),
     "source-scratch: 'scratch' cannot be swept yet"),
    (lambda s: s["runs"].update({"source-lora": {"task": "movies", "strategy": "lora"}}),
     "key 'source-lora' must be '<task>-<strategy>' of its value, i.e. movies-lora"),
    (lambda s: s["runs"].update({"source-ewc": {"task": "source", "strategy": "ewc"}}) or s["grids"].pop("ewc"),
     "sweep.grids.ewc: missing"),
    (lambda s: s.update(runs={}), "sweep.runs: got {}"),
])
def test_bad_params_are_refused_naming_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError) as e:
        S.load_configs(write_params(tmp_path, change))
    assert message in str(e.value)
    with pytest.raises(ConfigError):
        F.load_configs(tmp_path / "params.yaml")


def test_the_stage_fails_with_one_error_line_before_any_work(tmp_path):
    write_params(tmp_path, lambda s: s.update(seeds=[0]))
    p = subprocess.run([sys.executable, "-m", "stages.sweep", "--task", "source", "--strategy", "full"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid params: sweep.seeds"), p.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]   # nothing written


def test_without_an_lm_head_the_frontier_says_so_and_judges_nothing(swept, tmp_path):
    """A foundation without an LM head: the sweep records accuracy only (`blocks` null); the
    frontier stage and the page say the drift is not applicable, with no verdict."""
    import shutil

    from ptf.measures.drift import NO_LM_HEAD
    from ptf.report import frontier_section

    root, _, cfg, _, _ = swept
    copy = tmp_path / "r"
    shutil.copytree(root / "data/metrics", copy / "data/metrics")
    for s in cfg.strategies:
        f = S.output_file(copy, "movies", s)
        m = json.loads(f.read_text())
        m.update(blocks=None, objective=None, not_applicable=NO_LM_HEAD)
        f.write_text(json.dumps(m))
    out = F.run(cfg, DECIDE, copy)
    assert out["applicable"] is False and out["claims"] == {}
    text = "\n".join(frontier_section.section(json.loads((copy / F.OUTPUT).read_text())))
    assert f"**Not measured on LM drift**: {NO_LM_HEAD}." in text and "Verdict" not in text
