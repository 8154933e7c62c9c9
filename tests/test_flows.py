"""The Prefect flow around the DVC DAG, its deployment, and its MLflow pipeline runs, on real servers.

Shows, with a real Prefect server and a real MLflow tracking server on 127.0.0.1 (no mocks):
- the flow's stages and their order come from DVC's graph, foreach/matrix items one by one
  (a toy `dvc.yaml` of `python step.py` stages that log with `ptf.training.tracking` itself);
- on the toy DAG, run in-process: every stage runs, each stage's run nested under the flow's
  MLflow pipeline run (tagged with the Prefect flow run id, git commit, dvc.lock and params
  hashes) and linked from the summary; then every stage is up to date, and the next pipeline run
  holds runs that point to the runs that produced the outputs; a failing stage fails the flow with
  its error in the Prefect logs, runs what does not depend on it, reports what does as not run,
  and leaves the other outputs intact; stages DVC then restores from its run cache appear under
  the next pipeline run, pointing to their producers;
- the `nightly` deployment of `prefect.yaml`, registered with `prefect deploy`, has the cron
  schedule and the `concurrency_limit: 1` of `prefect.yaml`; triggered, a real process worker runs
  it on the smoke parameter set in a temporary copy of the repo to Completed, one task run per DVC
  stage (plus `dvc push`), logging to the MLflow server over HTTP, where every stage that logs
  (pretrain, each finetune item, curves, sequential, forgetting) has its own run under the flow's
  pipeline run; an invalid param for the last stage fails the next run with the stage's error,
  every earlier stage is up to date (pointing to its producer run) and its output in place.
The MLflow dashboard itself (names, columns, screenshots) is tests/test_dashboard.py.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from flows.dashboard import serving
from flows.servers import start, stop, wait_healthy
from flows.pipeline import select, stage_graph
from tests.smoke import GIT_ID, assert_same_results, free_port, make_smoke_repo, pipeline_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENT = "dvc-pipeline/nightly"


# ----------------------------------------------------------------------------- servers


def base_env(prefect_home: Path) -> dict[str, str]:
    env = {**os.environ, **GIT_ID}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1")
    return env


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A Prefect server and an MLflow tracking server (`flows.dashboard.serving`), started side by
    side on free ports of 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("servers")
    env = base_env(tmp / "prefect-home")
    pport = free_port()
    prefect = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                     str(pport)], tmp / "prefect.log", env)
    try:
        with serving(tmp / "mlflow", free_port(), tmp / "mlflow.log") as mlflow_url:
            wait_healthy(f"http://127.0.0.1:{pport}/api/health", prefect, tmp / "prefect.log")
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{pport}/api"
            env["MLFLOW_TRACKING_URI"] = mlflow_url
            yield {"env": env, "api": env["PREFECT_API_URL"], "mlflow": mlflow_url, "tmp": tmp}
            from prefect.logging.handlers import APILogHandler

            with prefect_api(env["PREFECT_API_URL"]):
                APILogHandler().flush()  # this process's flow logs, before their server goes
    finally:
        stop((prefect, signal.SIGINT))


@contextmanager
def prefect_api(api: str) -> Iterator[Any]:
    """This process's Prefect settings pointed at the test server, and a sync client."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            yield client


def task_runs(client: Any, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def run_logs(client: Any, flow_run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                            limit=200)
    return "\n".join(log.message for log in logs)


def wait_logs(client: Any, flow_run_id: Any, needle: str, timeout: float = 20) -> str:
    deadline = time.time() + timeout
    while True:
        text = run_logs(client, flow_run_id)
        if needle in text or time.time() > deadline:
            return text
        time.sleep(1)


def summary_of(client: Any, flow_run_id: Any) -> dict[str, str]:
    """The `pipeline-summary` artifact of a flow run as {stage: status}, and its raw markdown."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    (art,) = [a for a in arts if a.key == "pipeline-summary"]
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", art.data, re.M))
    return {"rows": rows, "markdown": art.data}


# ----------------------------------------------------------------------------- a toy DAG
STEP = '''"""Toy stage: python step.py OUT [IN...] writes data/OUT.txt from its inputs and logs its run
with the project's own tracking (ptf.training.tracking), as the real stages do."""
import os, pathlib, sys, yaml
out, ins = sys.argv[1], sys.argv[2:]
if yaml.safe_load(open("params.yaml"))["fail"] == out:
    sys.exit(f"error: stage {out} told to fail by params.yaml")
print(f"making {out} from {ins}", flush=True)
pathlib.Path("data").mkdir(exist_ok=True)
text = "".join(pathlib.Path(f"data/{i}.txt").read_text() for i in ins) + out
pathlib.Path(f"data/{out}.txt").write_text(text)
if os.environ.get("MLFLOW_TRACKING_URI"):
    from ptf.training.tracking import start_run
    with start_run(out.split("-")[0], {"inputs": ins}, {"toy": out}, root=".") as run:
        run.log({"chars": len(text)}, step=0)
'''
DVC_YAML = """stages:
  a:
    cmd: python step.py a
    deps:
      - step.py
    outs:
      - data/a.txt
  b:
    foreach: ${items}
    do:
      cmd: python step.py b-${item} a
      deps:
        - step.py
        - data/a.txt
      params:
        - fail
      outs:
        - data/b-${item}.txt
  c:
    cmd: python step.py c b-x
    deps:
      - step.py
      - data/b-x.txt
    params:
      - fail
    outs:
      - data/c.txt
  d:
    cmd: python step.py d b-y
    deps:
      - step.py
      - data/b-y.txt
    outs:
      - data/d.txt
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **GIT_ID})


@pytest.fixture
def toy(tmp_path) -> Path:
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "step.py").write_text(STEP)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("items: [y, x]\nfail: none\n")
    git(repo, "init", "-q")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "toy")
    return repo


def test_stages_and_order_come_from_dvc(toy):
    order, upstream = stage_graph(toy)
    assert order == ["a", "b@y", "b@x", "c", "d"]  # DAG order; ties in dvc.yaml's order
    assert upstream["c"] == {"a", "b@x"} and upstream["d"] == {"a", "b@y"}
    assert select(order, upstream, ["c"]) == ["a", "b@x", "c"]
    assert select(order, upstream, ["b"]) == ["a", "b@y", "b@x"]
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        select(order, upstream, ["nope"])


def test_toy_flow_runs_then_skips_then_fails_one_branch(toy, servers, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows import mlflow_view as view
    from flows.pipeline import pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["mlflow"])
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the toy stages import ptf.training.tracking
    stages = ["a", "b@y", "b@x", "c", "d"]
    mlflow = MlflowClient(servers["mlflow"])
    with prefect_api(servers["api"]) as client:
        state = pipeline(repo=str(toy), push=False, return_state=True)
        first = state.result()
        assert first["ran"] == stages
        parent = mlflow.get_run(first["mlflow_pipeline_run"])
        exp = parent.info.experiment_id
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=toy, capture_output=True, text=True).stdout.strip()
        assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
        assert parent.data.tags["mlflow.source.git.commit"] == head
        assert parent.data.tags["params.sha256"].startswith("sha256:")
        assert parent.data.tags["dvc.lock.sha256.after"].startswith("sha256:")
        assert parent.info.status == "FINISHED"
        produced = {}
        for stage in stages:  # each stage's own run, made by ptf.training.tracking in the stage
            (link,) = first["mlflow_runs"][stage]
            run = mlflow.get_run(link["run_id"])
            assert link["url"] == f"{servers['mlflow']}/#/experiments/{exp}/runs/{run.info.run_id}"
            assert run.data.tags["dvc.stage"] == stage and run.data.tags["toy"] == stage.replace("@", "-")
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert (run.data.tags["ptf.level"], run.info.status) == ("stage", "FINISHED")
            produced[stage] = run.info.run_id
        assert first["mlflow_runs"]["_table"] == view.runs_url(servers["mlflow"], exp,
                                                               view.share_key(parent.info.run_id))

        second = pipeline(repo=str(toy), push=False)
        assert second["up_to_date"] == stages and second["ran"] == []
        for stage in stages:  # up to date: a run that points to the run that made the output
            (link,) = second["mlflow_runs"][stage]
            run = mlflow.get_run(link["run_id"])
            assert run.data.tags["mlflow.parentRunId"] == second["mlflow_pipeline_run"]
            assert run.data.tags["ptf.produced_by"] == produced[stage]
            assert run.data.tags["ptf.produced_by.match"] == "outputs hash"
            assert run.data.tags["dvc.status"] == "up to date"

        # b@x fails: c (downstream) is not run, d (beside it) is; every other output stays
        kept = {p: (toy / "data" / f"{p}.txt").read_text() for p in ("a", "b-y", "d")}
        (toy / "params.yaml").write_text("items: [y, x]\nfail: b-x\n")
        state = pipeline(repo=str(toy), push=False, return_state=True)
        assert state.is_failed()
        flow_run_id = state.state_details.flow_run_id
        runs = {t.name: t.state.type.value for t in task_runs(client, flow_run_id)}
        assert runs == {"a": "COMPLETED", "b@y": "COMPLETED", "b@x": "FAILED", "d": "COMPLETED"}
        rows = summary_of(client, flow_run_id)["rows"]
        assert rows == {"a": "up to date", "b@y": "ran", "b@x": "failed", "c": "not run",
                        "d": "up to date"}
        logs = wait_logs(client, flow_run_id, "told to fail")
        assert "error: stage b-x told to fail by params.yaml" in logs
        assert {p: (toy / "data" / f"{p}.txt").read_text() for p in kept} == kept

        # params back as in the first run: DVC restores b@y and b@x from its run cache (c never
        # ran with the bad value: it is up to date), and
        # each appears under the new pipeline run, pointing to the run that produced its outputs
        (toy / "params.yaml").write_text("items: [y, x]\nfail: none\n")
        fourth = pipeline(repo=str(toy), push=False)
        assert fourth["restored"] == ["b@y", "b@x"] and fourth["ran"] == []
        for stage in fourth["restored"]:
            run = mlflow.get_run(fourth["mlflow_runs"][stage][0]["run_id"])
            assert run.data.tags["mlflow.parentRunId"] == fourth["mlflow_pipeline_run"]
            assert run.data.tags["dvc.status"] == "restored"
            producer = mlflow.get_run(run.data.tags["ptf.produced_by"])  # the latest run that made
            assert producer.data.tags["dvc.outs"] == run.data.tags["dvc.outs"]  # these outputs
            assert producer.info.status == "FINISHED" and "ptf.produced_by" not in producer.data.tags
        # b@x made its output only in the first run (its run in the third failed)
        assert mlflow.get_run(fourth["mlflow_runs"]["b@x"][0]["run_id"]).data.tags["ptf.produced_by"] == \
            produced["b@x"]


def test_a_tracking_store_that_cannot_take_the_pipeline_run_stops_the_flow_before_any_stage(
        toy, servers, monkeypatch):
    from flows.pipeline import pipeline
    from tests.smoke import closed_port

    with closed_port() as port, prefect_api(servers["api"]) as client:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        state = pipeline(repo=str(toy), push=False, return_state=True)
        assert state.is_failed()
        assert f"MLflow tracking store http://127.0.0.1:{port} is not reachable" in str(state.message)
        assert task_runs(client, state.state_details.flow_run_id) == []  # no stage started
    assert not (toy / "data").exists()


# ----------------------------------------------------------------------------- the real pipeline
@pytest.fixture(scope="module")
def deployed(servers) -> Iterator[dict[str, Any]]:
    """A smoke copy of this repo, its `nightly` deployment registered with `prefect deploy`, and a
    process worker serving its pool, logging to the MLflow server over HTTP."""
    tmp = servers["tmp"]
    repo = make_smoke_repo(tmp / "smoke" / "repo")
    env = {**pipeline_env(repo), **servers["env"], "PREFECT_WORKER_QUERY_SECONDS": "1",
           "MLFLOW_UI_URL": servers["mlflow"]}

    def prefect(*args: str) -> None:
        proc = subprocess.run([str(BIN / "prefect"), *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    pool = yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    prefect("work-pool", "create", pool, "--type", "process")
    prefect("--no-prompt", "deploy", "--all")
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", pool], tmp / "worker.log", env,
                   cwd=repo)
    try:
        yield {"repo": repo, "worker": worker, "log": tmp / "worker.log", **servers}
    finally:
        stop((worker, signal.SIGINT))


def trigger(deployed: dict[str, Any], **parameters: Any) -> Any:
    from prefect.deployments import run_deployment

    with prefect_api(deployed["api"]):
        run = run_deployment(DEPLOYMENT, parameters=parameters or None, timeout=600, poll_interval=1)
    assert run.state is not None and run.state.is_final(), (run.state, deployed["log"].read_text()[-5000:])
    return run


@pytest.fixture(scope="module")
def first_run(deployed) -> Any:
    return trigger(deployed)


@pytest.fixture(scope="module")
def stages(deployed) -> list[str]:
    return stage_graph(deployed["repo"])[0]


def test_deployment_has_the_schedule_and_the_concurrency_limit_of_prefect_yaml(deployed):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    with prefect_api(deployed["api"]) as client:
        dep = client.read_deployment_by_name(DEPLOYMENT)
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == \
        [(s["cron"], s["timezone"], s["active"]) for s in spec["schedules"]]
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                               {"directory": str(deployed["repo"])}}]
    # one run at a time (README, concurrent runs): the server holds a limit of 1 for it
    assert spec["concurrency_limit"] == 1
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1


def test_worker_runs_every_stage_once(deployed, first_run, stages):
    assert first_run.state.is_completed(), deployed["log"].read_text()[-5000:]
    with prefect_api(deployed["api"]) as client:
        runs = task_runs(client, first_run.id)
        summary = summary_of(client, first_run.id)
    assert sorted(t.name for t in runs) == sorted([*stages, "dvc push"])
    assert all(t.state.is_completed() for t in runs)
    assert summary["rows"] == {s: "ran" for s in stages}, summary["markdown"]
    assert "dvc push: True" in summary["markdown"]


def test_two_clean_runs_give_the_same_outputs(deployed, first_run, smoke_run):
    """The worker's run and the plain `dvc repro` of the session fixture: two clean runs, the
    same output hashes in dvc.lock and the same metrics (bar timings: tests/smoke.py)."""
    assert first_run.state.is_completed()
    assert_same_results(deployed["repo"], smoke_run["repo"])


def pipeline_run_of(deployed: dict[str, Any], flow_run: Any) -> Any:
    """The MLflow pipeline run that the flow run opened (tagged with the flow run's id)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(deployed["mlflow"])
    exps = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(exps, f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    return client, run


def test_every_stage_that_logs_has_its_run_under_the_flows_pipeline_run(deployed, first_run, stages):
    """Each of pretrain, every finetune item, curves, sequential, wise_ft and forgetting: its own stage
    run, FINISHED, under this flow run's pipeline run, linked from the flow's summary."""
    client, parent = pipeline_run_of(deployed, first_run)
    assert parent.info.status == "FINISHED" and parent.data.tags["ptf.level"] == "pipeline"
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`ptf.pipeline` = '{parent.info.run_id}'", max_results=1000)
    by_stage = {}
    for r in runs:
        if r.data.tags.get("ptf.level") == "stage":
            assert r.data.tags["dvc.stage"] not in by_stage, r.data.tags["dvc.stage"]
            by_stage[r.data.tags["dvc.stage"]] = r
    logging = [s for s in stages if s.split("@")[0] in ("pretrain", "finetune", "curves", "sequential",
                                                        "sweep", "wise_ft", "forgetting")]
    assert {"pretrain", "curves", "sequential", "forgetting"} <= set(logging)
    assert any(s.startswith("finetune@") for s in logging)
    assert sorted(by_stage) == sorted(logging)
    for stage, r in by_stage.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags["dvc.status"] == "ran", stage
    for stage in ("curves", *[s for s in logging if s.startswith("finetune@")]):
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_stage[stage].info.run_id]
        assert kids and all(k.data.tags["ptf.level"] == "configuration" for k in kids), stage
    with prefect_api(deployed["api"]) as pc:
        markdown = summary_of(pc, first_run.id)["markdown"]
    for stage, r in by_stage.items():
        assert f"/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}" in markdown, stage


def test_invalid_param_for_the_last_stage_fails_the_next_run(deployed, first_run, stages, tmp_path):
    """The next run, on a copy with a bad param for the last stage: every stage before it is up to
    date (one task run each; in MLflow, a run pointing to the first run's), the last fails with
    its error and nothing earlier changes."""
    repo = tmp_path / "repo"
    shutil.copytree(deployed["repo"], repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    last = next(s for s in reversed(stages) if s.split("@")[0] in params)
    params[last.split("@")[0]]["no_such_key"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]

    run = trigger(deployed, repo=str(repo), push=False)
    assert run.state.is_failed()
    with prefect_api(deployed["api"]) as client:
        logs = wait_logs(client, run.id, "no_such_key")
        rows = summary_of(client, run.id)["rows"]
        names = sorted(t.name for t in task_runs(client, run.id))
    assert "no_such_key" in logs and "error:" in logs, logs[-3000:]
    group = [s for s in stages if s.split("@")[0] == last.split("@")[0]]
    assert all(rows[s] == "failed" for s in group), rows
    assert all(rows[s] == "up to date" for s in stages if s not in group), rows
    assert names == sorted(stages)
    earlier = stage_graph(repo)[1][last]
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {s: lock_after[s] for s in earlier} == {s: lock_before[s] for s in earlier}
    status = subprocess.run([str(BIN / "dvc"), "status", *sorted(earlier)], cwd=repo,
                            env=pipeline_env(repo), capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr
    mlflow, parent = pipeline_run_of(deployed, run)
    _, first = pipeline_run_of(deployed, first_run)
    assert parent.info.status == "FAILED"
    runs = mlflow.search_runs([parent.info.experiment_id], f"tags.`ptf.pipeline` = '{parent.info.run_id}' "
                              "and tags.`ptf.level` = 'stage'", max_results=1000)
    pointers = {r.data.tags["dvc.stage"]: r for r in runs if "ptf.produced_by" in r.data.tags}
    assert "pretrain" in pointers and all(r.data.tags["dvc.status"] == "up to date" for r in pointers.values())
    assert {r.data.tags["ptf.produced_by.pipeline"] for r in pointers.values()} == {first.info.run_id}
