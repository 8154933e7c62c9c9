"""A pipeline execution on a fresh tracking store still shows every logging stage.

On a copy of the session's smoke run (tests/conftest.py) and an empty SQLite store, as in a new
clone whose data came from `dvc pull`: `python -m flows.mlflow_record repro` finds every stage up
to date and no run that produced its outputs; each stage that logs to MLflow (the stages of
tests/test_dashboard.py's LOGGING_STAGES) must still get a stage run under the pipeline run, named
and tagged as the stage's own run in the smoke store is (plus its status and the missing
producer), carrying its metrics files' numbers; the others get none. A second execution on that
store takes none of those runs for a producer.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.smoke import copy_smoke_repo, pipeline_env
from tests.test_dashboard import LOGGING_STAGES

SUFFIX = " [up to date; no producing run in this tracking store]"
SAME_TAGS = ("task", "strategy", "orders", "strategies", "seeds", "objective", "init", "foundation")


def stage_runs(client, exp_id: str, pipeline: str) -> dict:
    runs = client.search_runs([exp_id], f"tags.`ptf.pipeline` = '{pipeline}' and tags.`ptf.level` = 'stage'",
                              max_results=1000)
    by_stage = {r.data.tags["dvc.stage"]: r for r in runs}
    assert len(by_stage) == len(runs), sorted(r.data.tags["dvc.stage"] for r in runs)  # one per stage
    return by_stage


def own_runs_of(db: Path, dest: Path) -> dict:
    """The stage runs the smoke run's stages logged themselves (read from a copy of its store)."""
    from mlflow.tracking import MlflowClient

    shutil.copy2(db, dest)
    client = MlflowClient(f"sqlite:///{dest}")
    exp = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exp], "tags.`ptf.level` = 'stage' and "
                              "attributes.status = 'FINISHED'", max_results=1000)
    return {r.data.tags["dvc.stage"]: r for r in runs}


def expected_names(params: dict, stages: list[str]) -> dict[str, str]:
    """What each stage's run is called (tests/test_dashboard.py checks the same on its own runs)."""
    ft = params["finetune"]
    seq = ft["sequential"]
    names = {"pretrain": f"pretrain {params['pretrain']['objective']}", "forgetting": "forgetting",
             "curves": f"curves {ft['curves']['task']}", "wise_ft": f"wise_ft {params['wise_ft']['task']}",
             "sequential": f"sequential {'+'.join(seq['strategies'])}: "
                           + "; ".join(" → ".join(o) for o in seq["orders"])}
    names.update({f"finetune@{k}": f"finetune {v['task']}/{v['strategy']}" for k, v in ft["runs"].items()})
    names.update({f"sweep@{k}": f"sweep {v['task']}/{v['strategy']}" for k, v in params["sweep"]["runs"].items()})
    return {s: names[s] for s in stages}


@pytest.fixture(scope="module")
def fresh(smoke_run, tmp_path_factory) -> dict:
    """`python -m flows.mlflow_record repro` on a copy of the smoke run and an empty store."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import stage_graph

    base = tmp_path_factory.mktemp("fresh-store")
    repo = copy_smoke_repo(smoke_run["repo"], base / "repo")
    uri = f"sqlite:///{base / 'fresh.db'}"
    proc = subprocess.run([sys.executable, "-m", "flows.mlflow_record", "repro"], cwd=repo,
                          env=pipeline_env(repo, MLFLOW_TRACKING_URI=uri), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running stage" not in proc.stdout, proc.stdout[-3000:]   # nothing ran: all up to date
    pipeline = proc.stdout.strip().splitlines()[-1].removeprefix("MLflow pipeline run ")
    client = MlflowClient(uri)
    exp_id = client.get_run(pipeline).info.experiment_id
    src = Path(pipeline_env(smoke_run["repo"])["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    order = stage_graph(repo)[0]
    return {"repo": repo, "uri": uri, "client": client, "exp": exp_id, "pipeline": pipeline,
            "runs": stage_runs(client, exp_id, pipeline), "own": own_runs_of(src, base / "own.db"),
            "logging": [s for s in order if s.split("@")[0] in LOGGING_STAGES],
            "params": yaml.safe_load((repo / "params.yaml").read_text())}


def test_every_logging_stage_appears_under_the_pipeline_run(fresh):
    from flows.mlflow_record import dvc_outputs, outs_hash

    runs, outputs = fresh["runs"], dvc_outputs(fresh["repo"])
    assert sorted(runs) == sorted(fresh["logging"])   # and none for download, baselines, ...
    for stage, run in runs.items():
        t = run.data.tags
        assert run.info.status == "FINISHED", stage
        assert t["mlflow.parentRunId"] == fresh["pipeline"] == t["ptf.pipeline"], stage
        assert (t["ptf.level"], t["dvc.status"], t["ptf.no_producer"]) == ("stage", "up to date", "true")
        assert "ptf.produced_by" not in t, stage   # no run to point to
        assert t["stage"] == stage.split("@")[0] and t["dvc.outs"] == outs_hash(outputs[stage]["outs"]), stage
    parent = fresh["client"].get_run(fresh["pipeline"]).data.tags
    assert parent["ptf.stages.ran"] == "0" and parent["ptf.stages.no_producer"] == str(len(runs))


def test_each_run_is_named_and_tagged_as_the_stage_own_run(fresh):
    names = expected_names(fresh["params"], fresh["logging"])
    for stage, run in fresh["runs"].items():
        own = fresh["own"][stage]
        assert run.info.run_name == names[stage] + SUFFIX == own.info.run_name + SUFFIX, stage
        for key in SAME_TAGS:
            if key in own.data.tags and not (stage == "pretrain" and key == "foundation"):
                assert run.data.tags.get(key) == own.data.tags[key], (stage, key)
    for stage in (s for s in fresh["runs"] if s.startswith("finetune@")):
        item = fresh["params"]["finetune"]["runs"][stage.split("@")[1]]
        assert {k: fresh["runs"][stage].data.tags[k] for k in ("task", "strategy")} == item


def test_each_run_carries_its_metrics_files_numbers(fresh):
    from flows import mlflow_view as view
    from flows.mlflow_record import dvc_outputs, shown

    outputs = dvc_outputs(fresh["repo"])
    for stage, run in fresh["runs"].items():
        files = outputs[stage]["metrics"]
        assert files, stage
        for rel in files:
            want = {k: shown(v) for k, v in view.stable_metrics(json.loads((fresh["repo"] / rel).read_text())).items()}
            assert {k: run.data.metrics.get(k) for k in want} == want, (stage, rel)
        if stage.startswith("finetune@"):   # the forgetting stage's measures of its arm too
            assert {"test_accuracy", "gain_over_chance", "wall_time_s"} <= set(run.data.metrics), stage
        elif stage == "forgetting":   # forgetting.json nests its measures: the verdicts, as its own run
            result = json.loads((fresh["repo"] / "data/metrics/forgetting.json").read_text())
            verdicts = {k: c["verdict"] for k, c in result["claims"].items()}
            assert verdicts and {k: run.data.tags[f"claim.{k}"] for k in verdicts} == verdicts
            scores = view.verdict_metrics(verdicts)   # none for `inconclusive`
            assert {k: run.data.metrics[k] for k in scores} == scores
        else:
            assert "wall_time_s" in run.data.metrics, stage


def test_a_later_execution_takes_none_of_them_for_a_producer(fresh, monkeypatch):
    from flows.mlflow_record import close_pipeline, open_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh["uri"])
    second = open_pipeline(fresh["repo"], "manual")
    close_pipeline(fresh["repo"], second)
    runs = stage_runs(fresh["client"], fresh["exp"], second)
    assert sorted(runs) == sorted(fresh["logging"])
    for stage, run in runs.items():
        assert run.data.tags["ptf.no_producer"] == "true" and "ptf.produced_by" not in run.data.tags
        assert run.info.run_name.endswith(" [reused; no producing run in this tracking store]"), stage


def test_numbers_are_logged_as_the_runs_table_should_show_them():
    """A residue of floating point (a scratch arm's gain over its own mean, 3.7e-17) would show
    as "3.70074341..." in the runs table: logged rounded to 6 places, it reads 0."""
    from flows.mlflow_record import shown

    assert shown(3.700743415417188e-17) == 0.0 and str(shown(-1e-12)) == "0.0"
    assert shown(0.5488888888888889) == 0.548889 and shown(-0.0299999999) == -0.03
    assert shown(1760.4669543279997) == 1760.466954
