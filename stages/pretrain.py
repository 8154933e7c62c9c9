"""Stage `pretrain`: train a language model on the packed shards, from scratch or from a foundation.

In:  data/shards/{train,validation}/ + manifest.json (packed blocks, stage `tokenize`),
     data/tokenizer/ (stage `tokenizer`); params: the `pretrain` section of params.yaml.
Out: data/models/pretrained/   HF model directory (safetensors + config) plus the tokenizer;
                               loads with AutoModelForCausalLM (clm) / AutoModelForMaskedLM (mlm)
     data/metrics/pretrain.json  final val loss and perplexity, unigram perplexity of the same
                               targets, tokens seen, tokens/s, wall time, steps, distributed type
     data/plots/pretrain_loss.csv  step, train_loss, val_loss
     data/checkpoints/pretrain/<fingerprint>/step-*/  Accelerate state to resume from (transient:
                               git-ignored, not a DVC output, never pushed)
     one MLflow run (ptf/training/tracking.py): params, train/val metrics over steps, input hashes.
Init (`init`):
- `scratch`: the architecture of `model`, randomly initialised (seeded).
- `foundation`: the model the download stage laid out in data/foundation (`download.foundation`;
  `model` must be null: the architecture is the foundation's), whose tokenizer the tokenizer stage
  passed through. `max_steps: 0` uses it as it is (its files are copied; val loss only if it has
  the objective's LM head); `max_steps > 0` continues pretraining it on the corpus (domain- or
  task-adaptive pretraining, Gururangan et al. 2020). A checkpoint without the objective's LM
  head (e.g. a bare `BertModel` sentence encoder such as all-MiniLM-L6-v2) gets a fresh, seeded
  head (`lm_head: fresh` in the metrics; `ptf.models.modeling.load_foundation`). Refused before
  any training, naming both sides: an objective the architecture cannot serve (an encoder with
  `clm`), a tokenizer that is not the foundation's, blocks longer than its positions. Its name,
  revision and sha256 go into the metrics and the MLflow run's tags.
Run: accelerate launch --config_file accelerate/default.yaml -m stages.pretrain
     (2 CPU processes, DDP over gloo:
      ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m stages.pretrain)

Objectives:
- `clm`: LlamaForCausalLM, next-token loss on every position of each block (see
  ptf/models/modeling.py for why Llama and not GPT-2 on this CPU).
- `mlm`: BertForMaskedLM, BERT masking: `mlm_probability` of the non-special tokens are targets;
  of these 80% become the mask token, 10% a random token, 10% stay. Masks are drawn from a
  generator seeded by (seed, micro-step, process), so they are dynamic (new each step) yet a
  resumed run draws exactly the same ones. Needs a tokenizer with a mask token (wordpiece).

Evaluation: every `eval_every` steps and at the end, on the first `eval_blocks` validation blocks
(0: all), sharded over processes and summed: loss = mean cross-entropy over the evaluated
targets, perplexity = exp(loss). For mlm the eval masks are fixed (seeded by `seed`), so evals
are comparable. The unigram baseline (computed once) is the perplexity of exactly the same
target tokens (clm: positions 1.. of every block; mlm: the masked positions' original tokens)
under add-one-smoothed token frequencies of the train shards: a floor any real model must beat.

Resume: checkpoints go to data/checkpoints/pretrain/<fingerprint>/, the fingerprint being a
hash of every param that changes the trajectory (model, optimiser, schedule, data, seed,
number of processes) and of the input hashes. A rerun with the same config resumes from the
newest complete checkpoint; a different config gets its own directory (never silently loads
another config's state), and the trainer refuses a checkpoint whose stored fingerprint differs.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ptf.common import paths
from ptf.common.atomic import atomic_dir, write_json, write_text
from ptf.common.cli import StageError, main_guard
from ptf.common.config import StrictModel, load_section
from ptf.models.modeling import (FOUNDATION_DIR, FOUNDATION_RECORD, ModelConfig, build_model,
                                 flops_per_token, foundation_entry, foundation_model,
                                 foundation_tags, open_foundation, param_counts)
from ptf.data.shards import load_blocks
from ptf.training.tracking import check_reachable, input_hashes, start_run, tracking_uri
from ptf.models.backbones import BACKBONES_DIR, BACKBONES_FILE
from ptf.models.lm import mask_tokens
from ptf.training.trainer import (LoopConfig, Trainer, TrainResult, adamw, make_accelerator,
                                  param_groups, perplexity, warmup_cosine)

SECTION = "pretrain"
# params that do not change the training trajectory (left out of the checkpoint fingerprint)
_NOT_TRAJECTORY = {"log_every", "checkpoint_every", "keep_checkpoints", "experiment", "extra_seeds"}


class Config(StrictModel):
    objective: Literal["clm", "mlm"]
    init: Literal["scratch", "foundation"] = "scratch"  # foundation: data/foundation (download.foundation)
    seed: int = Field(ge=0)
    # further backbones, each pretrained the same way from its own seed, so that the verdicts'
    # spread includes pretraining variance: fine-tune seed s starts from backbone s mod N
    # (N = 1 + len(extra_seeds); ptf.models.backbones)
    extra_seeds: list[int] = Field(default_factory=list)
    model: ModelConfig | None                # scratch: the architecture; foundation: null (its own)
    batch_size: int = Field(gt=0)            # blocks per micro-batch per process
    grad_accum: int = Field(gt=0)            # micro-batches per optimizer step
    max_steps: int = Field(ge=0)             # optimizer steps; 0 (foundation only): used as it is
    lr: float = Field(gt=0, le=1.0)
    min_lr_ratio: float = Field(ge=0, le=1.0)  # cosine floor as a fraction of lr
    weight_decay: float = Field(ge=0)
    adam_beta1: float = Field(ge=0, lt=1)
    adam_beta2: float = Field(ge=0, lt=1)
    warmup_steps: int = Field(ge=0)
    grad_clip: float = Field(ge=0)           # 0: no clipping
    mixed_precision: Literal["no", "bf16", "fp16"]
    mlm_probability: float = Field(gt=0, lt=1)  # used by mlm only
    eval_every: int = Field(ge=0)            # 0: only at the end
    eval_blocks: int = Field(ge=0)           # validation blocks per eval; 0: all
    eval_batch_size: int = Field(gt=0)
    log_every: int = Field(gt=0)
    checkpoint_every: int = Field(ge=0)      # 0: no checkpoints
    keep_checkpoints: int = Field(gt=0)
    experiment: str = Field(min_length=1)    # MLflow experiment

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.max_steps and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < max_steps={self.max_steps}")
        if self.init == "scratch" and (self.model is None or self.max_steps == 0):
            raise ValueError("init scratch needs a `model` and max_steps > 0")
        if self.init == "foundation" and self.model is not None:
            raise ValueError("model must be null with init foundation: the architecture is the "
                             "foundation's (data/foundation/config.json)")
        if len(set(self.backbone_seeds())) != len(self.backbone_seeds()) or min(self.backbone_seeds()) < 0:
            raise ValueError(f"seed {self.seed} and extra_seeds {self.extra_seeds} must be distinct and >= 0")
        if self.extra_seeds and self.max_steps == 0:
            raise ValueError("extra_seeds with max_steps 0: a foundation used as it is is one backbone")
        return self

    def backbone_seeds(self) -> list[int]:
        return [self.seed, *self.extra_seeds]


# --------------------------------------------------------------------------- pure helpers


def unigram_counts(ds, vocab_size: int) -> np.ndarray:
    """Token frequencies over a shard dataset, read chunk by chunk from the memory map."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    col = ds.data.column("input_ids")
    for chunk in col.chunks:
        vals = chunk.flatten().to_numpy(zero_copy_only=False)
        counts += np.bincount(vals, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_perplexity(counts: np.ndarray, targets: np.ndarray) -> float:
    """Perplexity of `targets` under add-one-smoothed unigram probabilities from `counts`."""
    if targets.size == 0:
        return float("nan")
    logp = np.log(counts[targets] + 1.0) - math.log(counts.sum() + counts.size)
    return float(math.exp(-logp.mean()))


def fingerprint(cfg: Config, num_processes: int, inputs: dict[str, str]) -> dict:
    d = {k: v for k, v in cfg.model_dump().items() if k not in _NOT_TRAJECTORY}
    return {"params": d, "num_processes": num_processes, "inputs": inputs}


def fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def loss_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "train_loss", "val_loss"])
    for row in history:
        if "train_loss" in row or "val_loss" in row:
            w.writerow([row["step"], _fmt(row.get("train_loss")), _fmt(row.get("val_loss"))])
    return buf.getvalue()


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6f}"


# --------------------------------------------------------------------------- I/O

def _collate(rows):
    return {"input_ids": torch.stack([r["input_ids"] for r in rows]).long()}


def _read_inputs(root: Path):
    manifest_path = root / paths.SHARDS / "manifest.json"
    tok_dir = root / paths.TOKENIZER
    if not manifest_path.is_file():
        raise StageError(f"{manifest_path}: missing; run `dvc repro tokenize` first")
    if not (tok_dir / "tokenizer.json").is_file():
        raise StageError(f"{tok_dir}/tokenizer.json: missing; run `dvc repro tokenizer` first")
    manifest = json.loads(manifest_path.read_text())
    for split in ("train", "validation"):
        if split not in manifest:
            raise StageError(f"{manifest_path}: no '{split}' entry")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return manifest, tok


def _copy_files(src: Path, dest: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != FOUNDATION_RECORD:
            shutil.copy2(f, dest / f.name)


def _as_is(acc, eval_fn) -> TrainResult:
    """The result of zero training steps: one evaluation if the model has an LM head."""
    last = eval_fn() if eval_fn is not None else {"val_loss": None, "val_ppl": None}
    return TrainResult(steps=0, tokens=0, train_time_s=0.0, train_cpu_s=0.0, tokens_per_s=0.0,
                       best=last["val_loss"], best_step=0, stopped_early=False, resumed_from=None,
                       last_eval=last, history=[{"step": 0, **last}] if eval_fn else [],
                       distributed_type=str(acc.distributed_type.value), num_processes=acc.num_processes)


def run(cfg: Config, root: Path = Path(".")) -> dict:
    """Pretrain every backbone of `cfg.backbone_seeds()` (one after another, one MLflow run), then
    write them all at once: the first at data/models/pretrained/, each further one at
    data/models/pretrained/backbones/<seed>/ (`ptf.models.backbones`). Returns the first's metrics
    with every backbone's under `backbones`."""
    root = Path(root)
    t_start = time.perf_counter()
    uri = tracking_uri(root)
    check_reachable(uri, experiment=cfg.experiment)  # before any work: a wrong tracking URI fails in a second, not an hour
    manifest, tok = _read_inputs(root)
    block = int(manifest["train"]["block_size"])
    found, fconfig = (open_foundation(root / FOUNDATION_DIR, cfg.objective, tok, root / paths.TOKENIZER)
                      if cfg.init == "foundation" else (None, None))
    max_pos = cfg.model.max_positions if found is None else fconfig.max_position_embeddings
    if block > max_pos:
        where = "pretrain.model.max_positions" if found is None else \
            f"the foundation's max_position_embeddings ({root / FOUNDATION_DIR}/config.json)"
        raise StageError(f"block_size {block} (data/shards/manifest.json) exceeds {where}={max_pos}")
    if cfg.objective == "mlm" and tok.mask_token_id is None:
        raise StageError(f"{root / paths.TOKENIZER}: pretrain.objective=mlm needs a tokenizer with a "
                         "mask token (tokenizer.kind: wordpiece)")

    acc = make_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.seed)
    is_main = acc.is_main_process
    deps = {"shards": paths.SHARDS, "tokenizer": paths.TOKENIZER}
    inputs = input_hashes(root, deps if found is None else {**deps, "foundation": FOUNDATION_DIR})
    train_ds = load_blocks(root / paths.SHARDS / "train", manifest["train"]).with_format("torch")
    val_full = load_blocks(root / paths.SHARDS / "validation", manifest["validation"])
    n_val = len(val_full) if cfg.eval_blocks == 0 else min(cfg.eval_blocks, len(val_full))
    val_ids = torch.from_numpy(np.stack(val_full.select(range(n_val))["input_ids"]).astype(np.int64)
                               ) if n_val else torch.zeros(0, block, dtype=torch.long)
    if len(train_ds) < cfg.batch_size * acc.num_processes:
        raise StageError(f"{len(train_ds)} train blocks < one batch "
                         f"({cfg.batch_size} x {acc.num_processes} processes)")
    if n_val == 0:
        raise StageError("no validation blocks in data/shards")

    vocab = len(tok)
    special = sorted(set(tok.all_special_ids))
    # fixed eval masks (mlm) / targets (clm), the same for every backbone (comparable val losses)
    if cfg.objective == "mlm":
        g = torch.Generator().manual_seed(cfg.seed + 1)
        val_inputs, val_labels = mask_tokens(val_ids, tok.mask_token_id, vocab, special,
                                             cfg.mlm_probability, g)
        targets = val_labels[val_labels != -100].numpy()
    else:
        val_inputs, val_labels = val_ids, val_ids
        targets = val_ids[:, 1:].reshape(-1).numpy()
    counts = unigram_counts(train_ds, vocab)
    unigram_ppl = unigram_perplexity(counts, targets)
    data = _Data(train_ds, val_inputs, val_labels, n_val, tok, vocab, special, inputs, block)

    tags = {**inputs, "objective": cfg.objective,
            **{k: v for k, v in foundation_tags(found, None).items() if v is not None},  # lm_head: after
            "backbone_seeds": ",".join(map(str, cfg.backbone_seeds()))}
    with start_run(SECTION, cfg.model_dump(), tags, root=root, experiment=cfg.experiment, uri=uri,
                   enabled=is_main) as mlrun:
        mlrun.log({"unigram_ppl": unigram_ppl}, step=0)
        trained = []
        for k, seed in enumerate(cfg.backbone_seeds()):
            one = cfg.model_copy(update={"seed": seed, "extra_seeds": []})
            # the first backbone's metrics keep their names; a further one's are prefixed seed<s>.
            log = mlrun.log if k == 0 else (
                lambda m, step, s=seed: mlrun.log({f"seed{s}.{n}": v for n, v in m.items()}, step=step))
            acc = acc if k == 0 else make_accelerator(cfg.mixed_precision, cfg.grad_accum, seed)
            trained.append(_train_backbone(one, root, acc, data, found, fconfig, log))
        _, metrics, history, head = trained[0]
        fingerprints = {f"checkpoint.fingerprint{'' if k == 0 else f'.seed{s}'}": m.pop("checkpoint_fingerprint")
                        for k, (s, (_, m, _, _)) in enumerate(zip(cfg.backbone_seeds(), trained))}
        metrics.update(unigram_ppl=unigram_ppl, eval_targets=int(targets.size),
                       wall_time_s=time.perf_counter() - t_start,
                       backbones=[{"seed": s, **{n: m[n] for n in _PER_BACKBONE}}
                                  for s, (_, m, _, _) in zip(cfg.backbone_seeds(), trained)])
        if found is not None:
            metrics.update(init="foundation", lm_head=head, foundation=foundation_entry(found))
        if is_main:
            out = root / paths.PRETRAINED
            with atomic_dir(out) as tmp:
                for seed, (model, _, _, _) in zip(cfg.backbone_seeds(), trained):
                    dest = tmp if seed == cfg.seed else tmp / BACKBONES_DIR / str(seed)
                    dest.mkdir(parents=True, exist_ok=True)
                    if model is not None:
                        model.save_pretrained(str(dest), safe_serialization=True)
                    else:  # the foundation's own files, unchanged
                        _copy_files(root / FOUNDATION_DIR, dest)
                    _copy_files(root / paths.TOKENIZER, dest)  # the tokenizer exactly as trained
                if len(trained) > 1:
                    write_json(tmp / BACKBONES_FILE, {"seeds": cfg.backbone_seeds()})
            write_json(root / paths.METRICS / "pretrain.json", metrics)
            write_text(root / paths.PLOTS / "pretrain_loss.csv", loss_csv(history))
            mlrun.log({k: v for k, v in metrics.items()
                       if isinstance(v, (int, float)) and v is not None and k != "resumed_from_step"},
                      step=metrics["steps"])
            mlrun.set_tags({"distributed_type": metrics["distributed_type"],
                            "num_processes": metrics["num_processes"], **fingerprints,
                            **({"lm_head": head} if head else {})})
        acc.wait_for_everyone()
    acc.end_training()
    return metrics


_PER_BACKBONE = ("val_loss", "val_ppl", "steps", "train_time_s", "resumed_from_step")


@dataclass
class _Data:
    """What every backbone of one stage run trains and is evaluated on."""
    train_ds: object
    val_inputs: torch.Tensor
    val_labels: torch.Tensor
    n_val: int
    tok: object
    vocab: int
    special: list[int]
    inputs: dict[str, str]
    block: int


def _train_backbone(cfg: Config, root: Path, acc, d: _Data, found, fconfig, log_fn):
    """Train (or take as it is) one backbone from `cfg.seed`: (the unwrapped model to save, or
    None for a foundation's files as they are; its metrics; its loss history; the LM head kind)."""
    fp = fingerprint(cfg, acc.num_processes, d.inputs)
    ckpt_dir = root / paths.CHECKPOINTS / "pretrain" / fingerprint_key(fp)
    torch.manual_seed(cfg.seed)
    model, head = ((build_model(cfg.model, cfg.objective, d.tok), None) if found is None else
                   foundation_model(root / FOUNDATION_DIR, cfg.objective, cfg.seed, fconfig, cfg.max_steps > 0))
    counts_p = param_counts(model)
    flops = flops_per_token(model, d.block)
    if cfg.max_steps:
        optimizer = adamw(param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                          betas=(cfg.adam_beta1, cfg.adam_beta2))
        scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, acc.num_processes,
                                  cfg.min_lr_ratio)
        loader = torch.utils.data.DataLoader(d.train_ds, batch_size=cfg.batch_size, shuffle=True,
                                             drop_last=True, collate_fn=_collate)
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    else:  # a foundation used as it is: nothing to train
        model = acc.prepare(model)
    trainer_ref: dict = {}

    def loss_fn(m, batch):
        ids = batch["input_ids"]
        if cfg.objective == "clm":
            out = m(input_ids=ids, labels=ids)
            return out.loss, {}
        st = trainer_ref["t"].state
        g = torch.Generator().manual_seed(
            (cfg.seed * 1_000_003 + st.micro_step) * 1009 + acc.process_index)
        inp, labels = mask_tokens(ids.cpu(), d.tok.mask_token_id, d.vocab, d.special,
                                  cfg.mlm_probability, g)
        out = m(input_ids=inp.to(ids.device), labels=labels.to(ids.device))
        return out.loss, {}

    rank, world = acc.process_index, acc.num_processes

    def eval_fn() -> dict:
        net = acc.unwrap_model(model)
        tot = torch.zeros(2, dtype=torch.float64, device=acc.device)
        idx = torch.arange(rank, d.n_val, world)
        for i in range(0, len(idx), cfg.eval_batch_size):
            sel = idx[i:i + cfg.eval_batch_size]
            x, y = d.val_inputs[sel].to(acc.device), d.val_labels[sel].to(acc.device)
            with acc.autocast():
                logits = net(input_ids=x).logits.float()
            if cfg.objective == "clm":
                logits, y = logits[:, :-1], y[:, 1:]
            tot[0] += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                reduction="sum").double()
            tot[1] += (y != -100).sum()
        tot = acc.reduce(tot, reduction="sum")
        loss = float(tot[0] / tot[1])
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    if cfg.max_steps:
        loop = LoopConfig(max_steps=cfg.max_steps, grad_clip=cfg.grad_clip or None,
                          eval_every=cfg.eval_every, log_every=cfg.log_every, metric="val_loss",
                          mode="min", checkpoint_dir=ckpt_dir if cfg.checkpoint_every else None,
                          checkpoint_every=cfg.checkpoint_every,
                          keep_checkpoints=cfg.keep_checkpoints,
                          desc=f"pretrain {cfg.objective} seed {cfg.seed}")
        trainer = Trainer(acc, model, optimizer, loader, scheduler, loss_fn, loop,
                          eval_fn=eval_fn, log_fn=log_fn, fingerprint=fp)
        trainer_ref["t"] = trainer
        result = trainer.fit()
    else:
        result = _as_is(acc, eval_fn if head == "pretrained" else None)
    acc.wait_for_everyone()
    metrics = {
        "objective": cfg.objective,
        "val_loss": result.last_eval["val_loss"],
        "val_ppl": result.last_eval["val_ppl"],
        "steps": result.steps,
        "tokens_seen": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "train_time_s": result.train_time_s,
        "train_cpu_s": result.train_cpu_s,
        "resumed_from_step": result.resumed_from,
        "params_total": counts_p["total"],
        "params_non_embedding": counts_p["non_embedding"],
        "flops_per_token": flops["flops_per_token"],
        "distributed_type": result.distributed_type,
        "num_processes": result.num_processes,
        "checkpoint_fingerprint": fingerprint_key(fp),
    }
    return (acc.unwrap_model(model) if cfg.max_steps else None), metrics, result.history, head


def main() -> None:
    cfg = load_section(SECTION, Config)
    m = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        # no perplexity without an LM head (a foundation used as it is): say so, don't crash
        ppl = "n/a (no LM head)" if m["val_ppl"] is None else f"{m['val_ppl']:.1f}"
        print(f"pretrain: val ppl {ppl} (unigram {m['unigram_ppl']:.1f}), "
              f"{m['tokens_per_s']:,.0f} tokens/s, {m['wall_time_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main_guard(main)
