"""Test-wide environment (offline, no telemetry, no writes to the home directory), the one
reference run of the smoke pipeline that the pipeline-level tests share, and the order in which
`make test` (pytest-xdist, two workers, one module per worker at a time) hands modules out.

Why two workers: most of the suite's time is stage processes starting up (imports, one core),
so one pytest process left the second core of this 2-core machine idle half the time.
"""
import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each, not two each (set before torch is imported;
    # the stage processes the tests start inherit it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def holds_a_stage_lock(repo, pid: int) -> bool:
    """Whether DVC's rwlock of `repo` shows process `pid` holding a stage's outputs for writing
    (DVC takes it when a stage starts running and drops the repo lock while its command runs)."""
    try:
        lock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
    except (OSError, ValueError):
        return False  # not written yet, or caught mid-write
    return any(info.get("pid") == pid for info in lock.get("write", {}).values())


# Test files run first, in this order; the rest follow in collection order. For `make test`: the
# modules whose fixtures run the whole smoke pipeline, so that the two workers start on them
# together: the smoke run (test_dashboard) on one, the Prefect worker's own run (test_flows) on
# the other. (`make mutate` sets its own, the targeted fast files first: tests/mutate.py.)
FIRST = ("test_dashboard.py", "test_flows.py", "test_faults.py", "test_exp_run.py",
         "test_pipeline.py", "test_mlflow_fresh_store.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: order kept within


@contextmanager
def exclusive(lock_file):
    """Hold an exclusive lock on `lock_file` (shared by every xdist worker of this session)."""
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> dict:
    """A clean `dvc repro` of the smoke pipeline; a second `dvc repro` is tried while it runs.

    Shared by tests/test_pipeline.py, tests/test_faults.py (the reference of the interrupted
    runs) and tests/test_flows.py (the reference of the worker's clean run), so the suite pays
    for this run once: under pytest-xdist the first worker that asks runs it (holding a lock in
    the session's shared temporary folder) and records it there; the others wait and read that
    record. It is read-only: a test that runs a stage, commits or pushes works on its own copy
    (`tests.smoke.copy_smoke_repo`); each worker checks at its end that the run is as it found it.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    record = shared / "smoke-run.json"
    with exclusive(shared / "smoke-run.lock"):
        if not record.exists():
            record.write_text(json.dumps(run_smoke(shared / "smoke-run" / "repo")))
    run = json.loads(record.read_text())
    assert run["returncode"] == 0, run["first_out"][-4000:]
    repo = type(base)(run["repo"])
    before = repo_state(repo)
    yield {"repo": repo, "second": SimpleNamespace(**run["second"]), "first_out": run["first_out"]}
    changed = {k for k in before if repo_state(repo)[k] != before[k]}
    assert not changed, (f"a test changed the shared smoke run ({', '.join(sorted(changed))}); "
                         "work on a copy: tests.smoke.copy_smoke_repo")


def run_smoke(repo) -> dict:
    """Make a smoke repo at `repo`, run `dvc repro` there and, once a stage is running, a second
    `dvc repro`; what both did, as JSON."""
    from tests.smoke import finish, make_smoke_repo, sh, start_repro

    make_smoke_repo(repo)
    first = start_repro(repo)
    # wait until the first run is inside a stage's command (it holds that stage's write lock)
    end = time.monotonic() + 300
    while not holds_a_stage_lock(repo, first.pid):
        assert first.poll() is None, f"dvc repro ended early\n{first.log.read_text()[-4000:]}"
        assert time.monotonic() < end, f"no stage started in 300 s\n{first.log.read_text()[-4000:]}"
        time.sleep(0.05)
    second = sh(["dvc", "repro"], repo, check=False, timeout=300)
    out = finish(first)
    return {"repo": str(repo), "returncode": first.returncode, "first_out": out,
            "second": {"returncode": second.returncode, "stdout": second.stdout, "stderr": second.stderr}}


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
