"""End to end: `dvc repro` on the smoke parameter set in a temporary copy of the repo.

Shows: the whole DAG runs; afterwards `dvc status` is clean and a second `dvc repro` runs
nothing; `dvc push` then `dvc pull` in a fresh clone restores byte-identical outputs.
(That two clean runs give the same outputs is shown by tests/test_flows.py, whose Prefect worker
makes the second clean run, and by tests/test_faults.py for a run killed at five points, for
the stages it reruns: those killed, and those downstream of an output a rerun changed.)
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



def test_two_backbones_each_seed_starts_from_and_is_measured_against_its_own(smoke_run):
    """configs/smoke.yaml pretrains two backbones (pretrain.extra_seeds [1]): seed 1 of the sweep,
    of the sequential runs and of the fine-tunes starts from backbones/1, and its drift is from
    backbones/1's own held-out loss, recomputed here from the saved model and that backbone."""
    import json

    import numpy as np

    from ptf.measures.drift import EvalSet
    from ptf.models.artifacts import read_meta
    from ptf.models.backbones import backbone_dirs

    repo = Path(smoke_run["repo"])
    pre = repo / "data/models/pretrained"
    dirs = backbone_dirs(pre)
    assert [d.relative_to(repo).as_posix() for d in dirs] == ["data/models/pretrained",
                                                              "data/models/pretrained/backbones/1"]
    pm = json.loads((repo / "data/metrics/pretrain.json").read_text())
    assert [b["seed"] for b in pm["backbones"]] == [0, 1] and pm["backbones"][0]["val_loss"] != pm["backbones"][1]["val_loss"]
    sweep = json.loads((repo / "data/metrics/sweep/movies/full.json").read_text())
    assert sweep["backbones"] == ["data/models/pretrained", "data/models/pretrained/backbones/1"]
    for c in sweep["configs"].values():
        assert c["seeds"]["0"]["backbone"] == 0 and "base_sums" not in c["seeds"]["0"]
        assert c["seeds"]["1"]["backbone"] == 1 and c["seeds"]["1"]["base_sums"] != sweep["blocks"]["base_sums"]
    fg = json.loads((repo / "data/metrics/forgetting.json").read_text())
    assert [b["dir"] for b in fg["eval"]["backbones"]] == ["data/models/pretrained",
                                                          "data/models/pretrained/backbones/1"]
    model = repo / "data/models/finetuned/movies/full/seed1"
    assert Path(read_meta(model)["pretrained_dir"]).as_posix().endswith("data/models/pretrained/backbones/1")
    ev = EvalSet.build(repo, pre, 16, 8, 0.15, 0)
    ev1 = ev.for_backbone(dirs[1])
    e, e1 = ev.for_backbone(dirs[0]), ev1
    assert not np.array_equal(e.base_sums, e1.base_sums)
    seed1 = fg["tasks"]["movies"]["full"]["seeds"]["seed1"]
    want = float((e1.measure(model) - e1.base_sums).sum() / e1.counts.sum())
    got_other = float((e.measure(model) - e.base_sums).sum() / e.counts.sum())
    assert seed1["delta_loss"] == pytest.approx(want, rel=1e-5) != pytest.approx(got_other, rel=1e-5)
