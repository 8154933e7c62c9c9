"""The MLflow dashboard command and the flow's links into it (no server needed here).

The real MLflow server is started from `flows.dashboard.server_command` by tests/test_flows.py,
where the smoke pipeline logs to it over HTTP and the flow links every stage to its run.
"""
from __future__ import annotations

from pathlib import Path

from flows.dashboard import ROOT, server_command
from flows.pipeline import tracking_uri, ui_url


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


def test_flow_reads_the_same_store_as_the_stages(monkeypatch, tmp_path):
    import ptf.training.tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == ptf.training.tracking.tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking_uri(tmp_path) == ptf.training.tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5001"


def test_ui_links(monkeypatch):
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    assert ui_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert ui_url(f"sqlite:///{Path('/x/mlflow.db')}") is None
    monkeypatch.setenv("MLFLOW_UI_URL", "http://127.0.0.1:5000/")
    assert ui_url("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"
