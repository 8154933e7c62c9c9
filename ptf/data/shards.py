"""Arrow shard I/O for packed token blocks.

In (write): blocks of `block_size` token ids, either one block at a time (`write_shards`) or as
    2-D integer arrays of blocks (`write_block_arrays`, the fast path), and a split dir.
Out (write): `shard-00000.arrow`, ... (Arrow IPC stream files, the format `datasets`
    memory-maps), one column `input_ids` (list<int32>), each shard at most `shard_blocks`
    blocks, in record batches of exactly `BATCH_BLOCKS` blocks (the last one shorter), so the
    bytes depend only on the blocks, `block_size` and `shard_blocks` (not on how the caller
    chunked them); plus the split's manifest entry: block and token counts, each shard's file,
    blocks, bytes and sha256. Writing streams: memory does not grow with the number of blocks.
In (read): a split dir and its manifest entry (or the shards dir and a split name).
Out (read): a memory-mapped `datasets.Dataset` with one column `input_ids`, after checking every
    shard's presence, size and sha256 against the manifest (`ShardError` names the bad file).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ptf.common.cli import StageError, maybe_die

SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])
BATCH_BLOCKS = 1024  # blocks per record batch: bounds memory while writing
_BATCH = BATCH_BLOCKS  # old name
MANIFEST = "manifest.json"


class ShardError(StageError):
    """A shard is missing, corrupt, or does not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _record_batch(arr: np.ndarray) -> pa.RecordBatch:
    n, bs = arr.shape
    values = pa.array(np.ascontiguousarray(arr, dtype=np.int32).reshape(-1))
    offsets = pa.array(np.arange(0, n * bs + 1, bs, dtype=np.int32))
    return pa.record_batch([pa.ListArray.from_arrays(offsets, values)], schema=SCHEMA)


def _rechunk(arrays: Iterable[np.ndarray], block_size: int, size: int) -> Iterator[np.ndarray]:
    """Regroup 2-D block arrays into arrays of exactly `size` blocks (the last may be shorter)."""
    pending: list[np.ndarray] = []
    have = 0
    for arr in arrays:
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[1] != block_size:
            raise ValueError(f"blocks of shape {arr.shape}, expected (n, block_size={block_size})")
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise ValueError("token id out of int32 range")
        if not len(arr):
            continue
        pending.append(arr)
        have += len(arr)
        while have >= size:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield joined[:size]
            rest = joined[size:]
            pending, have = ([rest], len(rest)) if len(rest) else ([], 0)
    if have:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


def write_block_arrays(arrays: Iterable[np.ndarray], out_dir: Path, block_size: int,
                       shard_blocks: int) -> dict[str, Any]:
    """Stream 2-D arrays of blocks (shape `(n, block_size)`) into shards under `out_dir` (which
    must exist); return the manifest entry `{block_size, blocks, tokens, shards: [...]}`."""
    if block_size < 1 or shard_blocks < 1:
        raise ValueError(f"block_size={block_size} and shard_blocks={shard_blocks} must be >= 1")
    out_dir = Path(out_dir)
    shards: list[dict[str, Any]] = []
    writer = sink = None
    in_shard = 0

    def close() -> None:
        nonlocal writer, sink
        writer.close()
        sink.close()
        path = out_dir / shards[-1]["file"]
        shards[-1].update(blocks=in_shard, sha256=sha256_file(path), bytes=path.stat().st_size)
        writer = sink = None

    try:
        for chunk in _rechunk(arrays, block_size, BATCH_BLOCKS):
            while len(chunk):
                if writer is None:
                    name = f"shard-{len(shards):05d}.arrow"
                    shards.append({"file": name})
                    sink = pa.OSFile(str(out_dir / name), "wb")
                    writer = pa.ipc.new_stream(sink, SCHEMA)
                    in_shard = 0
                take = min(len(chunk), shard_blocks - in_shard)
                writer.write_batch(_record_batch(chunk[:take]))
                maybe_die("tokenize-shard")  # fault-injection point (tests/test_faults.py)
                in_shard += take
                chunk = chunk[take:]
                if in_shard >= shard_blocks:
                    close()
        if writer is not None:
            close()
    finally:
        if writer is not None:  # an error mid-shard: release the file handle
            writer.close()
            sink.close()
    n = sum(s["blocks"] for s in shards)
    return {"block_size": block_size, "blocks": n, "tokens": n * block_size, "shards": shards}


def write_shards(blocks: Iterable[Sequence[int]], out_dir: Path, block_size: int,
                 shard_blocks: int) -> dict[str, Any]:
    """Stream `blocks` (one sequence of `block_size` ids each) into shards under `out_dir`
    (which must exist); return the manifest entry. Same bytes as `write_block_arrays`."""

    def grouped() -> Iterator[np.ndarray]:
        buf: list[Sequence[int]] = []
        for block in blocks:
            if len(block) != block_size:
                raise ValueError(f"block of length {len(block)}, expected block_size={block_size}")
            buf.append(block)
            if len(buf) >= BATCH_BLOCKS:
                yield np.asarray(buf, dtype=np.int64)
                buf = []
        if buf:
            yield np.asarray(buf, dtype=np.int64)

    return write_block_arrays(grouped(), out_dir, block_size, shard_blocks)


def verify_shards(split_dir: Path, entry: dict[str, Any]) -> list[Path]:
    """Check every shard of a manifest entry; return their paths in order."""
    paths = []
    for s in entry["shards"]:
        p = Path(split_dir) / s["file"]
        if not p.is_file():
            raise ShardError(f"{p}: shard listed in the manifest is missing")
        if p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
            raise ShardError(f"{p}: sha256 does not match the manifest (expected {s['sha256']}); "
                             "the shard is corrupt or was changed: rerun `dvc repro tokenize`")
        paths.append(p)
    return paths


def load_blocks(split_dir: Path, entry: dict[str, Any], verify: bool = True):
    """Memory-mapped `datasets.Dataset` of the split's blocks (column `input_ids`)."""
    from datasets import Dataset, concatenate_datasets

    split_dir = Path(split_dir)
    paths = verify_shards(split_dir, entry) if verify else [split_dir / s["file"] for s in entry["shards"]]
    if not paths:
        raise ShardError(f"{split_dir}: the manifest lists no shards")
    try:
        parts = [Dataset.from_file(str(p)) for p in paths]
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{split_dir}: cannot read Arrow shard: {e}") from e
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    if len(ds) != entry["blocks"]:
        raise ShardError(f"{split_dir}: {len(ds)} blocks, manifest says {entry['blocks']}")
    return ds


def read_manifest(shards_dir: Path) -> dict[str, Any]:
    """The parsed `manifest.json` of a shards dir (`ShardError` names the file if bad)."""
    p = Path(shards_dir) / MANIFEST
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{p}: manifest not found (run `dvc repro tokenize`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{p}: manifest is not valid JSON: {e}") from None


def load_split(shards_dir: Path, split: str, verify: bool = True):
    """`load_blocks` of `shards_dir/split` with its entry from `shards_dir/manifest.json`."""
    manifest = read_manifest(shards_dir)
    if split not in manifest or not isinstance(manifest[split], dict):
        raise ShardError(f"{Path(shards_dir) / MANIFEST}: no split {split!r}")
    return load_blocks(Path(shards_dir) / split, manifest[split], verify=verify)
