"""Stage `forgetting`: what fine-tuning cost the pretrained model, and what it bought.

In:  data/models/pretrained/ (HF LM dir + tokenizer, stage `pretrain`);
     data/shards/validation/ + manifest.json (held-out pretraining blocks, stage `tokenize`);
     for exactly the declared arms (`finetune.runs`):
     data/models/finetuned/<task>/<strategy>/seed<k>/ and data/metrics/finetune/<task>/<strategy>.json
     (stage `finetune`); data/plots/curves.csv + data/metrics/curves.json (stage `curves`);
     data/metrics/sequential.json (stage `sequential`); data/metrics/wise_ft.json (stage
     `wise_ft`: measured on the same held-out blocks, checked). The readers: `ptf.measures.outputs`.
     Params: the `forgetting` section of params.yaml, and `finetune.runs`.
Out: data/metrics/forgetting.json       nested metrics, key-sorted (git-tracked: cache false)
     data/metrics/forgetting_summary.md  per task x strategy: gain, forgetting, trainable %, and
                                         the verdicts on the paradigm's two claims, with intervals
     data/plots/tradeoff.csv             one row per task x strategy (and per WiSE-FT alpha): delta
                                         LM loss vs task gain
     data/plots/learning_curves.csv      curves.csv averaged over seeds: task, strategy, n_labels
     data/plots/accuracy_matrix.csv      the sequential accuracy matrices (mean over seeds per
                                         strategy x order), long format
     data/plots/{tradeoff,learning_curves,accuracy_matrix}.png   the same as figures
     one MLflow run "forgetting" (ptf/training/tracking.py) with the table and the figures.
Run: python -m stages.forgetting

Measures: per fine-tuned model, the drift of the pretraining objective (`ptf.measures.drift`,
numbers from `ptf.measures.cl_metrics.drift`) and the gain (`ptf.measures.arms`); across seeds
mean and sample std; the sequential runs' ACC/BWT/FWT/forgetting, raw and majority-adjusted, and
forgetting events, per run and over seeds (`ptf.measures.sequential`).
Claims (`ptf.measures.claims`: paired bootstrap intervals over seeds and test examples or
held-out blocks, Holm-corrected within each claim; never written by hand):
1. few labels: at the smallest fraction of the curves, each of `few_label_strategies` beats
   `scratch_strategy` in test accuracy;
2. forgetting: each compared strategy has a smaller delta LM loss than `reference_strategy`
   (full fine-tuning), with its accuracy cost (accuracy minus the reference's); WiSE-FT takes
   part at its validation-chosen alpha (strategy `wise_ft`). Each claim also has a verdict per
   task (`by_task`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ptf.common import paths
from ptf.common.atomic import write_json, write_text
from ptf.common.cli import StageError, main_guard, maybe_die
from ptf.common.config import PARAMS_FILE, StrictModel, load_section
from ptf.measures import arms as am
from ptf.measures import cl_metrics as cl
from ptf.measures import outputs as out
from ptf.measures import sequential as sq
from ptf.measures.claims import claim_few_labels, claim_forget_less
from ptf.measures.drift import NO_LM_HEAD, EvalSet, lm_objective
from ptf.models.artifacts import PRETRAINED_REMEDY, check_weights
from ptf.models.backbones import backbone_dirs, per_backbone
from ptf.models.strategies import STRATEGIES
from ptf.report import plot_data as pd

METRICS_JSON = paths.METRICS / "forgetting.json"
SUMMARY_MD = paths.METRICS / "forgetting_summary.md"
TRADEOFF_CSV = paths.PLOTS / "tradeoff.csv"
CURVES_OUT_CSV = paths.PLOTS / "learning_curves.csv"
MATRIX_CSV = paths.PLOTS / "accuracy_matrix.csv"
PNGS = {name: paths.PLOTS / f"{name}.png" for name in ("tradeoff", "learning_curves", "accuracy_matrix")}


class Config(StrictModel):
    max_blocks: int = Field(ge=1, le=1_000_000)      # validation blocks evaluated (evenly spaced)
    batch_size: int = Field(ge=1, le=4096)           # blocks per forward pass
    mask_prob: float = Field(gt=0.0, lt=1.0)         # mlm only: share of tokens masked
    mask_seed: int = Field(ge=0)                     # mlm only: the one fixed masking
    worse_margin: float = Field(ge=0.0)              # nats/token a block must rise to count as worse
    reference_strategy: str                          # full fine-tuning: what the others are held to
    scratch_strategy: str                            # the no-pretraining baseline
    few_label_strategies: list[str] = Field(min_length=1)   # claim 1: pretrained arms vs scratch
    forget_less_strategies: list[str]                # claim 2; [] = every other arm but scratch
    alpha: float = Field(gt=0.0, lt=0.5)             # family-wise error rate of each claim (Holm)
    bootstrap_resamples: int = Field(ge=100, le=1_000_000)
    bootstrap_seed: int = Field(ge=0)
    tradeoff_gain: Literal["chance", "scratch"]     # y axis of the trade-off: gain over ...
    experiment: str = Field(min_length=1)            # MLflow experiment

    @field_validator("reference_strategy", "scratch_strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; expected one of {', '.join(STRATEGIES)}")
        return v

    @field_validator("few_label_strategies", "forget_less_strategies")
    @classmethod
    def _known_list(cls, v: list[str], info) -> list[str]:
        known = STRATEGIES + ((am.WISE_FT,) if info.field_name == "forget_less_strategies" else ())
        bad = [s for s in v if s not in known]
        if bad:
            raise ValueError(f"unknown strategies {bad}; expected names from {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate strategies in {v}")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> Config:
        if self.reference_strategy == self.scratch_strategy:
            raise ValueError("reference_strategy and scratch_strategy must differ")
        for s in self.few_label_strategies + self.forget_less_strategies:
            if s == self.scratch_strategy:
                raise ValueError(f"{s!r} is the scratch strategy; it cannot be compared with itself")
        if self.reference_strategy in self.forget_less_strategies:
            raise ValueError("forget_less_strategies must not contain reference_strategy")
        return self


def check_same_blocks(wise: dict[str, Any], ev) -> None:
    """wise_ft.json must be measured on this stage's held-out blocks (same indices, tokens and
    pretrained loss): else its points would sit on another axis."""
    e = wise.get("eval") or {}
    if (e.get("block_indices") != list(ev.indices) or e.get("block_counts") != [int(c) for c in ev.counts]
            or e.get("loss_pretrained") != cl.pooled_loss(ev.base_sums, ev.counts)):
        raise StageError(f"{out.WISE_FT_JSON}: measured on other held-out blocks than this stage's "
                         "(forgetting.max_blocks / mask_*, or another pretrained model); "
                         "rerun `dvc repro wise_ft`")


def mlflow_metrics(tasks: dict[str, Any], sequential: dict[str, Any]) -> dict[str, float]:
    metrics = {}
    for t, arms in tasks.items():
        for s, a in arms.items():
            for k in ("test_accuracy", "gain_over_chance", "gain_over_scratch", "delta_loss",
                      "rel_delta_pct", "share_worse"):
                v = a["mean_std"][k]["mean"]
                if v is not None:
                    metrics[f"{t}.{s}.{k}"] = v
    for level in ("groups", "strategies"):     # mean over seeds per strategy x order, per strategy
        for name, g in (sequential.get(level) or {}).items():
            for k in sq.SCALARS:
                v = g["mean_std"][k]["mean"]
                if v is not None:
                    metrics[f"sequential.{name}.{k}"] = v
    return metrics


def inputs(root: Path, matrix: out.Matrix) -> dict[str, Any]:
    """Every input but the models' weights, read and checked before any compute or MLflow run."""
    runs = out.read_finetune(root, matrix)
    out.read_models(root, runs)
    return {"runs": runs, "curves": out.read_curves(root),
            "sequential": sq.sequential_block(out.read_sequential(root)),
            "wise": out.read_wise_ft(root, matrix)}


def measure(cfg: Config, matrix: out.Matrix, root: Path, got: dict[str, Any]) -> dict[str, Any]:
    """forgetting.json's content, from the `inputs` that `run` checked. A pretrained model without an LM
    head (a released encoder) gets no LM drift: every arm's drift is null with the reason
    (`ptf.measures.drift.NO_LM_HEAD`), and claim 2 is not measured, never invented."""
    from tqdm import tqdm

    runs, curves, sequential, wise = got["runs"], got["curves"], got["sequential"], got["wise"]
    pre = root / paths.PRETRAINED
    ev = (EvalSet.build(root, pre, cfg.max_blocks, cfg.batch_size, cfg.mask_prob, cfg.mask_seed)
          if lm_objective(pre) else None)
    # one reference per pretrained backbone: a model's drift is from the backbone it started from
    ev_of = per_backbone(pre, ev.for_backbone) if ev is not None else None
    # every backbone, the first first (fine-tune seed k < N starts from backbone k)
    evs = [ev_of(k) for k in range(len(backbone_dirs(pre)))] if ev is not None else []

    sums, drifts = {}, {}
    if ev is not None:
        jobs = [(t, s, seed) for t in sorted(runs) for s in sorted(runs[t]) if s != cfg.scratch_strategy
                for seed in sorted(runs[t][s]["seeds"])]
        for job in tqdm(jobs, desc="forgetting: held-out LM loss", unit="model"):
            e = ev_of(job[2])
            sums[job] = e.measure(out.model_dir(root, *job))
            drifts[job] = cl.drift(e.base_sums, sums[job], e.counts, cfg.worse_margin)
    no_drift = None if ev is not None else NO_LM_HEAD
    tasks = am.task_table(runs, drifts, cfg.scratch_strategy, no_drift)
    base_of, counts = ((lambda k: ev_of(k).base_sums), ev.counts) if ev is not None else (None, None)
    samples = am.on_backbones(am.claim_samples(runs, sums, base_of, counts), len(evs))
    wise_points = []
    if wise is not None:
        if ev is not None:
            check_same_blocks(wise, ev)
        t = wise["task"]
        arm, wise_samples, wise_points = am.wise_ft_arm(
            wise, base_of, counts, cfg.worse_margin, am.scratch_mean(runs[t], cfg.scratch_strategy))
        samples[(t, am.WISE_FT)] = am.on_backbones({0: wise_samples}, len(evs))[0]
        tasks[t][am.WISE_FT] = arm
    if ev is not None:
        base_loss = cl.pooled_loss(ev.base_sums, ev.counts)
        held_out = {"applicable": True, "objective": ev.objective, "blocks": int(ev.inputs.shape[0]),
                    "block_indices": ev.indices, "tokens": int(ev.counts.sum()), "loss_pretrained": base_loss,
                    "ppl_pretrained": math.exp(base_loss), "mask_seed": cfg.mask_seed,
                    "mask_prob": cfg.mask_prob if ev.objective == "mlm" else None,
                    "lm_head": "pretrained output layer (untied copy) on the fine-tuned backbone",
                    "backbones": [{"dir": str(e.pretrained.relative_to(root)), "loss_pretrained":
                                   cl.pooled_loss(e.base_sums, e.counts)} for e in evs]}
    else:
        held_out = {"applicable": False, "objective": None, "note": NO_LM_HEAD}
    return {
        "eval": held_out,
        "matrix": matrix.describe(),
        "tasks": tasks,
        "wise_ft": ({"task": wise["task"], "source": wise["source"], "chosen_alpha": wise["chosen_alpha"],
                     "points": wise_points} if wise is not None else None),
        "sequential": sequential,
        "claims": {"few_labels": claim_few_labels(curves, cfg, max(1, len(evs))),
                   "forget_less": claim_forget_less(tasks, samples, cfg, not_applicable=no_drift)},
    }


def run(cfg: Config, matrix: out.Matrix, root: Path = Path(".")) -> dict[str, Any]:
    from ptf.report.forgetting_report import render_summary, write_figures
    from ptf.training.tracking import check_reachable, input_hashes, start_run, tracking_uri

    root = Path(root)
    pre = root / paths.PRETRAINED
    if not (pre / "config.json").is_file():
        raise StageError(f"{pre}: no pretrained model; run `dvc repro pretrain`")
    check_weights(pre, PRETRAINED_REMEDY)  # a truncated file: say which one, before any compute
    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    deps = {"pretrained": paths.PRETRAINED, "shards": paths.SHARDS, "finetune_metrics": out.FT_METRICS,
            "curves": out.CURVES_CSV, "curves_summary": out.CURVES_JSON, "sequential": out.SEQUENTIAL_JSON,
            "wise_ft": out.WISE_FT_JSON}
    got = inputs(root, matrix)
    # the run opens before the measuring, so that its duration is the stage's
    with start_run("forgetting", params={**cfg.model_dump(), "matrix": matrix.describe()},
                   tags=input_hashes(root, deps), root=root, experiment=cfg.experiment) as mlrun:
        result = measure(cfg, matrix, root, got)
        tasks, sequential = result["tasks"], result["sequential"]
        trade = pd.tradeoff_rows(tasks, cfg.tradeoff_gain, result["wise_ft"])
        crows = pd.curve_rows(got["curves"])
        summary = render_summary(result, cfg)

        write_json(root / METRICS_JSON, result)
        maybe_die("forgetting")  # fault-injection point (tests/test_faults.py)
        write_text(root / SUMMARY_MD, summary)
        write_text(root / TRADEOFF_CSV, pd.to_csv(trade, pd.TRADEOFF_COLUMNS))
        write_text(root / CURVES_OUT_CSV, pd.to_csv(crows, pd.CURVES_COLUMNS))
        write_text(root / MATRIX_CSV, pd.to_csv(pd.matrix_rows(sequential), pd.MATRIX_COLUMNS))
        write_figures(root, trade, crows, sequential, cfg, {k: root / v for k, v in PNGS.items()})
        print(summary)

        mlrun.log(mlflow_metrics(tasks, sequential), step=0)
        mlrun.set_tags({f"claim.{k}": c["verdict"] for k, c in result["claims"].items()})
        if mlrun.enabled:
            mlrun.client.log_table(mlrun.run_id, data={k: [r.get(k) for r in trade]
                                                       for k in pd.TRADEOFF_COLUMNS[:-1]},
                                   artifact_file="forgetting/tradeoff_table.json")
        for p in [METRICS_JSON, SUMMARY_MD, TRADEOFF_CSV, CURVES_OUT_CSV, MATRIX_CSV, *PNGS.values()]:
            if (root / p).is_file():
                mlrun.log_artifact(root / p, "forgetting")
    return result


def main() -> None:
    run(load_section("forgetting", Config), out.read_matrix(PARAMS_FILE))


if __name__ == "__main__":
    main_guard(main)
