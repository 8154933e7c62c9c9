"""File trees (no CLI): a local directory pinned by a tree hash, and the files of an archive.

In:  a `DirSource` (`kind: dir`, a local directory and the sha256 of its tree), or an archive
     (zip/wheel, tar, tar.gz/bz2/xz) and a member prefix; `max_bytes` bounds every file and the
     whole tree.
Out: `tree_sha256(dir)`: sha256 of the listing `<sha256 of file>  <relative path>\\n`, one line
     per regular file in sorted path order (what `sha256sum` prints; compute the pin with
     `python -c "from ptf.data.trees import tree_sha256; print(tree_sha256('DIR'))"`);
     `fetch_dir`: the directory verified and copied to `<raw>/<sha256>/<name>/` (a cached copy
     with the right tree hash is reused); `archive_files`: the regular files of an archive under
     a prefix, in name order, as streams. Symlinks, hardlinks, special files and names with an
     absolute path or `..` are refused (`StageError` naming the source and the entry), never
     followed or written.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from pydantic import Field

from ptf.common.cli import StageError
from ptf.common.config import StrictModel
from ptf.data.fetch import SHA256, check_member_path, sha256_file


class DirSource(StrictModel):
    """A local directory (relative to the repo root, or absolute), pinned by `tree_sha256`."""

    kind: Literal["dir"]
    path: Annotated[str, Field(min_length=1)]
    sha256: SHA256

    def describe(self) -> str:
        return f"dir {self.path}"


def _walk(d: Path, what: str, max_bytes: int) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file below `d`, sorted; links refused."""
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(d).as_posix()
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise StageError(f"{what}: {rel} is a symlink; refusing to follow it")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise StageError(f"{what}: {rel} is not a regular file")
            total += p.stat().st_size
            if total > max_bytes:
                raise StageError(f"{what}: the tree is larger than max_bytes={max_bytes}")
            out.append((rel, p))
    return sorted(out)


def tree_sha256(d: Path | str, max_bytes: int = 1 << 62, what: str = "") -> str:
    """sha256 of `<sha256>  <relpath>\\n` over the regular files of `d` in path order."""
    h = hashlib.sha256()
    for rel, p in _walk(Path(d), what or str(d), max_bytes):
        h.update(f"{sha256_file(p)}  {rel}\n".encode())
    return h.hexdigest()


def fetch_dir(src: DirSource, new_raw: Path, *, cache: list[Path], root: Path,
              max_bytes: int) -> tuple[Path, bool]:
    """Verify `src` and copy it to `new_raw/<sha256>/<name>/`; (path, False) if from `cache`."""
    what = src.describe()
    d = Path(src.path) if os.path.isabs(src.path) else Path(root) / src.path
    dest = new_raw / src.sha256 / (d.name or "tree")
    for raw in cache:
        old = raw / src.sha256 / dest.name
        if old.is_dir() and tree_sha256(old, max_bytes, what) == src.sha256:
            if old.resolve() != dest.resolve():
                shutil.copytree(old, dest, dirs_exist_ok=True)
            return dest, False
    if not d.is_dir():
        raise StageError(f"{what}: no such directory: {d}")
    got = tree_sha256(d, max_bytes, what)
    if got != src.sha256:
        raise StageError(f"{what}: sha256 mismatch for the tree of {d}: expected {src.sha256}, "
                         f"got {got} (see ptf/data/trees.py for how the tree hash is computed)")
    for rel, p in _walk(d, what, max_bytes):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest / rel)
    return dest, True


def dir_files(d: Path, pattern: str, max_bytes: int, what: str) -> Iterator[tuple[str, BinaryIO]]:
    """(relative path, open stream) of the regular files of `d` whose path matches `pattern`."""
    for rel, p in _walk(d, what, max_bytes):
        if fnmatch.fnmatchcase(rel, pattern):
            with open(p, "rb") as f:
                yield rel, f


# ----------------------------------------------------------------------------- archives
def _safe_name(name: str, what: str) -> str:
    clean = name[2:] if name.startswith("./") else name
    try:
        return check_member_path(clean.rstrip("/") if clean.endswith("/") else clean)
    except ValueError as e:
        raise StageError(f"{what}: unsafe archive member {name!r}: {e}; refusing to extract") from None


def _zip_entries(zf: zipfile.ZipFile, prefix: str, what: str):
    for info in zf.infolist():
        if info.is_dir() or not info.filename.replace("./", "", 1).startswith(prefix):
            continue
        name = _safe_name(info.filename, what)
        ftype = stat.S_IFMT(info.external_attr >> 16)
        if ftype not in (0, stat.S_IFREG):
            kind = "a symlink" if ftype == stat.S_IFLNK else "not a regular file"
            raise StageError(f"{what}: archive member {info.filename!r} is {kind}; refusing to extract")
        yield name, info.file_size, lambda info=info: zf.open(info)


def _tar_entries(tf: tarfile.TarFile, prefix: str, what: str):
    for ti in tf.getmembers():
        if ti.isdir() or not ti.name.replace("./", "", 1).startswith(prefix):
            continue
        name = _safe_name(ti.name, what)
        link = "a symlink" if ti.issym() else "a hardlink" if ti.islnk() else None
        kind = f"{link} (to {ti.linkname!r})" if link else None if ti.isreg() else "not a regular file"
        if kind is not None:
            raise StageError(f"{what}: archive member {ti.name!r} is {kind}; refusing to extract")
        yield name, ti.size, lambda ti=ti: tf.extractfile(ti)


def archive_files(archive: Path, prefix: str, max_bytes: int,
                  what: str) -> Iterator[tuple[str, BinaryIO]]:
    """(name relative to `prefix`, stream) of every regular file under `prefix` ('' = all) of a
    zip or tar archive, in name order; each file and their total bounded by `max_bytes`."""
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(archive):
                zf = stack.enter_context(zipfile.ZipFile(archive))
                entries = list(_zip_entries(zf, prefix, what))
            else:
                tf = stack.enter_context(tarfile.open(archive, mode="r:*"))
                entries = list(_tar_entries(tf, prefix, what))
            names = [n for n, _, _ in entries]
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})[0]
                raise StageError(f"{what}: member {dup!r} appears more than once in the archive; "
                                 "refusing an ambiguous archive")
            total = 0
            for name, size, opener in sorted(entries, key=lambda e: e[0]):
                total += size
                if size > max_bytes or total > max_bytes:
                    raise StageError(f"{what}: member {name!r} takes the files past max_bytes={max_bytes}")
                with opener() as f:
                    yield name[len(prefix):], f
    except StageError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise StageError(f"{what}: {archive.name} is truncated or corrupt ({type(e).__name__}: {e})") from None
