"""Stage `tokenize`: packed blocks that decode back to the corpus, memory-mapped shards with a
manifest, byte-identical reruns, and one clear error for each bad input or param."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages import tokenizer as tokenizer_stage
from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.data.shards import ShardError, load_split, read_manifest
from stages.tokenize import Config, encode_blocks, load_tokenizer, pack, run
from tests.test_tokenizer import make_docs, tok_config, write_corpus


def cfg(**over) -> Config:
    raw = dict(block_size=32, shard_blocks=20, batch_chars=1500, threads=0)
    raw.update(over)
    return Config(**raw)


@pytest.fixture(scope="module", params=["bpe", "wordpiece"])
def tok_root(request, tmp_path_factory):
    """A repo root with a corpus and a trained tokenizer of each kind."""
    root = write_corpus(tmp_path_factory.mktemp(f"tokz-{request.param}"))
    tokenizer_stage.run(tok_config(request.param), root=root)
    return request.param, root


@pytest.fixture
def root(tok_root, tmp_path):
    """A fresh copy of `tok_root` per test (tests may break its files)."""
    kind, src = tok_root
    shutil.copytree(src / "data", tmp_path / "data")
    return kind, tmp_path


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def sha_tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ran(tok_root):
    kind, root = tok_root
    run(cfg(), root=root)
    return kind, root


def test_blocks_match_a_reference_packing_and_decode_to_the_text(ran):
    from transformers import AutoTokenizer

    kind, root = ran
    tok = AutoTokenizer.from_pretrained(root / "data/tokenizer")
    manifest = read_manifest(root / "data/shards")
    for split in ("train", "validation"):
        docs = texts(root / f"data/corpus/{split}.jsonl")
        # Reference: the HF tokenizer, one document at a time.
        if kind == "bpe":
            stream = [i for d in docs for i in tok(d)["input_ids"] + [tok.eos_token_id]]
            sep_text = tok.eos_token
        else:
            stream = [i for d in docs for i in tok(d)["input_ids"]]  # [CLS] d [SEP]
        n = len(stream) // 32
        ds = load_split(root / "data/shards", split)
        blocks = np.array(ds["input_ids"])
        assert blocks.shape == (n, 32)
        assert blocks.ravel().tolist() == stream[: n * 32]
        e = manifest[split]
        assert (e["documents"], e["blocks"], e["tokens"]) == (len(docs), n, n * 32)
        assert e["corpus_tokens"] == len(stream) and e["dropped_tokens"] == len(stream) - n * 32
        assert len(e["shards"]) == -(-n // 20) and sum(s["blocks"] for s in e["shards"]) == n
        decoded = tok.decode(blocks.ravel().tolist() + stream[n * 32:])
        if kind == "bpe":  # byte-level: exact
            assert decoded == "".join(d + sep_text for d in docs)
        elif split == "train":  # WordPiece decoding normalises spaces around punctuation, and
            # validation has characters unseen in train ([UNK]): compare the words of train
            words = lambda s: re.findall(r"\w+", s)
            assert words(decoded.replace("[CLS]", " ").replace("[SEP]", " ")) == words(" ".join(docs))
    assert manifest["block_size"] == 32
    t = manifest["tokenizer"]
    assert t["vocab_size"] == len(tok) and t["model_max_length"] == 128
    if kind == "bpe":
        assert t["kind"] == "causal" and t["special_ids"] == {"bos": 1, "eos": 1, "pad": 0}
    else:
        assert t["kind"] == "masked" and t["special_ids"]["mask"] == tok.mask_token_id


def test_shards_are_memory_mapped_and_checked(ran, tmp_path):
    kind, root = ran
    ds = load_split(root / "data/shards", "train")
    assert ds.cache_files and all(Path(f["filename"]).parent == root / "data/shards/train"
                                  for f in ds.cache_files)
    copy = tmp_path / "shards"
    shutil.copytree(root / "data/shards", copy)
    shard = copy / "train/shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.arrow: sha256 does not match"):
        load_split(copy, "train")


def test_rerun_is_byte_identical_whatever_the_batching(ran, tmp_path):
    kind, root = ran
    shutil.copytree(root / "data/corpus", tmp_path / "data/corpus")
    shutil.copytree(root / "data/tokenizer", tmp_path / "data/tokenizer")
    run(cfg(batch_chars=1, threads=1), root=tmp_path)
    assert sha_tree(tmp_path / "data/shards") == sha_tree(root / "data/shards")


def test_encode_blocks_streams(ran):
    """Blocks come out before the whole input is read."""
    kind, root = ran
    info = load_tokenizer(root / "data/tokenizer")
    pulled = []

    def docs():
        for i, d in enumerate(make_docs(10_000, seed=5)):
            pulled.append(i)
            yield d["text"]

    stats: dict = {}
    first = next(encode_blocks(docs(), info, cfg(batch_chars=2000), stats))
    assert first.shape[1] == 32 and 0 < len(pulled) < 100


def test_pack_helper():
    blocks = pack([[1, 2, 3], [4, 5]], block_size=3, prefix=[9], suffix=[0])
    assert blocks.tolist() == [[9, 1, 2], [3, 0, 9], [4, 5, 0]]
    assert pack([[1, 2]], block_size=4, suffix=[0]).shape == (0, 4)


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("split", ["train", "validation"])
def test_missing_corpus_file(root, split):
    kind, r = root
    (r / f"data/corpus/{split}.jsonl").unlink()
    with pytest.raises(StageError, match=rf"data/corpus/{split}.jsonl: corpus file not found"):
        run(cfg(), root=r)


@pytest.mark.parametrize("content, match", [
    (b"", "validation.jsonl: empty corpus"),
    (b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "caf\xe9"}\n', r"validation.jsonl: line 2: not valid UTF-8"),
    (b'{"id": "1", "text": "ok"}\n\n{"id": "3", "text": "x"\n', r"validation.jsonl: line 3: malformed JSON"),
    (b'{"id": "1", "title": "no text"}\n', r"validation.jsonl: line 1: expected a JSON object"),
    (b'{"id": "1", "text": "too short"}\n', r"validation.jsonl: corpus too short: \d+ tokens make no block"),
])
def test_bad_corpus_keeps_the_previous_output(root, content, match):
    kind, r = root
    run(cfg(), root=r)
    before = sha_tree(r / "data/shards")
    (r / "data/corpus/validation.jsonl").write_bytes(content)
    with pytest.raises(StageError, match=match):
        run(cfg(), root=r)
    assert sha_tree(r / "data/shards") == before
    assert not [p for p in (r / "data").iterdir() if p.name.startswith(".shards.tmp")]


def test_block_size_larger_than_model_max_length(root):
    kind, r = root
    with pytest.raises(StageError, match=r"tokenizer_config.json: tokenize.block_size=129 is larger "
                                         r"than the tokenizer's model_max_length=128"):
        run(cfg(block_size=129), root=r)


def test_missing_tokenizer(root):
    kind, r = root
    shutil.rmtree(r / "data/tokenizer")
    with pytest.raises(StageError, match=r"data/tokenizer/tokenizer.json: tokenizer file not found"):
        run(cfg(), root=r)


# ---------------------------------------------------------------- params

VALID = cfg().model_dump()


@pytest.mark.parametrize("change, key", [
    ({"blok_size": 64}, "tokenize.blok_size: unknown key"),
    ({"block_size": None}, "tokenize.block_size: missing key"),
    ({"threads": None}, "tokenize.threads: missing key"),
    ({"block_size": "64"}, "tokenize.block_size: got '64'"),
    ({"shard_blocks": 2.5}, "tokenize.shard_blocks"),
    ({"block_size": 1}, "tokenize.block_size: got 1"),
    ({"shard_blocks": 0}, "tokenize.shard_blocks"),
    ({"batch_chars": 0}, "tokenize.batch_chars"),
    ({"threads": -1}, "tokenize.threads"),
])
def test_invalid_params(change, key):
    raw = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_section("tokenize", raw, Config)


def test_main_error_is_one_line(root, monkeypatch, capsys):
    from stages import tokenize as stage

    kind, r = root
    (r / "params.yaml").write_text("tokenize:\n" + "".join(
        f"  {k}: {v}\n" for k, v in cfg(block_size=4096).model_dump().items()))
    monkeypatch.chdir(r)
    from ptf.common.cli import main_guard

    with pytest.raises(SystemExit) as e:
        main_guard(stage.main)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model_max_length" in err[0]
