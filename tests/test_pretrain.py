"""Stage pretrain on tiny data and a 2-layer, hidden-32 model: outputs, MLflow, resume after
SIGKILL (bit-exact), two real DDP processes over gloo, params validation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain_fixtures import make_data, pretrain_params, write_params
from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.models.lm import mask_tokens
from stages.pretrain import Config, run, unigram_perplexity
from tests.smoke import closed_port, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module (creating the tables takes seconds)."""
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def _env(monkeypatch, mlflow_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    from ptf.training.trainer import reset_accelerate
    reset_accelerate()


def _cfg(**over) -> Config:
    return parse_section("pretrain", pretrain_params(**over), Config)


def _runs(uri, experiment):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


# ---------------------------------------------------------------- pure helpers, params

def test_mask_tokens_bert_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (64, 128))
    ids[:, 0] = 2  # a special token: never a target
    inp, lab = mask_tokens(ids, mask_id=4, vocab_size=100, special=[0, 1, 2, 3, 4], prob=0.15,
                           generator=g)
    chosen = lab != -100
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15 * 127 / 128) < 0.01
    assert torch.equal(lab[chosen], ids[chosen])
    masked = (inp == 4) & chosen
    kept = (inp == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.03
    assert 0.07 < kept.sum().item() / chosen.sum().item() < 0.14  # 10% kept (+ random hits)
    assert torch.equal(inp[~chosen], ids[~chosen])


def test_unigram_perplexity():
    assert unigram_perplexity(np.zeros(10, dtype=np.int64), np.arange(10)) == pytest.approx(10)
    counts = np.array([98, 0])  # add-one: p = [99/100, 1/100]
    assert unigram_perplexity(counts, np.array([0])) == pytest.approx(100 / 99)


@pytest.mark.parametrize("over,key", [
    ({"lr": "0.1"}, "pretrain.lr"), ({"objective": "gpt"}, "pretrain.objective"),
    ({"batch_size": 0}, "pretrain.batch_size"), ({"bogus": 1}, "pretrain.bogus"),
    ({"warmup_steps": 50}, "warmup_steps=50 must be < max_steps"),
    ({"mixed_precision": "fp8"}, "pretrain.mixed_precision")])
def test_invalid_params_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(**over)


def test_invalid_nested_and_missing_key():
    p = pretrain_params()
    p["model"]["layers"] = -1
    del p["seed"]
    with pytest.raises(ConfigError, match=r"pretrain\.seed: missing.*pretrain\.model\.layers: got -1"):
        parse_section("pretrain", p, Config)


# ---------------------------------------------------------------- in-process stage runs

def test_clm_outputs_mlflow_and_resume_keys(tmp_path, mlflow_uri):
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, pipeline)
    make_data(tmp_path, "bpe")
    m = run(_cfg(experiment="clm-test"), tmp_path)
    assert m["steps"] == 12 and m["resumed_from_step"] is None and m["distributed_type"] == "NO"
    assert m["tokens_seen"] == 12 * 8 * 32 and m["tokens_per_s"] > 0 and m["wall_time_s"] > 0
    assert np.isfinite(m["val_ppl"]) and m["val_ppl"] == pytest.approx(np.exp(m["val_loss"]))
    assert m["unigram_ppl"] > 1
    assert json.loads((tmp_path / "data/metrics/pretrain.json").read_text()) == m
    rows = (tmp_path / "data/plots/pretrain_loss.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss" and rows[-1].startswith("12,")
    assert all(r.split(",")[2] for r in rows[1:] if r.split(",")[0] in ("6", "12"))  # evals
    out = tmp_path / "data/models/pretrained"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    assert gen("the cat", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("the cat")
    AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)
    assert not list(out.parent.glob(".*tmp*"))
    # MLflow: one run with the section's params, step metrics and the tags
    c, runs = _runs(mlflow_uri, "clm-test")
    assert len(runs) == 1
    r = runs[0]
    assert r.data.params["model.hidden"] == "32" and r.data.params["lr"] == "0.003"
    assert r.data.tags["dvc.stage"] == "pretrain" and r.data.tags["input.shards"].startswith("sha256:")
    assert "input.tokenizer" in r.data.tags
    assert [x.step for x in c.get_metric_history(r.info.run_id, "train_loss")] == [2, 4, 6, 8, 10, 12]
    assert {x.step for x in c.get_metric_history(r.info.run_id, "val_loss")} == {6, 12}
    # same config again: resumes from the final checkpoint, same weights, no training
    w = _weights(out)
    m2 = run(_cfg(experiment="clm-test"), tmp_path)
    assert m2["resumed_from_step"] == 12 and m2["val_loss"] == m["val_loss"]
    assert all(torch.equal(w[k], v) for k, v in _weights(out).items())
    # another config: its own checkpoint directory, never the other one's state
    m3 = run(_cfg(experiment="clm-test", lr=0.001), tmp_path)
    assert m3["resumed_from_step"] is None
    assert len(list((tmp_path / "data/checkpoints/pretrain").iterdir())) == 2


def test_extra_seeds_train_one_backbone_each_the_first_unchanged(tmp_path, mlflow_uri):
    """pretrain.extra_seeds: each further backbone is the same training from its own seed, laid
    out under backbones/<seed>/ and found by ptf.models.backbones; the first is bit-identical to a
    one-seed run, and fine-tune seed s maps to backbone s mod N."""
    from transformers import AutoModelForCausalLM

    from ptf.models.backbones import backbone_dirs, backbone_for
    make_data(tmp_path, "bpe")
    one = tmp_path / "one"
    make_data(one, "bpe")
    m1 = run(_cfg(experiment="seeds-test", checkpoint_every=0), one)
    m = run(_cfg(experiment="seeds-test", checkpoint_every=0, extra_seeds=[7]), tmp_path)
    out = tmp_path / "data/models/pretrained"
    assert backbone_dirs(out) == [out, out / "backbones/7"]
    assert backbone_for(out, 4) == out and backbone_for(out, 5) == out / "backbones/7"
    assert backbone_dirs(one / "data/models/pretrained") == [one / "data/models/pretrained"]
    w1, w, w7 = _weights(one / "data/models/pretrained"), _weights(out), _weights(out / "backbones/7")
    assert all(torch.equal(w1[k], w[k]) for k in w1)                  # the first: as with one seed
    assert any(not torch.equal(w[k], w7[k]) for k in w)                # the other: its own init
    assert m["val_loss"] == m1["val_loss"]
    assert [b["seed"] for b in m["backbones"]] == [0, 7]
    assert m["backbones"][1]["val_loss"] != m["val_loss"] and m["backbones"][1]["steps"] == 12
    AutoModelForCausalLM.from_pretrained(out / "backbones/7")         # a whole HF directory
    assert (out / "backbones/7/tokenizer.json").is_file()
    c, runs = _runs(mlflow_uri, "seeds-test")
    mine = [r for r in runs if r.data.tags.get("backbone_seeds") == "0,7"]
    assert len(mine) == 1 and {x.step for x in c.get_metric_history(mine[0].info.run_id, "seed7.val_loss")} == {6, 12}
    with pytest.raises(ConfigError, match="must be distinct"):
        _cfg(extra_seeds=[0])


def test_mlm_outputs_fill_mask(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
    make_data(tmp_path, "wordpiece")
    m = run(_cfg(objective="mlm", checkpoint_every=0, experiment="mlm-test"), tmp_path)
    assert m["objective"] == "mlm" and np.isfinite(m["val_ppl"]) and m["eval_targets"] > 0
    out = tmp_path / "data/models/pretrained"
    model = AutoModelForMaskedLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    preds = pipeline("fill-mask", model=model, tokenizer=tok)(f"the cat {tok.mask_token} on the mat")
    assert len(preds) == 5 and all("token_str" in p for p in preds)
    assert not (tmp_path / "data/checkpoints/pretrain").exists()


def test_mlm_needs_mask_token(tmp_path):
    make_data(tmp_path, "bpe")
    with pytest.raises(StageError, match="mask token"):
        run(_cfg(objective="mlm"), tmp_path)


def test_unreachable_tracking_fails_before_training(tmp_path, monkeypatch):
    make_data(tmp_path, "bpe")
    with closed_port() as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        with pytest.raises(StageError, match=f"http://127.0.0.1:{port} is not reachable"):
            run(_cfg(), tmp_path)
    assert not (tmp_path / "data/checkpoints").exists() and not (tmp_path / "data/models").exists()


# ---------------------------------------------------------------- real processes

def _env_for(mlflow_uri: str, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=mlflow_uri, **extra)
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


# Runs the pretrain stage's `__main__` and SIGKILLs the process in the middle of optimizer step
# DIE_AT_STEP: after its forward and backward pass, before the update (torch's global
# optimizer-step pre-hook; the stage has one optimizer and takes one step per training step).
DIE_AT_STEP = """
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
calls = 0
def die(optimizer, args, kwargs):
    global calls
    calls += 1
    if calls == int(os.environ["DIE_AT_STEP"]):
        sys.stdout.flush(); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_pre_hook(die)
sys.argv = ["stages.pretrain"]
runpy.run_module("stages.pretrain", run_name="__main__", alter_sys=True)
"""


def _failed(name: str, proc, log: Path) -> str:
    return f"{name} exited {proc.returncode}\n{log.read_text()[-3000:]}"


def test_resume_after_sigkill_is_bit_exact(tmp_path, mlflow_uri):
    """12 steps, a checkpoint every 4; the killed run dies inside step 7 (SIGKILL), resumes from
    the step-4 checkpoint and ends with the uninterrupted run's weights, bit for bit."""
    steps, every, die_at = 12, 4, 7
    roots = {}
    for name in ("ref", "killed"):
        roots[name] = tmp_path / name
        make_data(roots[name], "bpe")
        write_params(roots[name], max_steps=steps, checkpoint_every=every, eval_every=6,
                     log_every=2, experiment=f"resume-{name}")
    cmd = [sys.executable, "-m", "stages.pretrain"]
    env = _env_for(mlflow_uri)
    logs = {n: tmp_path / f"{n}.log" for n in ("ref", "victim", "again")}

    def start(name: str, root: Path, argv: list[str], **extra) -> subprocess.Popen:
        with open(logs[name], "w") as log:
            return subprocess.Popen(argv, cwd=root, env={**env, **extra}, stdout=log,
                                    stderr=subprocess.STDOUT)

    ref = start("ref", roots["ref"], cmd)
    victim = start("victim", roots["killed"], [sys.executable, "-c", DIE_AT_STEP],
                   DIE_AT_STEP=str(die_at))
    assert victim.wait(timeout=300) == -signal.SIGKILL, _failed("victim", victim, logs["victim"])
    ck = roots["killed"] / "data/checkpoints/pretrain"
    assert [p.parent.name for p in ck.glob("*/step-*/COMPLETE")] == ["step-00000004"]
    assert not (roots["killed"] / "data/models/pretrained").exists()
    again = start("again", roots["killed"], cmd)
    assert again.wait(timeout=300) == 0, _failed("rerun", again, logs["again"])
    assert ref.wait(timeout=300) == 0, _failed("reference", ref, logs["ref"])
    m = json.loads((roots["killed"] / "data/metrics/pretrain.json").read_text())
    assert m["resumed_from_step"] == 4 and m["steps"] == steps
    m_ref = json.loads((roots["ref"] / "data/metrics/pretrain.json").read_text())
    assert m_ref["resumed_from_step"] is None and m["val_loss"] == m_ref["val_loss"]
    want = _weights(roots["ref"] / "data/models/pretrained")
    got = _weights(roots["killed"] / "data/models/pretrained")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_two_processes_ddp_gloo(tmp_path, mlflow_uri):
    from transformers import AutoModelForCausalLM
    make_data(tmp_path, "bpe")
    write_params(tmp_path, max_steps=6, eval_every=3, checkpoint_every=3, experiment="ddp-test")
    env = _env_for(mlflow_uri, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "stages.pretrain"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "data/metrics/pretrain.json").read_text())
    assert m["distributed_type"] == "MULTI_CPU" and m["num_processes"] == 2
    assert m["tokens_seen"] == 6 * 8 * 32 * 2  # both processes' tokens
    assert np.isfinite(m["val_loss"])
    assert r.stdout.count("pretrain: val ppl") == 1  # only rank 0 reports
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "data/models/pretrained")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _, runs = _runs(mlflow_uri, "ddp-test")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # only the main process logs
    assert not list((tmp_path / "data").rglob(".*tmp*"))


