"""The finetune, curves and sequential stages end to end on a tiny 2-layer Llama: every strategy
trains through the shared loop, saves a loadable model, freezes what it should (bitwise), and
bad inputs fail before any training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune_fixtures import make_root
from stages import curves, sequential
from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.data.tasks import stratified_fraction
from ptf.training.finetune_config import FinetuneSection
from stages.finetune import Config, run
from ptf.models.artifacts import classify, load_backbone_as_lm, load_classifier
from ptf.models.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def params(**over):
    lr = lambda v: {"lrs": v, "weight_decay": 0.0}  # noqa: E731
    p = {
        "tasks": ["movies"], "strategies": list(STRATEGIES), "seeds": [0], "pooling": "last",
        "data": {"max_train": 48, "max_eval": 24, "max_length": 16, "seed": 0},
        "train": {"batch_size": 8, "eval_batch_size": 24, "grad_accum": 1, "max_steps": STEPS,
                  "warmup_steps": 1, "eval_every": STEPS, "patience": None, "grad_clip": 1.0,
                  "mixed_precision": "no"},
        "arms": {
            "full": lr([1e-3]), "lower_lr": lr([1e-4]), "linear_probe": lr([1e-2]),
            "freeze_bottom": {**lr([1e-3]), "layers": 1},
            "gradual_unfreeze": {**lr([1e-3]), "every": 1, "factor": 2.6},
            "lora": {**lr([1e-2]), "r": 2, "alpha": 4.0, "dropout": 0.0,
                     "target_modules": ["q_proj", "v_proj"]},
            "prompt_tuning": {**lr([1e-2]), "virtual_tokens": 3},
            "replay": {**lr([1e-3]), "weight": 1.0, "batch_size": 2, "block_len": 8},
            "ewc": {**lr([1e-3]), "lam": 1.0, "fisher_blocks": 2, "fisher_batch_size": 1,
                    "block_len": 8, "normalize": True},
            "l2sp": {**lr([1e-3]), "alpha": 0.1},
            "scratch": lr([1e-3]),
        },
        "curves": {"task": "movies", "strategies": ["full", "scratch"], "fractions": [0.1, 1.0],
                   "seeds": [0, 1], "max_steps": 2, "lr_search": False},
        "sequential": {"order": ["movies", "source"],
                       "strategy": {"movies": "full", "source": "l2sp"}, "seed": 0, "max_steps": 2},
    }
    for k, v in over.items():
        sect, _, key = k.partition(".")
        (p[sect].__setitem__(key, v) if key else p.__setitem__(sect, v))
    return p


def cfg_of(p, model=Config):
    """The section validated whole (as the stages load it), then the keys `model` reads."""
    parse_section("finetune", p, FinetuneSection)
    return parse_section("finetune", p, model)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("ft"))


@pytest.fixture(scope="module")
def trained(root):
    """Every strategy once (1 seed, 3 steps); LR grid of 2 for `full` to exercise the search."""
    p = params()
    p["arms"]["full"]["lrs"] = [1e-3, 1e-4]
    p["seeds"] = [0]
    cfg = cfg_of(p)
    return {s: run(cfg, "movies", s, root=root) for s in STRATEGIES}


def pretrained_weights(root):
    return load_file(root / "data/models/pretrained/model.safetensors")


def saved_backbone(root, strategy):
    """The backbone state as the forgetting stage sees it (`model.*` keys of a CausalLM)."""
    lm = load_backbone_as_lm(root / f"data/models/finetuned/movies/{strategy}/seed0",
                             root / "data/models/pretrained")
    return {f"model.{k}": v for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_saves_loads_and_freezes(root, trained, strategy):
    m = trained[strategy]
    metrics_file = root / f"data/metrics/finetune/movies/{strategy}.json"
    on_disk = json.loads(metrics_file.read_text())
    assert on_disk["strategy"] == strategy and len(on_disk["seeds"]) == 1
    for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "train_time_s"):
        assert set(on_disk[k]) == {"mean", "std"}
    assert 0 <= m["test_accuracy"]["mean"] <= 1 and m["seeds"][0]["steps"] == STEPS
    assert 0 < m["trainable_fraction"] <= 1

    d = root / f"data/models/finetuned/movies/{strategy}/seed0"
    model = load_classifier(d, root / "data/models/pretrained")
    if strategy in ("lora", "prompt_tuning"):
        from peft import PeftModel
        assert isinstance(model, PeftModel) and (d / "adapter_config.json").is_file()
    else:
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(d)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(d)
    pred = classify(model, tok, ["the movie was really good"])
    assert pred[0] in (0, 1)

    pre = pretrained_weights(root)
    got = saved_backbone(root, strategy)
    same = {k for k in pre if k.startswith("model.") and torch.equal(pre[k], got[k])}
    changed = {k for k in pre if k.startswith("model.")} - same
    emb, l0, l1 = "model.embed_tokens.weight", "model.layers.0.", "model.layers.1."
    if strategy in ("linear_probe", "prompt_tuning"):
        assert not changed                      # backbone bitwise unchanged
    elif strategy == "lora":
        assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only merged LoRA
        raw = load_file(d / "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in raw.items())
    elif strategy == "freeze_bottom":
        assert emb in same and all(k in same for k in pre if k.startswith(l0))
        assert any(k.startswith(l1) for k in changed)
    elif strategy == "gradual_unfreeze":     # every=1, 3 steps: head, +layer 1, +layer 0
        assert emb in same
        assert any(k.startswith(l0) for k in changed) and any(k.startswith(l1) for k in changed)
    else:
        assert emb in changed and any(k.startswith(l0) for k in changed)


def test_lora_merged_dir_matches_adapter(root, trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    d = root / "data/models/finetuned/movies/lora/seed0"
    peft_model = load_classifier(d, root / "data/models/pretrained").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(d / "merged").eval()
    tok = AutoTokenizer.from_pretrained(d)
    enc = tok(["the film was dull", "a great plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(peft_model(**enc).logits, merged(**enc).logits, atol=1e-5)


def test_lr_search_recorded_and_replay_used_blocks(trained):
    full = trained["full"]
    assert set(full["lr_search_val_accuracy"]) == {"0.001", "0.0001"}
    assert full["chosen_lr"] in (1e-3, 1e-4)
    assert trained["scratch"]["trainable_fraction"] == 1.0
    assert trained["linear_probe"]["trainable_fraction"] < 0.05


def test_seeds_mean_std(root):
    p = params(seeds=[0, 1])
    p["train"]["max_steps"] = 2
    m = run(cfg_of(p), "movies", "linear_probe", root=root)
    accs = [r["test_accuracy"] for r in m["seeds"]]
    assert [r["seed"] for r in m["seeds"]] == [0, 1]
    assert m["test_accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert (root / "data/models/finetuned/movies/linear_probe/seed1/config.json").is_file()


def test_curves_and_sequential(root):
    c = curves.run(parse_section("finetune", params(), curves.Config), root)
    lines = (root / "data/plots/curves.csv").read_text().splitlines()
    assert lines[0] == "strategy,fraction,n_labels,seed,test_accuracy" and len(lines) == 1 + 2 * 2 * 2
    assert c["results"]["full"]["0.1"]["n_labels"] < c["results"]["full"]["1"]["n_labels"]
    s = sequential.run(parse_section("finetune", params(), sequential.Config), root)
    assert len(s["matrix"]) == 3 and all(len(r) == 2 for r in s["matrix"])
    assert s["n_classes"] == [2, 3] and s["chance"] == pytest.approx([0.5, 1 / 3])
    assert json.loads((root / "data/metrics/sequential.json").read_text())["order"] == ["movies", "source"]


def test_stratified_fraction():
    labels = [0] * 80 + [1] * 20
    idx = stratified_fraction(labels, 0.1, seed=3)
    assert sorted(labels[i] for i in idx) == [0] * 8 + [1] * 2
    assert idx != stratified_fraction(labels, 0.1, seed=4)
    assert len(stratified_fraction(labels, 0.001, seed=0)) == 2   # at least one per class


# ---------------------------------------------------------------- bad input, before training

def test_bad_fraction_is_config_error():
    p = params()
    p["curves"]["fractions"] = [0.5, 1.5]
    with pytest.raises(ConfigError, match=r"finetune\.curves\.fractions.*\(0, 1\]"):
        cfg_of(p)
    p["curves"]["fractions"] = [0.0]
    with pytest.raises(ConfigError):
        cfg_of(p)


def test_unknown_strategy_in_params_is_config_error():
    with pytest.raises(ConfigError, match="finetune.strategies.*unknown strategy 'nope'"):
        cfg_of(params(strategies=["full", "nope"]))


def test_missing_task_and_bad_lora_fail_before_training(root):
    out = root / "data/models/finetuned/nosuch"
    with pytest.raises(StageError, match="nosuch.*task data not found"):
        run(cfg_of(params()), "nosuch", "full", root=root)
    assert not out.exists()
    p = params()
    p["arms"]["lora"]["target_modules"] = ["q_proj", "c_attn"]
    before = sorted((root / "data/models/finetuned/movies").iterdir()) if (root / "data/models/finetuned/movies").exists() else []
    with pytest.raises(ConfigError, match="c_attn.*not found"):
        run(cfg_of(p), "movies", "lora", root=root)
    after = sorted((root / "data/models/finetuned/movies").iterdir()) if (root / "data/models/finetuned/movies").exists() else []
    assert before == after
    p = params()
    p["sequential"]["strategy"] = {"movies": "prompt_tuning", "source": "full"}
    with pytest.raises(ConfigError, match="not a sequential strategy"):
        sequential.run(cfg_of(p, sequential.Config), root)


def test_cli_unknown_strategy_exits_1(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"finetune": params()}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "stages.finetune", "--task", "movies",
                        "--strategy", "dropout"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown strategy 'dropout'")
