"""The one training loop: pretraining and fine-tuning are configurations of it.

In:  an `accelerate.Accelerator` and the objects it prepared (model, AdamW optimizer, train
     dataloader, LR scheduler), a loss callable, and a `LoopConfig` (budget, clipping, eval,
     logging, checkpoints). Optional: `eval_fn`, `step_hook`, `log_fn`, `on_best`.
Out: a trained model (in place) and a `TrainResult` (steps, tokens, tokens/s, best metric,
     history of train loss and eval metrics); optional checkpoints under `checkpoint_dir`.

Typical use (see `stages/pretrain.py`; `stages/finetune.py` does the same with its own loss):

    accelerator = make_accelerator(mixed_precision="no", grad_accum=2, seed=0)
    optimizer = adamw(param_groups(model, lr=3e-4, weight_decay=0.01), lr=3e-4)
    scheduler = warmup_cosine(optimizer, warmup_steps=50, max_steps=600,
                              num_processes=accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainer = Trainer(accelerator, model, optimizer, loader, scheduler, loss_fn, LoopConfig(...),
                      eval_fn=..., log_fn=..., fingerprint={...})
    result = trainer.fit()

Contracts:
- `loss_fn(model, batch) -> (loss, logs)`: `loss` a scalar tensor with grad (the trainer calls
  `accelerator.backward`, which divides by the accumulation steps); `logs` a dict of floats or
  0-d tensors averaged into the logged metrics (e.g. `{"ewc_penalty": p}`). It may read
  `trainer.state` (`step`, `micro_step`) to seed per-step randomness (MLM masking) so that a
  resumed run is bit-identical.
- `eval_fn() -> dict[str, float]`: runs on EVERY process (it may gather across processes) and
  must return the same numbers on every process; called every `eval_every` optimizer steps and
  at the end. `LoopConfig.metric` (e.g. "val_loss") and `mode` ("min"/"max") pick the tracked
  metric; `patience` evals without improvement stop training early (None: never).
- `step_hook(step, model)`: called on every process at the start of each optimizer step
  (0-based, including the first step after a resume). Make it a function of `step` alone
  (e.g. "layers >= n - step // k are trainable"), so a resume reconstructs the same state.
- `log_fn(metrics, step)`: main process only (e.g. `ptf.training.tracking.RunLogger.log`).
- `on_best(step, metrics)`: main process only, after an eval that improved the metric
  (e.g. keep a copy of the best weights).
- Scheduler: a prepared scheduler steps `num_processes` times per optimizer step, so
  `warmup_cosine` multiplies both lengths by `num_processes`. The trainer steps it only on
  optimizer steps (after accumulation).
- Gradient accumulation: `Accelerator(gradient_accumulation_steps=k)` with
  `sync_with_dataloader=False` (make_accelerator does it), so an optimizer step always sums
  exactly k micro-batches, also across epoch boundaries; `max_steps` counts optimizer steps.
- Checkpoints (`checkpoint_every > 0` and `checkpoint_dir`): `<dir>/step-00000100/` holds
  `accelerator.save_state` (model, optimizer, scheduler, RNG states, sampler) plus
  `trainer_state.json`; it is written as `<dir>/.step-00000100.tmp`, gets a `COMPLETE` marker
  (with the config fingerprint) last, and is renamed into place, so a kill mid-save never
  leaves a directory that looks complete. The newest `keep_checkpoints` are kept. `fit()`
  resumes from the newest complete one; if its fingerprint differs from `fingerprint`, it raises
  `StageError` naming the keys that differ (never loads it silently). Exact resume needs
  `DataLoaderConfiguration(use_seedable_sampler=True)` (make_accelerator sets it) and
  deterministic per-step randomness in `loss_fn`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ptf.common.cli import StageError

LossFn = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"


# --------------------------------------------------------------------------- construction helpers

def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons, so that the next `Accelerator` in this
    process starts fresh (several training runs in one process: tests, benchmarks). Accelerate
    has no public API for it; this is the reset its own test suite uses."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, seed: int = 0,
                     log_with: Any = None, project_dir: str | None = None, cpu: bool | None = None):
    """An Accelerator set up for exact resume: seedable sampler, accumulation that ignores epoch
    ends, and `set_seed(seed)` (same seed on every process: DDP replicas start identical)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed

    kwargs: dict[str, Any] = {}
    if cpu is not None:
        kwargs["cpu"] = cpu
    acc = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False, adjust_scheduler=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=log_with, project_dir=project_dir, **kwargs)
    set_seed(seed)
    return acc


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                 lr_for: Callable[[str], float] | None = None) -> list[dict[str, Any]]:
    """AdamW param groups: no weight decay on biases, norms and embeddings' LayerNorm (any 1-d
    tensor); `lr_for(name)` optionally gives a per-parameter LR (discriminative fine-tuning).
    Only parameters with `requires_grad` at call time are included, unless `lr_for` is given
    (then frozen ones are included too, so gradual unfreezing can enable them later)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and lr_for is None:
            continue
        wd = 0.0 if p.ndim < 2 else weight_decay
        plr = lr_for(name) if lr_for else lr
        groups.setdefault((plr, wd), []).append(p)
    return [{"params": ps, "lr": plr, "weight_decay": wd} for (plr, wd), ps in groups.items()]


def adamw(groups: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter], lr: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch AdamW over caller-supplied param groups (each group may set its own lr/wd); the
    fused kernel where torch has one for the parameters' device (CPU, CUDA: ~10% faster step on
    this CPU than the default per-tensor loop; it is also what HF Trainer uses)."""
    groups = list(groups)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                  num_processes: int = 1, min_lr_ratio: float = 0.0):
    """Linear warmup then cosine decay over `max_steps` optimizer steps (lengths multiplied by
    `num_processes`, because a prepared scheduler steps once per process per optimizer step)."""
    if min_lr_ratio == 0.0:
        from transformers import get_cosine_schedule_with_warmup
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps * num_processes,
                                               max_steps * num_processes)
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps * num_processes, max_steps * num_processes, min_lr_rate=min_lr_ratio)


# --------------------------------------------------------------------------- loop

@dataclass
class LoopConfig:
    max_steps: int                      # optimizer steps
    grad_clip: float | None = 1.0       # max global grad norm; None or 0: no clipping
    eval_every: int = 0                 # optimizer steps between evals; 0: only at the end
    log_every: int = 10                 # optimizer steps between train-loss logs
    metric: str = "val_loss"            # eval metric tracked for best / early stopping
    mode: str = "min"                   # "min" or "max"
    patience: int | None = None         # stop after this many evals without improvement; None: off
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0           # optimizer steps; 0: no checkpoints
    keep_checkpoints: int = 2
    desc: str = "train"                 # progress bar label

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"LoopConfig.mode must be 'min' or 'max', got {self.mode!r}")
        if self.max_steps < 1:
            raise ValueError(f"LoopConfig.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    micro_step: int = 0           # micro-batches done (all epochs)
    epoch: int = 0
    batch_in_epoch: int = 0       # micro-batches of the current epoch already consumed
    tokens: int = 0               # tokens seen, all processes
    train_time_s: float = 0.0     # time in training (not eval, not checkpointing)
    train_cpu_s: float = 0.0      # CPU time of this process in training (robust to a shared CPU)
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_time_s: float
    train_cpu_s: float
    tokens_per_s: float
    best: float | None
    best_step: int | None
    stopped_early: bool
    resumed_from: int | None
    last_eval: dict[str, float]
    history: list[dict[str, Any]]
    distributed_type: str
    num_processes: int


def _default_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


def _fingerprint_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: checkpoint {a!r} != now {b!r}")
    return diffs


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (with the COMPLETE marker), oldest first."""
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return []
    found = [p for p in Path(checkpoint_dir).glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class Trainer:
    """Run `fit()` once. Attributes: `state` (TrainState), `accelerator`, `model`."""

    def __init__(self, accelerator, model, optimizer, train_loader, scheduler, loss_fn: LossFn,
                 cfg: LoopConfig, *, eval_fn: Callable[[], dict[str, float]] | None = None,
                 step_hook: Callable[[int, torch.nn.Module], None] | None = None,
                 log_fn: Callable[[dict[str, float], int], None] | None = None,
                 on_best: Callable[[int, dict[str, float]], None] | None = None,
                 tokens_fn: Callable[[Any], int] = _default_tokens,
                 fingerprint: dict[str, Any] | None = None):
        self.accelerator = accelerator
        self.model, self.optimizer, self.loader, self.scheduler = model, optimizer, train_loader, scheduler
        self.loss_fn, self.cfg = loss_fn, cfg
        self.eval_fn, self.step_hook, self.log_fn, self.on_best = eval_fn, step_hook, log_fn, on_best
        self.tokens_fn = tokens_fn
        self.fingerprint = fingerprint or {}
        self.state = TrainState()
        self.last_eval: dict[str, float] = {}

    # ---- checkpoints
    def _save_checkpoint(self) -> None:
        acc, root = self.accelerator, Path(self.cfg.checkpoint_dir)
        name = f"step-{self.state.step:08d}"
        tmp, final = root / f".{name}.tmp", root / name
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(self.state.__dict__, indent=1))
            (tmp / COMPLETE).write_text(json.dumps({"fingerprint": self.fingerprint}, sort_keys=True))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in complete_checkpoints(root)[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _resume(self) -> int | None:
        ckpts = complete_checkpoints(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else []
        if not ckpts:
            return None
        last = ckpts[-1]
        saved = json.loads((last / COMPLETE).read_text())["fingerprint"]
        diffs = _fingerprint_diff(saved, json.loads(json.dumps(self.fingerprint)))
        if diffs:
            raise StageError(f"{last}: checkpoint was made with a different config ("
                             + "; ".join(diffs) + f"); delete {self.cfg.checkpoint_dir} to start over")
        self.accelerator.load_state(str(last))
        st = json.loads((last / STATE_FILE).read_text())
        self.state = TrainState(**st)
        return self.state.step

    # ---- batches
    def _batches(self):
        """Endless micro-batches, epoch after epoch, resuming mid-epoch with skip_first_batches."""
        st = self.state
        while True:
            loader = self.loader
            if st.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(self.loader, st.batch_in_epoch)
            loader.set_epoch(st.epoch)
            n = 0
            for batch in loader:
                n += 1
                yield batch
            if n == 0 and st.batch_in_epoch == 0:
                raise StageError("the training dataloader is empty (fewer blocks than one batch?)")
            st.epoch += 1
            st.batch_in_epoch = 0

    # ---- eval
    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.eval_fn().items()}
        self.model.train()
        st, cfg = self.state, self.cfg
        self.last_eval = metrics
        if cfg.metric in metrics:
            v = metrics[cfg.metric]
            better = st.best is None or (v < st.best if cfg.mode == "min" else v > st.best)
            if better:
                st.best, st.best_step, st.bad_evals = v, st.step, 0
                if self.on_best and self.accelerator.is_main_process:
                    self.on_best(st.step, metrics)
            else:
                st.bad_evals += 1
        return metrics

    def _record(self, row: dict[str, Any]) -> None:
        hist = self.state.history
        if hist and hist[-1]["step"] == row["step"]:
            hist[-1].update(row)
        else:
            hist.append(row)

    # ---- the loop
    def fit(self) -> TrainResult:
        acc, cfg, st = self.accelerator, self.cfg, self.state
        resumed = self._resume()
        st = self.state
        model, opt, sched = self.model, self.optimizer, self.scheduler
        model.train()
        batches = self._batches()
        bar = tqdm(total=cfg.max_steps, initial=st.step, desc=cfg.desc, dynamic_ncols=True,
                   disable=not acc.is_local_main_process)
        device = acc.device
        # sums since the last log: loss, micro-batches, tokens (this process)
        win = torch.zeros(3, dtype=torch.float64, device=device)
        extra: dict[str, float] = {}
        win_time = 0.0
        stopped_early = cfg.patience is not None and st.bad_evals >= cfg.patience
        if (st.step >= cfg.max_steps or stopped_early) and self.eval_fn and not self.last_eval:
            self._evaluate()
        while st.step < cfg.max_steps and not stopped_early:
            if self.step_hook:
                self.step_hook(st.step, model)
            t0, c0 = time.perf_counter(), time.process_time()
            grad_norm = None
            while True:  # micro-batches of one optimizer step
                batch = next(batches)
                with acc.accumulate(model):
                    loss, logs = self.loss_fn(model, batch)
                    acc.backward(loss)
                    synced = acc.sync_gradients
                    if synced and cfg.grad_clip:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    if synced:
                        sched.step()
                    opt.zero_grad(set_to_none=True)
                st.micro_step += 1
                st.batch_in_epoch += 1
                win[0] += loss.detach().double()
                win[1] += 1
                win[2] += self.tokens_fn(batch)
                for k, v in logs.items():
                    extra[k] = extra.get(k, 0.0) + float(v)
                if synced:
                    break
            st.step += 1
            win_time += time.perf_counter() - t0
            st.train_cpu_s += time.process_time() - c0
            bar.update(1)
            ckpt_now = bool(cfg.checkpoint_dir and cfg.checkpoint_every
                            and (st.step % cfg.checkpoint_every == 0 or st.step == cfg.max_steps))
            if st.step % cfg.log_every == 0 or st.step == cfg.max_steps or ckpt_now:
                tot = acc.reduce(win.clone(), reduction="sum")
                train_loss = float(tot[0] / tot[1])
                tokens = int(tot[2])
                st.tokens += tokens
                st.train_time_s += win_time
                tps = tokens / win_time if win_time > 0 else 0.0
                row = {"train_loss": train_loss, "lr": sched.get_last_lr()[0],
                       "tokens_per_s": tps, "tokens": st.tokens,
                       **{k: v / float(win[1]) for k, v in extra.items()}}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}")
                self._record({"step": st.step, "train_loss": train_loss})
                if self.log_fn and acc.is_main_process:
                    self.log_fn(row, st.step)
                win.zero_()
                extra.clear()
                win_time = 0.0
            do_eval = self.eval_fn is not None and (
                (cfg.eval_every and st.step % cfg.eval_every == 0) or st.step == cfg.max_steps)
            if do_eval:
                metrics = self._evaluate()
                self._record({"step": st.step, **metrics})
                if self.log_fn and acc.is_main_process:
                    self.log_fn(metrics, st.step)
                if cfg.patience is not None and st.bad_evals >= cfg.patience:
                    stopped_early = True
            if ckpt_now or (stopped_early and cfg.checkpoint_dir and cfg.checkpoint_every):
                self._save_checkpoint()
            if stopped_early:
                break
        bar.close()
        tps = st.tokens / st.train_time_s if st.train_time_s > 0 else 0.0
        return TrainResult(steps=st.step, tokens=st.tokens, train_time_s=st.train_time_s,
                           train_cpu_s=st.train_cpu_s,
                           tokens_per_s=tps, best=st.best, best_step=st.best_step,
                           stopped_early=stopped_early, resumed_from=resumed,
                           last_eval=dict(self.last_eval), history=list(st.history),
                           distributed_type=str(acc.distributed_type.value
                                                if hasattr(acc.distributed_type, "value")
                                                else acc.distributed_type),
                           num_processes=acc.num_processes)


def perplexity(loss: float) -> float:
    """exp(loss), capped to avoid overflow."""
    return math.exp(min(loss, 50.0))
