"""Stage `wise_ft`: WiSE-FT (Wortsman et al. 2022) points of the learning-forgetting trade-off.

In:  data/models/pretrained/ (stage `pretrain`); for the arm finetune@<task>-<source> (stage
     `finetune`): data/models/finetuned/<task>/<source>/seed<k>/ and
     data/metrics/finetune/<task>/<source>.json; data/tasks/<task>/ (the same validation and test
     subsets as the fine-tune: `finetune.data`); data/shards/validation/ (the held-out blocks).
     Params: the `wise_ft` section (`Config`), `finetune.data`, and the forgetting stage's
     held-out measure (`forgetting.max_blocks`, `batch_size`, `mask_prob`, `mask_seed`,
     `worse_margin`: `EvalKeys`), so that its points sit on the same axis as every other arm's.
Out: data/metrics/wise_ft.json (git-tracked): for every alpha of `wise_ft.alphas` and every
     seed of the source arm, the validation and test accuracy (macro-F1, predictions in split
     order) of the classifier whose backbone is (1 - alpha) * pretrained + alpha * fine-tuned
     (head fine-tuned; `ptf.models.interpolation`) and its held-out LM-loss drift
     (`ptf.measures.drift`: the backbone under the pretrained LM head, per-block sums kept for
     the forgetting stage's paired bootstrap; numbers from `ptf.measures.cl_metrics.drift`);
     mean/std over seeds per alpha (`points`, keyed by the alpha as text); `chosen_alpha`: the alpha with the best mean VALIDATION
     accuracy (ties: the smaller alpha, the one that keeps more of the pretrained weights).
     One MLflow run "wise_ft".
Run: python -m stages.wise_ft

No training: alpha 1 is the fine-tuned model itself and alpha 0 the pretrained backbone under the
fine-tuned head (exactly: `torch.lerp` is exact at both ends; tests/test_wise_ft.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.common.cli import StageError, main_guard
from ptf.common.config import PARAMS_FILE, ConfigError, StrictModel, load_section, parse_section, read_params
from ptf.data.tasks import DataCfg
from ptf.measures import outputs as out
from ptf.measures.stats import mean_std
from ptf.models.backbones import per_backbone, seed_key, seed_number
from ptf.models.interpolation import check_alphas

OUTPUT = out.WISE_FT_JSON
FULL_WEIGHT = ("model",)          # artifacts WiSE-FT can mix: plain full-weight classifiers
STAT_KEYS = ("val_accuracy", "test_accuracy", "test_macro_f1", "delta_loss", "rel_delta_pct",
             "share_worse", "loss_finetuned")


class Config(StrictModel):
    task: str = Field(min_length=1)                  # data/tasks/<task>
    source: str = Field(min_length=1)                # the full-weight arm finetune@<task>-<source>
    alphas: list[float]                              # mixing coefficients in [0, 1]
    experiment: str = Field(min_length=1)            # MLflow experiment

    @field_validator("alphas", mode="before")
    @classmethod
    def _alphas(cls, v: Any) -> list[float]:
        try:
            return check_alphas(v)
        except ConfigError as e:   # the message names the key: wise_ft.alphas (pydantic adds it)
            raise ValueError(str(e).split(": ", 1)[1]) from None


class EvalKeys(StrictModel):
    """The forgetting stage's held-out measure (its keys; the others are its own)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    max_blocks: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    mask_prob: float = Field(gt=0.0, lt=1.0)
    mask_seed: int = Field(ge=0)
    worse_margin: float = Field(ge=0.0)


def choose_alpha(points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The alpha with the best mean validation accuracy (ties: the smaller alpha)."""
    best = max(points.values(), key=lambda p: (p["mean_std"]["val_accuracy"]["mean"], -p["alpha"]))
    return {"alpha": best["alpha"], "val_accuracy": best["mean_std"]["val_accuracy"]["mean"],
            "rule": "highest mean validation accuracy over seeds; ties: the smaller alpha"}


def summarise(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"<alpha>": point with its mean/std over seeds of `STAT_KEYS`} (a mapping, so that `dvc
    metrics show` lists every point)."""
    return {f"{p['alpha']:g}": {**p, "mean_std": {k: mean_std([s[k] for s in p["seeds"]]) for k in STAT_KEYS}}
            for p in points}


def _check_source(root: Path, cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """The source arm's metrics and seed directories, checked before any compute."""
    from ptf.models.artifacts import read_meta

    f = out.finetune_file(root, cfg.task, cfg.source)
    metrics = out.read_json(f, f"run `dvc repro finetune@{cfg.task}-{cfg.source}` (wise_ft.task, "
                               "wise_ft.source name an arm that finetune.runs must declare)")
    seeds = [seed_key(r["seed"]) for r in metrics.get("seeds") or [] if isinstance(r, dict)]
    if not seeds:
        raise StageError(f"{f}: no per-seed records under `seeds`")
    for seed in seeds:
        mdir = out.model_dir(root, cfg.task, cfg.source, seed)
        if not (mdir / out.META_FILE).is_file():
            raise StageError(f"{mdir}: missing; run `dvc repro finetune@{cfg.task}-{cfg.source}`")
        art = read_meta(mdir)["artifact"]
        if art not in FULL_WEIGHT:
            raise ConfigError(f"wise_ft.source: got {cfg.source!r}, whose models are saved as "
                              f"{art!r}; WiSE-FT mixes full-weight classifiers (full, lower_lr, "
                              "l2sp, replay, ewc, freeze_bottom, gradual_unfreeze)")
    return metrics, seeds


def run(cfg: Config, ev_cfg: EvalKeys, data_cfg: DataCfg, root: Path = Path(".")) -> dict[str, Any]:
    from ptf.models.artifacts import PRETRAINED_REMEDY, check_weights
    from ptf.training.tracking import check_reachable, input_hashes, start_run, tracking_uri

    root = Path(root)
    pre = root / paths.PRETRAINED
    if not (pre / "config.json").is_file():
        raise StageError(f"{pre}: no pretrained model; run `dvc repro pretrain`")
    check_weights(pre, PRETRAINED_REMEDY)
    metrics, seeds = _check_source(root, cfg)
    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    deps = {"pretrained": paths.PRETRAINED, "shards": paths.SHARDS,
            "source_metrics": out.finetune_file(Path("."), cfg.task, cfg.source)}
    # the run opens before the measuring, so that its duration is the stage's (it was ~0 s)
    with start_run("wise_ft", params={**cfg.model_dump(), **ev_cfg.model_dump()},
                   tags={"task": cfg.task, "strategy": "wise_ft", **input_hashes(root, deps)},
                   root=root, experiment=cfg.experiment) as mlrun:
        result = measure(cfg, ev_cfg, data_cfg, root, metrics, seeds)
        write_json(root / OUTPUT, result)
        for p in result["points"].values():
            mlrun.log({f"alpha_{p['alpha']:g}.{k}": p["mean_std"][k]["mean"] for k in STAT_KEYS
                       if p["mean_std"][k]["mean"] is not None}, step=0)
        mlrun.log({"chosen_alpha": result["chosen_alpha"]["alpha"]}, step=0)
        mlrun.log_artifact(root / OUTPUT, "wise_ft")
    return result


def measure(cfg: Config, ev_cfg: EvalKeys, data_cfg: DataCfg, root: Path, metrics: dict[str, Any],
            seeds: list[str]) -> dict[str, Any]:
    """wise_ft.json's content: every alpha x seed mixed, scored on validation and test, and its
    held-out LM drift (null, with the reason, for a pretrained model without an LM head)."""
    import torch
    from transformers import AutoTokenizer

    from ptf.data.tasks import load_task
    from ptf.measures import cl_metrics as cl
    from ptf.measures.drift import NO_LM_HEAD, EvalSet, block_nll, lm_objective
    from ptf.models.artifacts import load_classifier, predict_ids
    from ptf.models.interpolation import backbone, pretrained_backbone_state, wise_ft_models
    from ptf.models.lm import pretrained_lm
    from ptf.training.finetuning import accuracy_f1

    pre = root / paths.PRETRAINED
    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = load_task(root, cfg.task, AutoTokenizer.from_pretrained(pre), data_cfg)
    for split, key in ((data.validation, "validation_labels"), (data.test, "test_labels")):
        if metrics.get(key) is not None and list(split.labels) != metrics[key]:
            raise StageError(f"{out.finetune_file(root, cfg.task, cfg.source)}: its {key} differ from "
                             f"data/tasks/{cfg.task} under finetune.data; rerun `dvc repro "
                             f"finetune@{cfg.task}-{cfg.source}`")
    # a foundation without an LM head: accuracy per alpha only, the drift null (never a random head)
    ev = (EvalSet.build(root, pre, ev_cfg.max_blocks, ev_cfg.batch_size, ev_cfg.mask_prob, ev_cfg.mask_seed)
          if lm_objective(pre) else None)

    def backbone_ref(d: Path) -> tuple:
        """(backbone `d`'s state, its LM and EvalSet; the last two None without an LM head)."""
        return (pretrained_backbone_state(d), pretrained_lm(d) if ev is not None else None,
                ev.for_backbone(d) if ev is not None else None)

    ref_of = per_backbone(pre, backbone_ref)     # made once per pretrained backbone

    per_alpha: dict[float, list[dict[str, Any]]] = {a: [] for a in cfg.alphas}
    for seed in seeds:
        ft = load_classifier(out.model_dir(root, cfg.task, cfg.source, seed))
        pre_state, lm, sev = ref_of(seed)    # the backbone this seed was fine-tuned from
        for alpha, clf in wise_ft_models(pre_state, ft, cfg.alphas):
            rec: dict[str, Any] = {"seed": seed_number(seed)}
            for name, split in (("val", data.validation), ("test", data.test)):
                pred = predict_ids(clf, split.ids, 64)
                acc, f1 = accuracy_f1(pred, split.labels, data.n_classes)
                rec.update({f"{name}_accuracy": acc, f"{name}_macro_f1": f1, f"{name}_predictions": pred})
            if ev is None:
                rec.update({k: None for k in ("loss_finetuned", "delta_loss", "rel_delta_pct", "share_worse",
                                              "block_sums")})
                per_alpha[alpha].append(rec)
                continue
            target = backbone(lm)
            missing, unexpected = target.load_state_dict(backbone(clf).state_dict(), strict=False)
            unexpected = [k for k in unexpected if not k.startswith("pooler.")]
            if missing or unexpected:
                raise StageError(f"{cfg.task}/{cfg.source} {seed}: the backbone does not match the "
                                 f"pretrained LM (missing {missing[:5]}, unexpected {unexpected[:5]})")
            sums, _ = block_nll(lm, sev.inputs, sev.labels, sev.objective, sev.batch_size)
            d = cl.drift(sev.base_sums, sums, sev.counts, ev_cfg.worse_margin)
            rec.update({k: d[k] for k in ("loss_finetuned", "delta_loss", "rel_delta_pct", "share_worse")})
            rec["block_sums"] = [float(x) for x in sums]
            per_alpha[alpha].append(rec)
            print(f"wise_ft {cfg.task}/{cfg.source} {seed} alpha={alpha:g}: val {rec['val_accuracy']:.4f} "
                  f"test {rec['test_accuracy']:.4f} Δ LM loss {rec['delta_loss']:+.4f}")
    held_out = ({"applicable": True, "objective": ev.objective, "blocks": int(ev.inputs.shape[0]),
                 "block_indices": ev.indices, "tokens": int(ev.counts.sum()),
                 "loss_pretrained": cl.pooled_loss(ev.base_sums, ev.counts),
                 "block_counts": [int(c) for c in ev.counts]} if ev is not None
                else {"applicable": False, "objective": None, "note": NO_LM_HEAD})
    points = summarise([{"alpha": a, "seeds": per_alpha[a]} for a in cfg.alphas])
    result = {
        "task": cfg.task, "source": cfg.source, "alphas": cfg.alphas,
        "label_names": data.label_names, "n_classes": data.n_classes,
        "validation_labels": list(data.validation.labels), "test_labels": list(data.test.labels),
        "trainable_fraction": metrics.get("trainable_fraction"),
        "eval": held_out,
        "points": points, "chosen_alpha": choose_alpha(points),
        "wall_time_s": time.perf_counter() - t0,
    }
    return result


def load(path: Path = PARAMS_FILE) -> tuple[Config, EvalKeys, DataCfg]:
    """Its section, the forgetting stage's measure keys and `finetune.data` (all that it reads)."""
    params = read_params(path)
    for sec in ("wise_ft", "forgetting", "finetune"):
        if not isinstance(params.get(sec), dict):
            raise ConfigError(f"invalid params: {sec}: missing section in {path}")
    data = params["finetune"].get("data")
    return (load_section("wise_ft", Config, path), parse_section("forgetting", params["forgetting"], EvalKeys),
            parse_section("finetune.data", data if isinstance(data, dict) else {"data": data}, DataCfg))


def main() -> None:
    r = run(*load())
    c = r["chosen_alpha"]
    print(f"wise_ft {r['task']}/{r['source']}: alpha chosen on validation {c['alpha']:g} "
          f"(val accuracy {c['val_accuracy']:.4f}); {r['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main_guard(main)
