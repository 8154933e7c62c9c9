"""The Prefect flow that runs the DVC pipeline: one Prefect task run per DVC stage.

In:  a DVC repository (default: the one containing the working directory; the deployments in
     `prefect.yaml` set it with a `set_working_directory` pull step), its `dvc.yaml`,
     `params.yaml` and `dvc.lock`.
Out: the stages' outputs, exactly as `dvc repro` would leave them (`dvc.lock` and DVC's cache stay
     the truth), `dvc push` to the default remote when one is configured, one MLflow pipeline run
     for this flow run (flows/mlflow_record.py: opened before the first stage, so a tracking store
     that cannot take it stops the flow before any compute; every stage's runs nest under it
     through `PTF_PIPELINE_RUN_ID`; completed at the end with the stages DVC did not run, the
     summary and the verdicts), and a summary (returned, logged and saved as the Prefect artifact
     `pipeline-summary`) of which stages ran, which were up to date and which failed, with links
     to the stages' MLflow runs and to this execution's runs table.

Run it:
    python -m flows.pipeline                    # once, now, on this checkout
    prefect deploy --all && prefect worker start --pool pipeline   # nightly (see prefect.yaml)
    python -m flows.deploy                      # or: serve the same schedule from one process

The DAG is never declared here. The stage list and its order come from DVC itself
(`Repo.index.graph`, the graph `dvc repro` and `dvc dag` use); `foreach`/`matrix` stages expand
to one task per item (`finetune@movies-lora`, ...). Each task runs `dvc repro --single-item
<stage>`, so DVC alone decides whether the stage is stale, and the stage's output is streamed
line by line into the Prefect run logger. Tasks use `NO_CACHE` and no result persistence: Prefect
keeps no second cache. Whether a stage ran, was up to date, or was restored from DVC's run cache is
read from DVC's own messages. A failed stage fails its task and the flow run; stages that do not
depend on it still run, those downstream of it are reported as not run. The outputs of every
other stage stay in place, and `dvc.lock` keeps the failed stage's last good entry (DVC clears a
stage's outputs before running its command, so its previous outputs wait in DVC's cache:
`dvc checkout <stage>` brings them back).

Parallelism. Stages run one at a time: `dvc repro` locks the repository, so two stages of one
checkout cannot run together. At scale the parallelism is across checkouts, not inside one:
  * DVC's experiment queue: `dvc exp run --queue -S '~finetune.runs.source-lora'` (one per variant),
    then `dvc queue start -j N` runs N experiments side by side, each in its own temporary
    workspace, sharing the cache;
  * or several Prefect workers on several machines (one work pool), each with its own clone of
    the repo and the same DVC remote: each flow run reproduces its own target (the `targets`
    parameter, e.g. one fine-tuning task), fetches what is already built (`pull=True`, i.e.
    `dvc repro --pull`) and pushes what it built (`dvc push` at the end of this flow), so no
    machine rebuilds another's outputs.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import mlflow_record as record
from flows import mlflow_view as view
from ptf.training.tracking import tracking_uri
from ptf.training.tracking_tree import PIPELINE_ENV, pipelines_enabled

# The tag every stage's MLflow run carries (ptf/training/tracking.py): the stage's name. `dvc repro`
# gives each stage command its full name in the variable DVC_STAGE (e.g. finetune@movies-lora).
STAGE_TAG = "dvc.stage"
# Stages that fetch from the network: retried (a flow parameter sets how often).
RETRIED_STAGES = ("download",)
# How many of a stage's last output lines a failure message quotes.
TAIL_LINES = 30

RAN, RESTORED, UP_TO_DATE, FAILED, NOT_RUN = "ran", "restored", "up to date", "failed", "not run"


# ----------------------------------------------------------------------------- the DAG, from DVC
def find_root(repo: str | os.PathLike[str] | None = None) -> Path:
    """The root of the DVC repository at `repo` (default: the working directory)."""
    from dvc.repo import Repo

    return Path(Repo.find_root(str(repo) if repo else None)).resolve()


def stage_graph(root: Path) -> tuple[list[str], dict[str, set[str]]]:
    """DVC's pipeline stages in the order `dvc repro` may run them, and each one's upstream stages.

    Ties in the topological order are broken by the order of declaration in `dvc.yaml`, so the
    order is stable from run to run. Data stages (`.dvc` files) are not pipeline stages and are
    left out.
    """
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    # a stage's name (`addressing`) is relative to the working directory: read it from the root
    with contextlib.chdir(root), Repo(str(root)) as repo:
        declared = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        position = {s: i for i, s in enumerate(declared)}
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        upstream = {
            s.addressing: {u.addressing for u in nx.descendants(graph, s) if u in position}
            for s in declared
        }
        runnable_first = graph.subgraph(declared).reverse(copy=True)
        order = [
            s.addressing
            for s in nx.lexicographical_topological_sort(runnable_first, key=position.__getitem__)
        ]
    return order, upstream


def select(order: list[str], upstream: dict[str, set[str]], targets: list[str] | None) -> list[str]:
    """The stages to run for `targets` (stage names, or a foreach/matrix group name such as
    `finetune`) and everything upstream of them, in DAG order. No targets: all stages."""
    if not targets:
        return order
    wanted: set[str] = set()
    for t in targets:
        hits = [s for s in order if s == t or s.split("@", 1)[0] == t]
        if not hits:
            raise ValueError(f"unknown stage {t!r}; stages of dvc.yaml: {', '.join(order)}")
        for s in hits:
            wanted |= {s} | upstream[s]
    return [s for s in order if s in wanted]


# ------------------------------------------------------------------------------ running a stage
def dvc_command(*args: str) -> list[str]:
    """`dvc ARGS` with the DVC of this interpreter's environment."""
    return [sys.executable, "-m", "dvc", *args]


def stage_env() -> dict[str, str]:
    """The environment of a stage: this one, with this interpreter's bin first on PATH (so the
    `python` and `accelerate` of the stages' commands are the venv's), and progress bars that
    report every 30 s instead of every 0.1 s (each report becomes a log line)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.setdefault("TQDM_MININTERVAL", "30")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def classify(stage: str, lines: list[str]) -> str:
    """What `dvc repro --single-item <stage>` did, from DVC's own messages."""
    text = "\n".join(lines)
    q = re.escape(stage)
    if re.search(rf"Running stage '{q}'", text):
        return RAN
    if re.search(rf"Stage '{q}' is cached - skipping run", text):
        return RESTORED
    return UP_TO_DATE


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message quotes the end of its output."""


def stream(cmd: list[str], cwd: Path, logger: Any,
           extra_env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, sending each line of its merged stdout/stderr to `logger` as it comes."""
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=cwd, env={**stage_env(), **(extra_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, bufsize=1, errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            lines.append(line)
            if line.startswith(("error:", "ERROR:", "Traceback")):
                logger.error(line)
            else:
                logger.info(line)
    return proc.returncode, lines


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{stage}", log_prints=True)
def repro_stage(stage: str, root: str, pull: bool = False, pipeline_run: str | None = None) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: DVC runs it only if it is stale (with `pull`, it first
    tries to fetch missing outputs of an unchanged stage from the remote instead). Its MLflow
    runs nest under the pipeline run `pipeline_run`."""
    logger = get_run_logger()
    started = time.time()
    args = ["repro", "--single-item", *(["--pull"] if pull else []), stage]
    rc, lines = stream(dvc_command(*args), Path(root), logger,
                       {PIPELINE_ENV: pipeline_run} if pipeline_run else None)
    ended = time.time()
    seconds = round(ended - started, 1)
    if rc != 0:
        tail = "\n".join(lines[-TAIL_LINES:])
        raise StageFailed(f"DVC stage {stage!r} failed (exit status {rc}) after {seconds} s:\n{tail}")
    status = classify(stage, lines)
    logger.info("stage %s: %s (%.1f s)", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": seconds, "started": started,
            "ended": ended}


def has_remote(root: Path) -> bool:
    """Whether DVC has a default remote (`core.remote`) to push to."""
    out = subprocess.run(
        dvc_command("config", "core.remote"), cwd=root, env=stage_env(),
        capture_output=True, text=True,
    )
    return out.returncode == 0 and bool(out.stdout.strip())


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="dvc push",
      retries=2, retry_delay_seconds=30)
def dvc_push(root: str) -> None:
    """`dvc push`: every output named in `dvc.lock` to the default remote."""
    rc, lines = stream(dvc_command("push"), Path(root), get_run_logger())
    if rc != 0:
        raise StageFailed("dvc push failed:\n" + "\n".join(lines[-TAIL_LINES:]))


# ------------------------------------------------------------------------------ MLflow links
def ui_url(uri: str) -> str | None:
    """The MLflow UI to link to: `MLFLOW_UI_URL`, or the tracking server itself."""
    explicit = os.environ.get("MLFLOW_UI_URL")
    if explicit:
        return explicit.rstrip("/")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return None


def mlflow_links(uri: str, recorded: dict[str, Any]) -> dict[str, Any]:
    """Per stage, its run under the pipeline run (as `close_pipeline` returned them), with URLs
    into the UI when there is one; the runs table of this execution under `"_table"`."""
    ui, exp = ui_url(uri), recorded.get("experiment_id")
    links: dict[str, Any] = {
        stage: [{"run_id": run_id, "experiment_id": exp,
                 "url": view.run_url(ui, exp, run_id) if ui else ""}]
        for stage, run_id in recorded.get("stages", {}).items()}
    if ui and exp:
        links["_table"] = view.runs_url(ui, exp, recorded.get("share_key"))
    return links


# ------------------------------------------------------------------------------ the flow
def summary_markdown(summary: dict[str, Any]) -> str:
    rows = ["| stage | status | seconds | MLflow run |", "|---|---|---|---|"]
    for r in summary["stages"]:
        link = " ".join(f"[{run['run_id'][:8]}]({run['url']})" if run["url"] else run["run_id"]
                        for run in summary["mlflow_runs"].get(r["stage"], []))
        rows.append(f"| `{r['stage']}` | {r['status']} | {r.get('seconds', '')} | {link} |")
    head = (f"**{len(summary['ran'])} ran, {len(summary['up_to_date'])} up to date, "
            f"{len(summary['restored'])} restored from the run cache, {len(summary['failed'])} "
            f"failed, {len(summary['not_run'])} not run**; dvc push: {summary['pushed']}; "
            f"MLflow: {summary['tracking_uri']}, pipeline run {summary['mlflow_pipeline_run']}")
    table = summary["mlflow_runs"].get("_table")
    return head + (f" ([runs table]({table}))" if table else "") + "\n\n" + "\n".join(rows)


@flow(name="dvc-pipeline", persist_result=False, log_prints=True)
def pipeline(
    repo: str | None = None,
    targets: list[str] | None = None,
    push: bool = True,
    pull: bool = False,
    download_retries: int = 3,
    retry_delay_seconds: float = 60.0,
) -> dict[str, Any]:
    """Run the DVC pipeline of `repo` (default: the working directory), stage by stage.

    targets: stages or foreach/matrix groups to bring up to date (with their upstream); default all.
    push: `dvc push` at the end when a default DVC remote is configured.
    pull: `dvc repro --pull`: fetch outputs that another machine built and pushed, instead of
        rebuilding them (for workers with their own clones and a shared remote).
    download_retries, retry_delay_seconds: retries of the stages that fetch from the network.
    """
    logger = get_run_logger()
    root = find_root(repo)
    order, upstream = stage_graph(root)
    stages = select(order, upstream, targets)
    logger.info("DVC pipeline in %s: %d stages: %s", root, len(stages), ", ".join(stages))
    uri = tracking_uri(root)
    # the MLflow pipeline run, before any stage: a store that cannot take it stops the flow here
    from prefect.runtime import flow_run

    pipeline_run = None
    if pipelines_enabled():  # PTF_PIPELINE=off: stage runs not grouped, no summary run
        pipeline_run = record.open_pipeline(root, f"prefect {flow_run.name or 'flow run'}",
                                            {"prefect.flow_run_id": str(flow_run.id or ""),
                                             "prefect.flow_run_name": str(flow_run.name or "")},
                                            owner="prefect")
        logger.info("MLflow pipeline run %s in %s", pipeline_run, uri)

    results: list[dict[str, Any]] = []
    broken: set[str] = set()  # failed, or downstream of a failure
    for stage in stages:
        blocked = sorted(upstream[stage] & broken)
        if blocked:
            broken.add(stage)
            results.append({"stage": stage, "status": NOT_RUN, "reason": f"upstream failed: {blocked}"})
            logger.warning("stage %s not run: upstream %s failed", stage, blocked)
            continue
        runner = repro_stage
        if stage.split("@", 1)[0] in RETRIED_STAGES and download_retries:
            runner = repro_stage.with_options(retries=download_retries,
                                              retry_delay_seconds=retry_delay_seconds)
        state = runner(stage, str(root), pull, pipeline_run, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            broken.add(stage)
            results.append({"stage": stage, "status": FAILED, "error": str(state.message)})

    failed = [r["stage"] for r in results if r["status"] == FAILED]
    pushed = False
    if push and any(r["status"] in (RAN, RESTORED, UP_TO_DATE) for r in results) and has_remote(root):
        dvc_push(str(root))
        pushed = True

    links: dict[str, Any] = {}
    try:
        if pipeline_run:
            recorded = record.close_pipeline(root, pipeline_run, {r["stage"]: r["status"] for r in results},
                                             "FAILED" if failed else "FINISHED", stages)
            links = mlflow_links(uri, recorded)
    except Exception as e:  # the summary is a convenience; never fail a pipeline over it
        logger.warning("could not complete the MLflow pipeline run %s in %s: %s", pipeline_run, uri, e)
    summary = {
        "repo": str(root),
        "stages": results,
        "ran": [r["stage"] for r in results if r["status"] == RAN],
        "up_to_date": [r["stage"] for r in results if r["status"] == UP_TO_DATE],
        "restored": [r["stage"] for r in results if r["status"] == RESTORED],
        "failed": failed,
        "not_run": [r["stage"] for r in results if r["status"] == NOT_RUN],
        "pushed": pushed,
        "tracking_uri": uri,
        "mlflow_pipeline_run": pipeline_run,
        "mlflow_runs": links,
    }
    text = summary_markdown(summary)
    logger.info("summary\n%s", text)
    create_markdown_artifact(text, key="pipeline-summary", description="DVC stages of this run")
    if failed:
        raise StageFailed(f"DVC stage(s) failed: {', '.join(failed)}; not run: "
                          f"{', '.join(summary['not_run']) or 'none'}")
    return summary


if __name__ == "__main__":
    pipeline()
