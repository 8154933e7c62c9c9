"""The README's screenshots from a real pipeline run (not the smoke one): docs/screenshots/*.png.

In:  a workspace where `python -m flows.mlflow_record repro` (`make repro`) ran and completed its
     pipeline run: `<repo>/mlflow.db` and `<repo>/mlartifacts/` (the default tracking store), and
     the DVC plots of its `dvc.lock`.
Out: in `--out` (default docs/screenshots/), each checked through the page's DOM first:
       mlflow-landing.png  the experiment's landing page (it must open on its training runs);
       mlflow-runs.png     the runs table of the latest pipeline execution (its shared view:
                           filtered to it, the run tree expanded, the metric columns);
       dvc-plots.png       `dvc plots show` with the offline template, opened with no network
                           (every plot must render its marks).
     It prints the two MLflow URLs it opened (on a server that stops when it ends).

    python -m scripts.screenshots_default [--repo .] [--out docs/screenshots] [--port 5055]

Everything is the code `make screenshots` (tests/test_dashboard.py) uses on the smoke run:
`flows.dashboard.serving` serves the store on 127.0.0.1, `flows.screenshots.mlflow_pages` and
`plots_page` drive headless Chromium (flows/browser.py). The difference is what is checked by
name: the default run has too many runs for one screen (the table virtualises its rows), so the
page must show the pipeline run and its first stage runs, not every run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["test_accuracy", "gain_over_scratch", "delta_loss", "trainable_pct"]  # as the test


def main(argv: list[str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    from flows import mlflow_view as view
    from flows.dashboard import serving
    from flows.mlflow_record import experiment_of
    from flows.plots_offline import TEMPLATE
    from flows.screenshots import mlflow_pages, plots_page
    from ptf.training.tracking_tree import PIPELINE_TAG

    ap = argparse.ArgumentParser(prog="python -m scripts.screenshots_default",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="workspace holding mlflow.db (default: this one)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--port", type=int, default=5055)
    args = ap.parse_args(argv)
    repo, out = args.repo.resolve(), args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="ptf-shots-") as tmp:
        with serving(repo, args.port, Path(tmp) / "mlflow-server.log") as url:
            client = MlflowClient(url)
            exp = client.get_experiment_by_name(experiment_of(repo))
            pipeline = view.latest_pipeline(client, exp.experiment_id) if exp else None
            if pipeline is None:
                raise SystemExit(f"error: no pipeline run in {repo / 'mlflow.db'}: run `make repro` first")
            key = view.share_key(pipeline.info.run_id)
            if view.SHARE_PREFIX + key not in exp.tags:
                raise SystemExit(f"error: pipeline run {pipeline.info.run_name!r} not completed: "
                                 "run `python -m flows.mlflow_record close` first")
            runs = client.search_runs([exp.experiment_id], f"tags.`{PIPELINE_TAG}` = '{pipeline.info.run_id}'",
                                      order_by=["attributes.start_time ASC"], max_results=5000)
            stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id]
            names = [pipeline.info.run_name] + [r.info.run_name for r in stages[:2]]
            shots = mlflow_pages(url, exp.experiment_id, key, names, COLUMNS, out)
            print(f"landing: {view.landing_url(url, exp.experiment_id)} -> {shots['landing']}")
            print(f"runs ({pipeline.info.run_name}, {len(runs)} runs): "
                  f"{view.runs_url(url, exp.experiment_id, key)} -> {shots['runs']}")
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        subprocess.run(["dvc", "plots", "show", "--html-template", str(TEMPLATE), "-o", tmp + "/plots"],
                       cwd=repo, env=env, check=True, capture_output=True, text=True)
        n = plots_page(Path(tmp) / "plots" / "index.html", out / "dvc-plots.png")
        print(f"dvc plots: {n} plots rendered offline -> {out / 'dvc-plots.png'}")


if __name__ == "__main__":
    main()
