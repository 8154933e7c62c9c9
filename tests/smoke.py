"""A temporary copy of this repo on the smoke parameter set, for pipeline-level tests.

In:  a destination folder.
Out: a git repo there holding the project's files (what `git ls-files` would ship, tracked or not,
     never data/ or local state), `configs/smoke.yaml` as its `params.yaml`, one commit, and a
     local DVC remote beside it; plus `pipeline_env()`, the environment its commands run in, and
     `assert_same_results()`, which compares two runs on everything that is deterministic;
     `copy_smoke_repo()`, a private copy of a finished run for tests that run, commit or push;
     `free_port()` and `closed_port()`, ports of 127.0.0.1 to serve on or to fail against.

What differs between two clean runs by nature, and is left out of the comparison:
  - metric keys that measure time or speed (`wall_time_s`, `train_time_s`, `tokens_per_s`: any
    key ending in `_s`) and `resumed_from_step`;
  - the md5 in dvc.lock of the metrics files holding those keys (their other keys are compared
    after parsing).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
          "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
# Results of a real default run: they describe other params, so a smoke copy starts without them.
NOT_COPIED = ("data/", "dvc.lock", "docs/")


_HANDED_OUT: set[int] = set()
_PORTS_LOCK = threading.Lock()
_RANDOM = random.SystemRandom()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port of 127.0.0.1 for a server that a test starts on a port it is told (Prefect, MLflow,
    a torchrun rendezvous).

    Never one this process handed out before (two calls never return the same port), never one
    of another pytest-xdist worker's (each worker draws from its own slice of the range), and
    drawn below the kernel's ephemeral range, so no outgoing connection and no `bind(0)`
    elsewhere is given it while the server starts; it must bind at the moment it is handed out.
    A test that only needs a port where connections are refused uses `closed_port()`, which
    holds the port.
    """
    lo, _ = _ephemeral_range()
    first = 20000 if lo > 21000 else 10000
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), worker + 1)
    width = (lo - first) // workers
    first, lo = first + worker * width, first + (worker + 1) * width
    with _PORTS_LOCK:
        for _ in range(1000):
            port = _RANDOM.randrange(first, lo)
            if port in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port of 127.0.0.1 in [{first}, {lo})")


@contextmanager
def closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections for as long as the block runs: its socket is
    bound but never listens, so no other process can start serving on it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def pipeline_env(repo: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **GIT_ID}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{repo.parent / 'mlflow.db'}")
    env.update(extra)
    return env


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True,
       timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or pipeline_env(cwd), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def project_files() -> list[str]:
    out = sh(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split("\n")
    return [f for f in out if f and not f.startswith(NOT_COPIED) and (ROOT / f).is_file()]


def make_smoke_repo(dest: Path, params: Path = ROOT / "configs" / "smoke.yaml") -> Path:
    dest.mkdir(parents=True)
    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    shutil.copy2(params, dest / "params.yaml")
    env = pipeline_env(dest)
    sh(["git", "init", "-q", "-b", "main"], dest, env)
    sh(["dvc", "remote", "add", "-d", "-f", "local", str(dest.parent / "dvc-remote")], dest, env)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "commit", "-qm", "smoke copy"], dest, env)
    return dest


def copy_smoke_repo(src: Path, dest: Path) -> Path:
    """A private copy of a finished smoke repo at `dest`: its work tree, git history and DVC cache
    (not `.dvc/tmp`: DVC's locks and state), with its own DVC remote beside it (committed), so
    the copy can run stages, commit and push without touching `src`. Far cheaper than a rerun."""
    shutil.copytree(src, dest, symlinks=True,
                    ignore=lambda d, names: ["tmp"] if Path(d) == src / ".dvc" else [])
    env = pipeline_env(dest)
    sh(["dvc", "remote", "add", "-d", "-f", "local", str(dest.parent / "dvc-remote")], dest, env)
    sh(["git", "commit", "-qm", "own DVC remote", "--", ".dvc/config"], dest, env)
    return dest


VOLATILE_SUFFIXES = ("_s",)
VOLATILE_KEYS = {"resumed_from_step"}
CKPT = "data/checkpoints/pretrain"  # resume state: no DVC output, compared by neither


def stable(obj):
    """A metrics object without its time/speed keys (recursively)."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items()
                if k not in VOLATILE_KEYS and not k.endswith(VOLATILE_SUFFIXES)}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def lock_outs(repo: Path) -> dict[str, str]:
    """Every output's hash as recorded in dvc.lock, by path."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for spec in lock["stages"].values()
            for o in spec.get("outs", []) if "md5" in o}


def metric_files(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in (repo / "data/metrics").rglob("*.json"))


def assert_same_results(repo: Path, ref: Path) -> None:
    """The same outputs in dvc.lock (bar the volatile ones) and the same deterministic metrics."""
    volatile = set(metric_files(ref))
    got, want = lock_outs(repo), lock_outs(ref)
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if k not in volatile} == \
        {k: v for k, v in want.items() if k not in volatile}
    assert metric_files(repo) == metric_files(ref)
    for rel in metric_files(ref):
        assert stable(json.loads((repo / rel).read_text())) == \
            stable(json.loads((ref / rel).read_text())), rel


def start_repro(repo: Path, **env: str) -> subprocess.Popen:
    """`dvc repro` in its own process group, output to `<repo>/../repro-<n>.log` (`proc.log`)."""
    n = len(list(repo.parent.glob("repro-*.log")))
    log = repo.parent / f"repro-{n}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=pipeline_env(repo, **env),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    """Wait for a `start_repro` process; its log. Past `timeout` its process group is killed and
    the failure quotes the end of the log."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise AssertionError(f"dvc repro still running after {timeout} s\n{proc.log.read_text()[-4000:]}")
    return proc.log.read_text()
