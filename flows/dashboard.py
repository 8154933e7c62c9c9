"""The MLflow dashboard: the MLflow UI and tracking server on this project's tracking store.

In:  the project's store, `<repo>/mlflow.db` (SQLite; where the stages log by default) and
     `<repo>/mlartifacts/` (artifacts), both git-ignored.
Out: `mlflow server` on http://127.0.0.1:5000 (local only), one worker, until Ctrl-C.

    python -m flows.dashboard                  # http://127.0.0.1:5000
    python -m flows.dashboard --port 5001 --store /elsewhere

Stages can also log through it: `MLFLOW_TRACKING_URI=http://127.0.0.1:5000 dvc repro` (or the
flow); the pipeline flow's summary then links each stage to its run in this UI.
"""
from __future__ import annotations

import argparse
import os
import sys
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT,
                        help="folder holding mlflow.db and mlartifacts/ (default: the repo root)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    cmd = server_command(args.store, args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {args.store.resolve()}); Ctrl-C stops it",
          flush=True)
    os.execvpe(cmd[0], cmd, server_env())


if __name__ == "__main__":
    main()
