"""Test-wide environment (offline, no telemetry, no writes to the home directory) and the one
reference run of the smoke pipeline that the pipeline-level tests share."""
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


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> dict:
    """A clean `dvc repro` of the smoke pipeline; a second `dvc repro` is tried while it runs.

    Shared by tests/test_pipeline.py (status, push/pull), tests/test_faults.py (the reference of
    the interrupted runs) and tests/test_flows.py (the reference of the worker's clean run), so
    the suite pays for this run once. Those tests only read its outputs.
    """
    from tests.smoke import finish, make_smoke_repo, sh, start_repro

    repo = make_smoke_repo(tmp_path_factory.mktemp("smoke-run") / "repo")
    first = start_repro(repo)
    # wait until the first run holds its stage locks (it is inside `download`)
    end = time.monotonic() + 120
    while not (repo / ".dvc/tmp/rwlock").is_file() and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(1.0)
    second = sh(["dvc", "repro"], repo, check=False, timeout=300)
    out = finish(first)
    assert first.returncode == 0, out[-4000:]
    return {"repo": repo, "second": second, "first_out": out}
