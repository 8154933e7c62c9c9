"""Benchmark of a fine-tuning sweep: configurations per CPU-minute, one at a time against
trained together (`ptf.training.batched.fit_together`), with the same results.

Run:  .venv/bin/python bench/sweep_speed.py [--strategies full linear_probe] [--k 8] [--repeats 5]
                                            [--alone 1] [--threads 1] [--data DIR] [--task T]

- Model: data/models/pretrained under `--data` (default this repo) when it exists, else the
  `pretrain.model` of params.yaml with random weights (the default 2-layer, d=128 Llama;
  vocabulary 8192 from the tokenizer that `bench/pretrain_speed.py` builds or links).
- Task: data/tasks/<--task> under `--data` (default: the task of the first item of
  `sweep.runs`) when it exists, else synthetic texts with the real tasks' lengths (mean ~32
  tokens, cap `finetune.data.max_length`), 4 classes, `finetune.data` caps.
- Configurations: per strategy (`full`, `linear_probe`, `l2sp`, `replay`: the penalty and the
  replayed LM loss are the ones `fit` adds, with the arm's values; `lora`: peft LoRA with the
  arm's rank and targets) 4 learning rates spanning 30x x K/4
  seeds, the `finetune` params of params.yaml (steps, batch, warmup, eval every, clipping).
- (a) one at a time, in one process: `build_classifier` + `ptf.training.finetuning.fit` per
  configuration, what `run_arm` pays per configuration (model build, Accelerator, training,
  validation every `eval_every` steps, best-weights restore, final validation and test), without
  MLflow logging; `--alone` of the K configurations per repeat, different ones each repeat.
  (b) together: the K models built the same way, then `fit_together`.
- Measured: CPU seconds of this process (`time.process_time`, all its threads) and wall
  seconds per configuration; the paths are interleaved (a, b, b, a, ...) and medians reported,
  because other jobs share this CPU. One torch thread by default: with two, the CPU time of
  both paths is inflated by OpenMP threads spinning while the other waits for a shared core
  (measured here at load ~10: 50 CPU-s for a fine-tune that takes 4 at one thread). The
  results of (a) and (b) for the same configuration are compared (best step, validation and
  test accuracy, test predictions).
- Also counted (`torch.utils.flop_counter`, in one untimed extra pass of each path): the
  matrix-product FLOPs per configuration of each path, and from them the FLOPs each path
  runs per CPU second, beside a 2048^3 matmul's rate on this thread. The speed ratio is the
  product of two factors: how much less arithmetic together does (FLOP ratio) and how much
  faster it runs its arithmetic (rate ratio). Where the FLOP ratio is below a goal, only a
  rate the one-at-a-time path does not reach can meet it.
- Out: the table on stdout and bench/results/sweep_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

LRS = {"full": [3e-5, 1e-4, 3e-4, 1e-3], "linear_probe": [1e-3, 3e-3, 1e-2, 3e-2],
       "l2sp": [3e-5, 1e-4, 3e-4, 1e-3], "replay": [3e-5, 1e-4, 3e-4, 1e-3],
       "lora": [3e-4, 1e-3, 3e-3, 1e-2]}   # 30x each
KEYS = ("best_step", "val_accuracy", "test_accuracy")


def prepare(tmp: Path, data_root: Path = REPO, task: str | None = None):
    """(Context, TaskData, finetune config, where the model and task came from); the model and
    task are read under `data_root` (default: this repo) when there."""
    from bench.pretrain_speed import prepare_root
    from ptf.common import paths
    from ptf.common.config import parse_section, read_params
    from ptf.data.tasks import Split, TaskData, load_task
    from ptf.models.modeling import ModelConfig, build_model
    from ptf.training.finetune_config import FinetuneKeys
    from ptf.training.finetuning import Context
    from transformers import AutoTokenizer

    params = read_params(REPO / "params.yaml")
    # the HF head's own pooling (last non-pad token): what fit_together computes
    cfg = parse_section("finetune", {**params["finetune"], "pooling": "last"}, FinetuneKeys)
    root = prepare_root(tmp / "root", blocks=64)
    pre = root / paths.PRETRAINED
    if (data_root / paths.PRETRAINED / "config.json").is_file():
        pre.parent.mkdir(parents=True, exist_ok=True)
        pre.symlink_to(data_root / paths.PRETRAINED)
        source = {"model": str(data_root / paths.PRETRAINED)}
    else:
        tok = AutoTokenizer.from_pretrained(str(root / paths.TOKENIZER))
        torch.manual_seed(0)
        mcfg = parse_section("pretrain.model", params["pretrain"]["model"], ModelConfig)
        build_model(mcfg, "clm", tok).save_pretrained(str(pre))
        tok.save_pretrained(str(pre))
        source = {"model": "random weights, params.yaml pretrain.model"}
    ctx = Context.create(root, cfg)
    task = task or next(iter(params["sweep"]["runs"].values()))["task"]   # the first item's
    if (data_root / paths.TASKS / task / "dataset_dict.json").is_file():
        (root / paths.TASKS).parent.mkdir(parents=True, exist_ok=True)
        (root / paths.TASKS).symlink_to(data_root / paths.TASKS)
        data = load_task(root, task, ctx.tokenizer, cfg.data)
        source["task"] = str(data_root / paths.TASKS / task)
    else:
        rng = random.Random(0)
        cap, vocab = cfg.data.max_length, len(ctx.tokenizer)

        def split(n: int) -> Split:
            lens = [max(4, min(cap, round(rng.gauss(32, 10)))) for _ in range(n)]
            return Split([[rng.randrange(10, vocab) for _ in range(L)] for L in lens],
                         [rng.randrange(4) for _ in range(n)])
        data = TaskData("synthetic", ["a", "b", "c", "d"], split(cfg.data.max_train),
                        split(cfg.data.max_eval), split(cfg.data.max_eval))
        source["task"] = "synthetic: lengths ~N(32, 10) clipped to [4, max_length], 4 classes"
    return ctx, data, cfg, source


def clock():
    return time.process_time(), time.perf_counter()


def alone(ctx, data, cfg, strategy, configs) -> tuple[list[dict], float, float]:
    """(results, CPU s, wall s) of `configs` trained one at a time, as run_arm trains them."""
    from ptf.models.strategies import build_classifier
    from ptf.training.finetuning import fit
    arm = getattr(cfg.arms, strategy)
    c0, w0 = clock()
    out = []
    for lr, seed in configs:
        clf = build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=seed,
                               pooling=cfg.pooling)
        out.append(fit(ctx, clf, strategy, arm, lr, seed, data, data.train, cfg.train.max_steps,
                       desc=f"alone {strategy} lr={lr:g} seed={seed}"))
    c1, w1 = clock()
    return out, c1 - c0, w1 - w0


def together(ctx, data, cfg, strategy, configs) -> tuple[list[dict], float, float]:
    from ptf.models.strategies import build_classifier
    from ptf.training.batched import Run, fit_together, regulariser
    arm, tc = getattr(cfg.arms, strategy), cfg.train
    c0, w0 = clock()
    runs = []
    for lr, seed in configs:
        clf = build_classifier(ctx.pretrained, data.label_names, strategy, arm, seed=seed,
                               pooling=cfg.pooling)
        runs.append(Run(clf, lr, seed, data.train, regulariser(ctx, clf, strategy, arm, seed)))
    out = fit_together(runs, tc, tc.max_steps,
                       lambda split, seed: ctx.loader(split, tc.batch_size, True, seed),
                       data.validation, data.test, data.n_classes, arm.weight_decay)
    c1, w1 = clock()
    return out, c1 - c0, w1 - w0


def same(a: dict, b: dict) -> bool:
    return (all(a[k] == b[k] for k in KEYS)
            and a.get("test_predictions", b["test_predictions"]) == b["test_predictions"])


def matrix_flops(fn, *args) -> float:
    """Matrix-product FLOPs of `fn(*args)` (mm, bmm, addmm: what `torch.utils.flop_counter`
    counts on the CPU; its CPU attention kernel is not counted, small at these lengths in
    both paths)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return float(fc.get_total_flops())


def measure(ctx, data, cfg, strategy: str, k: int, repeats: int, n_alone: int) -> dict:
    """Interleaved repeats of both paths for one strategy; medians, ratios, result checks."""
    from ptf.training.trainer import reset_accelerate
    lrs = LRS[strategy]
    configs = [(lrs[i % len(lrs)], i // len(lrs)) for i in range(k)]
    alone(ctx, data, cfg, strategy, configs[:1])        # warm-up: imports, allocator, kernels
    rows, mismatches = [], []
    for r in range(repeats):
        pick = [configs[(r * n_alone + j) % k] for j in range(n_alone)]
        order = ("alone", "together") if r % 2 == 0 else ("together", "alone")
        row: dict = {"repeat": r, "order": list(order), "alone_configs": pick}
        for path in order:
            reset_accelerate()
            if path == "alone":
                res_a, cpu, wall = alone(ctx, data, cfg, strategy, pick)
                row["alone_cpu_s"], row["alone_wall_s"] = cpu / len(pick), wall / len(pick)
            else:
                res_b, cpu, wall = together(ctx, data, cfg, strategy, configs)
                row["together_cpu_s"], row["together_wall_s"] = cpu / k, wall / k
        for (lr, seed), ra in zip(pick, res_a):
            rb = res_b[configs.index((lr, seed))]
            if not same(ra, rb):
                mismatches.append({"lr": lr, "seed": seed, **{x: [ra[x], rb[x]] for x in KEYS}})
        row["ratio_cpu"] = row["alone_cpu_s"] / row["together_cpu_s"]
        row["ratio_wall"] = row["alone_wall_s"] / row["together_wall_s"]
        rows.append(row)
        print(f"{strategy} repeat {r}: alone {row['alone_cpu_s']:.2f} CPU-s/config, together "
              f"{row['together_cpu_s']:.2f}: {row['ratio_cpu']:.2f}x "
              f"(wall {row['ratio_wall']:.2f}x), load {os.getloadavg()[0]:.1f}", flush=True)
    med = {x: statistics.median(r[x] for r in rows)
           for x in ("alone_cpu_s", "together_cpu_s", "alone_wall_s", "together_wall_s",
                     "ratio_cpu", "ratio_wall")}
    flops = {"alone": matrix_flops(alone, ctx, data, cfg, strategy, configs[:1]),
             "together": matrix_flops(together, ctx, data, cfg, strategy, configs) / k}
    rate = {p: flops[p] / med[f"{p}_cpu_s"] for p in flops}
    return {"configs_per_cpu_minute": {"alone": 60 / med["alone_cpu_s"],
                                       "together": 60 / med["together_cpu_s"]},
            "matrix_gflop_per_config": {p: f / 1e9 for p, f in flops.items()},
            "flop_ratio": flops["alone"] / flops["together"],
            "matrix_gflop_per_cpu_s": {p: r / 1e9 for p, r in rate.items()},
            "rate_ratio": rate["together"] / rate["alone"],
            "median_ratio_cpu": med["ratio_cpu"], "median_ratio_wall": med["ratio_wall"],
            "medians_per_config": med, "configs": configs, "repeats": rows,
            "same_results": {"compared": repeats * n_alone, "mismatches": mismatches}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="+", default=["full", "linear_probe"], choices=list(LRS))
    ap.add_argument("--k", type=int, default=8, help="configurations trained together")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alone", type=int, default=1, help="configurations run alone per repeat")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--data", default=str(REPO), help="folder whose data/ holds the pretrained "
                    "model and the tasks (default: this repo; absent: random model, synthetic task)")
    ap.add_argument("--task", default=None, help="the task (default: that of sweep.runs' first item)")
    ap.add_argument("--out", default=str(REPO / "bench/results/sweep_speed.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    from bench.pretrain_speed import matmul_peak
    peak = matmul_peak()[1] / 1e9      # per CPU second of this process
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as d:
        ctx, data, cfg, source = prepare(Path(d), Path(a.data), a.task)
        res = {s: measure(ctx, data, cfg, s, a.k, a.repeats, a.alone) for s in a.strategies}
    tc = cfg.train
    result = {
        "what": "configurations per CPU-minute of a fine-tuning sweep: one at a time "
                "(build_classifier + ptf.training.finetuning.fit each) vs together "
                "(ptf.training.batched.fit_together); medians of interleaved repeats",
        "strategies": res,
        "matmul_2048_gflop_per_cpu_s": peak,
        "conditions": {"k": a.k, "repeats": a.repeats, "alone_per_repeat": a.alone,
                       "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                       "load_average_start": load0, "load_average_end": os.getloadavg()[0],
                       "torch": torch.__version__, "max_steps": tc.max_steps,
                       "batch_size": tc.batch_size, "eval_every": tc.eval_every,
                       "eval_batch_size": tc.eval_batch_size, "n_train": len(data.train),
                       "n_validation": len(data.validation), "n_test": len(data.test),
                       "max_length": cfg.data.max_length,
                       "mean_tokens": sum(map(len, data.train.ids)) / len(data.train), **source},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{a.k} configurations a strategy, {tc.max_steps} steps x batch {tc.batch_size}, eval "
          f"every {tc.eval_every} on {len(data.validation)} + test {len(data.test)}; "
          f"{torch.get_num_threads()} torch thread(s); {source}")
    for s, r in res.items():
        m = r["medians_per_config"]
        ok = r["same_results"]["compared"] - len(r["same_results"]["mismatches"])
        print(f"{s:13s} one at a time {60 / m['alone_cpu_s']:6.1f} configurations per CPU-minute, "
              f"together {60 / m['together_cpu_s']:6.1f}: median ratio "
              f"{r['median_ratio_cpu']:.2f}x per CPU second ({r['median_ratio_wall']:.2f}x wall); "
              f"same results {ok}/{r['same_results']['compared']}")
        g, f = r["matrix_gflop_per_config"], r["matrix_gflop_per_cpu_s"]
        print(f"{'':13s} matrix GFLOP a configuration {g['alone']:.1f} vs {g['together']:.1f} "
              f"(FLOP ratio {r['flop_ratio']:.2f}x), run at {f['alone']:.1f} vs "
              f"{f['together']:.1f} GFLOP per CPU second (rate ratio {r['rate_ratio']:.2f}x)")
    print(f"a 2048^3 float32 matmul runs at {peak:.1f} GFLOP per CPU second on this thread")
    print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs); "
          f"written {a.out}")


if __name__ == "__main__":
    main()
