"""The strategy registry (ptf.models.strategies): one entry per strategy, the `finetune.arms`
params model derived from it, and an unknown name refused, with the known names listed, before
any work, everywhere a name can be given: `finetune.strategies`, `finetune.curves.strategies`,
`finetune.sequential.strategies` and `--strategy`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from finetune_fixtures import cfg_of, make_pretrained, make_tokenizer
from finetune_fixtures import params as fixture_params
from ptf.common.config import ConfigError
from ptf.models import strategies as S
from ptf.models import trainable as T
from ptf.models.adapter_modeling import is_adapter_param
from stages import curves, finetune, sequential

REPO = Path(__file__).resolve().parents[1]
KNOWN = "known strategies: " + ", ".join(S.STRATEGIES)


def new_arms(p: dict) -> dict:
    """The arms of dora, adapter and osf (issue 14) added where the shared fixture's params lack
    them (tests/finetune_fixtures.py predates them)."""
    targets = p["arms"]["lora"]["target_modules"]
    for name, arm in {
        "dora": {"lrs": [1e-2], "weight_decay": 0.0, "r": 2, "alpha": 4.0, "dropout": 0.0,
                 "target_modules": targets},
        "adapter": {"lrs": [1e-2], "weight_decay": 0.0, "reduction_factor": 4,
                    "placement": "both", "activation": "relu"},
        "osf": {"lrs": [1e-3], "weight_decay": 0.0, "effective_rank": 0.5, "target_modules": None},
    }.items():
        p["arms"].setdefault(name, arm)
    return p


def params(*args, **over) -> dict:
    return new_arms(fixture_params(*args, **over))


def test_arms_params_model_is_derived_from_the_registry():
    assert tuple(S.Arms.model_fields) == S.STRATEGIES == tuple(S.REGISTRY)
    for name, entry in S.REGISTRY.items():
        assert S.Arms.model_fields[name].annotation is entry.arm


def test_each_entry_says_how_it_is_saved_and_whether_it_runs_sequentially():
    kinds = {n: e.artifact for n, e in S.REGISTRY.items()}
    assert kinds.pop("lora") == "adapter+merged" and kinds.pop("prompt_tuning") == "adapter"
    assert kinds.pop("dora") == "adapter+merged" and kinds.pop("osf") == "adapter+merged"
    assert kinds.pop("adapter") == "remote_code"
    assert set(kinds.values()) == {"model"}
    assert [n for n, e in S.REGISTRY.items() if e.optimizer_hook] == ["osf"]
    assert [n for n, e in S.REGISTRY.items() if not e.sequential] == ["prompt_tuning", "scratch"]
    assert [n for n, e in S.REGISTRY.items() if e.blocks] == ["replay", "ewc"]


def test_adding_a_strategy_is_one_entry(tmp_path):
    """A new entry (typed arm + a trainability rule) is known to the params model, the name
    check and `build_classifier` without touching anything else."""
    class TopOnlyArm(S.Arm):
        layers: int = Field(ge=1)

    def top_only(model, arm):
        n = model.config.num_hidden_layers
        for name, p in model.named_parameters():
            i = T.layer_index(name)
            p.requires_grad_(T.is_head(model, name) or (i is not None and i >= n - arm.layers))

    registry = dict(S.REGISTRY)
    entry = S.Strategy("top_only", TopOnlyArm, "the head and the top `layers` blocks",
                       trainable=top_only)
    registry["top_only"] = entry
    arms = S.arms_model(registry)
    raw = {**params()["arms"], "top_only": {"lrs": [1e-3], "weight_decay": 0.0, "layers": 1}}
    parsed = arms.model_validate(raw)
    assert parsed.top_only.layers == 1
    with pytest.raises(Exception, match="top_only"):
        arms.model_validate(params()["arms"])           # its params are required

    pre = make_pretrained(tmp_path / "pre", make_tokenizer())
    old = dict(S.REGISTRY)
    S.REGISTRY["top_only"] = entry
    try:
        model = S.build_classifier(pre, ["a", "b"], "top_only", parsed.top_only, seed=0)
    finally:
        S.REGISTRY.clear()
        S.REGISTRY.update(old)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("score") or ".layers.1." in n for n in trained)


@pytest.mark.parametrize("strategy, want", [
    ("dora", lambda n: "lora_" in n or ".score." in n),
    ("adapter", lambda n: is_adapter_param(n) or n.startswith("score")),
    ("osf", lambda n: "osf_" in n or ".score." in n),
])
def test_new_strategies_train_only_their_own_parameters(tmp_path, strategy, want):
    """dora / adapter / osf (issue 14) through `build_classifier`: only their own parameters and
    the head train; the trainable share is what `trainable %` reports."""
    from ptf.models.trainable import count_trainable
    pre = make_pretrained(tmp_path / "pre", make_tokenizer())
    arm = getattr(cfg_of(params(), finetune.Config).arms, strategy)
    model = S.build_classifier(pre, ["a", "b"], strategy, arm, seed=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(want(n) for n in names), names
    assert any("score" in n for n in names) and any(not ("score" in n) for n in names)
    assert 0 < count_trainable(model)["trainable_fraction"] < 0.5


def test_new_strategies_refuse_bad_arms_before_training(tmp_path):
    pre = make_pretrained(tmp_path / "pre", make_tokenizer())
    arms = cfg_of(params(), finetune.Config).arms
    bad = {"dora": arms.dora.model_copy(update={"target_modules": ["nope"]}),
           "adapter": arms.adapter.model_copy(update={"reduction_factor": 64}),
           "osf": arms.osf.model_copy(update={"target_modules": ["embed_tokens"]})}
    keys = {"dora": r"finetune\.arms\.dora\.target_modules: 'nope'",
            "adapter": r"finetune\.arms\.adapter\.reduction_factor: got 64",
            "osf": r"finetune\.arms\.osf"}
    for name, arm in bad.items():
        with pytest.raises(ConfigError, match=keys[name]):
            S.build_classifier(pre, ["a", "b"], name, arm, seed=0)


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        S.register(S.Strategy("full", S.Arm, "again"))


# ---------------------------------------------------------------- unknown names, everywhere

def test_check_strategy_lists_the_known_names():
    with pytest.raises(ConfigError) as e:
        S.check_strategy("dropout", "somewhere")
    assert str(e.value) == f"somewhere: unknown strategy 'dropout'; {KNOWN}"
    assert S.check_strategy("lora") is S.REGISTRY["lora"]


@pytest.mark.parametrize("where, over", [
    ("finetune.runs.movies-nope.strategy", {"runs": {"movies-nope": {"task": "movies", "strategy": "nope"}}}),
    ("finetune.curves.strategies.0", {"curves.strategies": ["nope"]}),
    ("finetune.sequential.strategies.1", {"sequential.strategies": ["full", "nope"]}),
])
@pytest.mark.parametrize("stage", [finetune, curves, sequential])
def test_unknown_strategy_in_params_fails_every_stage(where, over, stage):
    """The section is validated whole by each stage: one bad name stops them all, naming the
    key and listing the known names."""
    with pytest.raises(ConfigError) as e:
        cfg_of(params(**over), stage.Config)
    msg = str(e.value)
    assert where in msg and "unknown strategy 'nope'" in msg and KNOWN in msg


@pytest.mark.parametrize("bad", ["prompt_tuning", "scratch"])
def test_sequential_refuses_entries_that_cannot_share_a_backbone(bad):
    with pytest.raises(ConfigError, match=rf"finetune\.sequential\.strategies: .*'{bad}' is not a sequential "
                                          r"strategy \(those are: full, lower_lr"):
        cfg_of(params(**{"sequential.strategies": ["full", bad]}), sequential.Config)


@pytest.mark.parametrize("key, value, message", [
    ("seeds", [0, 1, 0], "a seed is repeated: 0"),
    ("seeds", [], "at least 1 item"),
    ("orders", [], "at least 1 item"),
    ("orders", [[]], "order 0 is empty"),
    ("orders", [["movies", "movies"]], "order 0: a task is repeated: 'movies'"),
    ("orders", [["movies", "source"], ["source"]], r"order 1 \['source'\] is not a permutation of order 0"),
    ("orders", [["movies", "source"], ["movies", "nyt"]], "is not a permutation of order 0"),
    ("orders", [["movies", "source"], ["movies", "source"]], "an order is repeated"),
    ("strategies", ["full", "full"], "a strategy is repeated: 'full'"),
    ("strategies", [], "at least 1 item"),
    ("max_steps", 0, "greater than 0"),
])
def test_sequential_config_errors_name_the_key(key, value, message):
    """Bad input is one error naming `finetune.sequential.<key>`, before any work."""
    with pytest.raises(ConfigError, match=rf"finetune\.sequential\.{key}: .*{message}"):
        cfg_of(params(**{f"sequential.{key}": value}), sequential.Config)


def test_the_old_per_task_keys_are_refused():
    p = params()
    p["sequential"] = {"order": ["movies"], "strategy": {"movies": "full"}, "seed": 0, "max_steps": 2}
    with pytest.raises(ConfigError, match=r"finetune\.sequential\.order: unknown key"):
        cfg_of(p, sequential.Config)


def test_cli_unknown_strategy_exits_1_before_reading_params(tmp_path):
    """`--strategy` is checked first: here params.yaml does not even exist."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "stages.finetune", "--task", "movies",
                        "--strategy", "dropout"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"error: --strategy: unknown strategy 'dropout'; {KNOWN}"



@pytest.mark.parametrize("plan", [["adapter"], ["dora", "osf"]])
def test_new_strategies_run_in_the_sequential_stage(tmp_path, plan):
    """dora / osf merge into the shared backbone after their task (as LoRA); the adapter's
    modules stay in it, and a later adapter task trains the same adapters on."""
    from finetune_fixtures import make_root
    root = make_root(tmp_path)
    out = sequential.run(cfg_of(params(**{"sequential.strategies": plan}), sequential.Config),
                         root=root)
    assert [r["strategy"] for r in out["runs"]] == plan and all(len(r["matrix"]) == 3 for r in out["runs"])
