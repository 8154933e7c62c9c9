"""A temporary copy of this repo on the smoke parameter set, for pipeline-level tests.

In:  a destination folder.
Out: a git repo there holding the project's files (what `git ls-files` would ship, tracked or not,
     never data/ or local state), `configs/smoke.yaml` as its `params.yaml`, one commit, and a
     local DVC remote beside it; plus `pipeline_env()`, the environment its commands run in.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
          "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
# Results of a real default run: they describe other params, so a smoke copy starts without them.
NOT_COPIED = ("data/", "dvc.lock", "docs/")


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
