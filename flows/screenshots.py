"""Screenshots of the MLflow dashboard and of `dvc plots show`, each checked through the page's DOM.

In:  an MLflow UI (e.g. `make dashboard`) with a completed pipeline run (flows/mlflow_record.py),
     or the `index.html` that `dvc plots show --html-template .dvc/plots/offline.html` wrote.
Out: `mlflow_pages(...)` -> {"landing": png, "runs": png} after checking that the experiment opens
     on its training runs and that the runs table of one pipeline execution lists every given run
     name with the metric columns; `plots_page(...)` -> the number of plots that rendered (each
     DVC plot div rendered its SVG with marks; none failed), with networking off.

    python -m flows.screenshots --ui http://127.0.0.1:5000 --out docs/screenshots   # latest run
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from flows import mlflow_view as view
from flows.browser import Browser

TIDY_JS = """(() => {
  for (const id of ['mlflow.assistant.chat_panel.close', 'mlflow.experiment_page.shared_view.dismiss'])
    document.querySelector(`[data-component-id="${id}"]`)?.click();
  return true;
})()"""
PLOTS_JS = """(ids => ids.map(id => document.getElementById(id)).map((d, i) => ({
  id: ids[i], rendered: d?.getAttribute('data-rendered') === 'true', error: d?.getAttribute('data-error'),
  marks: d ? d.querySelectorAll("svg g.role-mark > *").length : 0})))"""
DVC_PLOT = re.compile(r"vegaEmbed\('#([^']+)', spec\);")


def _js(text: str) -> str:
    return json.dumps(text)


def mlflow_pages(ui: str, experiment_id: str, share_key: str, names: list[str], columns: list[str],
                 out: Path) -> dict[str, Path]:
    """Screenshots of the landing page and of one execution's runs table, after checking them."""
    shots = {}
    with Browser() as b:
        b.open(view.landing_url(ui, experiment_id))
        b.wait(f"location.hash.includes('/experiments/{experiment_id}/runs') && "
               f"document.body.innerText.includes({_js(names[0])})",
               "the experiment to open on its training runs")
        b.eval(TIDY_JS)
        b.expand_runs()
        shots["landing"] = b.screenshot(out / "mlflow-landing.png")
        b.open(view.runs_url(ui, experiment_id, share_key))
        b.wait(f"document.body.innerText.includes({_js(names[0])})", "the pipeline run")
        b.eval(TIDY_JS)
        b.expand_runs()
        missing = f"{_js(names)}.filter(n => !document.body.innerText.includes(n))"
        b.wait(f"{missing}.length === 0", f"every run name ({', '.join(names)})")
        absent = b.eval(f"{_js(columns)}.filter(c => !document.body.innerText.includes(c))")
        if absent:
            raise AssertionError(f"the runs table lacks the columns {absent}")
        shots["runs"] = b.screenshot(out / "mlflow-runs.png")
    return shots


def plots_page(index: Path, out: Path | None = None) -> int:
    """Open `dvc plots show`'s page with no network; every plot must render. Returns how many."""
    ids = DVC_PLOT.findall(index.read_text())
    if not ids:
        raise AssertionError(f"{index}: no DVC plot in the page")
    state = f"({PLOTS_JS})({_js(ids)})"
    with Browser(width=1400, height=1150) as b:
        b.open(index.resolve().as_uri())
        b.wait(f"{state}.every(p => p.rendered || p.error)", f"the plots {ids} to render or fail")
        plots = b.eval(state)
        if out is not None:
            b.screenshot(out)
    bad = [p for p in plots if p["error"] or not p["rendered"] or p["marks"] == 0]
    if bad:
        raise AssertionError(f"plots that did not render: {bad}")
    return len(plots)


def main(argv: list[str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    ap = argparse.ArgumentParser(prog="python -m flows.screenshots", description=__doc__.split("\n")[0])
    ap.add_argument("--ui", default="http://127.0.0.1:5000")
    ap.add_argument("--experiment", default="pretrain-finetune-forgetting")
    ap.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = ap.parse_args(argv)
    client = MlflowClient(args.ui)
    exp = client.get_experiment_by_name(args.experiment)
    pipeline = view.latest_pipeline(client, exp.experiment_id) if exp else None
    if pipeline is None:
        raise SystemExit(f"error: no pipeline run in {args.experiment!r} at {args.ui}")
    runs = client.search_runs([exp.experiment_id], f"tags.`ptf.pipeline` = '{pipeline.info.run_id}'",
                              max_results=5000)
    names = [pipeline.info.run_name] + sorted({r.info.run_name for r in runs} - {pipeline.info.run_name})
    columns = [c.split("`")[1] for c in view.columns_of(runs) if c.startswith("metrics.")]
    key = view.share_key(pipeline.info.run_id)
    for name, path in mlflow_pages(args.ui, exp.experiment_id, key, names, columns, args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
