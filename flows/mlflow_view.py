"""What a reviewer sees of one pipeline execution in MLflow: its numbers under stable names, and
the link that opens its runs table (no CLI).

In:  the stages' DVC metrics files (paths from DVC's own index), `data/metrics/forgetting.json`,
     the runs of one pipeline execution (`ptf.pipeline` tag), an `MlflowClient`.
Out:
  - `stable_metrics(obj)`: the numbers of a metrics file a runs table can show as columns: every
    top-level number under its own key, every `{mean, std}` as `key` and `key_std`
    (`test_accuracy`, `test_accuracy_std`, `wall_time_s`, ...), `trainable_pct` beside
    `trainable_fraction`;
  - `forgetting_measures(result)`: from forgetting.json, per (task, strategy) the arm's means
    (`gain_over_scratch`, `gain_over_chance`, `delta_loss`, `share_worse`, ...), per seed its own
    values, the sequential runs' CL measures per strategy x order and per strategy pooled over
    orders, mean over seeds (`full.bwt`, `full/source-movies.fwt`, `replay.acc_adj`, ...), and
    per claim its verdict (tag) and score (1 reproduced, 0.5 partly, 0 not reproduced);
  - `share_view(client, experiment_id, pipeline_id, columns)`: MLflow's own shared view state (the
    experiment tag `mlflow.sharedViewState.<key>`, plain JSON, which the UI reads for
    `?viewStateShareKey=<key>`): the runs table filtered to the runs of one pipeline execution,
    every level expanded, with the given metric and tag columns;
  - `runs_url(ui, experiment_id, key)` / `landing_url(ui, experiment_id)`: the links, with
    `workflowType=machine_learning` (MLflow 3.17 opens an experiment on its GenAI pages unless
    the workflow switch says otherwise; the experiment tag `mlflow.experimentKind` alone does not
    decide it in this version).
"""
from __future__ import annotations

import json
from typing import Any

from ptf.training.tracking_tree import LEVEL_TAG, PIPELINE_TAG

# the columns of the runs table, in this order, where a run of the execution has them (the
# sequential run's: full fine-tuning's measures pooled over orders, mean over seeds)
METRIC_COLUMNS = ("test_accuracy", "gain_over_scratch", "gain_over_majority", "gain_over_chance",
                  "delta_loss", "share_worse", "full.bwt", "full.fwt", "full.avg_forgetting", "trainable_pct",
                  "val_loss", "wall_time_s")
TAG_COLUMNS = ("task", "strategy", "seed", "configuration", "objective", "foundation", "dvc.status")
VERDICT_SCORE = {"reproduced": 1.0, "partly reproduced": 0.5, "not reproduced": 0.0}
SHARE_PREFIX = "mlflow.sharedViewState."
NAME_COLUMN = "attributes.`Run Name`"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def stable_metrics(obj: Any) -> dict[str, float]:
    """Top-level numbers and `{mean, std}` pairs of a metrics file, under stable names."""
    out: dict[str, float] = {}
    if not isinstance(obj, dict):
        return out
    for k, v in obj.items():
        if _number(v):
            out[k] = float(v)
        elif isinstance(v, dict) and _number(v.get("mean")):
            out[k] = float(v["mean"])
            if _number(v.get("std")):
                out[f"{k}_std"] = float(v["std"])
    if "trainable_fraction" in out:
        out["trainable_pct"] = 100.0 * out["trainable_fraction"]
    return out


def forgetting_measures(result: dict[str, Any]) -> dict[str, Any]:
    """{"arms": {(task, strategy): metrics}, "seeds": {(task, strategy, seed): metrics},
    "sequential": {"<strategy>[/<order>].<measure>": mean over seeds}, "verdicts": {claim: verdict}}
    from forgetting.json."""
    arms, seeds, seq = {}, {}, {}
    for task, by_strategy in (result.get("tasks") or {}).items():
        for strategy, arm in by_strategy.items():
            arms[(task, strategy)] = stable_metrics(arm.get("mean_std") or {})
            for seed, rec in (arm.get("seeds") or {}).items():  # keyed "seed0", "seed1", ...
                seeds[(task, strategy, str(seed).removeprefix("seed"))] = stable_metrics(rec)
    for level in ("groups", "strategies"):   # per strategy x order and per strategy: mean over seeds
        for name, block in ((result.get("sequential") or {}).get(level) or {}).items():
            seq.update({f"{name}.{k}": float(v["mean"]) for k, v in (block.get("mean_std") or {}).items()
                        if "." not in k and _number(v.get("mean"))})
    verdicts = {k: str(c.get("verdict")) for k, c in (result.get("claims") or {}).items()
                if isinstance(c, dict) and c.get("verdict")}
    return {"arms": arms, "seeds": seeds, "sequential": seq, "verdicts": verdicts}


def verdict_metrics(verdicts: dict[str, str]) -> dict[str, float]:
    return {f"claim.{k}": VERDICT_SCORE[v] for k, v in verdicts.items() if v in VERDICT_SCORE}


def columns_of(runs: list[Any]) -> list[str]:
    """The runs table's column ids (`metrics.\\`x\\``, `tags.\\`x\\``) that these runs fill."""
    metrics = {k for r in runs for k in r.data.metrics}
    tags = {k for r in runs for k in r.data.tags}
    return ([f"metrics.`{m}`" for m in METRIC_COLUMNS if m in metrics]
            + [f"tags.`{t}`" for t in TAG_COLUMNS if t in tags])


def share_key(pipeline_id: str) -> str:
    return f"pipeline-{pipeline_id}"


def view_state(pipeline_id: str, runs: list[Any]) -> dict[str, Any]:
    """The runs table of one pipeline execution: filtered to it, oldest first, every run with
    children expanded, the metric and tag columns its runs fill."""
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    columns = columns_of(runs)
    return {
        "searchFilter": f"tags.`{PIPELINE_TAG}` = '{pipeline_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "columnOrder": [NAME_COLUMN, *columns], "columnWidths": {NAME_COLUMN: 360},
        "runsExpanded": {r.info.run_id: True for r in runs if r.info.run_id in parents},
        "runsHiddenMode": "SHOW_ALL", "groupBy": None, "viewMaximized": False,
        "runListHidden": False,
    }


def share_view(client: Any, experiment_id: str, pipeline_id: str) -> str:
    """Store the runs table of `pipeline_id` as an MLflow shared view; returns its key."""
    runs = client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{pipeline_id}'",
                              max_results=5000)
    key = share_key(pipeline_id)
    client.set_experiment_tag(experiment_id, SHARE_PREFIX + key,
                              json.dumps(view_state(pipeline_id, runs), separators=(",", ":")))
    return key


def landing_url(ui: str, experiment_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def runs_url(ui: str, experiment_id: str, key: str | None = None) -> str:
    base = f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return base + (f"&viewStateShareKey={key}" if key else "")


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def latest_pipeline(client: Any, experiment_id: str) -> Any | None:
    """The most recent pipeline run of the experiment (None when there is none)."""
    found = client.search_runs([experiment_id], f"tags.`{LEVEL_TAG}` = 'pipeline'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None
