"""Benchmark of the pretrain stage: tokens/s, MFU, and the ratio to HF `Trainer`.

Run:  .venv/bin/python bench/pretrain_speed.py [--steps 20] [--repeats 3] [--params params.yaml]
      .venv/bin/python bench/pretrain_speed.py --arch-compare     (GPT-2 vs BERT vs Llama per step)

- Data: data/shards + data/tokenizer when they exist, else random tokens (vocab 8192, block 128)
  with the tiny test tokenizer padded to that vocabulary.
- The stage: `stages.pretrain.run` with the `pretrain` params, `max_steps=--steps`, no
  checkpoints, one small eval at the end (not timed: the stage's tokens/s excludes eval).
- HF `Trainer`: the same model class, init seed, data, batch, optimizer settings, schedule and
  steps; tokens/s over its training loop (from on_train_begin to on_train_end).
- Peak: a matmul timed in the same run (median of repeats): on the CPU 2048 x 2048 in fp32; on
  a GPU (CUDA, used when there is one) 8192 x 8192 in the stage's precision (bf16 when
  `pretrain.mixed_precision` is bf16), and MFU also against the chip's datasheet dense rate
  (`--datasheet-tflops`, default 989: an H100 / H200 SXM's dense bf16).
- MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 x (non-embedding params +
  output-layer params) + 12 x layers x seq_len x hidden (PaLM appendix).
- Random-token data take the vocabulary and block size of the params file (`tokenizer.vocab_size`,
  `tokenize.block_size`), so `--params configs/gpu.yaml` measures that file's model as it trains.
Repeats are interleaved (stage, Trainer, stage, Trainer, ...) and medians reported: this CPU
is shared and single runs are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
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

from ptf.training.trainer import reset_accelerate  # noqa: E402


CUDA = torch.cuda.is_available()


def matmul_peak(dtype: torch.dtype = torch.float32, repeats: int = 7) -> tuple[float, float]:
    """FLOP/s of an n x n matmul (n = 8192 on a GPU, 2048 on the CPU): per wall second and per
    CPU second of this process (the latter means little on a GPU)."""
    n, dev, k = (8192, "cuda", 10) if CUDA else (2048, "cpu", 1)   # one GPU product is ~1 ms: time ten
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3 if CUDA else 1):
        a @ b
    wall, cpu = [], []
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(k):
            a @ b
        if CUDA:
            torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) / k)
        cpu.append((time.process_time() - c) / k)
    return 2 * n ** 3 / statistics.median(wall), 2 * n ** 3 / statistics.median(cpu)


def prepare_root(tmp: Path, vocab: int = 8192, block: int = 128, blocks: int = 4096,
                 params: Path = REPO / "params.yaml") -> Path:
    """A root with data/shards + data/tokenizer: links to the repo's, or synthetic ones."""
    from ptf.common import paths
    data = tmp / "data"
    data.mkdir(parents=True)
    if (REPO / paths.SHARDS / "manifest.json").is_file() and (REPO / paths.TOKENIZER).is_dir():
        (data / "shards").symlink_to(REPO / paths.SHARDS)
        (data / "tokenizer").symlink_to(REPO / paths.TOKENIZER)
        return tmp
    from ptf.common.atomic import write_json
    from ptf.common.config import load_section
    from ptf.data.shards import write_shards
    from stages.tokenizer import Config as TokConfig
    from stages.tokenizer import train, wrap

    # a real byte-level BPE from the tokenizer stage, padded to `vocab` (the ids are random)
    tcfg = load_section("tokenizer", TokConfig, params)
    tok = wrap(train(lambda: [["the quick brown fox jumps over the lazy dog"] * 50], tcfg), tcfg)
    tok.add_tokens([f"tok{i}" for i in range(vocab - len(tok))])
    tok.save_pretrained(str(data / "tokenizer"))
    g = torch.Generator().manual_seed(0)
    manifest = {"block_size": block}
    for split, n in (("train", blocks), ("validation", 64)):
        (data / "shards" / split).mkdir(parents=True)
        ids = torch.randint(0, vocab, (n, block), generator=g).tolist()
        manifest[split] = write_shards(ids, data / "shards" / split, block, 65536)
    write_json(data / "shards" / "manifest.json", manifest)
    return tmp


def stage_tokens_per_s(root: Path, cfg) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of the stage's training loop."""
    from stages.pretrain import run
    reset_accelerate()
    m = run(cfg, root)
    return m["tokens_per_s"], m["tokens_seen"] / m["train_cpu_s"]


def hf_trainer_tokens_per_s(root: Path, cfg) -> tuple[float, float]:
    import json as _json

    from transformers import (AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,
                              set_seed)

    from ptf.common import paths
    from ptf.models.modeling import build_model
    from ptf.data.shards import load_blocks
    reset_accelerate()
    manifest = _json.loads((root / paths.SHARDS / "manifest.json").read_text())
    ds = load_blocks(root / paths.SHARDS / "train", manifest["train"]).with_format("torch")
    tok = AutoTokenizer.from_pretrained(str(root / paths.TOKENIZER))
    set_seed(cfg.seed)
    model = build_model(cfg.model, cfg.objective, tok)
    block = manifest["block_size"]
    if cfg.objective == "clm":
        def collate(rows):
            x = torch.stack([r["input_ids"] for r in rows]).long()
            return {"input_ids": x, "labels": x}
    else:
        from transformers import DataCollatorForLanguageModeling
        mlm = DataCollatorForLanguageModeling(tok, mlm_probability=cfg.mlm_probability)

        def collate(rows):
            return mlm([{"input_ids": r["input_ids"].long()} for r in rows])

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            self.dt, self.dc = time.perf_counter() - self.t0, time.process_time() - self.c0

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(root / "hf-out"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.max_steps, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", max_grad_norm=cfg.grad_clip,
        logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=not CUDA, bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
        dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True,
        remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
            callbacks=[clock]).train()
    tokens = cfg.max_steps * cfg.grad_accum * cfg.batch_size * block
    return tokens / clock.dt, tokens / clock.dc


def arch_compare(steps: int, repeats: int) -> None:
    """Per-step CPU time of GPT-2 variants, BERT and Llama of the same width/depth/vocab."""
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM)
    V, H, L, B, T = 8192, 256, 4, 16, 128
    torch.manual_seed(0)

    def gpt2(attn="sdpa", act="gelu_new", tie=True, ln=True):
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=T, activation_function=act,
            tie_word_embeddings=tie, attn_implementation=attn, resid_pdrop=0, embd_pdrop=0,
            attn_pdrop=0, bos_token_id=0, eos_token_id=0))
    variants = {
        "GPT2 sdpa, gelu_new (default)": lambda: gpt2(),
        "GPT2 eager attention": lambda: gpt2("eager"),
        "GPT2 sdpa, fused gelu": lambda: gpt2(act="gelu"),
        "GPT2 sdpa, untied head": lambda: gpt2(tie=False),
        "BERT sdpa (post-LN, gelu)": lambda: BertForMaskedLM(BertConfig(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
            intermediate_size=4 * H, max_position_embeddings=T, hidden_dropout_prob=0,
            attention_probs_dropout_prob=0, attn_implementation="sdpa")),
        "Llama sdpa (SwiGLU 4H, RMSNorm, tied)": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=T,
            tie_word_embeddings=True, attn_implementation="sdpa")),
    }
    models = {k: f() for k, f in variants.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), 1e-4) for k, m in models.items()}
    x = torch.randint(0, V, (B, T))

    def step(k):
        out = models[k](input_ids=x, labels=x)
        out.loss.backward()
        opts[k].step()
        opts[k].zero_grad()
    for k in models:
        step(k)
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for _ in range(repeats):
        for k in models:
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(k)
            wall[k].append(B * T * steps / (time.perf_counter() - t))
            cpu[k].append(B * T * steps / (time.process_time() - c))
    print(f"batch {B}x{T}, hidden {H}, {L} layers, vocab {V}, {torch.get_num_threads()} threads; "
          f"median of {repeats} interleaved repeats of {steps} steps")
    print(f"{'model':40s} {'params':>8s} {'tokens/s':>9s} {'tokens/CPU-s':>13s}")
    for k in models:
        n = sum(p.numel() for p in models[k].parameters())
        print(f"{k:40s} {n / 1e6:7.2f}M {statistics.median(wall[k]):9,.0f} "
              f"{statistics.median(cpu[k]):13,.0f}")
    # where the time goes in the default GPT-2: the profiler's top ops
    from torch.profiler import ProfilerActivity, profile
    for k in ("GPT2 sdpa, gelu_new (default)", "Llama sdpa (SwiGLU 4H, RMSNorm, tied)"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(k)
        print(f"\n{k}: top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--arch-compare", action="store_true")
    ap.add_argument("--datasheet-tflops", type=float, default=989.0,
                    help="the GPU's dense rate in the stage's precision (TFLOP/s)")
    a = ap.parse_args()
    if a.arch_compare:
        arch_compare(max(2, a.steps // 5), a.repeats)
        return
    from ptf.common.config import parse_section, read_params
    from ptf.models.modeling import build_model, flops_per_token
    from stages.pretrain import Config
    params = read_params(Path(a.params))
    raw = params["pretrain"]
    raw = {**raw, "max_steps": a.steps, "warmup_steps": min(raw["warmup_steps"], a.steps - 1),
           "eval_every": 0, "eval_blocks": 16, "checkpoint_every": 0, "log_every": a.steps,
           "experiment": "bench"}
    cfg = parse_section("pretrain", raw, Config)
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as d:
        tmp = Path(d)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        per_step = raw["batch_size"] * raw["grad_accum"]
        root = prepare_root(tmp / "root", vocab=params["tokenizer"]["vocab_size"],
                            block=params["tokenize"]["block_size"],
                            blocks=max(4096, per_step * a.steps), params=Path(a.params))
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(root / "data/tokenizer"))
        block = json.loads((root / "data/shards/manifest.json").read_text())["block_size"]
        fl = flops_per_token(build_model(cfg.model, cfg.objective, tok), block)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision,
                                                                     torch.float32)
        res = {k: [] for k in ("stage", "stage_cpu", "hf", "hf_cpu", "peak", "peak_cpu")}
        for i in range(a.repeats):
            for k, v in zip(("peak", "peak_cpu"), matmul_peak(dtype if CUDA else torch.float32)):
                res[k].append(v)
            for k, v in zip(("stage", "stage_cpu"), stage_tokens_per_s(root, cfg)):
                res[k].append(v)
            for k, v in zip(("hf", "hf_cpu"), hf_trainer_tokens_per_s(root, cfg)):
                res[k].append(v)
            print(f"repeat {i}: stage {res['stage'][-1]:,.0f} tokens/s, HF Trainer "
                  f"{res['hf'][-1]:,.0f} tokens/s, matmul peak {res['peak'][-1] / 1e9:,.0f} GFLOP/s",
                  flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    s, h, p = med["stage"], med["hf"], med["peak"]
    f = fl["flops_per_token"]
    mfu = s * f / p
    print(f"\nmodel: {cfg.objective}, hidden {cfg.model.hidden}, {cfg.model.layers} layers, "
          f"batch {cfg.batch_size}x{block} x accum {cfg.grad_accum}, {a.steps} steps, "
          f"{torch.cuda.get_device_name() if CUDA else f'{torch.get_num_threads()} CPU threads'}, "
          f"precision {cfg.mixed_precision}")
    print(f"FLOPs per token = 6 x (non-embedding params + output-layer params) "
          f"+ 12 x layers x seq_len x hidden\n  = {fl['formula']}")
    what = f"{dtype} 8192x8192" if CUDA else "fp32 2048x2048"
    print(f"matmul peak ({what}, median): {p / 1e9:,.1f} GFLOP/s")
    if CUDA:
        sheet = a.datasheet_tflops * 1e12
        print(f"MFU against the datasheet's {a.datasheet_tflops:,.0f} TFLOP/s: stage "
              f"{100 * s * f / sheet:.1f}%, HF Trainer {100 * med['hf'] * f / sheet:.1f}%")
    print(f"stage:      {s:,.0f} tokens/s (median of {a.repeats}), "
          f"{s * fl['flops_per_token'] / 1e9:,.1f} GFLOP/s, MFU {100 * mfu:.1f}%")
    print(f"HF Trainer: {h:,.0f} tokens/s (median of {a.repeats}), MFU "
          f"{100 * h * fl['flops_per_token'] / p:.1f}%")
    print(f"ratio stage / Trainer: {s / h:.2f} (wall), "
          f"{med['stage_cpu'] / med['hf_cpu']:.2f} (per CPU second)")
    print("per CPU second of this process (robust when other jobs share the CPU): matmul "
          f"{med['peak_cpu'] / 1e9:,.1f} GFLOP/CPU-s, stage {med['stage_cpu']:,.0f} tokens/CPU-s, "
          f"MFU {100 * med['stage_cpu'] * f / med['peak_cpu']:.1f}%; HF Trainer MFU "
          f"{100 * med['hf_cpu'] * f / med['peak_cpu']:.1f}%")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores: > 2 means shared)")


if __name__ == "__main__":
    main()
