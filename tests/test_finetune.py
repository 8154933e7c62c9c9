"""The finetune, curves and sequential stages end to end on a tiny 2-layer Llama: every registry
strategy trains through the shared loop, saves a loadable model, freezes what it should
(bitwise), records its predictions; replay and the EWC / L2-SP penalties do what they promise;
curves and sequential train through the same registry entries; bad inputs fail before training."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from finetune_fixtures import STEPS, cfg_of, make_root, params
from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.data.tasks import load_task, stratified_fraction
from ptf.models import strategies as S
from ptf.models.artifacts import classify, load_backbone_as_lm, load_classifier
from ptf.models.lm import lm_loss, load_pretraining_blocks
from ptf.models.strategies import STRATEGIES
from stages import curves, sequential
from stages.finetune import Config, run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("ft"))


@pytest.fixture(scope="module")
def trained(root):
    """Every strategy once (1 seed, 3 steps); LR grid of 2 for `full` to exercise the search."""
    p = params()
    p["arms"]["full"]["lrs"] = [1e-3, 1e-4]
    cfg = cfg_of(p, Config)
    return {s: run(cfg, "movies", s, root=root) for s in STRATEGIES}


def pretrained_weights(root):
    return load_file(root / "data/models/pretrained/model.safetensors")


def saved_backbone(root, strategy, task="movies"):
    """The backbone state as the forgetting stage sees it (`model.*` keys of a CausalLM)."""
    lm = load_backbone_as_lm(root / f"data/models/finetuned/{task}/{strategy}/seed0",
                             root / "data/models/pretrained")
    return {f"model.{k}": v for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_saves_loads_and_freezes(root, trained, strategy):
    m = trained[strategy]
    on_disk = json.loads((root / f"data/metrics/finetune/movies/{strategy}.json").read_text())
    assert on_disk["strategy"] == strategy and len(on_disk["seeds"]) == 1
    for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "train_time_s"):
        assert set(on_disk[k]) == {"mean", "std"}
    assert 0 <= m["test_accuracy"]["mean"] <= 1 and m["seeds"][0]["steps"] == STEPS
    assert 0 < m["trainable_fraction"] <= 1

    d = root / f"data/models/finetuned/movies/{strategy}/seed0"
    model = load_classifier(d)
    if S.REGISTRY[strategy].peft is not None:
        from peft import PeftModel
        assert isinstance(model, PeftModel) and (d / "adapter_config.json").is_file()
        assert (d / "base" / "config.json").is_file()
    else:
        assert (d / "config.json").is_file() and not (d / "base").exists()
    from transformers import AutoTokenizer
    assert classify(model, AutoTokenizer.from_pretrained(d), ["the movie was really good"])[0] in (0, 1)

    pre = pretrained_weights(root)
    got = saved_backbone(root, strategy)
    same = {k for k in pre if k.startswith("model.") and torch.equal(pre[k], got[k])}
    changed = {k for k in pre if k.startswith("model.")} - same
    emb, l0, l1 = "model.embed_tokens.weight", "model.layers.0.", "model.layers.1."
    if strategy in ("linear_probe", "prompt_tuning"):
        assert not changed                      # backbone bitwise unchanged
    elif strategy in ("lora", "dora"):
        assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only merged LoRA
        raw = load_file(d / "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in raw.items())
    elif strategy == "freeze_bottom":
        assert emb in same and all(k in same for k in pre if k.startswith(l0))
        assert any(k.startswith(l1) for k in changed)
    elif strategy == "gradual_unfreeze":     # every=1, 3 steps: head, +layer 1, +layer 0
        assert emb in same
        assert any(k.startswith(l0) for k in changed) and any(k.startswith(l1) for k in changed)
    elif strategy == "adapter":               # original weights untouched, adapters added
        assert not changed and set(got) - set(pre)
    elif strategy == "osf":                   # merged into the linear layers, embeddings frozen
        assert emb in same and any(k.startswith(l0) for k in changed)
    else:
        assert emb in changed and any(k.startswith(l0) for k in changed)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_metrics_record_predictions_in_split_order(root, trained, strategy):
    """Per seed: the predicted class ids of validation and test; top level: the gold ids in the
    same order; the recorded accuracies are those of these predictions."""
    m = json.loads((root / f"data/metrics/finetune/movies/{strategy}.json").read_text())
    gold = m["test_labels"]
    assert len(gold) == m["n_test"] and len(m["validation_labels"]) == m["n_validation"]
    for r in m["seeds"]:
        for split, labels in (("test", gold), ("val", m["validation_labels"])):
            pred = r[f"{split}_predictions"]
            assert len(pred) == len(labels) and set(pred) <= {0, 1}
            acc = sum(p == g for p, g in zip(pred, labels)) / len(labels)
            assert acc == pytest.approx(r[f"{split}_accuracy"])


def test_lora_merged_dir_matches_adapter(root, trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    d = root / "data/models/finetuned/movies/lora/seed0"
    peft_model = load_classifier(d).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(d / "merged").eval()
    tok = AutoTokenizer.from_pretrained(d)
    enc = tok(["the film was dull", "a great plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(peft_model(**enc).logits, merged(**enc).logits, atol=1e-5)


def test_lr_search_recorded(trained):
    full = trained["full"]
    assert set(full["lr_search_val_accuracy"]) == {"0.001", "0.0001"}
    assert full["chosen_lr"] in (1e-3, 1e-4)
    assert trained["scratch"]["trainable_fraction"] == 1.0
    assert trained["linear_probe"]["trainable_fraction"] < 0.05


def test_replay_blocks_are_counted_per_seed(root, trained):
    """Issue 17 item 1: every optimizer step of replay mixes `batch_size` pretraining blocks,
    and the metrics say how many; no other strategy replays."""
    for s, m in trained.items():
        on_disk = json.loads((root / f"data/metrics/finetune/movies/{s}.json").read_text())
        blocks = [r["replay_blocks"] for r in on_disk["seeds"]]
        assert blocks == ([STEPS * params()["arms"]["replay"]["batch_size"]] if s == "replay"
                          else [0]), s


# ---------------------------------------------------------------- regularisers do their job

REG_LR, REG_STEPS = 3e-3, 8


@pytest.fixture(scope="module")
def regularised(tmp_path_factory):
    """full, replay, l2sp and ewc at the same seed and LR, long and strong enough to tell apart."""
    r = make_root(tmp_path_factory.mktemp("reg"))
    p = params()
    p["train"].update(max_steps=REG_STEPS, eval_every=REG_STEPS)
    for s in ("full", "replay", "l2sp", "ewc"):
        p["arms"][s]["lrs"] = [REG_LR]
    p["arms"]["l2sp"]["alpha"] = 100.0
    p["arms"]["ewc"]["lam"] = 100.0
    cfg = cfg_of(p, Config)
    for s in ("full", "replay", "l2sp", "ewc"):
        run(cfg, "movies", s, root=r)
    return r


def _distance(root, strategy) -> float:
    pre, got = pretrained_weights(root), saved_backbone(root, strategy)
    return sum(float(((got[k] - pre[k]) ** 2).sum()) for k in got if k in pre) ** 0.5


def test_l2sp_and_ewc_end_closer_to_the_pretrained_weights_than_full(regularised):
    """Issue 17 item 1: same seed, LR and steps; the penalty must pull the backbone back."""
    d = {s: _distance(regularised, s) for s in ("full", "l2sp", "ewc")}
    assert d["full"] > 0
    assert d["l2sp"] < d["full"] and d["ewc"] < d["full"], d


def test_replay_keeps_the_pretraining_loss_lower_than_full(regularised):
    """Issue 17 item 1: replay's LM-loss term is in the gradient, so at the same seed and LR its
    backbone models the pretraining blocks better than full fine-tuning's does."""
    blocks = load_pretraining_blocks(regularised, 16)[0]
    ids = torch.tensor(blocks[list(range(len(blocks)))]["input_ids"], dtype=torch.long)
    pre = regularised / "data/models/pretrained"
    with torch.no_grad():
        loss = {s: float(lm_loss(load_backbone_as_lm(
            regularised / f"data/models/finetuned/movies/{s}/seed0", pre), ids))
            for s in ("full", "replay")}
    assert loss["replay"] < loss["full"], loss


# ---------------------------------------------------------------- seeds, curves, sequential

def test_seeds_mean_std(root):
    p = params(seeds=[0, 1])
    p["train"]["max_steps"] = 2
    m = run(cfg_of(p, Config), "movies", "linear_probe", root=root)
    accs = [r["test_accuracy"] for r in m["seeds"]]
    assert [r["seed"] for r in m["seeds"]] == [0, 1]
    assert m["test_accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert (root / "data/models/finetuned/movies/linear_probe/seed1/config.json").is_file()


def test_curves_and_sequential(root):
    c = curves.run(cfg_of(params(), curves.Config), root)
    lines = (root / "data/plots/curves.csv").read_text().splitlines()
    assert lines[0] == "strategy,fraction,n_labels,seed,test_accuracy" and len(lines) == 1 + 2 * 2 * 2
    assert c["results"]["full"]["0.1"]["n_labels"] < c["results"]["full"]["1"]["n_labels"]
    p = params(**{"sequential.orders": [["movies", "source"], ["source", "movies"]], "sequential.seeds": [0, 1]})
    s = sequential.run(cfg_of(p, sequential.Config), root)
    assert json.loads((root / "data/metrics/sequential.json").read_text()) == json.loads(json.dumps(s))
    assert [(r["order"], r["strategy"], r["seed"]) for r in s["runs"]] == [
        (["movies", "source"], "l2sp", 0), (["movies", "source"], "l2sp", 1),
        (["source", "movies"], "l2sp", 0), (["source", "movies"], "l2sp", 1)]
    assert s["n_classes"] == {"movies": 2, "source": 3} and set(s["random_init"]) == {"0", "1"}
    tok = AutoTokenizer.from_pretrained(root / "data/models/pretrained")
    labels = {t: load_task(root, t, tok, cfg_of(p, sequential.Config).data).test.labels for t in s["tasks"]}
    assert s["majority"] == {t: max(y.count(c) for c in set(y)) / len(y) for t, y in labels.items()}
    for r in s["runs"]:
        assert len(r["matrix"]) == 3 and all(len(row) == 2 for row in r["matrix"])
        # every accuracy is the share of its per-example correctness, over the whole test split
        for row, cor in zip(r["matrix"], r["correct"]):
            assert [len(c) for c in cor] == [len(labels[t]) for t in r["order"]]
            assert row == pytest.approx([c.count("1") / len(c) for c in cor])
    # a seed starts every order from the same heads: row 0 of the reversed order is row 0 reversed
    by = {(tuple(r["order"]), r["seed"]): r for r in s["runs"]}
    for seed in (0, 1):
        assert by[("source", "movies"), seed]["correct"][0] == by[("movies", "source"), seed]["correct"][0][::-1]


def test_sequential_trains_each_task_through_its_registry_entry(root, monkeypatch):
    """The same entries as the finetune stage: LoRA wraps and merges back into the shared
    backbone, EWC's regulariser anchors at the PRETRAINED backbone (not the moved one)."""
    calls = []
    lora, ewc = S.REGISTRY["lora"], S.REGISTRY["ewc"]

    def merge(m):
        calls.append(("merge", type(m).__name__))
        return lora.merge(m)

    def regulariser(ctx, backbone, anchor, arm, seed):
        calls.append(("anchor", anchor is backbone, anchor.embed_tokens.weight.clone()))
        return ewc.regulariser(ctx, backbone, anchor, arm, seed)

    monkeypatch.setitem(S.REGISTRY, "lora", S.Strategy(**{**lora.__dict__, "merge": merge}))
    monkeypatch.setitem(S.REGISTRY, "ewc", S.Strategy(**{**ewc.__dict__, "regulariser": regulariser}))
    p = params(**{"sequential.strategies": ["lora", "ewc"]})
    s = sequential.run(cfg_of(p, sequential.Config), root)
    assert [r["strategy"] for r in s["runs"]] == ["lora", "ewc"] and len(s["runs"][1]["matrix"]) == 3
    # the lora run merges after each of its two tasks; the ewc run anchors both at the pretrained backbone
    assert calls[:2] == [("merge", "PeftModelForSequenceClassification")] * 2 and len(calls) == 4
    for _, same, anchor_emb in calls[2:]:
        assert not same
        assert torch.equal(anchor_emb, pretrained_weights(root)["model.embed_tokens.weight"])


def test_stratified_fraction():
    labels = [0] * 80 + [1] * 20
    idx = stratified_fraction(labels, 0.1, seed=3)
    assert sorted(labels[i] for i in idx) == [0] * 8 + [1] * 2
    assert idx != stratified_fraction(labels, 0.1, seed=4)
    assert len(stratified_fraction(labels, 0.001, seed=0)) == 2   # at least one per class


def test_curves_budget_grows_with_the_labels(root):
    """Each fraction trains ceil(epochs x labels / examples per step) steps, at least min_steps,
    and records each seed's best-validation step within that budget."""
    p = params()
    p["curves"].update({"strategies": ["linear_probe"], "epochs": 2.0, "min_steps": 3})
    c = curves.run(cfg_of(p, curves.Config), root)
    per_step = p["train"]["batch_size"] * p["train"]["grad_accum"]
    assert (c["epochs"], c["min_steps"], c["examples_per_step"]) == (2.0, 3, per_step)
    small, whole = c["results"]["linear_probe"]["0.1"], c["results"]["linear_probe"]["1"]
    assert small["steps"] == max(3, math.ceil(2 * small["n_labels"] / per_step))
    assert whole["steps"] == math.ceil(2 * whole["n_labels"] / per_step) > small["steps"]
    for cell in (small, whole):
        assert len(cell["best_steps"]) == 2 and all(0 < b <= cell["steps"] for b in cell["best_steps"])


def test_curves_steps_for_and_repeated_values():
    cc = cfg_of(params(), curves.Config).curves
    assert cc.model_copy(update={"epochs": 3.0, "min_steps": 40}).steps_for(2000, 16) == 375
    assert cc.model_copy(update={"epochs": 3.0, "min_steps": 40}).steps_for(20, 16) == 40
    assert cc.model_copy(update={"epochs": 0.5, "min_steps": 1}).steps_for(33, 16) == 2   # ceil(1.03)
    for key, value in (("seeds", [0, 0]), ("fractions", [0.1, 0.1]), ("strategies", ["full", "full"])):
        p = params()
        p["curves"][key] = value
        with pytest.raises(ConfigError, match=rf"finetune\.curves\.{key}.*repeated"):
            cfg_of(p, curves.Config)
    p = params()
    p["curves"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"finetune\.curves\.epochs"):
        cfg_of(p, curves.Config)


# ---------------------------------------------------------------- bad input, before training

def test_bad_fraction_is_config_error():
    p = params()
    p["curves"]["fractions"] = [0.5, 1.5]
    with pytest.raises(ConfigError, match=r"finetune\.curves\.fractions.*\(0, 1\]"):
        cfg_of(p, Config)
    p["curves"]["fractions"] = [0.0]
    with pytest.raises(ConfigError):
        cfg_of(p, Config)


@pytest.mark.parametrize("stage", ["finetune", "curves", "sequential"])
def test_mean_pooling_on_llama_is_refused_before_any_output(root, stage):
    """Llama's HF head cannot mean-pool: every stage stops at its start, naming the key, the
    value and the model type, and writes nothing."""
    p = params(pooling="mean")
    before = sorted(x for x in (root / "data").rglob("*"))
    with pytest.raises(ConfigError, match=r"finetune\.pooling: 'mean' cannot be saved "
                                          r"faithfully for model type 'llama'"):
        if stage == "finetune":
            run(cfg_of(p, Config), "movies", "full", root=root)
        else:
            mod = curves if stage == "curves" else sequential
            mod.run(cfg_of(p, mod.Config), root)
    assert sorted(x for x in (root / "data").rglob("*")) == before


def test_missing_task_and_bad_lora_fail_before_training(root):
    out = root / "data/models/finetuned/nosuch"
    with pytest.raises(StageError, match="nosuch.*task data not found"):
        run(cfg_of(params(), Config), "nosuch", "full", root=root)
    assert not out.exists()
    p = params()
    p["arms"]["lora"]["target_modules"] = ["q_proj", "c_attn"]
    movies = root / "data/models/finetuned/movies"
    before = sorted(movies.iterdir()) if movies.exists() else []
    with pytest.raises(ConfigError, match="c_attn.*not found"):
        run(cfg_of(p, Config), "movies", "lora", root=root)
    assert (sorted(movies.iterdir()) if movies.exists() else []) == before
    p["sequential"]["strategies"] = ["full", "lora"]   # the second strategy's arm is checked before any run
    with pytest.raises(ConfigError, match="c_attn.*not found"):
        sequential.run(cfg_of(p, sequential.Config), root)


def test_unknown_strategy_in_params_is_config_error():
    with pytest.raises(ConfigError, match="finetune.runs.movies-nope.strategy.*unknown strategy 'nope'"):
        parse_section("finetune", params(runs={"movies-nope": {"task": "movies", "strategy": "nope"}}), Config)
