"""The MLflow dashboard: the MLflow UI and tracking server on this project's tracking store.

In:  the project's store, `<repo>/mlflow.db` (SQLite; where the stages log by default) and
     `<repo>/mlartifacts/` (artifacts), both git-ignored.
Out: `mlflow server` on http://127.0.0.1:5000 (local only), one worker, until Ctrl-C; first it
     prints the two links a reviewer opens: the experiment's training runs, and the runs table of
     the latest pipeline execution (filtered to it, with the metric columns; flows/mlflow_view.py).
     `serving(store, port)`: the same server for a `with` block (tests, screenshots).

    python -m flows.dashboard                  # http://127.0.0.1:5000
    python -m flows.dashboard --port 5001 --store /elsewhere

Stages can also log through it: `MLFLOW_TRACKING_URI=http://127.0.0.1:5000 dvc repro` (or the
flow); the pipeline flow's summary then links each stage to its run in this UI.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def server_command(store: Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow server` command line for the tracking store in the folder `store`."""
    store = store.resolve()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "mlartifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """No telemetry, and no job runner: its queue consumers (GenAI evaluation jobs, unused here)
    cost seven processes and keep the server from stopping promptly."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


@contextlib.contextmanager
def serving(store: Path, port: int, log: Path, timeout: float = 120.0) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1:`port` over `store` while the block runs; yields its URL once
    it answers /health; stops the server's process group afterwards."""
    from flows.servers import start, stop, wait_healthy

    url = f"http://127.0.0.1:{port}"
    proc = start(server_command(store, port=port), log, server_env())
    try:
        wait_healthy(url + "/health", proc, log, timeout)
        yield url
    finally:
        stop((proc, signal.SIGTERM))  # the MLflow server ignores SIGINT


def links(store: Path, ui: str) -> list[str]:
    """The landing page and the latest pipeline execution's runs table, if the store has them."""
    db = store.resolve() / "mlflow.db"
    if not db.is_file():
        return []
    from mlflow.tracking import MlflowClient

    from flows import mlflow_view as view
    from flows.mlflow_record import experiment_of

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment_of(ROOT))
    if exp is None:
        return []
    out = [f"training runs:  {view.landing_url(ui, exp.experiment_id)}"]
    latest = view.latest_pipeline(client, exp.experiment_id)
    if latest is not None:
        key = view.share_key(latest.info.run_id)
        if view.SHARE_PREFIX + key in exp.tags:
            out.append(f"latest pipeline run ({latest.info.run_name}): "
                       f"{view.runs_url(ui, exp.experiment_id, key)}")
        else:
            out.append(f"latest pipeline run ({latest.info.run_name}) not completed: "
                       "`python -m flows.mlflow_record close` adds its summary and runs-table view")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT,
                        help="folder holding mlflow.db and mlartifacts/ (default: the repo root)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    cmd = server_command(args.store, args.host, args.port)
    ui = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {ui} (store {args.store.resolve()}); Ctrl-C stops it", flush=True)
    for line in links(args.store, ui):
        print(line, flush=True)
    os.execvpe(cmd[0], cmd, server_env())


if __name__ == "__main__":
    main()
