"""Stage processes that start together on a fresh tracking store all log, into one run tree.

Real processes, released at the same instant, each starting runs with `ptf.training.tracking`
on a fresh SQLite file (the race of issue 12: MLflow's schema migrations and the experiment's
creation). They are children of a stand-in `dvc` executable, so they also race to create the
pipeline run of that one `dvc` invocation: exactly one must come out. A failing child's stderr
is part of the assertion message.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.smoke import ROOT

CHILD = """
import json, sys
import mlflow.tracking
from ptf.training.tracking import start_run
print("ready", flush=True)
sys.stdin.read()  # released by the launcher, together with the others
with start_run("finetune", {"lr": 0.1}, {"task": "t", "strategy": "full", "seed": sys.argv[2],
               "lr": "0.0003"}, root=sys.argv[1], experiment="race") as run:
    run.log({"test_accuracy": 0.5, "trainable_fraction": 0.25}, step=1)
print(json.dumps({"run": run._place.run_id, "stage": run._place.stage_run,
                  "pipeline": run._place.pipeline}))
"""

# The stand-in for `dvc repro`: starts N children, releases them at once, reports each one.
LAUNCHER = """#!{python}
import json, subprocess, sys
n, child, root = int(sys.argv[2]), sys.argv[3], sys.argv[4]
procs = [subprocess.Popen([sys.executable, child, root, str(i)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
for p in procs:  # every child has imported MLflow: release them all at once
    p.stdout.readline()
for p in procs:
    p.stdin.close()
    p.stdin = None
out = []
for p in procs:
    stdout, stderr = p.communicate(timeout=240)
    out.append({{"rc": p.returncode, "stdout": stdout, "stderr": stderr[-3000:]}})
print(json.dumps(out))
"""


def launch(tmp: Path, n: int) -> list[dict]:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    dvc = bindir / "dvc"
    dvc.write_text(LAUNCHER.format(python=sys.executable))
    dvc.chmod(0o755)
    child = tmp / "child.py"
    child.write_text(CHILD)
    env = {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    proc = subprocess.run([str(dvc), "repro", str(n), str(child), str(tmp)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for i, r in enumerate(results):
        assert r["rc"] == 0, f"child {i} exited {r['rc']}:\n{r['stderr']}"
    return [json.loads(r["stdout"].strip().splitlines()[-1]) for r in results]


def test_processes_starting_together_on_a_fresh_store_all_log_into_one_tree(tmp_path):
    from mlflow.tracking import MlflowClient

    n = 3
    placed = launch(tmp_path, n)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "race"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=100)}
    pipelines = {p["pipeline"] for p in placed}
    assert len(pipelines) == 1 and None not in pipelines, placed  # one `dvc` invocation, one run
    (pipeline,) = pipelines
    assert runs[pipeline].data.tags["ptf.pipeline.key"].startswith("dvc:")
    assert runs[pipeline].data.tags["dvc.command"] == f"dvc repro {n} {tmp_path / 'child.py'} {tmp_path}"
    levels = sorted(r.data.tags["ptf.level"] for r in runs.values())
    assert levels == ["configuration"] * n + ["pipeline"] + ["stage"] * n  # no duplicate left over
    for p in placed:
        run, stage = runs[p["run"]], runs[p["stage"]]
        assert run.data.tags["mlflow.parentRunId"] == p["stage"]
        assert stage.data.tags["mlflow.parentRunId"] == pipeline
        assert run.data.tags["ptf.pipeline"] == stage.data.tags["ptf.pipeline"] == pipeline
        assert run.info.status == stage.info.status == "FINISHED"
        assert run.data.metrics["trainable_pct"] == 25.0 and "wall_time_s" in run.data.metrics
    assert runs[pipeline].info.status == "FINISHED"  # its stages own it: done when they are
    # the next `dvc` invocation (same store, same experiment) gets a pipeline run of its own
    (again,) = launch(tmp_path, 1)
    assert again["pipeline"] not in (None, pipeline)
