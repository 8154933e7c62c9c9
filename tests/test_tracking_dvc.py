"""A `dvc exp run` is one pipeline run in MLflow, found by its stages through the `dvc` process.

A one-stage toy repo whose stage logs with `ptf.training.tracking`, run with the real `dvc exp run`
(the bare `dvc repro` of the smoke pipeline is tests/test_dashboard.py): the stage's run nests
under a pipeline run named for the command and tagged with DVC's experiment name.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.smoke import GIT_ID, ROOT

STEP = """import pathlib
from ptf.training.tracking import start_run
pathlib.Path("out.txt").write_text(open("params.yaml").read())
with start_run("step", {}, {}, root=".") as run:
    run.log({"x": 1.0}, step=0)
"""
DVC_YAML = """stages:
  step:
    cmd: python step.py
    deps: [step.py]
    params: [x]
    outs: [out.txt]
"""


def test_dvc_exp_run_gets_one_pipeline_run_named_for_it(tmp_path):
    from mlflow.tracking import MlflowClient

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "step.py").write_text(STEP)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("x: 1\n")
    env = {**os.environ, **GIT_ID, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PTF_PIPELINE_RUN_ID", None)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "toy"], ["dvc", "exp", "run", "-S", "x=2"]):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pretrain-finetune-forgetting")
    runs = {r.data.tags["ptf.level"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["pipeline", "stage"]
    pipeline, stage = runs["pipeline"], runs["stage"]
    assert stage.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert pipeline.data.tags["dvc.command"] == "dvc exp run -S x=2"
    assert pipeline.info.run_name.startswith("dvc exp run -S x=2 · ")
    assert pipeline.data.tags["dvc.exp.name"] and pipeline.data.tags["dvc.exp.baseline"]
    assert pipeline.info.status == stage.info.status == "FINISHED"
