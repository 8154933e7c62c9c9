"""A temporary copy of this repo on the smoke parameter set, for pipeline-level tests.

In:  a destination folder.
Out: a git repo there holding the project's files (what `git ls-files` would ship, tracked or not,
     never data/ or local state), `configs/smoke.yaml` as its `params.yaml`, one commit, and a
     local DVC remote beside it; plus `pipeline_env()`, the environment its commands run in, and
     `assert_same_results()`, which compares two runs on everything that is deterministic.

What differs between two clean runs by nature, and is left out of the comparison:
  - metric keys that measure time or speed (`wall_time_s`, `train_time_s`, `tokens_per_s`: any
    key ending in `_s`) and `resumed_from_step`;
  - the md5 in dvc.lock of the metrics files holding those keys (their other keys are compared
    after parsing).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
          "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
# Results of a real default run: they describe other params, so a smoke copy starts without them.
NOT_COPIED = ("data/", "dvc.lock", "docs/")


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (free to serve on, or closed to fail against)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
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
    proc.wait(timeout=timeout)
    return proc.log.read_text()
