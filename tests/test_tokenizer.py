"""Stage `tokenizer`: trains on train.jsonl only, saves a loadable, deterministic HF tokenizer,
and rejects bad inputs and bad params with one clear message."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.data.corpus import iter_texts
from stages.tokenizer import ROLES, Config, run

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and in a to was is for on as by with he that at from his it an were are "
         "which this also be or had first one their its new after who they two her she been "
         "city river north population school football album released café Zürich").split()

SPECIAL = {
    "bpe": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
}


def make_docs(n: int, seed: int, extra: str = "") -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 18))]
            sents.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", " (1990)."]))
        docs.append({"id": f"{seed}-{i}", "title": f"Doc {i}", "text": " ".join(sents) + extra})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def write_corpus(root: Path, n_train: int = 120, n_val: int = 20) -> Path:
    write_jsonl(root / "data/corpus/train.jsonl", make_docs(n_train, seed=1))
    # A word that appears only in validation: the tokenizer must never learn it.
    write_jsonl(root / "data/corpus/validation.jsonl",
                make_docs(n_val, seed=2, extra=" quokkaquokka quokkaquokka quokkaquokka"))
    return root


def tok_config(kind: str = "bpe", **over) -> Config:
    raw = dict(kind=kind, vocab_size=400, min_frequency=2, lowercase=False,
               model_max_length=128, special_tokens=SPECIAL[kind], batch_docs=16)
    raw.update(over)
    return Config(**raw)


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module", params=["bpe", "wordpiece"])
def trained(request, tmp_path_factory):
    root = write_corpus(tmp_path_factory.mktemp(f"tok-{request.param}"))
    run(tok_config(request.param), root=root)
    return request.param, root


def test_autotokenizer_loads_with_special_tokens(trained):
    from transformers import AutoTokenizer

    kind, root = trained
    tok = AutoTokenizer.from_pretrained(root / "data/tokenizer")
    assert tok.model_max_length == 128
    st = SPECIAL[kind]
    for role in ROLES[kind]:
        assert getattr(tok, f"{role}_token") == st[role]
    specials = list(dict.fromkeys(st[r] for r in ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
                                  if r in st))
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(len(specials)))
    text = "The city river was released in Zürich."
    ids = tok(text)["input_ids"]
    if kind == "bpe":
        assert tok.decode(ids) == text  # byte-level: lossless, no special tokens added
        assert tok.pad_token_id != tok.eos_token_id
    else:
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.decode(ids, skip_special_tokens=True) == "The city river was released in Zürich."
        assert tok.mask_token_id is not None and tok.unk_token_id == 1


def test_trains_on_train_only(trained):
    kind, root = trained
    vocab = json.loads((root / "data/tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    assert not [t for t in vocab if "quokka" in t or "okk" in t]


def test_wordpiece_alphabet_covers_every_character(trained):
    kind, root = trained
    if kind != "wordpiece":
        pytest.skip("byte-level BPE covers every byte")
    vocab = json.loads((root / "data/tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    chars = set("".join(iter_texts(root / "data/corpus/train.jsonl"))) - {" "}
    assert chars <= set(vocab) and {"##a", "##e", "##ü"} <= set(vocab)
    assert all(t.count("##") <= 1 and "\U000F0000" > max(t) for t in vocab)


def test_deterministic_bytes(trained, tmp_path):
    kind, root = trained
    other = write_corpus(tmp_path)
    run(tok_config(kind), root=other)
    assert digests(other / "data/tokenizer") == digests(root / "data/tokenizer")


def test_lowercase_option(tmp_path):
    from transformers import AutoTokenizer

    run(tok_config("bpe", lowercase=True), root=write_corpus(tmp_path))
    tok = AutoTokenizer.from_pretrained(tmp_path / "data/tokenizer")
    assert tok.decode(tok("The CITY")["input_ids"]) == "the city"


# ---------------------------------------------------------------- bad inputs

def _bad_corpus(root: Path, content: bytes) -> Path:
    p = root / "data/corpus/train.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content)
    return p


GOOD = json.dumps({"id": "1", "title": "t", "text": "good text here"}).encode() + b"\n"


@pytest.mark.parametrize("content, match", [
    (b"", "empty corpus"),
    (b"\n  \n" + json.dumps({"id": "1", "title": "t", "text": ""}).encode() + b"\n", "empty corpus"),
    (GOOD + GOOD + b'{"id": "3", "text": "caf\xe9"}\n', r"train.jsonl: line 3: not valid UTF-8"),
    (GOOD + b'{"id": "2", "text": \n', r"train.jsonl: line 2: malformed JSON"),
    (GOOD + b'["a list"]\n', r"train.jsonl: line 2: a JSON list, not an object"),
    (GOOD + b'{"id": "2", "text": 5}\n', r"train.jsonl: line 2: expected a JSON object with a string"),
])
def test_bad_corpus_is_a_stage_error(tmp_path, content, match):
    _bad_corpus(tmp_path, content)
    with pytest.raises(StageError, match=match):
        run(tok_config(), root=tmp_path)
    assert not (tmp_path / "data/tokenizer").exists()


def test_missing_corpus(tmp_path):
    with pytest.raises(StageError, match=r"data/corpus/train.jsonl: corpus file not found"):
        run(tok_config(), root=tmp_path)


def test_iter_texts_streams(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", make_docs(5, seed=3))
    seen = []
    assert len(list(iter_texts(p, on_bytes=seen.append))) == 5
    assert sum(seen) == p.stat().st_size


def test_main_prints_one_line_and_exits_1(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "tokenizer:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in tok_config().model_dump().items()))
    _bad_corpus(tmp_path, GOOD + b"{oops\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "stages.tokenizer"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "data/corpus/train.jsonl: line 2: malformed JSON" in lines[0]


# ---------------------------------------------------------------- params

VALID = tok_config().model_dump()


@pytest.mark.parametrize("change, key", [
    ({"vocab_sise": 100}, "tokenizer.vocab_sise: unknown key"),
    ({"vocab_size": None}, "tokenizer.vocab_size: got None; expected: Value error, missing key; kind 'bpe' needs it"),
    ({"kind": "foundation"}, "tokenizer.vocab_size: got 400; expected: Value error, not used by kind 'foundation'"),
    ({"max_docs": 0}, "tokenizer.max_docs"),
    ({"kind": "unigram"}, "tokenizer.kind"),
    ({"vocab_size": "8192"}, "tokenizer.vocab_size"),
    ({"lowercase": "no"}, "tokenizer.lowercase"),
    ({"vocab_size": 10}, "tokenizer.vocab_size"),
    ({"vocab_size": 258}, "leaves no room for merges"),
    ({"min_frequency": 0}, "tokenizer.min_frequency"),
    ({"model_max_length": 0}, "tokenizer.model_max_length"),
    ({"batch_docs": 0}, "tokenizer.batch_docs"),
    ({"special_tokens": {"bos": "<s>", "eos": "</s>"}}, "missing ['pad']"),
    ({"special_tokens": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "mask": "<m>"}}, "unexpected ['mask']"),
    ({"special_tokens": {"bos": "<s>", "eos": "</s>", "pad": "</s>"}}, "pad must differ"),
    ({"special_tokens": {"bos": "<s>", "eos": " </s>", "pad": "<pad>"}}, "special_tokens.eos"),
    ({"kind": "wordpiece"}, "missing ['cls', 'mask', 'sep', 'unk']"),
    ({"special_tokens": ["<s>"]}, "tokenizer.special_tokens"),
])
def test_invalid_params(change, key):
    raw = {**VALID, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_section("tokenizer", raw, Config)


def test_max_docs_trains_on_an_evenly_spaced_sample(tmp_path):
    from stages.tokenizer import evenly_spaced

    docs = make_docs(120, seed=1)
    sample = set(evenly_spaced(120, 12))
    for i, d in enumerate(docs):
        if i not in sample:  # a word only the documents left out of the sample hold
            d["text"] += " zyxwzyxw zyxwzyxw zyxwzyxw"
    for name, over in (("all", {}), ("sample", {"max_docs": 12})):
        root = tmp_path / name
        write_jsonl(root / "data/corpus/train.jsonl", docs)
        run(tok_config("bpe", **over), root=root)
    learned = {n: json.loads((tmp_path / n / "data/tokenizer/tokenizer.json").read_text())["model"]["vocab"]
               for n in ("all", "sample")}
    assert "Ġzyxwzyxw" in learned["all"] and not any("zyx" in t for t in learned["sample"])
