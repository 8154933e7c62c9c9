"""The MLflow dashboard of one pipeline execution, and `dvc plots show` with no network.

On the session's smoke run (a bare `dvc repro`, tests/conftest.py), read only: its tracking store
is copied, the copy completed with `flows.mlflow_record close` and served with `flows.dashboard`
on 127.0.0.1; through the MLflow API of that server, the run tree is checked: one pipeline run
keyed by the `dvc` process, one stage run per stage that logs, one run per configuration and seed,
names that say what a run is, the tags and metric columns, the summary on the pipeline run and the
shared view that opens its runs table. `dvc plots show` with the offline template writes a page
that loads nothing from the network.

Opt-in (they need Debian's chromium; `make screenshots` sets it): `PTF_SCREENSHOTS=<dir>` also
opens the landing page and the runs table in headless Chromium, checks through the DOM that the
experiment opens on its training runs and that the table lists every run and metric column, and
opens the plots page with networking off, checking that every plot rendered its marks; the
screenshots go to <dir> (docs/screenshots for the README). Set and no chromium: the tests fail.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from flows import mlflow_view as view
from flows.dashboard import serving
from flows.plots_offline import TEMPLATE, inlined
from ptf.common.config import read_params
from tests.smoke import free_port, pipeline_env

SHOTS = os.environ.get("PTF_SCREENSHOTS")
LOGGING_STAGES = ("pretrain", "finetune", "curves", "sequential", "sweep", "wise_ft", "forgetting")   # representation, baselines: no MLflow run


def copy_store(src_db: Path, dest: Path) -> Path:
    """The smoke run's SQLite store and artifacts, copied into `dest` with the artifact
    locations rewritten to the copy (the original is the shared run's)."""
    dest.mkdir(parents=True)
    shutil.copy2(src_db, dest / "mlflow.db")
    if (src_db.parent / "mlartifacts").is_dir():
        shutil.copytree(src_db.parent / "mlartifacts", dest / "mlartifacts")
    old, new = (src_db.parent / "mlartifacts").as_uri(), (dest / "mlartifacts").as_uri()
    with sqlite3.connect(dest / "mlflow.db") as con:
        con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return dest


@pytest.fixture(scope="module")
def dash(smoke_run, tmp_path_factory) -> Any:
    """The copied store, completed and served: {"url", "client", "experiment", "pipeline",
    "recorded", "runs", "repo"}."""
    from mlflow.tracking import MlflowClient

    from flows.mlflow_record import close_pipeline, latest_of

    repo = smoke_run["repo"]
    src = Path(pipeline_env(repo)["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    store = copy_store(src, tmp_path_factory.mktemp("dashboard") / "store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        pipeline = latest_of(repo)
        recorded = close_pipeline(repo, pipeline)
    with serving(store, free_port(), store.parent / "mlflow-server.log") as url:
        client = MlflowClient(url)
        exp = client.get_experiment(recorded["experiment_id"])
        runs = client.search_runs([exp.experiment_id], f"tags.`ptf.pipeline` = '{pipeline}'", max_results=1000)
        yield {"url": url, "client": client, "experiment": exp, "pipeline": pipeline,
               "recorded": recorded, "runs": {r.info.run_id: r for r in runs}, "repo": repo}


def children(dash: dict, parent: str) -> list[Any]:
    return [r for r in dash["runs"].values() if r.data.tags.get("mlflow.parentRunId") == parent]


def test_experiment_is_tagged_as_model_training(dash):
    assert dash["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"


def test_one_pipeline_run_for_the_dvc_repro_with_its_identity(dash):
    pipelines = [r for r in dash["runs"].values() if r.data.tags["ptf.level"] == "pipeline"]
    assert [p.info.run_id for p in pipelines] == [dash["pipeline"]]
    tags = pipelines[0].data.tags
    assert tags["ptf.pipeline.key"].startswith("dvc:") and tags["dvc.command"] == "dvc repro"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dash["repo"], capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["params.sha256"].startswith("sha256:") and tags["dvc.lock.sha256.after"].startswith("sha256:")
    assert pipelines[0].info.status == "FINISHED"
    assert pipelines[0].info.run_name.startswith("dvc repro · ")


def test_every_logging_stage_has_one_run_under_the_pipeline_run(dash):
    from flows.pipeline import stage_graph

    expected = [s for s in stage_graph(dash["repo"])[0] if s.split("@")[0] in LOGGING_STAGES]
    stages = children(dash, dash["pipeline"])
    assert sorted(r.data.tags["dvc.stage"] for r in stages) == sorted(expected)
    assert sorted(dash["recorded"]["stages"]) == sorted(expected)
    assert all(r.data.tags["ptf.level"] == "stage" and r.info.status == "FINISHED" for r in stages)
    assert all(r.data.tags["dvc.status"] == "ran" for r in stages)
    names = {r.data.tags["dvc.stage"]: r.info.run_name for r in stages}
    objective = next(r for r in stages if r.data.tags["dvc.stage"] == "pretrain").data.tags["objective"]
    assert names["pretrain"] == f"pretrain {objective}" and names["forgetting"] == "forgetting"
    assert names["curves"] == "curves movies"
    assert re.fullmatch(r"sequential \w+(\+\w+)*: \w+( → \w+)+(; \w+( → \w+)+)*", names["sequential"]), names["sequential"]
    for s in (s for s in expected if s.startswith("finetune@")):
        task, strategy = s.split("@")[1].split("-", 1)
        assert names[s] == f"finetune {task}/{strategy}"


def test_each_configuration_and_seed_is_a_named_run_under_its_stage_run(dash):
    stages = {r.data.tags["dvc.stage"]: r for r in children(dash, dash["pipeline"])}
    for stage, run in stages.items():
        kids = children(dash, run.info.run_id)
        if stage.startswith("finetune@"):
            task, strategy = stage.split("@")[1].split("-", 1)
            assert kids, stage
            for k in kids:
                t = k.data.tags
                assert (t["task"], t["strategy"], t["ptf.level"]) == (task, strategy, "configuration")
                assert k.info.run_name == f"finetune {t['configuration']} seed={t['seed']}"
                assert re.fullmatch(rf"{task}/{strategy} lr=[0-9.e-]+", t["configuration"])
                assert t["objective"] in ("mlm", "clm") and t["objective"] in t["foundation"]
            seeds = read_params(dash["repo"] / "params.yaml")["finetune"]["seeds"]
            assert sorted(k.data.tags["seed"] for k in kids if k.data.tags["ptf.selected"] == "true") == \
                sorted(map(str, seeds))            # the chosen LR's run of every seed
        elif stage.startswith("sweep@"):   # one run per configuration of the grid and seed
            task, strategy = stage.split("@")[1].split("-", 1)
            sw = read_params(dash["repo"] / "params.yaml")["sweep"]
            grid = sw["grids"][strategy]
            want = sorted((f"{lr:g}", str(n), str(seed)) for lr in grid["lrs"] for n in sw["lengths"]
                          for seed in sw["seeds"])
            got = sorted((k.data.tags["lr"], k.data.tags["steps"], k.data.tags["seed"]) for k in kids)
            assert got == want, stage
            for k in kids:
                t = k.data.tags
                assert (t["task"], t["strategy"], t["ptf.level"]) == (task, strategy, "configuration")
                assert k.info.run_name == f"sweep {t['configuration']} seed={t['seed']}"
                assert {"val_accuracy", "test_accuracy", "delta_loss"} <= set(k.data.metrics)
        elif stage == "curves":
            got = sorted(k.info.run_name for k in kids)
            assert got and all(re.fullmatch(r"curves movies/\w+ (10|100)% seed=0", n) for n in got), got
        else:
            assert not kids, stage  # one run: the stage run itself


def test_the_numbers_a_reviewer_compares_are_columns(dash):
    stages = {r.data.tags["dvc.stage"]: r for r in children(dash, dash["pipeline"])}
    for stage, run in stages.items():
        m = run.data.metrics
        assert "wall_time_s" in m, stage
        if stage.startswith("finetune@"):
            assert {"test_accuracy", "trainable_pct", "gain_over_chance"} <= set(m), (stage, sorted(m))
            if not stage.endswith("-scratch"):
                assert {"gain_over_scratch", "delta_loss", "share_worse"} <= set(m), (stage, sorted(m))
            picked = [k for k in children(dash, run.info.run_id) if k.data.tags["ptf.selected"] == "true"]
            assert picked and all({"test_accuracy", "trainable_pct", "wall_time_s", "gain_over_chance"}
                                  <= set(k.data.metrics) for k in picked)
    assert {"full.bwt", "full.fwt", "full.acc"} <= set(stages["sequential"].data.metrics)
    assert "val_loss" in stages["pretrain"].data.metrics


def test_the_pipeline_run_carries_the_summary(dash):
    client, pipeline = dash["client"], dash["pipeline"]
    run = client.get_run(pipeline)
    summary = (dash["repo"] / "data/metrics/forgetting_summary.md").read_text()
    assert run.data.tags["mlflow.note.content"][:200] == summary[:200]
    arts = {a.path for a in client.list_artifacts(pipeline, "summary")}
    figs = {a.path for a in client.list_artifacts(pipeline, "summary/figures")}
    assert {"summary/forgetting_summary.md", "summary/forgetting.json"} <= arts
    assert {f"summary/figures/{p.name}" for p in (dash["repo"] / "data/plots").glob("*.png")} == figs and figs
    claims = json.loads((dash["repo"] / "data/metrics/forgetting.json").read_text())["claims"]
    for name, claim in claims.items():
        assert run.data.tags[f"claim.{name}"] == claim["verdict"]
        if claim["verdict"] in view.VERDICT_SCORE:
            assert run.data.metrics[f"claim.{name}"] == view.VERDICT_SCORE[claim["verdict"]]


def test_the_shared_view_opens_this_execution_with_its_columns(dash):
    key = dash["recorded"]["share_key"]
    state = json.loads(dash["client"].get_experiment(dash["experiment"].experiment_id).tags[view.SHARE_PREFIX + key])
    found = dash["client"].search_runs([dash["experiment"].experiment_id], state["searchFilter"], max_results=1000)
    assert {r.info.run_id for r in found} == set(dash["runs"])
    for col in ("test_accuracy", "gain_over_scratch", "delta_loss", "trainable_pct", "wall_time_s"):
        assert f"metrics.`{col}`" in state["selectedColumns"]
    for col in ("task", "strategy", "seed", "configuration"):
        assert f"tags.`{col}`" in state["selectedColumns"]
    url = view.runs_url(dash["url"], dash["experiment"].experiment_id, key)
    assert url.endswith(f"/runs?workflowType=machine_learning&viewStateShareKey={key}")


@pytest.fixture(scope="module")
def plots(smoke_run, tmp_path_factory) -> Path:
    """`dvc plots show` of the smoke run with the offline template, written outside the repo."""
    out = tmp_path_factory.mktemp("plots")
    repo = smoke_run["repo"]
    proc = subprocess.run(["dvc", "plots", "show", "--html-template", str(TEMPLATE), "-o", str(out)],
                          cwd=repo, env=pipeline_env(repo), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / "index.html"


def test_offline_template_inlines_the_pinned_libraries():
    text = TEMPLATE.read_text()
    declared, body = inlined(text)
    assert set(declared) == {"vega", "vega-lite", "vega-embed"}
    assert {k: v[1] for k, v in declared.items()} == body
    assert "{plot_divs}" in text and "{scripts}" not in text


def test_plots_page_loads_nothing_from_the_network(plots):
    from flows.screenshots import DVC_PLOT

    html = plots.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"https?:", html)
    ids = DVC_PLOT.findall(html)
    for name in ("pretrain_loss", "tradeoff", "learning_curves", "accuracy_matrix", "curves"):
        assert any(name in i for i in ids), (name, ids)


# ----------------------------------------------------------------------------- opt-in: Chromium
needs_chromium = pytest.mark.skipif(not SHOTS, reason="screenshots are opt-in: PTF_SCREENSHOTS=<dir> "
                                    "(`make screenshots`); the API checks above always run")


@needs_chromium
def test_screenshots_of_the_landing_page_and_the_runs_table(dash):
    from flows.screenshots import mlflow_pages

    pipeline = dash["runs"][dash["pipeline"]]
    names = [pipeline.info.run_name] + sorted({r.info.run_name for r in dash["runs"].values()} - {pipeline.info.run_name})
    shots = mlflow_pages(dash["url"], dash["experiment"].experiment_id, dash["recorded"]["share_key"],
                         names, ["test_accuracy", "gain_over_scratch", "delta_loss", "trainable_pct"],
                         Path(SHOTS))
    assert all(p.stat().st_size > 0 for p in shots.values())


@needs_chromium
def test_every_dvc_plot_renders_with_no_network(plots):
    from flows.screenshots import plots_page

    assert plots_page(plots, Path(SHOTS) / "dvc-plots.png") >= 5
