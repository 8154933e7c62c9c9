"""configs/foundation.yaml: the run that fine-tunes from the real all-MiniLM-L6-v2 (as it is) beside
scratch on the polarity tasks. What can be checked without running it: every section builds its
stage's strict Config, the foundation is the pinned wheel, the arms are the polarity tasks with
scratch beside the pretrained arms, and a LoRA target that a BERT lacks (Llama's q_proj/v_proj) is
refused before any training, naming both sides."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ptf.common.config import ConfigError, load_section, parse_section, read_params
from tests.test_foundation import MINILM

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION = ROOT / "configs" / "foundation.yaml"
POLARITY = {"movies", "amazon", "nyt", "tweets"}
STAGES = ["download", "tokenizer", "tokenize", "pretrain", "baselines", "forgetting", "wise_ft",
          "representation"]


@pytest.fixture(scope="module")
def params() -> dict:
    return read_params(FOUNDATION)


@pytest.mark.parametrize("section", STAGES)
def test_sections_build_their_configs(section):
    load_section(section, importlib.import_module(f"stages.{section}").Config, FOUNDATION)


def test_finetune_section_and_its_stages(params):
    from ptf.training.finetune_config import FinetuneSection
    from stages import curves, finetune, sequential

    parse_section("finetune", params["finetune"], FinetuneSection)
    for mod in (finetune, curves, sequential):
        parse_section("finetune", {k: v for k, v in params["finetune"].items()
                                   if k in mod.Config.model_fields}, mod.Config)


def test_same_sections_as_params_yaml(params):
    # `representation` is added to params.yaml when the stage is wired into dvc.yaml
    base = set(read_params(ROOT / "params.yaml")) - {"representation"}
    assert set(params) - {"representation"} == base and "representation" in params


def test_the_pinned_minilm_as_it_is(params):
    assert params["download"]["foundation"] == MINILM
    assert params["tokenizer"] == {"kind": "foundation"}
    pre = params["pretrain"]
    assert (pre["init"], pre["objective"], pre["model"], pre["max_steps"]) == ("foundation", "mlm", None, 0)
    # the same tasks and splits as the default run
    default = read_params(ROOT / "params.yaml")["download"]
    assert {k: v for k, v in params["download"].items() if k != "foundation"} == \
        {k: v for k, v in default.items() if k != "foundation"}


def test_arms_are_the_polarity_tasks_beside_scratch(params):
    runs = params["finetune"]["runs"]
    tasks = {r["task"] for r in runs.values()}
    assert tasks == POLARITY
    for t in tasks:
        assert {(t, s) for s in ("full", "linear_probe", "scratch")} <= {(r["task"], r["strategy"]) for r in runs.values()}
    assert set(params["baselines"]["tasks"]) == POLARITY and params["baselines"]["data"] == params["finetune"]["data"]
    assert params["finetune"]["curves"]["task"] in POLARITY
    assert params["finetune"]["curves"]["strategies"] == ["full", "linear_probe", "scratch"]
    assert params["representation"]["held_out_blocks"] == params["forgetting"]["max_blocks"]
    assert params["finetune"]["arms"]["lora"]["target_modules"] == ["query", "value"]


def _bert_root(tmp_path):
    from tests.finetune_fixtures import make_root
    return make_root(tmp_path, "bert")


@pytest.mark.parametrize("strategy,key", [("lora", r"finetune\.arms\.lora\.target_modules: \['q_proj', 'v_proj'\] "
                                                   r"not found in the model \(bert\); its linear modules are: \[.*'query'.*'value'"),
                                          ("dora", r"finetune\.arms\.dora\.target_modules: 'q_proj' not found in the "
                                                   r"model \(bert\); its wrappable layers are: \[.*'query'.*'value'")])
def test_llama_lora_targets_on_a_bert_refused_before_training(tmp_path, strategy, key):
    """The finetune stage's preflight (ptf.training.finetuning.preflight, through the registry's
    check in ptf.models.strategies / ptf.models.peft_variants) refuses Llama's names on a BERT,
    naming the missing targets and the model's own modules, before any training or output."""
    from stages import finetune
    from tests.finetune_fixtures import cfg_of, params as ft_params

    root = _bert_root(tmp_path)
    p = ft_params("bert")
    p["arms"][strategy]["target_modules"] = ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=key):
        finetune.run(cfg_of(p, finetune.Config), "movies", strategy, root=root)
    assert not (root / "data/models/finetuned").exists()
    assert not (root / "data/metrics/finetune").exists()


def test_the_configs_lora_arm_fits_a_bert(tmp_path, params):
    from ptf.models.strategies import REGISTRY, build_classifier

    root = _bert_root(tmp_path)
    arm_model = REGISTRY["lora"].arm
    arm = arm_model.model_validate(params["finetune"]["arms"]["lora"])
    clf = build_classifier(root / "data/models/pretrained", ["negative", "positive"], "lora", arm, seed=0)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in clf.named_parameters() if "lora_A" in n}
    assert wrapped == {"query", "value"}
