"""Test-wide environment (offline, no telemetry, no writes to the home directory) and the one
reference run of the smoke pipeline that the pipeline-level tests share."""
import json
import os
import tempfile
import time

import pytest

_HOME_STATE = tempfile.mkdtemp(prefix="pipeline-tests-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_DATASETS_CACHE": os.path.join(_HOME_STATE, "hf-datasets"),
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_HOME": os.path.join(_HOME_STATE, "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ[key] = value


def holds_a_stage_lock(repo, pid: int) -> bool:
    """Whether DVC's rwlock of `repo` shows process `pid` holding a stage's outputs for writing
    (DVC takes it when a stage starts running and drops the repo lock while its command runs)."""
    try:
        lock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
    except (OSError, ValueError):
        return False  # not written yet, or caught mid-write
    return any(info.get("pid") == pid for info in lock.get("write", {}).values())


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> dict:
    """A clean `dvc repro` of the smoke pipeline; a second `dvc repro` is tried while it runs.

    Shared by tests/test_pipeline.py, tests/test_faults.py (the reference of the interrupted
    runs) and tests/test_flows.py (the reference of the worker's clean run), so the suite pays
    for this run once. It is read-only: a test that runs a stage, commits or pushes works on its
    own copy (`tests.smoke.copy_smoke_repo`).
    """
    from tests.smoke import finish, make_smoke_repo, sh, start_repro

    repo = make_smoke_repo(tmp_path_factory.mktemp("smoke-run") / "repo")
    first = start_repro(repo)
    # wait until the first run is inside a stage's command (it holds that stage's write lock)
    end = time.monotonic() + 300
    while not holds_a_stage_lock(repo, first.pid):
        assert first.poll() is None, f"dvc repro ended early\n{first.log.read_text()[-4000:]}"
        assert time.monotonic() < end, f"no stage started in 300 s\n{first.log.read_text()[-4000:]}"
        time.sleep(0.05)
    second = sh(["dvc", "repro"], repo, check=False, timeout=300)
    out = finish(first)
    assert first.returncode == 0, out[-4000:]
    before = repo_state(repo)
    yield {"repo": repo, "second": second, "first_out": out}
    changed = {k for k in before if repo_state(repo)[k] != before[k]}
    assert not changed, (f"a test changed the shared smoke run ({', '.join(sorted(changed))}); "
                         "work on a copy: tests.smoke.copy_smoke_repo")


def repo_state(repo) -> dict:
    """What a test that only reads the smoke run leaves as it was: the git commit and status,
    the DVC remote, and every file (size, mtime) outside .git and DVC's own .dvc/tmp."""
    from tests.smoke import sh

    files = {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
             for p in repo.rglob("*") if p.is_file()
             and p.relative_to(repo).parts[0] != ".git" and p.relative_to(repo).parts[:2] != (".dvc", "tmp")}
    remote = repo.parent / "dvc-remote"
    return {"git commit": sh(["git", "rev-parse", "HEAD"], repo).stdout,
            "git status": sh(["git", "status", "--porcelain"], repo).stdout,
            "files": files,
            "DVC remote": sorted(str(p) for p in remote.rglob("*")) if remote.exists() else []}
