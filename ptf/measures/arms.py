"""Per-arm measures of the forgetting stage (no CLI, no I/O): what each fine-tuned model bought
and what it cost, per seed and across seeds (the sequential runs' measures:
`ptf.measures.sequential`).

In:  the fine-tune runs as `ptf.measures.outputs.read_finetune` gives them (after
     `read_models` set `n_classes`), each model's drift (`ptf.measures.cl_metrics.drift`).
     The WiSE-FT points of `read_wise_ft` (stage `wise_ft`).
Out: per task and strategy {"seeds": {seed: record}, "mean_std": {key: mean_std},
     "drift_applicable"}; the samples the claims' bootstrap resamples;
     `wise_ft_arm`: WiSE-FT at its validation-chosen alpha as one more arm of its task (strategy
     `wise_ft`, with `alpha`), its samples, and every alpha's point (mean/std over seeds).

The gain is the test accuracy over chance (1 / n_classes) and over the scratch baseline of the
same task (per seed: accuracy minus the mean scratch accuracy). `scratch` has no pretrained
backbone: its drift is not applicable (null), never invented.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ptf.common.cli import StageError
from ptf.measures import cl_metrics as cl
from ptf.measures.claims import Sample, block_sample, prediction_sample, seed_sample
from ptf.measures.stats import mean_std
from ptf.models.backbones import seed_key

DRIFT_KEYS = ("loss_pretrained", "loss_finetuned", "ppl_pretrained", "ppl_finetuned", "delta_loss",
              "rel_delta_pct", "ppl_ratio", "share_worse")
STAT_KEYS = ["test_accuracy", "macro_f1", "trainable_fraction", "gain_over_chance",
             "gain_over_scratch", "delta_loss", "rel_delta_pct", "share_worse", "loss_finetuned",
             "ppl_finetuned"]


NO_BACKBONE = "not applicable: no pretrained backbone to drift from"


def per_model_record(ft: dict[str, Any], drift: dict[str, Any] | None, scratch_mean: float | None,
                     applicable: bool, note: str = NO_BACKBONE) -> dict[str, Any]:
    """One model's row: its task metrics, its gains and (when applicable) its drift; else `note`."""
    chance = 1.0 / ft["n_classes"] if ft.get("n_classes") else None
    acc = ft["test_accuracy"]
    rec = {
        "test_accuracy": acc,
        "macro_f1": ft.get("macro_f1"),
        "trainable_fraction": ft.get("trainable_fraction"),
        "trainable_params": ft.get("trainable_params"),
        "chance": chance,
        "gain_over_chance": acc - chance if chance is not None else None,
        "gain_over_scratch": acc - scratch_mean if scratch_mean is not None else None,
        "drift_applicable": applicable,
    }
    for k in DRIFT_KEYS:
        rec[k] = drift[k] if (applicable and drift is not None) else None
    if not applicable:
        rec["drift_note"] = note
    return rec


def aggregate(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    return {"seeds": per_seed,
            "mean_std": {k: mean_std([per_seed[s].get(k) for s in seeds]) for k in STAT_KEYS},
            "drift_applicable": all(r["drift_applicable"] for r in per_seed.values())}


def scratch_mean(runs_of_task: dict[str, Any], scratch_strategy: str) -> float | None:
    scratch = runs_of_task.get(scratch_strategy)
    return (float(np.mean([r["test_accuracy"] for r in scratch["seeds"].values()]))
            if scratch else None)


def task_table(runs: dict[str, dict[str, dict[str, Any]]], drifts: dict[tuple[str, str, str], dict[str, Any]],
               scratch_strategy: str, no_drift: str | None = None) -> dict[str, dict[str, Any]]:
    """{task: {strategy: aggregate}} of every declared arm. `no_drift`: why no arm has an LM drift
    (a pretrained model without an LM head), else None."""
    tasks: dict[str, dict[str, Any]] = {}
    for t in sorted(runs):
        smean = scratch_mean(runs[t], scratch_strategy)
        tasks[t] = {}
        for s in sorted(runs[t]):
            applicable = s != scratch_strategy and no_drift is None
            note = NO_BACKBONE if s == scratch_strategy else (no_drift or NO_BACKBONE)
            per_seed = {seed: per_model_record(rec, drifts.get((t, s, seed)), smean, applicable, note)
                        for seed, rec in sorted(runs[t][s]["seeds"].items())}
            tasks[t][s] = aggregate(per_seed)
    return tasks


def accuracy_sample(arm: dict[str, Any]) -> Sample:
    """Per-example correctness when the metrics hold `test_predictions` for every seed and the
    `test_labels`; else the per-seed test accuracies (the bootstrap then resamples seeds only)."""
    seeds = arm["seeds"]
    preds = {s: r.get("test_predictions") for s, r in seeds.items()}
    if arm.get("test_labels") is not None and all(p is not None for p in preds.values()):
        return prediction_sample(preds, arm["test_labels"])
    return seed_sample({s: r["test_accuracy"] for s, r in seeds.items()},
                       note="no test_predictions in the fine-tune metrics")


def claim_samples(runs: dict[str, dict[str, dict[str, Any]]], block_sums: dict[tuple[str, str, str], np.ndarray],
                  base_of: Callable[[str], np.ndarray] | None, counts: np.ndarray | None
                  ) -> dict[tuple[str, str], dict[str, Sample | None]]:
    """{(task, strategy): {"accuracy": Sample, "delta": Sample | None (no drift)}}. `base_of(seed
    key)`: the pretrained per-block sums that seed's drift is from (`block_sample`); None: no LM
    drift was measured (`block_sums` is empty then)."""
    out: dict[tuple[str, str], dict[str, Sample | None]] = {}
    for t, arms in runs.items():
        labels = {s: arm["test_labels"] for s, arm in arms.items() if arm.get("test_labels") is not None}
        if len({tuple(v) for v in labels.values()}) > 1:
            raise StageError(f"task {t}: the fine-tune metrics of {sorted(labels)} record different "
                             "test_labels; their test predictions cannot be paired (rerun `dvc repro finetune`)")
        for s, arm in arms.items():
            sums = {seed: block_sums[(t, s, seed)] for seed in arm["seeds"] if (t, s, seed) in block_sums}
            out[(t, s)] = {"accuracy": accuracy_sample(arm),
                           "delta": block_sample(sums, base_of, counts) if sums else None}
    return out


def on_backbones(samples: dict[Any, dict[str, Sample | None]], n_backbones: int) -> dict[Any, dict[str, Sample | None]]:
    """Every sample tagged with its seeds' backbones (the bootstrap then resamples them)."""
    return {k: {m: (x.on_backbones(n_backbones) if x is not None else None) for m, x in v.items()}
            for k, v in samples.items()}


WISE_FT = "wise_ft"


def wise_ft_arm(wise: dict[str, Any], base_of: Callable[[str], np.ndarray] | None, counts: np.ndarray | None,
                worse_margin: float, smean: float | None
                ) -> tuple[dict[str, Any], dict[str, Sample | None], dict[str, dict[str, Any]]]:
    """(the arm at the validation-chosen alpha, its claim samples, every alpha's point).

    Each seed's drift is recomputed from its per-block sums against the forgetting stage's own
    pretrained sums (`base_of(seed key)`, as in `claim_samples`; `ptf.measures.cl_metrics.drift`),
    so its numbers are the other arms' measure. `base_of` None (a pretrained model without an LM
    head): accuracy only, drift null."""
    lm = base_of is not None
    note = wise.get("eval", {}).get("note") or NO_BACKBONE
    points, chosen = {}, wise["chosen_alpha"]["alpha"]
    arm = samples = None
    for key, p in wise["points"].items():
        per_seed = {}
        for r in p["seeds"]:
            ft = {"test_accuracy": r["test_accuracy"], "macro_f1": r.get("test_macro_f1"),
                  "trainable_fraction": wise.get("trainable_fraction"), "n_classes": wise["n_classes"]}
            drift = cl.drift(base_of(seed_key(r["seed"])), r["block_sums"], counts, worse_margin) if lm else None
            per_seed[seed_key(r["seed"])] = {**per_model_record(ft, drift, smean, lm, note),
                                            "val_accuracy": r["val_accuracy"]}
        agg = aggregate(per_seed)
        agg["mean_std"]["val_accuracy"] = mean_std([per_seed[s]["val_accuracy"] for s in sorted(per_seed)])
        points[key] = {"alpha": p["alpha"], "chosen": p["alpha"] == chosen, **agg}
        if p["alpha"] == chosen:
            arm = {**agg, "alpha": chosen, "alpha_rule": wise["chosen_alpha"]["rule"],
                   "source": wise["source"]}
            samples = {"accuracy": prediction_sample({seed_key(r["seed"]): r["test_predictions"] for r in p["seeds"]},
                                                     wise["test_labels"]),
                       "delta": block_sample({seed_key(r["seed"]): np.asarray(r["block_sums"]) for r in p["seeds"]},
                                             base_of, counts) if lm else None}
    if arm is None:
        raise StageError(f"wise_ft.json: chosen_alpha {chosen} is not one of its points; rerun `dvc repro wise_ft`")
    return arm, samples, points
