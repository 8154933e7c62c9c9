"""End to end: `dvc repro` on the smoke parameter set in a temporary copy of the repo.

Shows: the whole DAG runs; afterwards `dvc status` is clean and a second `dvc repro` runs
nothing; `dvc push` then `dvc pull` in a fresh clone restores byte-identical outputs.
(That two clean runs give the same outputs is shown by tests/test_flows.py, whose Prefect worker
makes the second clean run, and by tests/test_faults.py for a run killed six times.)
The run is the session fixture `smoke_run` of tests/conftest.py; these tests rerun, commit and
push, so they work on a copy of it (`copy_smoke_repo`: its files, git history and DVC cache).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.smoke import copy_smoke_repo, pipeline_env, sh


def file_digests(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = [o["path"] for spec in lock["stages"].values() for o in spec.get("outs", []) if "md5" in o]
    digests = {}
    for rel in paths:
        root = repo / rel
        for f in sorted([root] if root.is_file() else root.rglob("*")):
            if f.is_file():
                digests[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def ran(smoke_run, tmp_path_factory) -> Path:
    return copy_smoke_repo(smoke_run["repo"], tmp_path_factory.mktemp("pipeline") / "repo")


def test_repro_runs_every_stage_and_then_nothing(ran):
    lock = yaml.safe_load((ran / "dvc.lock").read_text())
    declared = sh(["dvc", "stage", "list", "--name-only"], ran).stdout.split()
    assert sorted(lock["stages"]) == sorted(declared)
    status = sh(["dvc", "status"], ran).stdout
    assert "up to date" in status, status
    again = sh(["dvc", "repro"], ran).stdout
    assert "Running stage" not in again, again


def test_push_then_pull_in_a_fresh_clone_is_byte_identical(ran, tmp_path):
    env = pipeline_env(ran)
    sh(["git", "add", "-A"], ran, env)
    sh(["git", "commit", "-qm", "smoke run"], ran, env)
    sh(["dvc", "push"], ran, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(ran), str(clone)], tmp_path, env)
    sh(["dvc", "pull"], clone, env)
    assert file_digests(clone) == file_digests(ran)
    assert "up to date" in sh(["dvc", "status"], clone, env).stdout

