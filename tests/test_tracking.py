"""MLflow tracking: one run with flattened params, batched step metrics and tags; fail-fast checks."""
from __future__ import annotations


import pytest

from ptf.common.cli import StageError
from ptf.training.tracking import (check_reachable, flatten, input_hashes, start_run, tracking_uri)
from tests.smoke import free_port


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for this module (creating one costs seconds); each test its experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


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


def test_run_records_params_metrics_tags(store, tmp_path):
    from mlflow.tracking import MlflowClient
    (tmp_path / "data" / "shards").mkdir(parents=True)
    (tmp_path / "data" / "shards" / "manifest.json").write_text('{"train": {}}')
    (tmp_path / "data" / "tokenizer").mkdir()
    (tmp_path / "data" / "tokenizer" / "tokenizer.json").write_text("{}")
    tags = input_hashes(tmp_path, {"shards": "data/shards", "tokenizer": "data/tokenizer",
                                   "gone": "data/gone"})
    assert tags["input.shards"].startswith("sha256:") and tags["input.tokenizer"].startswith("md5:")
    assert tags["input.gone"] == "missing"
    uri = store
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


def test_failed_run_is_marked(store, tmp_path):
    from mlflow.tracking import MlflowClient
    uri = store
    with pytest.raises(RuntimeError):
        with start_run("s", {}, uri=uri, root=tmp_path) as run:
            run_id = run.run_id
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


# ----------------------------------------------------------------------------- the run tree
def _pipeline(uri: str, experiment: str) -> str:
    """A pipeline run as the flow opens one (flows/mlflow_record.py does the same)."""
    from mlflow.tracking import MlflowClient

    from ptf.training.tracking_store import ensure_experiment
    c = MlflowClient(uri)
    run = c.create_run(ensure_experiment(c, experiment), run_name="pipeline",
                       tags={"ptf.level": "pipeline"})
    c.set_tag(run.info.run_id, "ptf.pipeline", run.info.run_id)
    return run.info.run_id


def test_names_nesting_and_stable_metrics(store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    uri = store
    parent = _pipeline(uri, "tree")
    monkeypatch.setenv("PTF_PIPELINE_RUN_ID", parent)
    monkeypatch.setenv("DVC_STAGE", "finetune@source-full")
    ids = []
    for seed, lr in ((0, 0.0003), (0, 0.001), (1, 0.0003)):
        with start_run("finetune", {"lr": lr}, {"task": "source", "strategy": "full", "seed": str(seed),
                                                "lr": str(lr)}, root=tmp_path, uri=uri, experiment="tree") as run:
            run.log({"test_accuracy": 0.8, "trainable_fraction": 0.5}, step=3)
            ids.append(run.run_id)
    monkeypatch.setenv("DVC_STAGE", "curves")
    with start_run("curves", {}, {"task": "source", "strategy": "linear_probe", "seed": "1", "lr": "0.001",
                                  "fraction": "0.05"}, root=tmp_path, uri=uri, experiment="tree") as run:
        ids.append(run.run_id)
    monkeypatch.setenv("DVC_STAGE", "pretrain")
    with start_run("pretrain", {}, {"objective": "mlm"}, root=tmp_path, uri=uri, experiment="tree") as run:
        ids.append(run.run_id)
    c = MlflowClient(uri)
    runs = [c.get_run(i) for i in ids]
    assert [r.info.run_name for r in runs] == [
        "finetune source/full lr=3e-4 seed=0", "finetune source/full lr=1e-3 seed=0",
        "finetune source/full lr=3e-4 seed=1", "curves source/linear_probe 5% seed=1", "pretrain mlm"]
    ft_stage = {r.data.tags["mlflow.parentRunId"] for r in runs[:3]}
    assert len(ft_stage) == 1  # one stage run holds the three configuration runs
    (stage,) = [c.get_run(s) for s in ft_stage]
    assert stage.info.run_name == "finetune source/full" and stage.data.tags["ptf.level"] == "stage"
    assert stage.data.tags["mlflow.parentRunId"] == parent and stage.info.status == "FINISHED"
    curves_stage = c.get_run(runs[3].data.tags["mlflow.parentRunId"])
    assert curves_stage.info.run_name == "curves source"
    assert curves_stage.data.tags["mlflow.parentRunId"] == parent
    assert runs[4].data.tags["mlflow.parentRunId"] == parent and runs[4].data.tags["ptf.level"] == "stage"
    assert {r.data.tags["ptf.pipeline"] for r in runs} == {parent}
    assert runs[0].data.tags["configuration"] == "source/full lr=3e-4"
    assert runs[3].data.tags["configuration"] == "source/linear_probe 5%"
    assert runs[0].data.metrics["trainable_pct"] == 50.0
    assert all("wall_time_s" in r.data.metrics for r in [*runs, stage])
    exp = c.get_experiment_by_name("tree")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_foundation_tags_from_the_pretrained_model(tmp_path):
    from ptf.training.tracking_tree import foundation_tags, short_number, percent
    pre = tmp_path / "data/models/pretrained"
    pre.mkdir(parents=True)
    (pre / "config.json").write_text('{"architectures": ["BertForMaskedLM"], "model_type": "bert", '
                                     '"num_hidden_layers": 2, "hidden_size": 128}')
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  pretrain:\n    cmd: x\n    outs:\n"
                                       "    - path: data/models/pretrained\n      md5: 0123456789abcdef.dir\n")
    assert foundation_tags(tmp_path) == {"objective": "mlm", "foundation": "bert 2L d=128 mlm @01234567"}
    assert [short_number(x) for x in (0.0003, 0.01, 0.1, 2.5e-5, 1)] == ["3e-4", "0.01", "0.1", "2.5e-5", "1"]
    assert [percent(x) for x in (0.05, 0.1, 1.0, 0.01)] == ["5%", "10%", "100%", "1%"]


# ----------------------------------------------------------------------------- bad stores
def _no_runs(uri: str, experiment: str) -> bool:
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return exp is None or not c.search_runs([exp.experiment_id])


def test_genai_experiment_of_the_same_name_is_refused_before_anything_is_logged(store, tmp_path):
    from mlflow.tracking import MlflowClient
    uri = store
    MlflowClient(uri).create_experiment("shared", tags={"mlflow.experimentKind": "genai_development"})
    with pytest.raises(StageError, match="'shared'.*genai_development.*GenAI traces"):
        check_reachable(uri, experiment="shared")
    with pytest.raises(StageError, match="genai_development"):
        start_run("pretrain", {}, {}, root=tmp_path, uri=uri, experiment="shared")
    assert _no_runs(uri, "shared")
    # a kind the UI only guessed is replaced
    MlflowClient(uri).create_experiment("guessed", tags={"mlflow.experimentKind": "genai_development_inferred"})
    with start_run("pretrain", {}, {}, root=tmp_path, uri=uri, experiment="guessed"):
        pass
    assert MlflowClient(uri).get_experiment_by_name("guessed").tags["mlflow.experimentKind"] == \
        "custom_model_development"


def test_pipeline_run_that_no_longer_exists_is_refused_before_anything_is_logged(store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    uri = store
    parent = _pipeline(uri, "gone")
    MlflowClient(uri).delete_run(parent)
    monkeypatch.setenv("PTF_PIPELINE_RUN_ID", parent)
    with pytest.raises(StageError, match=f"pipeline run {parent} named by PTF_PIPELINE_RUN_ID no longer exists"):
        check_reachable(uri)
    with pytest.raises(StageError, match="no longer exists"):
        start_run("finetune", {}, {"task": "t", "strategy": "s", "seed": "0"}, root=tmp_path, uri=uri,
                  experiment="gone")
    monkeypatch.setenv("PTF_PIPELINE_RUN_ID", "0" * 32)
    with pytest.raises(StageError, match="no longer exists"):
        check_reachable(uri)
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("gone")
    assert [r.info.run_id for r in c.search_runs([exp.experiment_id], run_view_type=3)] == [parent]


@pytest.fixture
def refusing_server():
    """An HTTP server that answers /health but refuses everything else (HTTP 403), like a
    read-only proxy in front of a tracking server."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            code = 200 if self.path.rstrip("/") == "/health" else 403
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"OK" if code == 200 else b"read-only")

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_store_that_refuses_writes_is_one_clear_error(refusing_server, tmp_path):
    with pytest.raises(StageError, match="answers but refuses writes \\(HTTP 403"):
        check_reachable(refusing_server)
    with pytest.raises(StageError, match=f"{refusing_server} refused to start the run"):
        start_run("pretrain", {}, {}, root=tmp_path, uri=refusing_server, experiment="x")


def test_a_write_refused_midway_leaves_no_half_logged_tree(store, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    uri = store
    parent = _pipeline(uri, "half")
    monkeypatch.setenv("PTF_PIPELINE_RUN_ID", parent)
    real = MlflowClient.create_run
    calls = []

    def flaky(self, *args, **kwargs):  # the stage run is created, its configuration run refused
        calls.append(1)
        if len(calls) == 2:
            raise MlflowException("quota exceeded")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", flaky)
    with pytest.raises(StageError, match="refused to start the run \\(quota exceeded\\); nothing was left"):
        start_run("finetune", {}, {"task": "t", "strategy": "s", "seed": "0"}, root=tmp_path, uri=uri,
                  experiment="half")
    c = MlflowClient(uri)
    assert [r.info.run_id for r in c.search_runs([c.get_experiment_by_name("half").experiment_id])] == [parent]
    monkeypatch.setattr(MlflowClient, "create_run", real)
    with start_run("finetune", {}, {"task": "t", "strategy": "s", "seed": "0"}, root=tmp_path, uri=uri,
                   experiment="half") as run:  # a fresh stage run, not the deleted one
        pass
    assert c.get_run(c.get_run(run._place.run_id).data.tags["mlflow.parentRunId"]).info.lifecycle_stage == "active"
