"""Stage `representation` on tiny fixtures (2-layer Llama, hidden 32): it reads exactly the
declared arms and every seed the fine-tune metrics list, writes CKA, probe retention on the other
tasks (train -> validation) and the forgetting stage's LM loss in bits/byte per arm; a bare
encoder gets "not applicable" for the LM part; bad params and bad inputs fail before compute with
one message naming the key or the file."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.measures import outputs as out
from stages import representation as rp
from tests.finetune_fixtures import make_root
from tests.test_representation_arms import save

ROOT_DIR = Path(__file__).resolve().parents[1]
PARAMS = {"held_out_blocks": 8, "batch_size": 8, "cka_pooling": "tokens",
          "probe": {"tasks": None, "layer": -1, "l2": 1e-3, "max_iter": 50,
                    "data": {"max_train": 48, "max_eval": 24, "max_length": 16, "seed": 0}}}
ARMS = [("movies", "full"), ("movies", "scratch"), ("source", "linear_probe")]


def cfg(**over) -> rp.Config:
    return parse_section("representation", {**PARAMS, **over}, rp.Config)


def matrix(arms=ARMS) -> out.Matrix:
    from ptf.training.finetune_config import Run
    return out.Matrix(runs={f"{t}-{s}": Run(task=t, strategy=s) for t, s in arms})


def write_validation(root: Path, tok, n_blocks: int = 12, block_size: int = 16) -> None:
    from ptf.data.shards import write_shards
    from tests.finetune_fixtures import _sentences
    import random

    ids: list[int] = []
    for text, _ in _sentences(random.Random(11), 80, "polarity"):
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]
    d = root / "data" / "shards" / "validation"
    d.mkdir(parents=True)
    entry = write_shards(blocks, d, block_size=block_size, shard_blocks=8)
    mf = root / "data" / "shards" / "manifest.json"
    mf.write_text(json.dumps({**json.loads(mf.read_text()), "validation": entry}))


def finetune_metrics(root: Path, task: str, strategy: str, seeds: list[int]) -> None:
    f = root / "data" / "metrics" / "finetune" / task / f"{strategy}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"strategy": strategy, "seeds": [
        {"seed": k, "test_accuracy": 0.7, "test_macro_f1": 0.6, "trainable_params": 10,
         "trainable_fraction": 0.1} for k in seeds]}))


def forgetting_json(root: Path, idx: list[int]) -> None:
    tasks = {"movies": {"full": {"seeds": {"seed0": {"loss_pretrained": 3.0, "loss_finetuned": 3.4},
                                            "seed1": {"loss_pretrained": 3.0, "loss_finetuned": 3.2}}},
                        "scratch": {"seeds": {"seed0": {"loss_pretrained": None, "loss_finetuned": None}}}},
             "source": {"linear_probe": {"seeds": {"seed0": {"loss_pretrained": 3.0, "loss_finetuned": 3.0}}}}}
    (root / "data" / "metrics" / "forgetting.json").write_text(json.dumps(
        {"eval": {"objective": "clm", "block_indices": idx, "loss_pretrained": 3.0}, "tasks": tasks}))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    root = make_root(tmp_path_factory.mktemp("repr"))
    pre = root / "data" / "models" / "pretrained"
    tok = AutoTokenizer.from_pretrained(pre)
    write_validation(root, tok)
    ft = root / "data" / "models" / "finetuned"
    save(pre, ft / "movies/full/seed0", "full", noise=0.3, seed=1)
    save(pre, ft / "movies/full/seed1", "full", noise=0.3, seed=2)
    save(pre, ft / "movies/scratch/seed0", "scratch", scratch=True, seed=3)
    save(pre, ft / "source/linear_probe/seed0", "linear_probe", task="source", seed=4)
    # left over from another params set: never read (not declared), though broken
    (ft / "movies/lora/seed0").mkdir(parents=True)
    finetune_metrics(root, "movies", "full", [0, 1])
    finetune_metrics(root, "movies", "scratch", [0])
    finetune_metrics(root, "source", "linear_probe", [0])
    (root / "data/metrics/finetune/movies/lora.json").write_text("{not json")
    forgetting_json(root, [0, 3, 6, 9])
    return root


@pytest.fixture(scope="module")
def result(root) -> dict:
    return rp.run(cfg(), matrix(), root)


def test_output_per_arm(root, result):
    assert json.loads((root / rp.OUTPUT).read_text()) == json.loads(json.dumps(result))
    assert result["arms"] == ["movies-full", "movies-scratch", "source-linear_probe"]
    assert set(result["tasks"]) == {"movies", "source"} and set(result["tasks"]["movies"]) == {"full", "scratch"}
    full = result["tasks"]["movies"]["full"]
    assert set(full["seeds"]) == {"seed0", "seed1"} and full["mean_std"]["cka_last"]["n"] == 2
    assert full["mean_std"]["cka_last"]["mean"] < 0.999
    assert set(full["seeds"]["seed0"]["probe"]) == {"source"}          # the other task only
    lp = result["tasks"]["source"]["linear_probe"]["seeds"]["seed0"]
    assert set(lp["probe"]) == {"movies"} and lp["probe_lost_mean"] == 0.0
    assert lp["cka"] == pytest.approx([1.0] * result["held_out"]["hidden_states"], abs=1e-9)
    sc = result["tasks"]["movies"]["scratch"]
    assert sc["applicable"] is False and "random init" in sc["seeds"]["seed0"]["note"]
    assert result["probe"]["score_split"] == "validation" and result["probe"]["tasks"] == ["movies", "source"]
    assert result["held_out"]["blocks"] == 8 and result["held_out"]["examples"] == 8 * 16


def test_lm_in_bits_per_byte_from_the_forgetting_numbers(root, result):
    lm = result["lm"]
    assert lm["applicable"] and lm["head"] == "LlamaForCausalLM" and lm["blocks"] == 4
    r = lm["text_tokens"] / lm["text_bytes"]
    assert lm["bpb_pretrained"] == pytest.approx(3.0 * r / math.log(2))
    s0 = result["tasks"]["movies"]["full"]["seeds"]["seed0"]["lm"]
    assert s0["delta_loss"] == pytest.approx(0.4) and s0["delta_bpb"] == pytest.approx(0.4 * r / math.log(2))
    ms = result["tasks"]["movies"]["full"]["mean_std"]
    assert ms["lm.delta_loss"]["mean"] == pytest.approx(0.3) and ms["lm.delta_bpb"]["n"] == 2


def test_bare_encoder_has_no_lm_part(tmp_path):
    """A pretrained model without an LM head (all-MiniLM-L6-v2 is a bare BertModel): the LM part is
    "not applicable", forgetting.json is not read, CKA and probes are measured."""
    from transformers import AutoModel, AutoTokenizer

    root = make_root(tmp_path, "bert")
    pre = root / "data" / "models" / "pretrained"
    tok = AutoTokenizer.from_pretrained(pre)
    AutoModel.from_pretrained(pre).save_pretrained(pre)          # BertForMaskedLM -> BertModel
    assert json.loads((pre / "config.json").read_text())["architectures"] == ["BertModel"]
    write_validation(root, tok)
    save(pre, root / "data/models/finetuned/movies/full/seed0", "full", noise=0.3)
    finetune_metrics(root, "movies", "full", [0])
    r = rp.run(cfg(probe={**PARAMS["probe"], "tasks": ["movies", "source"]}), matrix([("movies", "full")]), root)
    assert r["lm"]["applicable"] is False and "BertModel) has no LM head" in r["lm"]["note"]
    rec = r["tasks"]["movies"]["full"]["seeds"]["seed0"]
    assert rec["lm"] == {"applicable": False} and rec["cka_last"] < 1.0 and set(rec["probe"]) == {"source"}


@pytest.mark.parametrize("over,match", [
    ({"held_out_blocks": 1}, r"representation\.held_out_blocks"),
    ({"cka_pooling": "cls"}, r"representation\.cka_pooling"),
    ({"probe": {**PARAMS["probe"], "tasks": []}}, r"representation\.probe\.tasks"),
    ({"probe": {**PARAMS["probe"], "l2": 0.0}}, r"representation\.probe\.l2"),
    ({"probe": {**PARAMS["probe"], "data": {"max_train": 4}}}, r"representation\.probe\.data\.max_eval"),
    ({"extra": 1}, r"representation\.extra: unknown key"),
])
def test_bad_params_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**over)


def test_bad_inputs_before_compute(root, tmp_path):
    with pytest.raises(ConfigError, match=r"representation\.probe\.layer: got 5; the pretrained backbone has 3"):
        rp.run(cfg(probe={**PARAMS["probe"], "layer": 5}), matrix(), root)
    with pytest.raises(StageError, match=r"no task data for \['nyt'\] \(representation\.probe\.tasks\)"):
        rp.run(cfg(probe={**PARAMS["probe"], "tasks": ["movies", "nyt"]}), matrix(), root)
    with pytest.raises(StageError, match=r"the arm movies/l2sp is declared by params\.yaml"):
        rp.run(cfg(), matrix([("movies", "l2sp")]), root)
    with pytest.raises(StageError, match="no pretrained model"):
        rp.run(cfg(), matrix(), tmp_path)


def test_main_prints_one_error_line_naming_the_key(tmp_path):
    p = yaml.safe_load((ROOT_DIR / "configs" / "smoke.yaml").read_text()) \
        if (ROOT_DIR / "configs" / "smoke.yaml").is_file() else {}
    p["representation"] = {**PARAMS, "batch_size": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    r = subprocess.run([sys.executable, "-m", "stages.representation"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid params: representation.batch_size"), r.stderr


def test_no_other_task_to_probe(root):
    """A run with one task (the smoke run): CKA only; the probe part is empty, not an error."""
    from ptf.report.representation_section import section_representation

    r = rp.run(cfg(probe={**PARAMS["probe"], "tasks": ["movies"]}), matrix([("movies", "full")]), root)
    rec = r["tasks"]["movies"]["full"]["seeds"]["seed0"]
    assert rec["probe"] == {} and rec["probe_lost_mean"] is None and rec["cka_last"] < 1.0
    assert r["tasks"]["movies"]["full"]["mean_std"]["probe_lost_mean"]["n"] == 0
    text = "\n".join(section_representation(json.loads(json.dumps(r))))
    assert "| movies | full | 2 |" in text and "n/a" in text
