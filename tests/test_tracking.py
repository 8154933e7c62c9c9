"""MLflow tracking: one run with flattened params, batched step metrics and tags; fail-fast checks."""
from __future__ import annotations


import pytest

from ptf.common.cli import StageError
from ptf.training.tracking import (check_reachable, flatten, input_hashes, start_run, tracking_uri)
from tests.smoke import free_port


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_uri_default_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri(tmp_path) == "http://example:5000"


def test_unreachable_stores_fail_fast(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StageError, match=f"{uri} is not reachable"):
        check_reachable(uri, timeout=2)
    with pytest.raises(StageError, match="missing or not writable"):
        check_reachable(f"sqlite:///{tmp_path}/nope/mlflow.db")
    check_reachable(f"sqlite:///{tmp_path}/mlflow.db")  # creatable: fine


def test_run_records_params_metrics_tags(tmp_path):
    from mlflow.tracking import MlflowClient
    (tmp_path / "data" / "shards").mkdir(parents=True)
    (tmp_path / "data" / "shards" / "manifest.json").write_text('{"train": {}}')
    (tmp_path / "data" / "tokenizer").mkdir()
    (tmp_path / "data" / "tokenizer" / "tokenizer.json").write_text("{}")
    tags = input_hashes(tmp_path, {"shards": "data/shards", "tokenizer": "data/tokenizer",
                                   "gone": "data/gone"})
    assert tags["input.shards"].startswith("sha256:") and tags["input.tokenizer"].startswith("md5:")
    assert tags["input.gone"] == "missing"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with start_run("finetune@movies-full", {"lr": 0.1, "model": {"hidden": 8}},
                   {**tags, "task": "movies"}, root=tmp_path, uri=uri, experiment="t") as run:
        for step in range(1, 8):
            run.log({"train_loss": 1.0 / step, "lr": 0.1}, step=step)
        run_id = run.run_id
    with start_run("x", {}, enabled=False, uri=uri) as off:  # non-main process: no-op
        off.log({"a": 1.0}, step=1)
        assert off.run_id is None
    c = MlflowClient(uri)
    r = c.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params == {"lr": "0.1", "model.hidden": "8"}
    assert r.data.tags["dvc.stage"] == "finetune@movies-full" and r.data.tags["task"] == "movies"
    assert r.data.tags["input.shards"] == tags["input.shards"]
    hist = c.get_metric_history(run_id, "train_loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, 8))
    assert len(c.search_runs([c.get_experiment_by_name("t").experiment_id])) == 1


def test_failed_run_is_marked(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError):
        with start_run("s", {}, uri=uri, root=tmp_path) as run:
            run_id = run.run_id
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"
