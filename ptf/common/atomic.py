"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

In:  a destination path and the content (bytes, text, JSON) or a block that fills a directory.
Out: the destination replaced in one rename; on any error (or a kill) the previous good output
     stays, and the partial one is a hidden `.<name>.tmp-*` sibling that is never taken for a
     finished output (and is removed by the next attempt, as is a `.<name>.old-*` left by a kill
     in the middle of a directory replace).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(dest: Path, is_dir: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # leftovers of a killed attempt: a partial temporary, or the previous output moved aside by
    # a replace that was killed between its two renames (see `_replace`)
    for pattern in (f".{dest.name}.tmp-*", f".{dest.name}.old-*"):
        for stale in dest.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    prefix = f".{dest.name}.tmp-"
    # mkdtemp/mkstemp create 0700/0600 for privacy; outputs get the usual umask-based modes.
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        tmp.chmod(0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        # A directory cannot be renamed over a non-empty one: move the old one aside first, so
        # the window without `dest` is two renames wide and the old copy is never half-deleted.
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    _fsync_dir(dest.parent)


def write_bytes(dest: Path | str, data: bytes) -> None:
    dest = Path(dest)
    tmp = _tmp_sibling(dest, is_dir=False)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(dest: Path | str, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: Path | str, obj: Any) -> None:
    """Pretty, key-sorted JSON so that the same content always gives the same bytes (and hash)."""
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory; on normal exit it replaces `dest` whole."""
    dest = Path(dest)
    tmp = _tmp_sibling(dest, is_dir=True)
    try:
        yield tmp
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary file path to fill; on normal exit it replaces `dest`."""
    dest = Path(dest)
    tmp = _tmp_sibling(dest, is_dir=False)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
