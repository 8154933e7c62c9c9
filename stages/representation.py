"""Stage `representation`: forgetting that does not need an LM head, for every declared model.

In:  data/models/pretrained/ (the backbone every arm started from, + its tokenizer; stage
     `pretrain`); data/shards/validation/ + manifest.json (held-out blocks, never trained on;
     stage `tokenize`); data/tasks/<task>/ of the probe tasks (stage `download`); for exactly the
     declared arms (`finetune.runs`, read as the forgetting stage reads them:
     `ptf.measures.outputs.read_matrix`) every seed's data/models/finetuned/<task>/<strategy>/
     seed<k>/ and data/metrics/finetune/<task>/<strategy>.json (stage `finetune`); and
     data/metrics/forgetting.json (stage `forgetting`: its held-out LM losses, for bits/byte).
     Params: the `representation` section of params.yaml (`Config`), and `finetune.runs`.
Out: data/metrics/representation.json (git-tracked: cache false): per fine-tuned model and per
     arm (mean ± sample std over seeds)
       cka            linear CKA per layer (0 = embeddings) between the pretrained and the
                      fine-tuned backbone's hidden states on `held_out_blocks` validation blocks
                      (evenly spaced), `cka_last`, `cka_min`;
       probe          per probe task other than the model's own: a linear probe's accuracy on the
                      frozen features of layer `probe.layer`, trained on the task's TRAIN split
                      and scored on its VALIDATION split (the test split is read once, by the
                      final evaluation, never here), before (pretrained backbone) and after
                      (fine-tuned backbone), lost = before - after; `probe_lost_mean`;
       lm             the forgetting stage's held-out LM loss in nats/token and in bits per UTF-8
                      byte of the same blocks, where the pretrained model has an LM head; where it
                      has none (a bare encoder) the output says "not applicable" and why.
     `scratch` (random init) has no pretrained backbone to drift from: not applicable (null).
Run: python -m stages.representation

The measures: `ptf.measures.representation_arms` (protocol in its docstring) on
`ptf.measures.representation` (CKA, probes, bits/byte).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.common.cli import StageError, main_guard
from ptf.common.config import PARAMS_FILE, ConfigError, StrictModel, load_section
from ptf.data.tasks import DataCfg, load_task
from ptf.measures import outputs as out
from ptf.measures import representation_arms as ra
from ptf.measures.drift import load_eval_blocks
from ptf.models.artifacts import PRETRAINED_REMEDY, check_weights

SECTION = "representation"
OUTPUT = paths.METRICS / "representation.json"
FORGETTING_JSON = paths.METRICS / "forgetting.json"


class ProbeCfg(StrictModel):
    tasks: list[str] | None              # data/tasks/<task> probed; null: every task of finetune.runs
    layer: int                           # hidden-state index: 0 embeddings, -1 the last layer
    data: DataCfg                        # train cap (max_train), VALIDATION cap (max_eval), max_length, seed
    l2: float = Field(gt=0.0)            # probe weight penalty (per example)
    max_iter: int = Field(ge=1, le=10_000)   # L-BFGS iterations per probe

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"expected null or a non-empty list of distinct task names, got {v}")
        return v


class Config(StrictModel):
    held_out_blocks: int = Field(ge=2, le=100_000)   # validation blocks for CKA (evenly spaced)
    batch_size: int = Field(ge=1, le=4096)           # sequences per forward pass
    cka_pooling: Literal["tokens", "mean"]           # CKA over every token, or per block (mean)
    probe: ProbeCfg


def check_inputs(cfg: Config, root: Path, tasks: list[str]) -> int:
    """Everything that can fail on bad input, before any compute; returns the number of hidden
    states of the pretrained backbone (embeddings + layers)."""
    pre = root / paths.PRETRAINED
    if not (pre / "config.json").is_file():
        raise StageError(f"{pre}: no pretrained model; run `dvc repro pretrain`")
    check_weights(pre, PRETRAINED_REMEDY)
    missing = [t for t in tasks if not (root / paths.TASKS / t / "dataset_dict.json").is_file()]
    if missing:
        raise StageError(f"{root / paths.TASKS}: no task data for {missing} "
                         f"({SECTION}.probe.tasks); run `dvc repro download`, or fix the list")
    conf = json.loads((pre / "config.json").read_text(encoding="utf-8"))
    n_layers = conf.get("num_hidden_layers") or conf.get("n_layer")
    if isinstance(n_layers, int):
        n = n_layers + 1
        if not -n <= cfg.probe.layer < n:
            raise ConfigError(f"invalid params: {SECTION}.probe.layer: got {cfg.probe.layer}; the "
                              f"pretrained backbone has {n} hidden states (0 = embeddings .. {n - 1}, "
                              f"or -1 .. -{n})")
        return n
    return 0


def blocks_at(root: Path, idx: list[int]) -> list[list[int]]:
    """The validation blocks at `idx` (the ones the forgetting stage scored)."""
    from ptf.data.shards import load_blocks

    manifest = out.read_json(root / paths.SHARDS / "manifest.json", "run `dvc repro tokenize`")
    if not isinstance(manifest, dict) or "validation" not in manifest:
        raise StageError(f"{root / paths.SHARDS}/manifest.json: no 'validation' entry; run `dvc repro tokenize`")
    ds = load_blocks(root / paths.SHARDS / "validation", manifest["validation"])
    bad = [i for i in idx if not (isinstance(i, int) and 0 <= i < len(ds))]
    if bad:
        raise StageError(f"{root / FORGETTING_JSON}: block indices {bad[:5]} outside the {len(ds)} validation "
                         "blocks; rerun `dvc repro forgetting`")
    return [list(r) for r in ds.select(idx)["input_ids"]]


def lm_block(root: Path, pre: Path, tok, jobs: list[ra.Job]) -> tuple[dict[str, Any], dict]:
    """(summary, per-job LM numbers): bits/byte from the forgetting stage's losses, or not
    applicable where the pretrained model has no LM head."""
    head = ra.lm_head_of(pre)
    if head is None:
        arch = (json.loads((pre / "config.json").read_text()).get("architectures") or ["?"])[0]
        note = (f"not applicable: the pretrained model ({arch}) has no LM head, so its "
                "pretraining loss cannot be measured; CKA and probe retention stand in for it")
        return {"applicable": False, "note": note}, {}
    fg = out.read_json(root / FORGETTING_JSON, "run `dvc repro forgetting`")
    idx = (fg.get("eval") or {}).get("block_indices") if isinstance(fg, dict) else None
    if not isinstance(idx, list) or not idx:
        raise StageError(f"{root / FORGETTING_JSON}: no eval.block_indices; run `dvc repro forgetting`")
    rows = blocks_at(root, idx)
    n_tok, n_bytes = ra.tokens_per_byte(tok, rows)
    if n_bytes <= 0:
        raise StageError(f"{root / paths.SHARDS}/validation: the scored blocks decode to no text")
    per_job = ra.lm_bits(fg, jobs, n_tok, n_bytes, str(root / FORGETTING_JSON))
    from ptf.measures.representation import bits_per_byte
    base = fg["eval"].get("loss_pretrained")
    summary = {"applicable": True, "head": head, "blocks": len(idx), "text_tokens": n_tok,
               "text_bytes": n_bytes, "tokens_per_byte": n_tok / n_bytes,
               "objective": fg["eval"].get("objective"),
               "loss_pretrained": base,
               "bpb_pretrained": bits_per_byte(base, n_tok, n_bytes) if isinstance(base, (int, float)) else None,
               "unit": "nats per scored token (forgetting.json) and bits per UTF-8 byte: nats/token x "
                       "(non-special tokens / bytes of their text) / ln 2"}
    return summary, per_job


def run(cfg: Config, matrix: out.Matrix, root: Path = Path(".")) -> dict[str, Any]:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    root = Path(root)
    t0 = time.perf_counter()
    arms = matrix.arms()
    probe_tasks = cfg.probe.tasks if cfg.probe.tasks is not None else sorted({t for t, _ in arms})
    n_states = check_inputs(cfg, root, probe_tasks)
    runs = out.read_finetune(root, matrix)
    out.read_models(root, runs)
    jobs = [ra.Job(t, s, seed, out.model_dir(root, t, s, seed)) for t, s in arms
            for seed in sorted(runs[t][s]["seeds"])]
    pre = root / paths.PRETRAINED
    tok = AutoTokenizer.from_pretrained(str(pre))
    lm_summary, lm = lm_block(root, pre, tok, jobs)        # before the long part: fail early
    ids, idx = load_eval_blocks(root, cfg.held_out_blocks)
    if ids.shape[0] < 2:
        raise StageError(f"{root / paths.SHARDS}/validation: {ids.shape[0]} block(s); CKA needs at least 2")
    probes = [ra.ProbeSet.from_task(load_task(root, t, tok, cfg.probe.data)) for t in probe_tasks]
    settings = ra.Settings(batch_size=cfg.batch_size, cka_pooling=cfg.cka_pooling,
                           probe_layer=cfg.probe.layer, l2=cfg.probe.l2, max_iter=cfg.probe.max_iter)
    with tqdm(total=len(jobs), desc="representation: CKA + probes", unit="model") as bar:
        ref, recs = ra.measure_models(jobs, pre, ids, probes, tok.pad_token_id, settings,
                                      progress=lambda job: bar.update(1))
    for job, rec in recs.items():
        if lm_summary["applicable"]:
            rec["lm"] = lm[job]
        else:
            rec["lm"] = {"applicable": False}
    result = {
        "arms": [f"{t}-{s}" for t, s in arms],
        "held_out": {"split": "validation", "blocks": int(ids.shape[0]), "block_indices": idx,
                     "block_len": int(ids.shape[1]), "pooling": cfg.cka_pooling,
                     "examples": ref["held_out_examples"], "hidden_states": ref["layers"]},
        "probe": {"tasks": probe_tasks, "layer": cfg.probe.layer, "train_split": "train",
                  "score_split": "validation", "l2": cfg.probe.l2, "data": cfg.probe.data.model_dump(),
                  "n_train": {p.name: len(p.train_y) for p in probes},
                  "n_validation": {p.name: len(p.val_y) for p in probes},
                  "n_classes": {p.name: p.n_classes for p in probes},
                  "before": ref["probe_before"]},
        "lm": lm_summary,
        "tasks": ra.arm_table(recs),
        "wall_time_s": time.perf_counter() - t0,
    }
    if n_states and ref["layers"] != n_states:
        raise StageError(f"{pre}: {ref['layers']} hidden states, its config says {n_states}")
    write_json(root / OUTPUT, result)
    return result


def main() -> None:
    def go():
        r = run(load_section(SECTION, Config), out.read_matrix(PARAMS_FILE))
        for t, arms in r["tasks"].items():
            for s, a in arms.items():
                ms = a["mean_std"]
                if not a["applicable"]:
                    print(f"{t}/{s}: not applicable (random init)")
                    continue
                c, lost = ms.get("cka_last", {}), ms.get("probe_lost_mean", {})
                print(f"{t}/{s}: CKA last layer {c.get('mean')}, probe accuracy lost {lost.get('mean')} "
                      f"(mean over seeds)")

    main_guard(go)


if __name__ == "__main__":
    main()
