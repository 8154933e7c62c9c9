"""ptf/data/fetch.py: pinned sources, nested members, safe and bounded extraction, and the
retries of `url` and `pypi` fetches against real local servers on 127.0.0.1 that fail on purpose
(an HTTP file server; a PEP 503 package index that real `pip download` runs go through)."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from ptf.data import fetch
from ptf.common.cli import StageError
from tests.download_fixtures import make_tar, sha

PAYLOAD = b"inner payload\n" * 10


def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_nested_members_cached_by_sha(tmp_path):
    inner = make_tar(tmp_path / "inner.tar.gz", {"pkg/data.txt": PAYLOAD})
    outer = _zip(tmp_path / "outer.whl", {"pkg/inner.tar.gz": inner.read_bytes(), "other": b"x"})
    src = fetch.FileSource(kind="file", path="outer.*", members=["pkg/inner.tar.gz", "pkg/data.txt"],
                           sha256=sha(PAYLOAD))
    raw = tmp_path / "raw"
    out, fetched = fetch.fetch(src, raw, cache=[], root=tmp_path, max_bytes=10_000)
    assert fetched and out == raw / sha(PAYLOAD) / "data.txt" and out.read_bytes() == PAYLOAD
    outer.unlink()  # the cache answers without the source
    out2, fetched2 = fetch.fetch(src, tmp_path / "raw2", cache=[raw], root=tmp_path, max_bytes=10_000)
    assert not fetched2 and out2.read_bytes() == PAYLOAD


def test_glob_must_match_one_file(tmp_path):
    (tmp_path / "a1.txt").write_bytes(b"1")
    (tmp_path / "a2.txt").write_bytes(b"2")
    src = fetch.FileSource(kind="file", path="a*.txt", sha256=sha(b"1"))
    with pytest.raises(StageError, match="must match exactly one file"):
        fetch.fetch(src, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10)


def test_zip_symlink_and_size_bound(tmp_path):
    z = _zip(tmp_path / "a.zip", {"big.txt": PAYLOAD}, symlink="link.txt")
    with pytest.raises(StageError, match="'link.txt' is a symlink"):
        fetch.read_member(z, "link.txt", 10_000, "a.zip")
    with pytest.raises(StageError, match="more than max_bytes=10"):
        fetch.read_member(z, "big.txt", 10, "a.zip")
    assert fetch.read_member(z, "big.txt", 10_000, "a.zip") == PAYLOAD


def test_corrupt_zip(tmp_path):
    z = _zip(tmp_path / "a.zip", {"big.txt": PAYLOAD * 50})
    data = bytearray(z.read_bytes())
    data[60:80] = b"\0" * 20  # inside the compressed data
    z.write_bytes(bytes(data))
    with pytest.raises(StageError, match="a.zip is truncated or corrupt"):
        fetch.read_member(z, "big.txt", 1_000_000, "src")


@pytest.fixture
def server(tmp_path):
    """A local http server whose first `fail` requests get 503."""
    state = {"fail": 0, "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["hits"] += 1
            if state["hits"] <= state["fail"]:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.txt", state
    httpd.shutdown()


def test_backoff_doubles_and_is_bounded():
    assert fetch.backoff_delays(4, 2.0) == [2.0, 4.0, 8.0]
    assert fetch.backoff_delays(1, 2.0) == []
    for model in (fetch.UrlSource, fetch.PypiSource):  # the same bounds for both kinds
        assert model.model_fields["retries"].default == 4
        assert model.model_fields["backoff_s"].default == 2.0
    with pytest.raises(ValueError):
        fetch.PypiSource(kind="pypi", name="x", version="1", dist="wheel", sha256="0" * 64, retries=21)
    with pytest.raises(ValueError):
        fetch.PypiSource(kind="pypi", name="x", version="1", dist="wheel", sha256="0" * 64, backoff_s=601)


def test_url_retries_then_succeeds(server, tmp_path):
    url, state = server
    state["fail"] = 2
    slept: list[float] = []
    src = fetch.UrlSource(kind="url", url=url, sha256=sha(PAYLOAD), retries=3, backoff_s=0.5)
    out, _ = fetch.fetch(src, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10_000,
                         sleep=slept.append)
    assert out.name == "file.txt" and out.read_bytes() == PAYLOAD and state["hits"] == 3
    assert slept == [0.5, 1.0]


def test_url_fails_after_last_try(server, tmp_path):
    url, state = server
    state["fail"] = 99
    src = fetch.UrlSource(kind="url", url=url, sha256=sha(PAYLOAD), retries=2, backoff_s=0.0)
    with pytest.raises(StageError, match=r"download failed after 2 tries; last error: HTTP Error 503"):
        fetch.fetch(src, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10_000)
    assert state["hits"] == 2


def test_url_sha_mismatch_and_size_bound(server, tmp_path):
    url, state = server
    bad = fetch.UrlSource(kind="url", url=url, sha256="0" * 64, backoff_s=0.0)
    with pytest.raises(StageError, match=f"sha256 mismatch for file.txt: expected {'0' * 64}, got {sha(PAYLOAD)}"):
        fetch.fetch(bad, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10_000)
    small = fetch.UrlSource(kind="url", url=url, sha256=sha(PAYLOAD), backoff_s=0.0)
    hits = state["hits"]
    with pytest.raises(StageError, match="larger than max_bytes=10"):
        fetch.fetch(small, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10)
    assert state["hits"] == hits + 1  # too large is final: not tried again


# ----------------------------------------------------------------------------- pypi, real pip

def _wheel(name: str, version: str, files: dict[str, bytes]) -> tuple[str, bytes]:
    buf = io.BytesIO()
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A PEP 503 package index on 127.0.0.1 serving one wheel, `toypkg 1.0`, and pip configured
    to use it alone (no config file, no find-links, its own cache). `plan` lists what the next
    requests get, in order: "503" (Service Unavailable) or "cut" (half the body, then the
    connection closes); requests past the plan are served. `requests` records every path."""
    whl_name, whl = _wheel("toypkg", "1.0", {"toypkg/data.txt": PAYLOAD})
    state = {"plan": [], "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"].append(self.path)
            if self.path.rstrip("/") == "/simple/toypkg":
                digest = hashlib.sha256(whl).hexdigest()
                body = f'<a href="/files/{whl_name}#sha256={digest}">{whl_name}</a>'.encode()
                ctype = "text/html"
            elif self.path == f"/files/{whl_name}":
                body, ctype = whl, "application/octet-stream"
            else:
                self.send_error(404)
                return
            fault = state["plan"].pop(0) if state["plan"] else None
            if fault == "503":
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if fault == "cut" else body)
            if fault == "cut":
                self.close_connection = True

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{httpd.server_address[1]}/simple/")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    yield state
    httpd.shutdown()
    httpd.server_close()


def _toypkg(**over) -> fetch.PypiSource:
    return fetch.PypiSource(**{"kind": "pypi", "name": "toypkg", "version": "1.0", "dist": "wheel",
                               "members": ["toypkg/data.txt"], "sha256": sha(PAYLOAD), **over})


def test_pypi_retries_in_transit_then_succeeds(index, tmp_path):
    """The index answers 503 once, then the wheel's transfer is cut halfway: pip fails twice
    (it does not retry on its own), the third try gets the wheel, with url's backoff between."""
    index["plan"] = ["503", None, "cut"]
    slept: list[float] = []
    out, fetched = fetch.fetch(_toypkg(retries=3, backoff_s=0.5), tmp_path / "raw", cache=[],
                               root=tmp_path, max_bytes=10_000, sleep=slept.append)
    assert fetched and out == tmp_path / "raw" / sha(PAYLOAD) / "data.txt"
    assert out.read_bytes() == PAYLOAD
    assert slept == [0.5, 1.0]
    whl = "/files/toypkg-1.0-py3-none-any.whl"
    assert index["requests"] == ["/simple/toypkg/", "/simple/toypkg/", whl, "/simple/toypkg/", whl]


def test_pypi_fails_after_last_try_with_one_clear_error(index, tmp_path):
    index["plan"] = ["503"] * 10
    slept: list[float] = []
    with pytest.raises(StageError, match=r"^pypi toypkg==1.0 \(wheel\): download failed after 2 tries; "
                                         r"last error: pip download failed \(exit 1\): .*No matching"):
        fetch.fetch(_toypkg(retries=2, backoff_s=0.25), tmp_path / "raw", cache=[], root=tmp_path,
                    max_bytes=10_000, sleep=slept.append)
    assert index["requests"] == ["/simple/toypkg/"] * 2 and slept == [0.25]
    assert not (tmp_path / "raw").exists()


def test_pypi_asks_pip_for_the_kind_of_dist_pinned(index, tmp_path):
    """The index has only a wheel: `dist: sdist` must not accept it (pip's --no-binary)."""
    with pytest.raises(StageError, match=r"after 1 try; .*No matching distribution found for toypkg==1.0"):
        fetch.fetch(_toypkg(dist="sdist", retries=1), tmp_path / "raw", cache=[], root=tmp_path,
                    max_bytes=10_000)
    out, _ = fetch.fetch(_toypkg(dist="wheel", retries=1), tmp_path / "raw", cache=[], root=tmp_path,
                         max_bytes=10_000)
    assert out.read_bytes() == PAYLOAD
