"""Arrow shard I/O for packed token blocks.

In (write): an iterator of blocks (each a sequence of `block_size` token ids) and a split dir.
Out (write): `shard-00000.arrow`, ... (Arrow IPC stream files, the format `datasets` memory-maps),
    each at most `shard_blocks` blocks, plus the split's manifest entry: block and token counts
    and each shard's sha256. Writing streams: memory does not grow with the number of blocks.
In (read): a split dir and its manifest entry.
Out (read): a memory-mapped `datasets.Dataset` with one column `input_ids`, after checking every
    shard's presence, size and sha256 against the manifest (`ShardError` names the bad file).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.cli import StageError

SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])
_BATCH = 1024  # blocks per record batch: bounds memory while writing


class ShardError(StageError):
    """A shard is missing, corrupt, or does not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_shards(blocks: Iterable[Sequence[int]], out_dir: Path, block_size: int,
                 shard_blocks: int) -> dict[str, Any]:
    """Stream `blocks` into shards under `out_dir` (which must exist); return the manifest entry."""
    shards: list[dict[str, Any]] = []
    writer = None
    buf: list[Sequence[int]] = []
    in_shard = 0

    def flush() -> None:
        if buf:
            writer.write_batch(pa.record_batch([pa.array(buf, type=pa.list_(pa.int32()))], schema=SCHEMA))
            buf.clear()

    def close() -> None:
        nonlocal writer
        flush()
        writer.close()
        sink.close()
        path = out_dir / shards[-1]["file"]
        shards[-1].update(blocks=in_shard, sha256=sha256_file(path), bytes=path.stat().st_size)
        writer = None

    for block in blocks:
        if len(block) != block_size:
            raise ValueError(f"block of length {len(block)}, expected block_size={block_size}")
        if writer is None:
            name = f"shard-{len(shards):05d}.arrow"
            shards.append({"file": name})
            sink = pa.OSFile(str(out_dir / name), "wb")
            writer = pa.ipc.new_stream(sink, SCHEMA)
            in_shard = 0
        buf.append(block)
        in_shard += 1
        if len(buf) >= _BATCH:
            flush()
        if in_shard >= shard_blocks:
            close()
    if writer is not None:
        close()
    n = sum(s["blocks"] for s in shards)
    return {"block_size": block_size, "blocks": n, "tokens": n * block_size, "shards": shards}


def verify_shards(split_dir: Path, entry: dict[str, Any]) -> list[Path]:
    """Check every shard of a manifest entry; return their paths in order."""
    paths = []
    for s in entry["shards"]:
        p = split_dir / s["file"]
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
