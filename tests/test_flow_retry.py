"""The Prefect flow's retry of the stages that fetch from the network (flows/pipeline.py,
`RETRIED_STAGES`, the flow parameters `download_retries` and `retry_delay_seconds`), driven through
Prefect's real retry machinery on a toy DVC repo, against a temporary Prefect server
(`prefect_test_harness`).

The toy's stages are `python stage.py NAME`; a stage named in `FAIL_ONCE` exits 1 on its first try
("connection reset") and succeeds on the next. Each try appends its start time to a file outside
the repo, so the test counts the tries DVC really ran, not what Prefect says it did.

- `download` failing once: its task is retried once after `retry_delay_seconds`; the task run
  ends Completed with run_count 2, the stage ran twice, the flow completes and the stage
  downstream of it runs;
- with `download_retries=0`, the same failure fails the flow (the retry is what saves it);
- a stage that is not in `RETRIED_STAGES` failing once is not retried: it fails its task and the
  flow at the first try.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.smoke import GIT_ID, sh

BIN = Path(sys.executable).parent

STAGE = '''"""Toy stage: python stage.py NAME writes data/NAME.txt; fails its first try if in FAIL_ONCE."""
import os, pathlib, sys, time
name = sys.argv[1]
tries = pathlib.Path(os.environ["TOY_TRIES_DIR"]) / name
with open(tries, "a") as f:
    f.write(f"{time.time()}\\n")
if name in os.environ.get("FAIL_ONCE", "").split(",") and len(tries.read_text().splitlines()) == 1:
    sys.exit(f"error: {name}: connection reset by peer (toy: the first try fails)")
pathlib.Path("data").mkdir(exist_ok=True)
pathlib.Path(f"data/{name}.txt").write_text(name)
print(f"{name}: done", flush=True)
'''
DVC_YAML = """stages:
  download:
    cmd: python stage.py download
    deps: [stage.py]
    outs: [data/download.txt]
  tokenize:
    cmd: python stage.py tokenize
    deps: [stage.py, data/download.txt]
    outs: [data/tokenize.txt]
"""


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def toy(tmp_path, monkeypatch) -> dict[str, Any]:
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    env = {**os.environ, **GIT_ID, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "toy"], repo, env)
    tries = tmp_path / "tries"
    tries.mkdir()
    monkeypatch.setenv("TOY_TRIES_DIR", str(tries))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/no-store.db")  # no links
    return {"repo": repo, "tries": tries}


def tries_of(toy: dict[str, Any], stage: str) -> list[float]:
    f = toy["tries"] / stage
    return [float(t) for t in f.read_text().split()] if f.is_file() else []


def task_runs(flow_run_id) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def run_flow(toy: dict[str, Any], **params):
    from flows.pipeline import pipeline

    return pipeline(repo=str(toy["repo"]), push=False, return_state=True, **params)


def test_download_failing_once_is_retried_and_the_flow_completes(prefect_server, toy, monkeypatch):
    monkeypatch.setenv("FAIL_ONCE", "download")
    state = run_flow(toy, download_retries=1, retry_delay_seconds=1)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["ran"] == ["download", "tokenize"] and not summary["failed"]
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["download"].state.is_completed() and runs["download"].run_count == 2
    assert runs["tokenize"].state.is_completed() and runs["tokenize"].run_count == 1
    first, second = tries_of(toy, "download")  # DVC ran the stage's command twice
    assert second - first >= 1.0  # the retry waited retry_delay_seconds
    assert (toy["repo"] / "data/download.txt").read_text() == "download"
    assert (toy["repo"] / "data/tokenize.txt").read_text() == "tokenize"


def test_without_retries_the_same_failure_fails_the_flow(prefect_server, toy, monkeypatch):
    monkeypatch.setenv("FAIL_ONCE", "download")
    state = run_flow(toy, download_retries=0, retry_delay_seconds=0)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["download"].state.is_failed() and runs["download"].run_count == 1
    assert "tokenize" not in runs  # downstream of the failure: not run
    assert len(tries_of(toy, "download")) == 1 and tries_of(toy, "tokenize") == []


def test_only_the_network_stages_are_retried(prefect_server, toy, monkeypatch):
    monkeypatch.setenv("FAIL_ONCE", "tokenize")
    state = run_flow(toy, download_retries=2, retry_delay_seconds=0)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["download"].state.is_completed() and runs["download"].run_count == 1
    assert runs["tokenize"].state.is_failed() and runs["tokenize"].run_count == 1
    assert len(tries_of(toy, "tokenize")) == 1


def test_the_flow_retries_download_by_default():
    import inspect

    from flows.pipeline import RETRIED_STAGES, pipeline
    assert RETRIED_STAGES == ("download",)
    defaults = {k: p.default for k, p in inspect.signature(pipeline.fn).parameters.items()}
    assert defaults["download_retries"] == 3 and defaults["retry_delay_seconds"] == 60.0
