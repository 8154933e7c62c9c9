"""Stage `tokenize`: the corpus as packed fixed-length blocks of token ids, in Arrow shards.

In:  data/corpus/{train,validation}.jsonl (one document per line, `{"id", "title", "text"}`),
     data/tokenizer/ (stage `tokenizer`), the `tokenize` section of params.yaml.
Out: data/shards/{train,validation}/shard-*.arrow (column `input_ids`, `block_size` int32 ids
     per row, written by `ptf.data.shards`) and data/shards/manifest.json:
       {"block_size", "tokenizer": {kind, vocab_size, model_max_length, special_ids,
        separator, sha256}, "train": entry, "validation": entry}
     where an entry holds documents, corpus_tokens (with separators), blocks, tokens (in
     blocks), dropped_tokens and the shards (file, blocks, bytes, sha256).
     Read it with `ptf.data.shards.load_split(Path("data/shards"), "train")`.
Packing: each document is tokenized without special tokens and framed with separators, then
     all documents are concatenated in corpus order and cut into blocks of `block_size`; the
     incomplete last block is dropped. The separators follow the tokenizer's kind:
       - causal (the tokenizer has an `eos_token`, e.g. byte-level BPE): `doc <eos>`;
       - masked (the tokenizer has `cls_token` and `sep_token`, e.g. WordPiece):
         `[CLS] doc [SEP]`, the same ids as the tokenizer's own BERT post-processor gives.
     Blocks span document boundaries (GPT-2 / RoBERTa "full sentences" packing).
Streaming: documents are read in batches of about `batch_chars` characters (a batch closes
     once it reaches that size; a longer document is a batch of its own) and encoded with the
     Rust tokenizer's batch encoder (`encode_batch_fast`, parallel over the documents of a batch
     on `threads` threads), so memory is bounded by the batch size, whatever the corpus size. Output is written atomically (the whole
     data/shards dir). Same inputs and params give byte-identical shards and manifest.
Run: python -m stages.tokenize
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field

from ptf.common import paths
from ptf.common.atomic import atomic_dir, write_json
from ptf.common.cli import StageError, main_guard
from ptf.common.config import StrictModel, load_section
from ptf.data.shards import MANIFEST, sha256_file, write_block_arrays
from ptf.data.corpus import iter_texts

SPLITS = ("train", "validation")


class Config(StrictModel):
    block_size: int = Field(ge=2, le=1_048_576)
    shard_blocks: int = Field(ge=1)  # blocks per Arrow shard (few, large shards)
    batch_chars: int = Field(ge=1, le=1_000_000_000)  # characters per encoding batch (bounds memory)
    threads: int = Field(ge=0, le=1024)  # tokenizer threads; 0 = all cores, 1 = no parallelism


@dataclass
class TokenizerInfo:
    """What packing needs to know about a saved tokenizer (read without `transformers`)."""

    tokenizer: object  # tokenizers.Tokenizer
    kind: str  # "causal" (doc <eos>) or "masked" ([CLS] doc [SEP])
    model_max_length: int
    vocab_size: int
    special_ids: dict[str, int]
    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    sha256: str = ""

    def summary(self) -> dict:
        sep = "doc <eos>" if self.kind == "causal" else "[CLS] doc [SEP]"
        return {"kind": self.kind, "vocab_size": self.vocab_size,
                "model_max_length": self.model_max_length, "special_ids": self.special_ids,
                "separator": sep, "sha256": self.sha256}


def load_tokenizer(tok_dir: Path) -> TokenizerInfo:
    """Read `tokenizer.json` + `tokenizer_config.json` of a `PreTrainedTokenizerFast` dir."""
    from tokenizers import Tokenizer

    tok_dir = Path(tok_dir)
    tj, cj = tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"
    for p in (tj, cj):
        if not p.is_file():
            raise StageError(f"{p}: tokenizer file not found (run the `tokenizer` stage first)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # the Rust error type is not exported
        raise StageError(f"{tj}: cannot load tokenizer: {e}") from None
    try:
        conf = json.loads(cj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{cj}: not valid JSON: {e}") from None
    mml = conf.get("model_max_length")
    if not isinstance(mml, int) or mml < 1:
        raise StageError(f"{cj}: model_max_length must be a positive integer, got {mml!r}")
    ids: dict[str, int] = {}
    for role in ("pad", "unk", "bos", "eos", "cls", "sep", "mask"):
        t = conf.get(f"{role}_token")
        if isinstance(t, dict):  # AddedToken serialised
            t = t.get("content")
        if t is None:
            continue
        i = tok.token_to_id(t)
        if i is None:
            raise StageError(f"{cj}: {role}_token {t!r} is not in the vocabulary of {tj}")
        ids[role] = i
    tok.no_truncation()
    tok.no_padding()
    info = TokenizerInfo(tokenizer=tok, kind="", model_max_length=mml,
                         vocab_size=tok.get_vocab_size(with_added_tokens=True),
                         special_ids=ids, sha256=sha256_file(tj))
    if "eos" in ids:
        info.kind, info.suffix = "causal", [ids["eos"]]
    elif "cls" in ids and "sep" in ids:
        info.kind, info.prefix, info.suffix = "masked", [ids["cls"]], [ids["sep"]]
    else:
        raise StageError(f"{cj}: the tokenizer has neither an eos_token nor cls/sep tokens "
                         "to separate documents")
    return info


# ---------------------------------------------------------------- pure helpers

def frame(id_lists: Iterable[list[int]], prefix: list[int], suffix: list[int]) -> np.ndarray:
    """One flat int32 array: `prefix + ids + suffix` for each document, concatenated."""
    flat: list[int] = []
    for ids in id_lists:
        flat.extend(prefix)
        flat.extend(ids)
        flat.extend(suffix)
    return np.array(flat, dtype=np.int32)


@dataclass
class Packer:
    """Cut a stream of flat token arrays into `(n, block_size)` arrays, carrying the rest."""

    block_size: int
    carry: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    total: int = 0  # tokens fed in

    def feed(self, flat: np.ndarray) -> np.ndarray:
        self.total += len(flat)
        buf = np.concatenate([self.carry, flat]) if len(self.carry) else flat
        n = len(buf) // self.block_size
        cut = n * self.block_size
        self.carry = buf[cut:].copy()
        return buf[:cut].reshape(n, self.block_size)


def pack(id_lists: Iterable[list[int]], block_size: int, prefix: list[int] = (),
         suffix: list[int] = ()) -> np.ndarray:
    """All blocks of documents given as id lists (in memory; for tests and small inputs)."""
    return Packer(block_size).feed(frame(id_lists, list(prefix), list(suffix)))


# ---------------------------------------------------------------- streaming pipeline

@contextlib.contextmanager
def parallelism(threads: int) -> Iterator[None]:
    """Let the Rust tokenizer run batches on `threads` threads (0: all cores, 1: serial).

    `TOKENIZERS_PARALLELISM` is set for the block and restored after (the stage does not fork).
    `RAYON_NUM_THREADS` only takes effect if no parallel call happened yet in this process.
    """
    new = {"TOKENIZERS_PARALLELISM": "false" if threads == 1 else "true"}
    if threads > 1 and "RAYON_NUM_THREADS" not in os.environ:
        new["RAYON_NUM_THREADS"] = str(threads)
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def encode_blocks(texts: Iterable[str], info: TokenizerInfo, cfg: Config,
                  stats: dict) -> Iterator[np.ndarray]:
    """Stream documents into `(n, block_size)` int32 arrays; fill `stats` (documents,
    corpus_tokens, dropped_tokens) when exhausted."""
    tok = info.tokenizer
    packer = Packer(cfg.block_size)
    docs = 0
    batch: list[str] = []

    def encode(batch: list[str]) -> np.ndarray:
        encs = tok.encode_batch_fast(batch, add_special_tokens=False)
        return packer.feed(frame((e.ids for e in encs), info.prefix, info.suffix))

    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= cfg.batch_chars:
            docs += len(batch)
            yield encode(batch)
            batch, chars = [], 0
    if batch:
        docs += len(batch)
        yield encode(batch)
    stats.update(documents=docs, corpus_tokens=packer.total, dropped_tokens=len(packer.carry))


def tokenize_split(src: Path, out_dir: Path, info: TokenizerInfo, cfg: Config,
                   desc: str = "") -> dict:
    """Tokenize one jsonl file into shards under `out_dir`; return its manifest entry."""
    from tqdm import tqdm

    src = Path(src)
    if not src.is_file():
        raise StageError(f"{src}: corpus file not found (run the `download` stage first)")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    with tqdm(total=src.stat().st_size, unit="B", unit_scale=True,
              desc=desc or f"tokenize {src.name}") as bar:
        texts = iter_texts(src, on_bytes=bar.update)
        with parallelism(cfg.threads):
            entry = write_block_arrays(encode_blocks(texts, info, cfg, stats), out_dir,
                                       cfg.block_size, cfg.shard_blocks)
    if entry["blocks"] == 0:
        raise StageError(f"{src}: corpus too short: {stats['corpus_tokens']} tokens make no "
                         f"block of block_size={cfg.block_size}")
    return {**entry, **stats}


def check_block_size(cfg: Config, info: TokenizerInfo, tok_dir: Path) -> None:
    if cfg.block_size > info.model_max_length:
        raise StageError(
            f"{Path(tok_dir) / 'tokenizer_config.json'}: tokenize.block_size={cfg.block_size} "
            f"is larger than the tokenizer's model_max_length={info.model_max_length}")


def run(cfg: Config, root: Path = Path(".")) -> None:
    root = Path(root)
    tok_dir = root / paths.TOKENIZER
    info = load_tokenizer(tok_dir)
    check_block_size(cfg, info, tok_dir)
    srcs = {s: root / paths.CORPUS / f"{s}.jsonl" for s in SPLITS}
    for p in srcs.values():  # fail before any work if an input is absent
        if not p.is_file():
            raise StageError(f"{p}: corpus file not found (run the `download` stage first)")
    manifest: dict = {"block_size": cfg.block_size, "tokenizer": info.summary()}
    with atomic_dir(root / paths.SHARDS) as tmp:
        for split, src in srcs.items():
            manifest[split] = tokenize_split(src, tmp / split, info, cfg,
                                             desc=f"tokenize {split}")
        write_json(tmp / MANIFEST, manifest)
    for split in SPLITS:
        e = manifest[split]
        print(f"tokenize: {split}: {e['documents']} documents, {e['corpus_tokens']} tokens -> "
              f"{e['blocks']} blocks of {cfg.block_size} in {len(e['shards'])} shard(s)")


def main() -> None:
    run(load_section("tokenize", Config))


if __name__ == "__main__":
    main_guard(main)
