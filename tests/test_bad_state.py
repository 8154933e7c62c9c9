"""Bad state on disk: each case is one clear `StageError` naming the file and what to do, raised
before any training, never a deserialisation error deep in a library's stack.

- a truncated `data/models/pretrained/model.safetensors`: the finetune stage (in-process and
  through its `__main__`: one `error:` line, exit 1) and the forgetting stage name the file and
  say how to restore it (`dvc checkout data/models/pretrained` / `dvc repro -f pretrain`);
- a truncated fine-tuned model (read by forgetting through `load_classifier`): same;
- an Arrow shard whose bytes no longer match the manifest's sha256, and an Arrow shard that is
  garbage but whose manifest was rewritten to match it: the pretrain stage stops with a
  `ShardError` naming the shard (the shard format itself: tests/test_shards.py);
- a checkpoint made with another model size: a changed `pretrain.model` gets another checkpoint
  directory (the fingerprint key); a checkpoint of another size placed in this config's
  directory is refused with the differing keys named, and nothing is trained or written.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from finetune_fixtures import make_root
from pretrain_fixtures import make_data, pretrain_params
from ptf.common import paths
from ptf.common.cli import StageError
from ptf.common.config import parse_section, read_params
from ptf.data.shards import ShardError, sha256_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    from ptf.training.trainer import reset_accelerate
    reset_accelerate()


@pytest.fixture(scope="module")
def ft_root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("bad-ft"))


def _truncate(f: Path) -> None:
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])


def _finetune_cfg():
    from stages.finetune import Config
    return parse_section("finetune", read_params(REPO / "configs" / "smoke.yaml")["finetune"], Config)


@pytest.fixture
def truncated_pretrained(ft_root, tmp_path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(ft_root, root)
    _truncate(root / paths.PRETRAINED / "model.safetensors")
    return root


def test_finetune_names_a_truncated_pretrained_file(truncated_pretrained):
    from stages.finetune import run
    bad = truncated_pretrained / paths.PRETRAINED / "model.safetensors"
    with pytest.raises(StageError) as e:
        run(_finetune_cfg(), "movies", "full", truncated_pretrained)
    msg = str(e.value)
    assert str(bad) in msg and "truncated or corrupt" in msg
    assert "dvc checkout data/models/pretrained" in msg and "dvc repro -f pretrain" in msg
    assert not (truncated_pretrained / paths.FINETUNED).exists()


def test_finetune_cli_says_it_in_one_line(truncated_pretrained, monkeypatch, capsys):
    import yaml

    from stages import finetune
    smoke = read_params(REPO / "configs" / "smoke.yaml")
    (truncated_pretrained / "params.yaml").write_text(yaml.safe_dump({"finetune": smoke["finetune"]}))
    monkeypatch.chdir(truncated_pretrained)
    monkeypatch.setattr(sys, "argv", ["finetune", "--task", "movies", "--strategy", "full"])
    with pytest.raises(SystemExit) as e:
        finetune.main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model.safetensors" in err[0]


def test_forgetting_names_a_truncated_pretrained_file(truncated_pretrained):
    """The pretrained weights are checked first: before any input is read or a model built."""
    from ptf.measures.outputs import Matrix
    from stages.forgetting import Config, run
    cfg = parse_section("forgetting", read_params(REPO / "configs" / "smoke.yaml")["forgetting"], Config)
    bad = truncated_pretrained / paths.PRETRAINED / "model.safetensors"
    with pytest.raises(StageError, match="model.safetensors: truncated or corrupt") as e:
        run(cfg, Matrix.grid(["movies"], ["full"]), truncated_pretrained)
    assert str(bad) in str(e.value) and "dvc checkout data/models/pretrained" in str(e.value)
    assert not (truncated_pretrained / paths.METRICS).exists()


def test_a_truncated_finetuned_model_is_named(ft_root, tmp_path):
    """A complete fine-tuned model directory (as the finetune stage writes it), then its weights
    truncated: `load_classifier` names the file and how to restore it."""
    from finetune_fixtures import make_tokenizer
    from ptf.models import strategies as S
    from ptf.models.artifacts import load_classifier, save_classifier
    pre = ft_root / paths.PRETRAINED
    clf = S.build_classifier(pre, ["negative", "positive"], "full", S.Arm(lrs=[1.0], weight_decay=0.0),
                             seed=0)
    d = tmp_path / "clf"
    save_classifier(clf, make_tokenizer(), d, {
        "strategy": "full", "task": "movies", "pooling": "last", "label_names": ["negative", "positive"],
        "pretrained_dir": str(pre), "max_length": 16, "padding_side": "left"})
    load_classifier(d)  # whole: loads
    _truncate(d / "model.safetensors")
    with pytest.raises(StageError, match=rf"{d}/model.safetensors: truncated or corrupt.*dvc checkout"):
        load_classifier(d)


# --------------------------------------------------------------------------- shards and checkpoints

def _pretrain_cfg(**over):
    from stages.pretrain import Config
    return parse_section("pretrain", pretrain_params(**over), Config)


@pytest.fixture(scope="module")
def pt_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-pt")
    make_data(root, "bpe")
    return root


@pytest.fixture
def pt_root(pt_data, tmp_path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(pt_data, root)
    return root


def _first_shard(root: Path) -> Path:
    return sorted((root / paths.SHARDS / "train").glob("shard-*.arrow"))[0]


def test_pretrain_stops_on_a_shard_that_no_longer_matches_its_manifest(pt_root):
    from stages.pretrain import run
    shard = _first_shard(pt_root)
    b = bytearray(shard.read_bytes())
    b[-100] ^= 0xFF  # same size, one byte flipped inside the token data
    shard.write_bytes(bytes(b))
    with pytest.raises(ShardError, match=rf"{shard}: sha256 does not match the manifest.*dvc repro tokenize"):
        run(_pretrain_cfg(), pt_root)
    assert not (pt_root / paths.PRETRAINED).exists() and not (pt_root / paths.CHECKPOINTS).exists()


def test_pretrain_stops_on_a_corrupt_arrow_shard_even_with_a_matching_manifest(pt_root):
    from stages.pretrain import run
    shard = _first_shard(pt_root)
    shard.write_bytes(b"\x00garbage, not an Arrow IPC stream" * 40)
    manifest_path = pt_root / paths.SHARDS / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(s for s in manifest["train"]["shards"] if s["file"] == shard.name)
    entry.update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="cannot read Arrow shard"):
        run(_pretrain_cfg(), pt_root)
    assert not (pt_root / paths.PRETRAINED).exists()


def test_another_model_size_gets_another_checkpoint_directory():
    from stages.pretrain import fingerprint, fingerprint_key
    inputs = {"input.shards": "sha256:x", "input.tokenizer": "md5:y"}
    small = fingerprint(_pretrain_cfg(), 1, inputs)
    big = fingerprint(_pretrain_cfg(model={**pretrain_params()["model"], "hidden": 64}), 1, inputs)
    assert fingerprint_key(small) != fingerprint_key(big)
    # what does not change the trajectory keeps the key (a resume still finds its checkpoints)
    assert fingerprint_key(fingerprint(_pretrain_cfg(log_every=3, checkpoint_every=2), 1, inputs)) \
        == fingerprint_key(small)


def test_a_checkpoint_of_another_model_size_is_refused_not_loaded(pt_root):
    from stages.pretrain import fingerprint, fingerprint_key, run
    from ptf.training.tracking import input_hashes
    from ptf.training.trainer import COMPLETE
    inputs = input_hashes(pt_root, {"shards": paths.SHARDS, "tokenizer": paths.TOKENIZER})
    big = _pretrain_cfg(model={**pretrain_params()["model"], "hidden": 64})
    small = _pretrain_cfg()
    # a checkpoint written by the hidden=32 run, moved into the hidden=64 run's directory
    d = pt_root / paths.CHECKPOINTS / "pretrain" / fingerprint_key(fingerprint(big, 1, inputs)) / "step-00000004"
    d.mkdir(parents=True)
    (d / COMPLETE).write_text(json.dumps({"fingerprint": fingerprint(small, 1, inputs)}, sort_keys=True))
    with pytest.raises(StageError, match=r"different config \(params\.model\.hidden: checkpoint 32 != now 64"):
        run(big, pt_root)
    assert not (pt_root / paths.PRETRAINED).exists()
    assert not (pt_root / paths.METRICS / "pretrain.json").exists()
