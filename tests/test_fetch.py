"""ptf/data/fetch.py: pinned sources, nested members, safe and bounded extraction, url retries."""
from __future__ import annotations

import http.server
import io
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
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.txt", state
    httpd.shutdown()


def test_url_retries_then_succeeds(server, tmp_path):
    url, state = server
    state["fail"] = 2
    src = fetch.UrlSource(kind="url", url=url, sha256=sha(PAYLOAD), retries=3, backoff_s=0.01)
    out, _ = fetch.fetch(src, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10_000)
    assert out.name == "file.txt" and out.read_bytes() == PAYLOAD and state["hits"] == 3


def test_url_fails_after_last_try(server, tmp_path):
    url, state = server
    state["fail"] = 99
    src = fetch.UrlSource(kind="url", url=url, sha256=sha(PAYLOAD), retries=2, backoff_s=0.0)
    with pytest.raises(StageError, match=r"download failed after 2 tries; last error: HTTP Error 503"):
        fetch.fetch(src, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10_000)
    assert state["hits"] == 2


def test_url_sha_mismatch_and_size_bound(server, tmp_path):
    url, _ = server
    bad = fetch.UrlSource(kind="url", url=url, sha256="0" * 64, backoff_s=0.0)
    with pytest.raises(StageError, match=f"sha256 mismatch for file.txt: expected {'0' * 64}, got {sha(PAYLOAD)}"):
        fetch.fetch(bad, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10_000)
    small = fetch.UrlSource(kind="url", url=url, sha256=sha(PAYLOAD), backoff_s=0.0)
    with pytest.raises(StageError, match="larger than max_bytes=10"):
        fetch.fetch(small, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10)


def test_pip_failure_is_one_clear_error(tmp_path, monkeypatch):
    class Proc:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for nosuchpkg==0.0.1\n"

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: Proc())
    src = fetch.PypiSource(kind="pypi", name="nosuchpkg", version="0.0.1", dist="sdist",
                           members=["x"], sha256="0" * 64)
    with pytest.raises(StageError, match=r"pypi nosuchpkg==0.0.1 \(sdist\): pip download failed .*No matching"):
        fetch.fetch(src, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10)


def test_pip_command_line(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("--dest") + 1])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("pkg/x.txt", PAYLOAD)
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes(buf.getvalue())

        class P:
            returncode, stdout, stderr = 0, "", ""
        return P()

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    src = fetch.PypiSource(kind="pypi", name="pkg", version="1.0", dist="wheel", members=["pkg/x.txt"],
                           sha256=sha(PAYLOAD))
    out, _ = fetch.fetch(src, tmp_path / "raw", cache=[], root=tmp_path, max_bytes=10_000)
    assert out.read_bytes() == PAYLOAD
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary" in cmd
    assert cmd[-1] == "pkg==1.0"
