"""The MLflow dashboard command, its links, and the flow's links into it (no server needed here).

The real MLflow server is started with `flows.dashboard.serving` by tests/test_flows.py (the smoke
pipeline logs to it over HTTP) and tests/test_dashboard.py (the run tree of one execution).
"""
from __future__ import annotations

from pathlib import Path

from flows import mlflow_view as view
from flows.dashboard import ROOT, links, server_command
from flows.pipeline import mlflow_links, ui_url


def test_dashboard_serves_the_project_store_on_localhost_only():
    cmd = server_command(ROOT)
    args = dict(zip(cmd[4::2], cmd[5::2]))
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert args == {
        "--backend-store-uri": f"sqlite:///{ROOT / 'mlflow.db'}",
        "--artifacts-destination": str(ROOT / "mlartifacts"),
        "--host": "127.0.0.1",
        "--port": "5000",
        "--workers": "1",
    }


def test_stages_keep_artifacts_where_the_dashboard_serves_them(tmp_path):
    from ptf.training.tracking_store import artifact_location
    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_ui_links(monkeypatch):
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    assert ui_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert ui_url(f"sqlite:///{Path('/x/mlflow.db')}") is None
    monkeypatch.setenv("MLFLOW_UI_URL", "http://127.0.0.1:5000/")
    assert ui_url("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"
    got = mlflow_links("sqlite:////x/mlflow.db", {"experiment_id": "3", "stages": {"pretrain": "abc"},
                                                  "share_key": "pipeline-p"})
    assert got["pretrain"] == [{"run_id": "abc", "experiment_id": "3",
                                "url": "http://127.0.0.1:5000/#/experiments/3/runs/abc"}]
    # MLflow 3.17 opens an experiment on its GenAI pages unless the workflow switch says otherwise
    assert got["_table"] == ("http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
                             "&viewStateShareKey=pipeline-p")
    assert view.landing_url("http://h:1/", "3") == "http://h:1/#/experiments/3?workflowType=machine_learning"


def test_dashboard_prints_nothing_for_an_empty_store(tmp_path):
    assert links(tmp_path, "http://127.0.0.1:5000") == []


def test_the_pinned_mlflow_ui_knows_the_kind_and_the_workflow_switch_we_use():
    """Read from the installed UI bundle: the experiment kind its selector writes for "Machine
    learning", and the URL switch that opens an experiment on its training runs."""
    import re

    import mlflow

    from ptf.training.tracking_store import GENAI_KIND, KIND_TAG, TRAINING_KIND
    bundle = "\n".join(p.read_text(errors="replace") for p in
                       (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("main.*.js"))
    kinds = dict(re.findall(r'\.([A-Z_]+)="([a-z_]+)"', bundle))
    assert kinds["CUSTOM_MODEL_DEVELOPMENT"] == TRAINING_KIND
    assert kinds["GENAI_DEVELOPMENT"] == GENAI_KIND
    assert f'"{KIND_TAG}"' in bundle
    assert 'MACHINE_LEARNING="machine_learning"' in bundle and '"workflowType"' in bundle


def test_what_dvc_repro_did_with_each_stage_and_the_one_experiment(tmp_path):
    import pytest

    from flows.mlflow_record import experiment_of, statuses_from
    from ptf.common.cli import StageError
    assert experiment_of(tmp_path) == "pretrain-finetune-forgetting"  # no params.yaml: the default
    lines = ["Running stage 'pretrain':", "Stage 'finetune@movies-full' is cached - skipping run, "
             "checking out outputs", "Stage 'download' didn't change, skipping"]
    assert statuses_from(lines) == {"pretrain": "ran", "finetune@movies-full": "restored",
                                    "download": "up to date"}
    (tmp_path / "params.yaml").write_text("a: {experiment: e}\nb: {experiment: e}\nc: {x: 1}\n")
    assert experiment_of(tmp_path) == "e"
    (tmp_path / "params.yaml").write_text("a: {experiment: e}\nb: {experiment: f}\n")
    with pytest.raises(StageError, match="several MLflow experiments"):
        experiment_of(tmp_path)
