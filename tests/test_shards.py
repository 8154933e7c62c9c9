"""Arrow shard I/O: streaming writes with a manifest, memory-mapped reads, checks that catch a
missing, corrupt or changed shard."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ptf.data import shards
from ptf.data.shards import (ShardError, load_blocks, load_split, read_manifest, write_block_arrays,
                           write_shards)


def blocks(n: int, bs: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, size=(n, bs), dtype=np.int64)


def write(tmp: Path, arr: np.ndarray, shard_blocks: int, chunk: int) -> dict:
    out = tmp / "split"
    out.mkdir(parents=True)
    parts = (arr[i:i + chunk] for i in range(0, len(arr), chunk))
    return write_block_arrays(parts, out, arr.shape[1], shard_blocks)


def test_roundtrip_counts_and_memory_map(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_BLOCKS", 16)  # several record batches per shard
    arr = blocks(100, 8)
    entry = write(tmp_path, arr, shard_blocks=40, chunk=13)
    assert [s["blocks"] for s in entry["shards"]] == [40, 40, 20]
    assert (entry["blocks"], entry["tokens"], entry["block_size"]) == (100, 800, 8)
    ds = load_blocks(tmp_path / "split", entry)
    assert np.array_equal(np.array(ds["input_ids"]), arr)
    assert len(ds.cache_files) == 3  # memory-mapped from the shard files, not copied


def test_bytes_do_not_depend_on_chunking(tmp_path):
    arr = blocks(3000, 4)
    a = write(tmp_path / "a", arr, shard_blocks=2500, chunk=7)
    b = write(tmp_path / "b", arr, shard_blocks=2500, chunk=3000)
    out = tmp_path / "c"
    out.mkdir()
    c = write_shards((row.tolist() for row in arr), out, 4, 2500)
    assert a == b == c


def test_empty_input_gives_no_shards(tmp_path):
    entry = write_shards([], tmp_path, 4, 10)
    assert entry == {"block_size": 4, "blocks": 0, "tokens": 0, "shards": []}
    with pytest.raises(ShardError, match="lists no shards"):
        load_blocks(tmp_path, entry)


def test_bad_block_shapes(tmp_path):
    with pytest.raises(ValueError, match="block of length 3, expected block_size=4"):
        write_shards([[1, 2, 3, 4], [1, 2, 3]], tmp_path, 4, 10)
    with pytest.raises(ValueError, match="expected \\(n, block_size=4\\)"):
        write_block_arrays([np.zeros((2, 5), dtype=np.int32)], tmp_path, 4, 10)
    with pytest.raises(ValueError, match="int32"):
        write_block_arrays([np.full((1, 4), 2**40)], tmp_path, 4, 10)


@pytest.fixture
def written(tmp_path):
    entry = write(tmp_path, blocks(50, 8), shard_blocks=20, chunk=50)
    (tmp_path / "manifest.json").write_text(json.dumps({"split": entry}))
    return tmp_path, entry


def test_corrupt_shard(written):
    root, entry = written
    p = root / "split/shard-00001.arrow"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1  # same size, one bit flipped
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001.arrow: sha256 does not match"):
        load_split(root, "split")


def test_changed_checksum_in_manifest(written):
    root, entry = written
    entry["shards"][0]["sha256"] = "0" * 64
    with pytest.raises(ShardError, match=r"shard-00000.arrow: sha256 does not match"):
        load_blocks(root / "split", entry)


def test_missing_or_truncated_shard(written):
    root, entry = written
    p = root / "split/shard-00002.arrow"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ShardError, match="shard-00002.arrow: sha256 does not match"):
        load_blocks(root / "split", entry)
    p.unlink()
    with pytest.raises(ShardError, match="shard-00002.arrow: shard listed in the manifest is missing"):
        load_blocks(root / "split", entry)


def test_unverified_read_of_garbage_is_a_shard_error(written):
    root, entry = written
    (root / "split/shard-00000.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ShardError, match="cannot read Arrow shard"):
        load_blocks(root / "split", entry, verify=False)


def test_manifest_errors(tmp_path, written):
    with pytest.raises(ShardError, match="manifest.json: manifest not found"):
        read_manifest(tmp_path / "nowhere")
    root, _ = written
    with pytest.raises(ShardError, match="no split 'test'"):
        load_split(root, "test")
    (root / "manifest.json").write_text("{")
    with pytest.raises(ShardError, match="manifest.json: manifest is not valid JSON"):
        read_manifest(root)
