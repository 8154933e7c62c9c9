"""One MLflow pipeline run per pipeline execution: opened before it, completed after it.

In:  a DVC repository (its `params.yaml`, `dvc.lock`, the stages and outputs DVC's own index
     lists: no second copy of the DAG), its tracking store (`MLFLOW_TRACKING_URI`, else
     `<repo>/mlflow.db`), and the stage runs that `ptf.training.tracking` nested under the
     pipeline run while the stages ran (`PTF_PIPELINE_RUN_ID` in their environment).
Out: `open_pipeline` -> the pipeline run's id: a run named and tagged for what ran it (git
     commit, sha256 of dvc.lock and params.yaml, the Prefect flow run id), created before any
     stage, so a store that refuses it stops the pipeline before compute.
     `close_pipeline` completes it:
       - every DVC stage that logs to MLflow appears under it: a stage that ran has its run; a
         stage restored from DVC's run cache or up to date gets a run that points to the run
         that produced its outputs (`ptf.produced_by`; found by the outputs' hash `dvc.outs`
         that this step tags on every stage run it sees run, else the stage's latest run), with
         that run's tags and numbers; one whose outputs no run of this tracking store produced
         (a fresh store: data from `dvc pull`, or a new clone where DVC skips every stage) gets
         a stage run of its own, named and tagged from params.yaml (`finetune source/full [up to
         date; no producing run in this tracking store]`, tag `ptf.no_producer`), with its
         metrics files' numbers. A stage logs to MLflow when its deps list
         ptf/training/tracking.py (tests/test_dag.py keeps deps complete); the others (download,
         tokenize, baselines, representation, ...) get no run;
       - each stage run gets its DVC metrics file's numbers under stable names, the fine-tune
         runs (and the LR-selected configuration runs, `ptf.selected`) the forgetting stage's
         measures of their arm and seed, the sequential run its BWT/FWT;
       - the pipeline run gets the summary: `data/metrics/forgetting_summary.md` (as its
         description and an artifact), the figures `data/plots/*.png`, forgetting.json, the
         verdicts as tags and metrics (`claim.<name>`), the counts `ptf.stages.ran`, `.reused`
         and `.no_producer`, and the view that opens its runs table;
       - it ends FINISHED or FAILED.

    python -m flows.mlflow_record repro [DVC REPRO ARGS]   # open, dvc repro, close
    python -m flows.mlflow_record close [--run-id ID]      # after a bare `dvc repro` / `dvc exp run`

A bare `dvc repro` or `dvc exp run` gets its pipeline run from its stages (keyed by the `dvc`
process, see ptf/training/tracking_tree.py); `close` (default: the latest pipeline run of this
checkout) then adds what only this step can: the stages DVC did not run and the summary.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows import mlflow_view as view
from ptf.common import paths
from ptf.common.cli import StageError
from ptf.training import tracking_store as store
from ptf.training.tracking import EXPERIMENT, check_reachable, redact, tracking_uri
from ptf.training.tracking_tree import (LEVEL_TAG, OWNER_TAG, PARENT_TAG, PIPELINE, PIPELINE_ENV,
                                        PIPELINE_TAG, STAGE, file_sha, foundation_tags, pipeline_tags,
                                        sequential_tags, stage_name)

OUTS_TAG, PRODUCER_TAG, NO_PRODUCER_TAG = "dvc.outs", "ptf.produced_by", "ptf.no_producer"
NO_PRODUCER = "no producing run in this tracking store"
TRACKING_DEP = "ptf/training/tracking.py"  # a stage that imports it logs runs (deps: tests/test_dag.py)
SUMMARY_MD = paths.METRICS / "forgetting_summary.md"
FORGETTING_JSON = paths.METRICS / "forgetting.json"
FRONTIER_JSON = paths.METRICS / "frontier.json"
NOTE_LIMIT = 7000  # MLflow keeps tag values up to 8000 characters
STATUS_LINES = {r"Running stage '(.+?)'": "ran", r"Stage '(.+?)' is cached - skipping run": "restored",
                r"Stage '(.+?)' didn't change, skipping": "up to date"}


def experiment_of(root: Path) -> str:
    """The one experiment every section of params.yaml logs to (its `experiment` keys)."""
    import yaml

    file = root / "params.yaml"
    params = (yaml.safe_load(file.read_text()) or {}) if file.is_file() else {}
    names = {v["experiment"] for v in params.values() if isinstance(v, dict) and "experiment" in v}
    if len(names) > 1:
        raise StageError(f"params.yaml names several MLflow experiments {sorted(names)}; one "
                               "pipeline run groups one experiment's runs: use one name")
    return names.pop() if names else EXPERIMENT


def client_for(root: Path) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    return MlflowClient(tracking_uri=uri), uri


def open_pipeline(root: Path, source: str, tags: dict[str, str] | None = None,
                  owner: str = "flows.mlflow_record") -> str:
    """Create the pipeline run of an execution about to start (`source`: what runs it, in its
    name; `owner`: what completes it)."""
    root = Path(root).resolve()
    client, uri = client_for(root)
    experiment = experiment_of(root)
    check_reachable(uri, experiment=experiment)  # unreachable, read-only, GenAI: fail fast
    try:
        with store.store_lock(uri):
            exp_id = store.ensure_experiment(client, experiment)
            when = time.strftime("%Y-%m-%d %H:%M")
            all_tags = {**pipeline_tags(root), **(tags or {}), OWNER_TAG: owner}
            run = client.create_run(exp_id, run_name=f"{source} · {when}", tags=all_tags)
            client.set_tag(run.info.run_id, PIPELINE_TAG, run.info.run_id)
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear error, before any stage runs
        raise store.refused(redact(uri), "open the pipeline run", e) from None
    return run.info.run_id


def outs_hash(outs: dict[str, str | None]) -> str:
    text = "\n".join(f"{p}:{h}" for p, h in sorted(outs.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dvc_outputs(root: Path) -> dict[str, dict[str, Any]]:
    """Per pipeline stage, in dvc.yaml's order: its outputs' hashes (from dvc.lock), metrics files
    and whether it logs to MLflow ("logs": its deps list ptf/training/tracking.py)."""
    import contextlib

    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with contextlib.chdir(root), Repo(str(root)) as repo:
        return {s.addressing: {"outs": {str(o.def_path): o.hash_info.value for o in s.outs},
                               "metrics": [str(o.def_path) for o in s.outs if o.metric],
                               "logs": any(str(d.def_path) == TRACKING_DEP for d in s.deps)}
                for s in repo.index.stages if isinstance(s, PipelineStage)}


def producer_of(client: Any, exp_id: str, stage: str, outs: str) -> tuple[Any, str] | None:
    """The run that produced `stage`'s current outputs: (run, how it was found), or None."""
    runs = client.search_runs([exp_id], f"tags.`dvc.stage` = '{stage}' and tags.`{LEVEL_TAG}` = "
                              f"'{STAGE}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    # pointer runs and runs of stages with no producer made no outputs: never a producer
    own = [r for r in runs if PRODUCER_TAG not in r.data.tags and NO_PRODUCER_TAG not in r.data.tags]
    for r in own:
        if r.data.tags.get(OUTS_TAG) == outs:
            return r, "outputs hash"
    return (own[0], "latest run of the stage (outputs not recorded)") if own else None


def pointer_run(client: Any, exp_id: str, pipeline: str, stage: str, producer: Any, how: str,
                status: str, outs: str) -> str:
    """A stage that did not run in this execution: a run pointing to its outputs' producer."""
    keep = {k: v for k, v in producer.data.tags.items() if not k.startswith(("mlflow.", "ptf.pipeline"))}
    tags = {**keep, PARENT_TAG: pipeline, PIPELINE_TAG: pipeline, LEVEL_TAG: STAGE, OUTS_TAG: outs,
            PRODUCER_TAG: producer.info.run_id, "ptf.produced_by.match": how, "dvc.status": status,
            "ptf.produced_by.pipeline": producer.data.tags.get(PIPELINE_TAG, "")}
    name = f"{producer.info.run_name} [{status}]"
    run = client.create_run(exp_id, run_name=name, tags={**tags, "mlflow.runName": name})
    log_numbers(client, run.info.run_id, producer.data.metrics)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def declared_tags(root: Path, dvc_stage: str) -> dict[str, str]:
    """The tags the stage's call site would pass to `start_run` (task, strategy, orders,
    objective, init), from params.yaml, for a stage that did not run; its run's name is made of
    these alone. `finetune@<key>`: its item of `finetune.runs`; `sweep@<task>-<strategy>`: its item of `sweep.runs`."""
    import yaml

    file = root / "params.yaml"
    params = (yaml.safe_load(file.read_text()) or {}) if file.is_file() else {}
    base, _, key = dvc_stage.partition("@")
    finetune = params.get("finetune") or {}   # curves and sequential are keys of it
    section = params.get(base) or finetune.get(base) or {}
    if base == "finetune":
        item = (finetune.get("runs") or {}).get(key) or {}
        tags = {k: item[k] for k in ("task", "strategy") if k in item}
    elif base == "sequential" and section.get("orders"):
        tags = sequential_tags(section["orders"], section.get("strategies") or [], section.get("seeds") or [])
    elif base == "wise_ft":
        tags = {"task": section.get("task"), "strategy": "wise_ft"}
    elif base == "sweep" and "-" in key:   # an item of sweep.runs: sweep@<task>-<strategy> (task names have no "-")
        tags = dict(zip(("task", "strategy"), key.split("-", 1)))
    elif base == "curves":
        tags = {"task": section.get("task")}
    elif base == "pretrain":
        tags = {"objective": section.get("objective"), "init": section.get("init")}
    else:
        tags = {}
    return {k: str(v) for k, v in tags.items() if v is not None}


def unproduced_run(client: Any, root: Path, exp_id: str, pipeline: str, stage: str, status: str,
                   outs: str) -> str:
    """A stage that did not run and whose outputs no run of this store produced (a fresh store):
    a stage run of its own, named like the run the stage would log, its status and the missing
    producer in the name; the caller logs its metrics files' numbers."""
    base = stage.split("@")[0]
    own = declared_tags(root, stage)
    found = foundation_tags(root) if base != "pretrain" else {}  # as tracking_tree.place tags it
    commit = client.get_run(pipeline).data.tags.get("mlflow.source.git.commit")
    name = f"{stage_name(base, stage, own)} [{status}; {NO_PRODUCER}]"
    tags = {**found, **own, "dvc.stage": stage, "stage": base, PARENT_TAG: pipeline,
            PIPELINE_TAG: pipeline, LEVEL_TAG: STAGE, OUTS_TAG: outs, "dvc.status": status,
            NO_PRODUCER_TAG: "true", "mlflow.runName": name,
            **({"mlflow.source.git.commit": commit} if commit else {})}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


DECIMALS = 6   # what the runs table shows of a number this module logs


def shown(v: float) -> float:
    """A number as the runs table should show it: rounded to `DECIMALS` places, so that a
    floating-point residue (3.7e-17 for a gain of exactly 0, which the table truncates to
    "3.70074341...") reads 0; the metrics files keep every digit."""
    return round(float(v), DECIMALS) + 0.0   # + 0.0: no "-0"


def log_numbers(client: Any, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, shown(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def attach_measures(client: Any, root: Path, stage_runs: dict[str, Any], children: list[Any]) -> dict:
    """The forgetting stage's measures onto the fine-tune and sequential runs; the verdicts."""
    result = read_json(root / FORGETTING_JSON)
    if not isinstance(result, dict):
        return {}
    m = view.forgetting_measures(result)
    for stage, run in stage_runs.items():
        t = run.data.tags
        arm = m["arms"].get((t.get("task"), t.get("strategy"))) if stage.startswith("finetune") else None
        if arm:
            log_numbers(client, run.info.run_id, arm)
            chosen = (read_json(root / paths.METRICS / "finetune" / t["task"] / f"{t['strategy']}.json")
                      or {}).get("chosen_lr")
            for c in [c for c in children if c.data.tags.get(PARENT_TAG) == run.info.run_id]:
                picked = chosen is not None and float(c.data.tags.get("lr", "nan")) == float(chosen)
                client.set_tag(c.info.run_id, "ptf.selected", str(picked).lower())
                per_seed = m["seeds"].get((t["task"], t["strategy"], c.data.tags.get("seed")))
                if picked and per_seed:
                    log_numbers(client, c.info.run_id, per_seed)
        if stage == "sequential" and m["sequential"]:
            log_numbers(client, run.info.run_id, m["sequential"])
    front = read_json(root / FRONTIER_JSON)   # claim 2 decided on the sweep's frontiers
    extra = {f"forget_less_{k}": c["verdict"] for k, c in ((front or {}).get("claims") or {}).items()
             if isinstance(c, dict) and c.get("verdict")}
    return {**m["verdicts"], **extra}


def summarise(client: Any, root: Path, pipeline: str, verdicts: dict[str, str]) -> None:
    """The results page, figures, forgetting.json and verdicts onto the pipeline run."""
    summary = root / SUMMARY_MD
    if summary.is_file():
        text = summary.read_text()
        note = text if len(text) <= NOTE_LIMIT else text[:NOTE_LIMIT] + "\n\n… (summary/forgetting_summary.md)"
        client.set_tag(pipeline, "mlflow.note.content", note)
        client.log_artifact(pipeline, str(summary), "summary")
    for p in [root / FORGETTING_JSON, *sorted((root / paths.PLOTS).glob("*.png"))]:
        if p.is_file():
            client.log_artifact(pipeline, str(p), "summary" if p.suffix == ".json" else "summary/figures")
    for k, v in verdicts.items():
        client.set_tag(pipeline, f"claim.{k}", v)
    log_numbers(client, pipeline, view.verdict_metrics(verdicts))


def close_pipeline(root: Path, pipeline: str, statuses: dict[str, str] | None = None,
                   status: str = "FINISHED", only: list[str] | None = None) -> dict[str, Any]:
    """Complete the pipeline run `pipeline` (see the module docstring). `statuses`: what the
    execution did with each stage (ran, restored, up to date, failed, not run); `only`: the
    stages it covered (default: all). Returns {"experiment_id", "stages": {stage: run id},
    "share_key"}."""
    root = Path(root).resolve()
    client, _ = client_for(root)
    parent = client.get_run(pipeline)
    exp_id = parent.info.experiment_id
    mine = client.search_runs([exp_id], f"tags.`{PIPELINE_TAG}` = '{pipeline}'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    ran = {r.data.tags.get("dvc.stage"): r for r in mine if r.data.tags.get(LEVEL_TAG) == STAGE}
    children = [r for r in mine if r.data.tags.get(LEVEL_TAG) not in (STAGE, PIPELINE)]
    stage_ids, stage_runs, unproduced = {}, {}, []
    for stage, info in dvc_outputs(root).items():
        outs, said = outs_hash(info["outs"]), (statuses or {}).get(stage)
        if (only is not None and stage not in only) or (stage not in ran and said in ("failed", "not run")):
            continue
        if stage in ran:
            run_id = ran[stage].info.run_id
            if client.get_run(run_id).info.status == "FINISHED":  # a failed run made no outputs
                client.set_tag(run_id, OUTS_TAG, outs)
            client.set_tag(run_id, "dvc.status", said or "ran")
        else:
            found = producer_of(client, exp_id, stage, outs)
            if found is None and not info["logs"]:
                continue  # a stage that logs nothing to MLflow (download, tokenize, baselines, ...)
            if found:
                run_id = pointer_run(client, exp_id, pipeline, stage, *found, said or "reused", outs)
            else:  # a fresh store: the stage still appears, with the numbers of its metrics files
                run_id = unproduced_run(client, root, exp_id, pipeline, stage, said or "reused", outs)
                unproduced.append(stage)
        for rel in info["metrics"]:
            log_numbers(client, run_id, view.stable_metrics(read_json(root / rel)))
        stage_ids[stage] = run_id
        stage_runs[stage] = client.get_run(run_id)
    verdicts = attach_measures(client, root, stage_runs, children)
    if "forgetting" in unproduced:  # as its own run would: forgetting.json has no top-level numbers
        for k, v in verdicts.items():
            client.set_tag(stage_ids["forgetting"], f"claim.{k}", v)
        log_numbers(client, stage_ids["forgetting"], view.verdict_metrics(verdicts))
    summarise(client, root, pipeline, verdicts)
    for k, v in {"dvc.lock.sha256.after": file_sha(root / "dvc.lock"),
                 "ptf.stages.ran": str(sum(1 for s in stage_ids if s in ran)),
                 "ptf.stages.reused": str(sum(1 for s in stage_ids if s not in ran)),
                 "ptf.stages.no_producer": str(len(unproduced))}.items():
        if v:
            client.set_tag(pipeline, k, v)
    key = view.share_view(client, exp_id, pipeline)
    client.log_metric(pipeline, "wall_time_s", time.time() - parent.info.start_time / 1000)
    client.set_terminated(pipeline, status)
    return {"experiment_id": exp_id, "stages": stage_ids, "share_key": key}


def statuses_from(lines: list[str]) -> dict[str, str]:
    """What `dvc repro` did with each stage, from its own messages."""
    out: dict[str, str] = {}
    for line in lines:
        for pattern, status in STATUS_LINES.items():
            m = re.search(pattern, line)
            if m:
                out[m.group(1)] = status
    return out


def latest_of(root: Path) -> str:
    """The most recent pipeline run of this checkout."""
    client, uri = client_for(root)
    exp = client.get_experiment_by_name(experiment_of(root))
    runs = client.search_runs([exp.experiment_id], f"tags.`{LEVEL_TAG}` = '{PIPELINE}' and "
                              f"tags.`ptf.root` = '{root}'", order_by=["attributes.start_time DESC"],
                              max_results=1) if exp else []
    if not runs:
        raise StageError(f"no pipeline run of {root} in {redact(uri)}")
    return runs[0].info.run_id


def repro(root: Path, args: list[str]) -> int:
    """`dvc repro ARGS` inside a pipeline run: open, run (output passed through), close."""
    run_id = open_pipeline(root, "dvc repro" + "".join(f" {a}" for a in args))
    env = {**os.environ, PIPELINE_ENV: run_id}
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=root, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
    close_pipeline(root, run_id, statuses_from(lines), "FINISHED" if proc.returncode == 0 else "FAILED")
    print(f"MLflow pipeline run {run_id}", flush=True)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.mlflow_record", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["open", "close", "repro"])
    ap.add_argument("--run-id", help="close: the pipeline run (default: PTF_PIPELINE_RUN_ID, else "
                                     "the latest pipeline run of this checkout)")
    ap.add_argument("--repo", type=Path, default=Path("."))
    args, rest = ap.parse_known_args(argv)
    root = args.repo.resolve()
    try:
        if args.action == "open":
            print(open_pipeline(root, "manual"))
        elif args.action == "close":
            run_id = args.run_id or os.environ.get(PIPELINE_ENV) or latest_of(root)
            print(json.dumps(close_pipeline(root, run_id)))
        else:
            return repro(root, rest)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
