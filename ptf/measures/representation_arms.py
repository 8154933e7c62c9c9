"""Forgetting without an LM head, per fine-tuned model and per arm (no CLI): what the stage
`representation` measures, on data it is handed (`ptf.measures.representation` does the maths).

In:  the pretrained model directory (data/models/pretrained: the backbone every arm started from),
     jobs `Job(task, strategy, seed, model_dir)` (every seed of every declared arm), held-out token
     blocks (the validation shards, evenly spaced), the probe tasks as tokenized splits
     (`ptf.data.tasks.load_task`), and for the LM drift the forgetting stage's numbers
     (data/metrics/forgetting.json) plus the text of the blocks it scored.
Out: `measure_models(...)` -> per job {cka, cka_last, cka_min, probe, probe_lost_mean,
     probe_after_mean}; `lm_bits(...)` -> per job the held-out LM loss in nats/token AND bits/byte;
     `arm_table(...)` -> {task: {strategy: {"seeds", "mean_std", "applicable"}}}.

Protocol (every model compared with the SAME pretrained backbone on the SAME inputs: paired):
  (a) representation drift: linear CKA (Kornblith et al. 2019) per layer (index 0 = embeddings)
      between the pretrained backbone's and the fine-tuned backbone's hidden states on the
      held-out blocks (never trained on), over every token (`tokens`) or per block (`mean`).
  (b) probe retention: for each probe task OTHER than the one the model was fine-tuned on, a
      multinomial logistic probe (`fit_probe`) on the frozen, mean-pooled features of one layer,
      trained on that task's TRAIN split (capped) and scored on its VALIDATION split (capped),
      once on the pretrained backbone (before) and once on the fine-tuned one (after);
      lost = before - after. The TEST split is never scored here: it is read once, by the final
      evaluation of the fine-tune stage.
  (c) LM drift in bits per byte beside nats per token: the forgetting stage's per-model loss
      (nats per scored token, same blocks, same masking) times the blocks' tokens per UTF-8 byte
      (non-special tokens / bytes of their decoded text) / ln 2, so that models with different
      tokenizers compare. Not applicable when the pretrained model has no LM head (a bare
      encoder such as all-MiniLM-L6-v2's `BertModel`): said so, never invented.
The backbone of a fine-tuned model is what its classifier computes with: LoRA/DoRA/OSF merged,
bottleneck adapters in place, prompt tuning's backbone as pretrained (the soft prompt is an input,
not a weight of the backbone: CKA 1 and nothing lost, by construction). A strategy that starts
from random weights (`scratch`) has no pretrained backbone to drift from: not applicable (null).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ptf.common.cli import StageError
from ptf.measures.representation import (bits_per_byte, cka_per_layer, fit_probe, layer_features,
                                         probe_accuracy, utf8_bytes)
from ptf.measures.stats import mean_std
from ptf.models.backbones import per_backbone
from ptf.models.strategies import REGISTRY

NOT_FROM_PRETRAINED = "not applicable: no pretrained backbone to drift from (random init)"
LM_KEYS = ("loss_pretrained", "loss_finetuned", "delta_loss", "bpb_pretrained", "bpb_finetuned",
           "delta_bpb")


class Job(NamedTuple):
    task: str
    strategy: str
    seed: str          # "seed<k>", as the fine-tune metrics and model directories name it
    model_dir: Path


@dataclass(frozen=True)
class Settings:
    batch_size: int = 16
    cka_pooling: Literal["tokens", "mean"] = "tokens"
    probe_layer: int = -1          # hidden-state index (0: embeddings; -1: the last layer)
    l2: float = 1e-3
    max_iter: int = 200


@dataclass
class ProbeSet:
    """One probe task: token ids and labels of its train and VALIDATION splits."""
    name: str
    n_classes: int
    train_ids: list[list[int]]
    train_y: list[int]
    val_ids: list[list[int]]
    val_y: list[int]

    @classmethod
    def from_task(cls, data) -> ProbeSet:
        """From a `ptf.data.tasks.TaskData` (its test split is not used)."""
        if not len(data.train) or not len(data.validation):
            raise StageError(f"task {data.name}: the probe needs non-empty train and validation splits")
        return cls(data.name, data.n_classes, data.train.ids, data.train.labels,
                   data.validation.ids, data.validation.labels)


def applicable(strategy: str) -> bool:
    """Whether the strategy's model starts from the pretrained backbone."""
    return REGISTRY[strategy].init != "random"


# ----------------------------------------------------------------------------- backbones
def pretrained_backbone(pretrained: Path):
    """The pretrained transformer body (`AutoModel`: no head needed, so a bare encoder works)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(pretrained)).eval()


def finetuned_backbone(model_dir: Path):
    """The backbone the saved classifier computes with (module docstring)."""
    from ptf.models.artifacts import load_classifier
    from ptf.models.strategies import unwrap_hf

    return unwrap_hf(load_classifier(model_dir, merge=True)).base_model.eval()


# ----------------------------------------------------------------------------- batches
def block_batches(ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Full held-out blocks (no padding) in order."""
    return [(ids[i:i + batch_size], torch.ones_like(ids[i:i + batch_size]))
            for i in range(0, ids.shape[0], batch_size)]


def padded_batches(rows: Sequence[Sequence[int]], pad_id: int, batch_size: int):
    """Right-padded batches of `rows` in the given order (right padding keeps every real token
    at its own position, for absolute and rotary positions alike): `ptf.data.tasks.collate`'s."""
    from ptf.data.tasks import collate

    out = []
    for i in range(0, len(rows), batch_size):
        b = collate([(list(r), 0) for r in rows[i:i + batch_size]], pad_id, pad_left=False)
        out.append((b["input_ids"], b["attention_mask"]))
    return out


def by_length(ids: list[list[int]], y: list[int]) -> tuple[list[list[int]], list[int]]:
    """Examples sorted by length (stable): less padding; the same order for every model."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [ids[i] for i in order], [y[i] for i in order]


@dataclass
class Features:
    held_out: list[np.ndarray]                           # per layer
    probe: dict[str, tuple[np.ndarray, np.ndarray]]      # task -> (train x, validation x)


def features(backbone, held_out: list, probes: dict[str, ProbeSet], pad_id: int,
             settings: Settings) -> Features:
    ho = layer_features(backbone, held_out, settings.cka_pooling)
    px = {}
    for name, p in probes.items():
        tr = layer_features(backbone, padded_batches(p.train_ids, pad_id, settings.batch_size), "mean")
        va = layer_features(backbone, padded_batches(p.val_ids, pad_id, settings.batch_size), "mean")
        px[name] = (tr[settings.probe_layer], va[settings.probe_layer])
    return Features(ho, px)


def probe_score(p: ProbeSet, x: tuple[np.ndarray, np.ndarray], settings: Settings) -> float:
    """Validation accuracy of a probe trained on the train features."""
    probe = fit_probe(x[0], p.train_y, p.n_classes, settings.l2, settings.max_iter)
    return probe_accuracy(probe, x[1], p.val_y)


# ----------------------------------------------------------------------------- measures
def measure_models(jobs: Sequence[Job], pretrained: Path, held_out_ids: torch.Tensor,
                   probes: Sequence[ProbeSet], pad_id: int, settings: Settings = Settings(),
                   progress: Callable[[Job], None] | None = None) -> tuple[dict[str, Any], dict[Job, dict[str, Any]]]:
    """(reference, {job: record}): the pretrained backbone's probe accuracies, and per fine-tuned
    model its CKA per layer against the pretrained backbone on `held_out_ids` and its probe
    retention on every probe task but its own (module docstring)."""
    sets = {p.name: ProbeSet(p.name, p.n_classes, *by_length(p.train_ids, p.train_y),
                             *by_length(p.val_ids, p.val_y)) for p in probes}
    held = block_batches(held_out_ids, settings.batch_size)

    def backbone_ref(d: Path) -> tuple:
        """(backbone `d`'s features, its probe scores)."""
        f = features(pretrained_backbone(d), held, sets, pad_id, settings)
        return f, {t: probe_score(sets[t], f.probe[t], settings) for t in sorted(sets)}

    ref_of = per_backbone(pretrained, backbone_ref)     # per fine-tune seed, its backbone's reference
    base, before = ref_of(0)                         # seed 0 starts from the first backbone
    reference = {"probe_before": before, "layers": len(base.held_out),
                 "held_out_examples": int(base.held_out[0].shape[0])}
    records: dict[Job, dict[str, Any]] = {}
    for job in jobs:
        if not applicable(job.strategy):
            records[job] = {"applicable": False, "note": NOT_FROM_PRETRAINED}
        else:
            # compared with the backbone this seed was fine-tuned from
            base, before = ref_of(job.seed)
            others = {t: p for t, p in sets.items() if t != job.task}
            ft = features(finetuned_backbone(job.model_dir), held, others, pad_id, settings)
            if len(ft.held_out) != len(base.held_out):
                raise StageError(f"{job.model_dir}: {len(ft.held_out)} hidden-state layers, the "
                                 f"pretrained backbone has {len(base.held_out)}")
            cka = cka_per_layer(base.held_out, ft.held_out)
            probe = {}
            for t in sorted(others):
                after = probe_score(others[t], ft.probe[t], settings)
                probe[t] = {"before": before[t], "after": after, "lost": before[t] - after}
            records[job] = {"applicable": True, "cka": cka, "cka_last": cka[-1],
                            "cka_min": min(cka),
                            "probe": probe,
                            "probe_lost_mean": _mean([r["lost"] for r in probe.values()]),
                            "probe_after_mean": _mean([r["after"] for r in probe.values()])}
        if progress is not None:
            progress(job)
    return reference, records


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


# ----------------------------------------------------------------------------- LM loss in bits/byte
def lm_head_of(pretrained: Path) -> str | None:
    """The LM architecture of the pretrained checkpoint (`...MaskedLM`, `...CausalLM`), or None
    for a bare encoder / decoder body without an LM head."""
    import json

    arch = (json.loads((Path(pretrained) / "config.json").read_text()).get("architectures") or [""])[0]
    return arch if arch.endswith(("MaskedLM", "CausalLM", "LMHeadModel")) else None


def tokens_per_byte(tokenizer, rows: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(non-special tokens, UTF-8 bytes of their decoded text) of token-id rows."""
    special = set(tokenizer.all_special_ids)
    n_tok = sum(1 for r in rows for t in r if t not in special)
    return n_tok, utf8_bytes(tokenizer, rows)


def lm_bits(forgetting: dict[str, Any], jobs: Sequence[Job], n_tokens: int, n_bytes: int,
            where: str = "forgetting.json") -> dict[Job, dict[str, float | None]]:
    """Per job: the forgetting stage's held-out LM loss (nats per scored token) before and after,
    its delta, and the same in bits per byte (`bits_per_byte` at the blocks' tokens/byte)."""
    out: dict[Job, dict[str, float | None]] = {}
    tasks = forgetting.get("tasks") if isinstance(forgetting, dict) else None
    if not isinstance(tasks, dict):
        raise StageError(f"{where}: no `tasks` table; run `dvc repro forgetting`")
    for job in jobs:
        if not applicable(job.strategy):
            out[job] = {k: None for k in LM_KEYS}
            continue
        try:
            rec = tasks[job.task][job.strategy]["seeds"][job.seed]
            pre, ft = float(rec["loss_pretrained"]), float(rec["loss_finetuned"])
        except (KeyError, TypeError, ValueError):
            raise StageError(f"{where}: no held-out LM loss of {job.task}/{job.strategy} {job.seed}; "
                             "run `dvc repro forgetting`") from None
        bp, bf = (bits_per_byte(x, n_tokens, n_bytes) for x in (pre, ft))
        out[job] = {"loss_pretrained": pre, "loss_finetuned": ft, "delta_loss": ft - pre,
                    "bpb_pretrained": bp, "bpb_finetuned": bf, "delta_bpb": bf - bp}
    return out


# ----------------------------------------------------------------------------- per arm
def arm_table(records: dict[Job, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{task: {strategy: {"seeds": {seed: record}, "mean_std": {key: mean_std}, "applicable"}}}:
    mean and sample std over seeds of every scalar (CKA per layer as `cka.layer<i>`, probe loss
    per task as `probe_lost.<task>`)."""
    arms: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for job, rec in records.items():
        arms.setdefault((job.task, job.strategy), {})[job.seed] = rec
    table: dict[str, dict[str, Any]] = {}
    for (t, s), seeds in sorted(arms.items()):
        flat = {seed: _scalars(r) for seed, r in seeds.items()}
        keys = sorted({k for f in flat.values() for k in f})
        table.setdefault(t, {})[s] = {
            "seeds": dict(sorted(seeds.items())),
            "mean_std": {k: mean_std([flat[x].get(k) for x in sorted(flat)]) for k in keys},
            "applicable": all(r.get("applicable", True) for r in seeds.values()),
        }
    return table


def _scalars(rec: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in rec.items():
        if k == "cka" and isinstance(v, list):
            out.update({f"cka.layer{i}": x for i, x in enumerate(v)})
        elif k == "probe" and isinstance(v, dict):
            out.update({f"probe_lost.{t}": r["lost"] for t, r in v.items()})
            out.update({f"probe_after.{t}": r["after"] for t, r in v.items()})
        elif k == "lm" and isinstance(v, dict):
            out.update({f"lm.{x}": y for x, y in v.items() if isinstance(y, (int, float)) or y is None})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = None if isinstance(v, float) and math.isnan(v) else v
        elif v is None:                    # e.g. no other task to probe: kept, as n = 0
            out[k] = None
    return out
