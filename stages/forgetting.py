"""Stage `forgetting`: what fine-tuning cost the pretrained model, and what it bought.

In:  data/models/pretrained/ (HF LM dir + tokenizer, stage `pretrain`);
     data/shards/validation/ + manifest.json (held-out pretraining blocks, stage `tokenize`);
     data/models/finetuned/<task>/<strategy>/seed<k>/ and data/metrics/finetune/<task>/<strategy>.json
     (stage `finetune`); data/plots/curves.csv + data/metrics/curves.json (data-efficiency
     curves, stage `curves`) and data/metrics/sequential.json (accuracy matrix of the
     sequential run, stage `sequential`).
     Params: the `forgetting` section of params.yaml.
Out: data/metrics/forgetting.json       nested metrics (below), key-sorted
     data/metrics/forgetting_summary.md  per task x strategy: gain, forgetting, trainable %, and
                                         the verdicts on the paradigm's two claims
     data/plots/tradeoff.csv             one row per task x strategy: delta LM loss vs task gain
     data/plots/learning_curves.csv      curves.csv averaged over seeds: task, strategy, n_labels
     data/plots/accuracy_matrix.csv      the sequential accuracy matrix, long format
     data/plots/{tradeoff,learning_curves,accuracy_matrix}.png   the same as figures
     one MLflow run "forgetting" (ptf/training/tracking.py) with the table and the figures.
Run: python -m stages.forgetting

Measures per fine-tuned model (task x strategy x seed):
- drift of the pretraining objective: the fine-tuned backbone under the PRETRAINED LM head
  (`ptf.models.artifacts.load_backbone_as_lm`: an untied copy of the pretrained output layer; LoRA merged;
  prompt tuning leaves the backbone as pretrained) against the pretrained LM (`pretrained_lm`,
  the same untied head), on the same `max_blocks` validation blocks (evenly spaced over the
  split, in order). clm: next-token loss at positions 1..; mlm: BERT masking (pretrain's
  `mask_tokens`) drawn ONCE from a generator seeded by `mask_seed` and used for both models
  (paired). Reported: pooled loss and perplexity of both, delta loss (> 0: forgot), relative %,
  and the share of blocks whose loss rose (by more than `worse_margin` nats/token).
  `scratch` has no pretrained backbone: drift is marked not applicable (null), never invented.
- the gain: test accuracy and macro-F1 from the fine-tune metrics, gain over chance
  (1 / n_classes, or the metrics' own `chance`) and over the scratch baseline of the same task
  (per seed: accuracy minus the mean scratch accuracy).
Across seeds: mean and sample std (ddof 1). Sequential runs: `ptf.measures.cl_metrics` (ACC, BWT,
FWT against row 0, Chaudhry forgetting; raw and chance-adjusted).

Claims (verdicts computed by `ptf.measures.cl_metrics.compare`, never written by hand):
1. few labels: at the smallest fraction of the curves, each of `few_label_strategies` beats
   `scratch_strategy` in test accuracy;
2. forgetting: each compared strategy has a smaller delta LM loss than `reference_strategy`
   (full fine-tuning), with its accuracy cost (accuracy minus the reference's).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ptf.measures import cl_metrics as cl
from ptf.measures.stats import mean_std
from ptf.common import paths
from ptf.common.atomic import write_json, write_text
from ptf.common.cli import StageError, main_guard, maybe_die
from ptf.common.config import StrictModel, load_section
from ptf.models.artifacts import PRETRAINED_REMEDY, check_weights
from ptf.models.strategies import STRATEGIES

METRICS_JSON = paths.METRICS / "forgetting.json"
SUMMARY_MD = paths.METRICS / "forgetting_summary.md"
TRADEOFF_CSV = paths.PLOTS / "tradeoff.csv"
CURVES_OUT_CSV = paths.PLOTS / "learning_curves.csv"
MATRIX_CSV = paths.PLOTS / "accuracy_matrix.csv"
PNGS = {name: paths.PLOTS / f"{name}.png" for name in ("tradeoff", "learning_curves", "accuracy_matrix")}
# inputs of the fine-tune stage
FT_METRICS = paths.METRICS / "finetune"
CURVES_CSV = paths.PLOTS / "curves.csv"
CURVES_JSON = paths.METRICS / "curves.json"
SEQUENTIAL_JSON = paths.METRICS / "sequential.json"
_SEED_DIR = re.compile(r"^seed(\d+)$")


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
    def _known_list(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategies {bad}; expected names from {', '.join(STRATEGIES)}")
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


# ---------------------------------------------------------------- pure helpers

def select_blocks(n_total: int, k: int) -> list[int]:
    """`min(k, n_total)` block indices evenly spaced over the split, increasing (deterministic)."""
    k = min(k, n_total)
    return [i * n_total // k for i in range(k)]


def seed_stats(per_seed: dict[str, dict[str, Any]], keys: list[str]) -> dict[str, dict[str, Any]]:
    """mean/std/n over seeds for each key (None values ignored)."""
    seeds = sorted(per_seed)
    return {k: mean_std([per_seed[s].get(k) for s in seeds]) for k in keys}


# ---------------------------------------------------------------- reading the fine-tune outputs

def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _seed_key(s: Any) -> str:
    s = str(s)
    m = _SEED_DIR.match(s)
    return f"seed{int(m.group(1)) if m else int(s)}"


def parse_finetune_metrics(obj: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """{"seed<k>": {test_accuracy, macro_f1, trainable_fraction, trainable_params, chance?,
    n_classes?}} from one `data/metrics/finetune/<task>/<strategy>.json`.

    Accepts per-seed records under `seeds` (a mapping seed -> record, or a list of records with
    a `seed` key); a record's test metrics may sit at its top level or under `test`.
    """
    raw = obj.get("seeds", obj.get("per_seed"))
    if isinstance(raw, list):
        try:
            raw = {r["seed"]: r for r in raw}
        except (KeyError, TypeError):
            raise StageError(f"{where}: every record of `seeds` needs a `seed` key") from None
    if not isinstance(raw, dict) or not raw:
        raise StageError(f"{where}: expected per-seed records under `seeds`")
    out = {}
    for seed, rec in raw.items():
        if not isinstance(rec, dict):
            raise StageError(f"{where}: seed {seed}: expected an object")
        flat = {**rec, **(rec.get("test") if isinstance(rec.get("test"), dict) else {})}
        acc = _num(flat.get("test_accuracy", flat.get("accuracy")))
        if acc is None:
            raise StageError(f"{where}: seed {seed}: no numeric test accuracy "
                             "(`test_accuracy` or `test.accuracy`)")
        out[_seed_key(seed)] = {
            "test_accuracy": acc,
            "macro_f1": _num(flat.get("test_macro_f1", flat.get("macro_f1"))),
            "trainable_fraction": _num(flat.get("trainable_fraction")),
            "trainable_params": _num(flat.get("trainable_params")),
            "chance": _num(flat.get("chance", obj.get("chance"))),
            "n_classes": _num(flat.get("n_classes", obj.get("n_classes"))),
        }
    return out


def discover_runs(root: Path) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{task: {strategy: {seed: record}}} from every data/metrics/finetune/<task>/<strategy>.json."""
    base = root / FT_METRICS
    files = sorted(base.glob("*/*.json"))
    if not files:
        raise StageError(f"{base}: no fine-tune metrics (<task>/<strategy>.json); run `dvc repro finetune`")
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for f in files:
        task, strategy = f.parent.name, f.stem
        if strategy not in STRATEGIES:
            continue  # another file beside the per-strategy metrics
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise StageError(f"{f}: not valid JSON ({e.msg})") from None
        runs.setdefault(task, {})[strategy] = parse_finetune_metrics(obj, str(f))
    return runs


def model_dir(root: Path, task: str, strategy: str, seed: str) -> Path:
    return root / paths.FINETUNED / task / strategy / seed


def fill_n_classes(root: Path, runs: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> None:
    """Where the metrics give neither `chance` nor `n_classes`, take the number of labels from
    the saved model's `finetune_meta.json` (`label_names`)."""
    from ptf.models.artifacts import META_FILE

    for t, arms in runs.items():
        for s, seeds in arms.items():
            for seed, rec in seeds.items():
                if rec.get("chance") is not None or rec.get("n_classes"):
                    continue
                meta = model_dir(root, t, s, seed) / META_FILE
                if meta.is_file():
                    names = json.loads(meta.read_text(encoding="utf-8")).get("label_names") or []
                    rec["n_classes"] = float(len(names)) if names else None


def read_curves(path: Path, summary: Path | None = None) -> list[dict[str, Any]]:
    """Rows of curves.csv: strategy, fraction, n_labels, seed, test_accuracy (+ task if present;
    else the `task` of the curves' JSON summary `summary`, if given)."""
    if not path.is_file():
        return []
    default_task = ""
    if summary is not None and summary.is_file():
        try:
            default_task = str(json.loads(summary.read_text(encoding="utf-8")).get("task") or "")
        except (json.JSONDecodeError, AttributeError):
            default_task = ""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"strategy", "fraction", "n_labels", "test_accuracy"}
        if not need <= set(reader.fieldnames or []):
            raise StageError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for i, r in enumerate(reader, start=2):
            try:
                rows.append({"task": r.get("task") or default_task, "strategy": r["strategy"],
                             "fraction": float(r["fraction"]), "n_labels": int(float(r["n_labels"])),
                             "seed": r.get("seed", ""), "test_accuracy": float(r["test_accuracy"])})
            except ValueError as e:
                raise StageError(f"{path}:{i}: {e}") from None
    return rows


def read_sequential(path: Path) -> list[dict[str, Any]]:
    """The sequential run(s) of `path` (see `sequential_runs`); none if the file is absent."""
    if not path.is_file():
        return []
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e.msg})") from None
    return sequential_runs(obj, path)


def sequential_runs(obj: Any, where: Path | str) -> list[dict[str, Any]]:
    """The runs of a parsed sequential.json: one object {order, strategy, matrix, chance,
    n_classes}, a list of them, or a mapping strategy -> object."""
    if isinstance(obj, dict) and "matrix" in obj:
        items = [obj]
    elif isinstance(obj, list):
        items = obj
    elif isinstance(obj, dict):
        items = [{"strategy": k, **v} for k, v in sorted(obj.items()) if isinstance(v, dict)]
    else:
        raise StageError(f"{where}: expected an object with `matrix`, a list or a mapping of them")
    for it in items:
        if "matrix" not in it:
            raise StageError(f"{where}: a sequential run without `matrix`")
    return items


# ---------------------------------------------------------------- aggregation (pure)

def chance_of(rec: dict[str, Any]) -> float | None:
    if rec.get("chance") is not None:
        return rec["chance"]
    if rec.get("n_classes"):
        return 1.0 / rec["n_classes"]
    return None


def per_model_record(ft: dict[str, Any], drift: dict[str, Any] | None, scratch_mean: float | None,
                     applicable: bool) -> dict[str, Any]:
    """One model's row: its task metrics, its gains and (when applicable) its drift."""
    chance = chance_of(ft)
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
    keys = ("loss_pretrained", "loss_finetuned", "ppl_pretrained", "ppl_finetuned", "delta_loss",
            "rel_delta_pct", "ppl_ratio", "share_worse")
    for k in keys:
        rec[k] = drift[k] if (applicable and drift is not None) else None
    if not applicable:
        rec["drift_note"] = "not applicable: no pretrained backbone to drift from"
    return rec


STAT_KEYS = ["test_accuracy", "macro_f1", "trainable_fraction", "gain_over_chance",
             "gain_over_scratch", "delta_loss", "rel_delta_pct", "share_worse", "loss_finetuned",
             "ppl_finetuned"]


def aggregate(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"seeds": per_seed, "mean_std": seed_stats(per_seed, STAT_KEYS),
            "drift_applicable": all(r["drift_applicable"] for r in per_seed.values())}


def claim_few_labels(curves: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Claim 1 on the curves: at each task's smallest fraction, pretrained arms vs scratch."""
    comps = {}
    tasks = sorted({r["task"] for r in curves})
    for task in tasks:
        rows = [r for r in curves if r["task"] == task]
        fmin = min(r["fraction"] for r in rows)
        at = [r for r in rows if r["fraction"] == fmin]
        scratch = mean_std([r["test_accuracy"] for r in at if r["strategy"] == cfg.scratch_strategy])
        n_labels = sorted({r["n_labels"] for r in at})
        for s in cfg.few_label_strategies:
            arm = mean_std([r["test_accuracy"] for r in at if r["strategy"] == s])
            if arm["n"] == 0 and scratch["n"] == 0:
                continue
            c = cl.compare(arm, scratch, expect="greater")
            comps[f"{task or 'all'}/{s}"] = {"task": task, "strategy": s, "fraction": fmin,
                                             "n_labels": n_labels, "accuracy": arm,
                                             "scratch_accuracy": scratch, **c}
    verdict = cl.overall([c["verdict"] for c in comps.values()])
    return {"claim": f"pretrained ({', '.join(cfg.few_label_strategies)}) beats "
                     f"{cfg.scratch_strategy} at the smallest label fraction",
            "rule": "difference of means against sqrt(std_a^2 + std_b^2) over seeds",
            "comparisons": comps, "verdict": verdict}


def claim_forget_less(tasks: dict[str, dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Claim 2: each compared arm's delta LM loss is below the reference's; with its accuracy cost."""
    comps = {}
    for task in sorted(tasks):
        arms = tasks[task]
        if cfg.reference_strategy not in arms:
            continue
        ref = arms[cfg.reference_strategy]["mean_std"]
        names = cfg.forget_less_strategies or [
            s for s in sorted(arms) if s not in (cfg.reference_strategy, cfg.scratch_strategy)]
        for s in names:
            if s not in arms:
                continue
            ms = arms[s]["mean_std"]
            c = cl.compare(ms["delta_loss"], ref["delta_loss"], expect="less")
            cost = cl.compare(ms["test_accuracy"], ref["test_accuracy"], expect="less")
            comps[f"{task}/{s}"] = {
                "task": task, "strategy": s, "delta_loss": ms["delta_loss"],
                "reference_delta_loss": ref["delta_loss"], **c,
                "accuracy_cost": {"diff": cost["diff"], "spread": cost["spread"],
                                  "verdict_lower_accuracy": cost["verdict"]},
            }
    verdict = cl.overall([c["verdict"] for c in comps.values()])
    return {"claim": f"parameter-efficient, frozen and replay strategies forget less than "
                     f"{cfg.reference_strategy} (smaller delta held-out LM loss)",
            "rule": "difference of means against sqrt(std_a^2 + std_b^2) over seeds",
            "comparisons": comps, "verdict": verdict}


def run_name(run: dict[str, Any], i: int) -> str:
    """A sequential run's name: its strategy, or the strategies of its tasks in order joined by
    '-' (`strategy` may be a list in task order, or a mapping task -> strategy)."""
    s = run.get("strategy")
    if isinstance(s, (dict, list)):
        if isinstance(s, list):
            names = [str(x) for x in s]
        else:
            order = run.get("order") or sorted(s)
            names = [str(s[t]) for t in order if t in s] or [str(v) for _, v in sorted(s.items())]
        uniq = list(dict.fromkeys(names))
        s = uniq[0] if len(uniq) == 1 else "-".join(names)
    name = str(s) if s else f"run{i}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def sequential_block(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for i, run in enumerate(runs):
        name = run_name(run, i)
        try:
            m = cl.sequential_measures(run["matrix"], chance=run.get("chance"),
                                       baseline=run.get("baseline"))
        except cl.MatrixError as e:
            raise StageError(f"sequential run {name!r}: {e}") from None
        out[name] = {"order": run.get("order"), "n_classes": run.get("n_classes"),
                     "chance": run.get("chance"), **m}
    return out


def tradeoff_rows(tasks: dict[str, dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """One point per task x strategy with drift: x = delta LM loss, y = gain (mean, std)."""
    rows = []
    gkey = "gain_over_chance" if cfg.tradeoff_gain == "chance" else "gain_over_scratch"
    for task in sorted(tasks):
        for s in sorted(tasks[task]):
            a = tasks[task][s]
            ms = a["mean_std"]
            if not a["drift_applicable"] or ms["delta_loss"]["mean"] is None or ms[gkey]["mean"] is None:
                continue
            rows.append({"task": task, "strategy": s,
                         "delta_loss": ms["delta_loss"]["mean"], "delta_loss_std": ms["delta_loss"]["std"],
                         "gain": ms[gkey]["mean"], "gain_std": ms[gkey]["std"],
                         "test_accuracy": ms["test_accuracy"]["mean"],
                         "trainable_pct": (100 * ms["trainable_fraction"]["mean"]
                                           if ms["trainable_fraction"]["mean"] is not None else None),
                         "seeds": ms["delta_loss"]["n"]})
    return rows


def curve_rows(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """curves.csv averaged over seeds: one row per task x strategy x fraction."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in curves:
        groups.setdefault((r["task"], r["strategy"], r["fraction"]), []).append(r)
    out = []
    for (task, s, frac), rs in sorted(groups.items()):
        ms = mean_std([r["test_accuracy"] for r in rs])
        out.append({"series": f"{task}/{s}" if task else s, "task": task, "strategy": s,
                    "fraction": frac, "n_labels": int(round(float(np.mean([r["n_labels"] for r in rs])))),
                    "test_accuracy": ms["mean"], "std": ms["std"], "seeds": ms["n"]})
    return out


def matrix_rows(sequential: dict[str, Any]) -> list[dict[str, Any]]:
    """Long format of every sequential matrix: one row per (after, task) cell."""
    rows = []
    for name in sorted(sequential):
        seq = sequential[name]
        raw = seq["raw"]["matrix"]
        adj = seq.get("chance_adjusted", {}).get("matrix")
        T = len(raw[0])
        order = seq.get("order") or [f"task{j}" for j in range(T)]
        after = ["0 before"] + [f"{i} {order[i - 1]}" for i in range(1, T + 1)]
        for i, row in enumerate(raw):
            for j, a in enumerate(row):
                rows.append({"run": name, "after": after[i], "task": f"{j} {order[j]}",
                             "accuracy": a, "accuracy_chance_adjusted": adj[i][j] if adj else None})
    return rows


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})
    return buf.getvalue()


# ---------------------------------------------------------------- the held-out LM loss

def load_eval_blocks(root: Path, max_blocks: int):
    """(LongTensor n x L of the selected validation blocks, their indices)."""
    import torch

    from ptf.data.shards import load_blocks

    mpath = root / paths.SHARDS / "manifest.json"
    if not mpath.is_file():
        raise StageError(f"{mpath}: missing; run `dvc repro tokenize`")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if "validation" not in manifest:
        raise StageError(f"{mpath}: no 'validation' entry")
    ds = load_blocks(root / paths.SHARDS / "validation", manifest["validation"])
    if len(ds) == 0:
        raise StageError(f"{mpath}: the validation split has no blocks")
    idx = select_blocks(len(ds), max_blocks)
    ids = torch.tensor(np.asarray(ds.select(idx)["input_ids"], dtype=np.int64))
    return ids, idx


def eval_targets(ids, objective: str, tokenizer, cfg: Config):
    """(inputs, labels) fixed once: clm labels = inputs (shifted in `block_nll`); mlm the
    pretraining masking rule with a generator seeded by `mask_seed`."""
    import torch

    if objective == "clm":
        labels = ids.clone()
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in (
                tokenizer.eos_token_id, tokenizer.bos_token_id):
            labels[labels == tokenizer.pad_token_id] = -100
        return ids, labels
    from ptf.models.lm import mask_tokens

    if tokenizer.mask_token_id is None:
        raise StageError("masked-LM checkpoint whose tokenizer has no mask token")
    g = torch.Generator().manual_seed(cfg.mask_seed)
    return mask_tokens(ids, tokenizer.mask_token_id, len(tokenizer),
                       sorted(set(tokenizer.all_special_ids)), cfg.mask_prob, g)


def block_nll(lm, inputs, labels, objective: str, batch_size: int):
    """Per-block summed NLL (float64) and number of predicted tokens, in block order."""
    import torch
    import torch.nn.functional as F

    sums, counts = [], []
    lm.eval()
    with torch.no_grad():
        for s in range(0, inputs.shape[0], batch_size):
            x, y = inputs[s:s + batch_size], labels[s:s + batch_size]
            logits = lm(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
            if objective == "clm":
                logits, y = logits[:, :-1], y[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                  ignore_index=-100, reduction="none").view(y.shape)
            sums.append(nll.double().sum(1))
            counts.append((y != -100).sum(1))
    return torch.cat(sums).numpy(), torch.cat(counts).numpy()


def objective_of(pretrained: Path) -> str:
    from transformers import AutoConfig

    arch = (AutoConfig.from_pretrained(pretrained).architectures or [""])[0]
    return "mlm" if arch.endswith("MaskedLM") else "clm"


# ---------------------------------------------------------------- the stage

def run(cfg: Config, root: Path = Path(".")) -> dict[str, Any]:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ptf.report.forgetting_report import render_summary, write_figures
    from ptf.models.artifacts import load_backbone_as_lm
    from ptf.models.lm import pretrained_lm
    from ptf.training.tracking import check_reachable, input_hashes, start_run, tracking_uri

    root = Path(root)
    check_reachable(tracking_uri(root))
    pre = root / paths.PRETRAINED
    if not (pre / "config.json").is_file():
        raise StageError(f"{pre}: no pretrained model; run `dvc repro pretrain`")
    runs = discover_runs(root)
    fill_n_classes(root, runs)
    curves = read_curves(root / CURVES_CSV, root / CURVES_JSON)
    seq_runs = read_sequential(root / SEQUENTIAL_JSON)

    check_weights(pre, PRETRAINED_REMEDY)  # a truncated file: say which one, before any compute
    torch.manual_seed(0)
    objective = objective_of(pre)
    tok = AutoTokenizer.from_pretrained(pre)
    ids, idx = load_eval_blocks(root, cfg.max_blocks)
    inputs, labels = eval_targets(ids, objective, tok, cfg)
    keep = ((labels[:, 1:] if objective == "clm" else labels) != -100).any(1)
    inputs, labels = inputs[keep], labels[keep]
    if inputs.shape[0] == 0:
        raise StageError("no validation block has a target token to score")
    base_sums, counts = block_nll(pretrained_lm(pre), inputs, labels, objective, cfg.batch_size)
    base_loss = cl.pooled_loss(base_sums, counts)

    jobs = [(t, s, seed) for t in sorted(runs) for s in sorted(runs[t]) for seed in sorted(runs[t][s])]
    drifts: dict[tuple[str, str, str], dict[str, Any]] = {}
    for t, s, seed in tqdm(jobs, desc="forgetting: held-out LM loss", unit="model"):
        if s == cfg.scratch_strategy:
            continue
        d = model_dir(root, t, s, seed)
        if not d.is_dir():
            raise StageError(f"{d}: fine-tuned model listed in {root / FT_METRICS / t / (s + '.json')} "
                             "is missing; run `dvc repro finetune`")
        lm = load_backbone_as_lm(d, pre)
        ft_sums, _ = block_nll(lm, inputs, labels, objective, cfg.batch_size)
        drifts[(t, s, seed)] = cl.drift(base_sums, ft_sums, counts, cfg.worse_margin)
        del lm

    tasks: dict[str, dict[str, Any]] = {}
    for t in sorted(runs):
        scratch = runs[t].get(cfg.scratch_strategy)
        scratch_mean = (float(np.mean([r["test_accuracy"] for r in scratch.values()]))
                        if scratch else None)
        tasks[t] = {}
        for s in sorted(runs[t]):
            per_seed = {seed: per_model_record(rec, drifts.get((t, s, seed)), scratch_mean,
                                               applicable=s != cfg.scratch_strategy)
                        for seed, rec in sorted(runs[t][s].items())}
            tasks[t][s] = aggregate(per_seed)

    sequential = sequential_block(seq_runs)
    result = {
        "eval": {"objective": objective, "blocks": int(inputs.shape[0]), "block_indices": idx,
                 "tokens": int(counts.sum()), "loss_pretrained": base_loss,
                 "ppl_pretrained": math.exp(base_loss), "mask_seed": cfg.mask_seed,
                 "mask_prob": cfg.mask_prob if objective == "mlm" else None,
                 "lm_head": "pretrained output layer (untied copy) on the fine-tuned backbone"},
        "tasks": tasks,
        "sequential": sequential,
        "claims": {"few_labels": claim_few_labels(curves, cfg) if curves else
                   {"verdict": cl.MISSING, "comparisons": {}, "claim": "no curves.csv"},
                   "forget_less": claim_forget_less(tasks, cfg)},
    }
    trade = tradeoff_rows(tasks, cfg)
    crows = curve_rows(curves)
    mrows = matrix_rows(sequential)
    summary = render_summary(result, cfg)

    write_json(root / METRICS_JSON, result)
    maybe_die("forgetting")  # fault-injection point (tests/test_faults.py)
    write_text(root / SUMMARY_MD, summary)
    write_text(root / TRADEOFF_CSV, to_csv(trade, ["task", "strategy", "delta_loss", "delta_loss_std",
                                                   "gain", "gain_std", "test_accuracy",
                                                   "trainable_pct", "seeds"]))
    write_text(root / CURVES_OUT_CSV, to_csv(crows, ["series", "task", "strategy", "fraction",
                                                     "n_labels", "test_accuracy", "std", "seeds"]))
    write_text(root / MATRIX_CSV, to_csv(mrows, ["run", "after", "task", "accuracy",
                                                 "accuracy_chance_adjusted"]))
    write_figures(root, trade, crows, sequential, cfg, {k: root / v for k, v in PNGS.items()})
    print(summary)

    deps = {"pretrained": paths.PRETRAINED, "shards": paths.SHARDS, "finetune_metrics": FT_METRICS,
            "curves": CURVES_CSV, "curves_summary": CURVES_JSON, "sequential": SEQUENTIAL_JSON}
    with start_run("forgetting", params=cfg.model_dump(), tags=input_hashes(root, deps),
                   root=root, experiment=cfg.experiment) as mlrun:
        metrics = {}
        for t, arms in tasks.items():
            for s, a in arms.items():
                for k in ("test_accuracy", "gain_over_chance", "gain_over_scratch", "delta_loss",
                          "rel_delta_pct", "share_worse"):
                    v = a["mean_std"][k]["mean"]
                    if v is not None:
                        metrics[f"{t}.{s}.{k}"] = v
        for name, seq in sequential.items():
            for var in ("raw", "chance_adjusted"):
                for k in ("acc", "bwt", "fwt", "avg_forgetting"):
                    v = seq.get(var, {}).get(k)
                    if v is not None:
                        metrics[f"sequential.{name}.{var}.{k}"] = v
        mlrun.log(metrics, step=0)
        mlrun.set_tags({"claim.few_labels": result["claims"]["few_labels"]["verdict"],
                        "claim.forget_less": result["claims"]["forget_less"]["verdict"]})
        if mlrun.enabled:
            mlrun.client.log_table(mlrun.run_id, data={k: [r.get(k) for r in trade] for k in
                                                       ("task", "strategy", "delta_loss", "delta_loss_std",
                                                        "gain", "gain_std", "test_accuracy", "trainable_pct")},
                                   artifact_file="forgetting/tradeoff_table.json")
        for p in [METRICS_JSON, SUMMARY_MD, TRADEOFF_CSV, CURVES_OUT_CSV, MATRIX_CSV, *PNGS.values()]:
            if (root / p).is_file():
                mlrun.log_artifact(root / p, "forgetting")
    return result


def main() -> None:
    run(load_section("forgetting", Config))


if __name__ == "__main__":
    main_guard(main)
