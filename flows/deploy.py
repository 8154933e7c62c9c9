"""Serve the pipeline flow on its schedule from one long-running process (no work pool needed).

In:  `prefect.yaml` (the deployment's name, parameters and cron schedule are read from there, so
     the schedule lives in one place), a Prefect API (`PREFECT_API_URL`, e.g. a local
     `prefect server start --host 127.0.0.1`).
Out: the deployment `dvc-pipeline/<name>` registered with its schedule; scheduled and triggered
     runs execute in this checkout until Ctrl-C.

    python -m flows.deploy                 # the `nightly` deployment of prefect.yaml
    python -m flows.deploy --name nightly
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def deployment_spec(name: str = "nightly", path: Path = ROOT / "prefect.yaml") -> dict[str, Any]:
    """The deployment `name` of prefect.yaml."""
    spec = yaml.safe_load(path.read_text())
    for dep in spec.get("deployments", []):
        if dep.get("name") == name:
            return dep
    raise SystemExit(f"error: no deployment named {name!r} in {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="nightly", help="a deployment of prefect.yaml")
    args = parser.parse_args(argv)
    from prefect.schedules import Cron

    from flows.pipeline import pipeline

    dep = deployment_spec(args.name)
    schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
                 for s in dep.get("schedules", [])]
    os.chdir(ROOT)  # the flow runs in this checkout
    pipeline.serve(name=dep["name"], schedules=schedules, parameters=dep.get("parameters") or {},
                   tags=dep.get("tags"), description=dep.get("description"),
                   global_limit=dep.get("concurrency_limit"), limit=1)


if __name__ == "__main__":
    main()
