"""The strategy registry (ptf.models.strategies): one entry per strategy, the `finetune.arms`
params model derived from it, and an unknown name refused, with the known names listed, before
any work, everywhere a name can be given: `finetune.strategies`, `finetune.curves.strategies`,
`finetune.sequential.strategy` and `--strategy`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from finetune_fixtures import cfg_of, make_pretrained, make_tokenizer, params
from ptf.common.config import ConfigError
from ptf.models import strategies as S
from ptf.models import trainable as T
from stages import curves, finetune, sequential

REPO = Path(__file__).resolve().parents[1]
KNOWN = "known strategies: " + ", ".join(S.STRATEGIES)


def test_arms_params_model_is_derived_from_the_registry():
    assert tuple(S.Arms.model_fields) == S.STRATEGIES == tuple(S.REGISTRY)
    for name, entry in S.REGISTRY.items():
        assert S.Arms.model_fields[name].annotation is entry.arm


def test_each_entry_says_how_it_is_saved_and_whether_it_runs_sequentially():
    kinds = {n: e.artifact for n, e in S.REGISTRY.items()}
    assert kinds.pop("lora") == "adapter+merged" and kinds.pop("prompt_tuning") == "adapter"
    assert set(kinds.values()) == {"model"}
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
    ("finetune.strategies.1", {"strategies": ["full", "nope"]}),
    ("finetune.curves.strategies.0", {"curves.strategies": ["nope"]}),
    ("finetune.sequential.strategy.source", {"sequential.strategy": {"movies": "full",
                                                                     "source": "nope"}}),
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
    with pytest.raises(ConfigError, match=rf"strategy\.movies: '{bad}' is not a sequential "
                                          r"strategy \(those are: full, lower_lr"):
        cfg_of(params(**{"sequential.strategy": {"movies": bad, "source": "full"}}),
               sequential.Config)


def test_sequential_plan_needs_a_strategy_per_task_and_no_repeats():
    with pytest.raises(ConfigError, match="no strategy for task 'source'"):
        cfg_of(params(**{"sequential.strategy": {"movies": "full"}}), sequential.Config)
    with pytest.raises(ConfigError, match="a task is repeated"):
        cfg_of(params(**{"sequential.order": ["movies", "movies"]}), sequential.Config)


def test_cli_unknown_strategy_exits_1_before_reading_params(tmp_path):
    """`--strategy` is checked first: here params.yaml does not even exist."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "stages.finetune", "--task", "movies",
                        "--strategy", "dropout"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"error: --strategy: unknown strategy 'dropout'; {KNOWN}"

