"""Benchmark of the `tokenize` stage: throughput against raw `tokenizers`, and peak memory.

Run: .venv/bin/python bench/tokenize_speed.py [--repeats 5] [--scale 10] [--root DIR]
Needs data/corpus/{train,validation}.jsonl and data/tokenizer (run the `download` and
`tokenizer` stages first); reads the `tokenize` section of params.yaml.

Prints, from one run:
  1. throughput of the stage's streaming pipeline (`stages.tokenize.tokenize_split`: read jsonl,
     parse, `encode_batch_fast` in batches, frame, pack, write Arrow shards with sha256) on
     train.jsonl, against raw `Tokenizer.encode_batch` on the same texts already in memory (one
     call over the whole list, Rust parallelism on); the two interleaved, `--repeats` times,
     medians and their ratio;
  2. peak RSS (the child's VmHWM from /proc) of the whole stage (`stages.tokenize.run`)
     in a fresh subprocess on the corpus, and on train.jsonl repeated `--scale` times, next to
     the RSS of a subprocess that only imports the same modules.
"""
from __future__ import annotations

import argparse
import os
import sys
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")

from ptf.common import paths
from ptf.common.config import load_section
from stages.tokenize import Config, load_tokenizer, parallelism, tokenize_split
from ptf.data.corpus import iter_texts

CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from stages.tokenize import Config, run
from pathlib import Path
if {do_run}:
    t = time.perf_counter()
    run(Config(**json.loads({cfg!r})), root=Path({root!r}))
    print("SECONDS", time.perf_counter() - t)
# VmHWM: this process's own peak RSS (ru_maxrss of a child can carry the parent's size over
# the fork+exec, so it is not used).
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("VMHWM_KB", hwm)
"""


def run_child(root: Path, cfg: Config, do_run: bool) -> tuple[float, float]:
    """Peak RSS (MiB, the child's own VmHWM) and seconds of a fresh interpreter that runs the
    stage on `root` (or only imports it)."""
    code = CHILD.format(repo=str(REPO), cfg=json.dumps(cfg.model_dump()), root=str(root),
                        do_run=do_run)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err,
                             env={**os.environ, "TQDM_DISABLE": "1"})
        if p.wait() != 0:
            err.seek(0)
            raise RuntimeError(f"child failed: {err.read()[-2000:]}")
        out.seek(0)
        vals = dict(line.split()[:2] for line in out.read().splitlines() if line.split())
        return int(vals["VMHWM_KB"]) / 1024, float(vals.get("SECONDS", "nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--root", type=Path, default=REPO,
                    help="where data/corpus and data/tokenizer are (default: the repo)")
    args = ap.parse_args()
    cfg = load_section("tokenize", Config, REPO / "params.yaml")
    data_root = args.root.resolve()
    os.chdir(data_root)
    train = paths.CORPUS / "train.jsonl"
    info = load_tokenizer(paths.TOKENIZER)
    texts = list(iter_texts(train))
    chars = sum(map(len, texts))
    print(f"corpus: {train} {train.stat().st_size / 1e6:.2f} MB, {len(texts)} documents, "
          f"{chars / 1e6:.2f} M chars; tokenizer {info.kind}, vocab {info.vocab_size}; "
          f"params: {cfg.model_dump()}; cpus {os.cpu_count()}")

    # 1. throughput, interleaved
    stage_tps, raw_tps, fast_tps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            out = Path(tmp) / f"r{r}"
            t = time.perf_counter()
            entry = tokenize_split(train, out, info, cfg)
            stage_tps.append(entry["corpus_tokens"] / (time.perf_counter() - t))
            with parallelism(cfg.threads):
                t = time.perf_counter()
                encs = info.tokenizer.encode_batch(texts, add_special_tokens=False)
                dt = time.perf_counter() - t
            raw_tokens = sum(len(e.ids) for e in encs)
            raw_tps.append(raw_tokens / dt)
            del encs
            with parallelism(cfg.threads):
                t = time.perf_counter()
                encs = info.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
                fast_tps.append(sum(len(e.ids) for e in encs) / (time.perf_counter() - t))
            del encs
            print(f"  repeat {r}: stage {stage_tps[-1] / 1e6:.3f} M tok/s "
                  f"({entry['corpus_tokens']} tokens incl. {entry['documents']} separators), "
                  f"raw encode_batch {raw_tps[-1] / 1e6:.3f} M tok/s ({raw_tokens} tokens), "
                  f"raw encode_batch_fast {fast_tps[-1] / 1e6:.3f} M tok/s")
    s, w, f = (statistics.median(x) for x in (stage_tps, raw_tps, fast_tps))
    print(f"THROUGHPUT median of {args.repeats}: stage {s / 1e6:.3f} M tok/s, raw encode_batch "
          f"{w / 1e6:.3f} M tok/s, ratio stage/raw = {s / w:.2f}; (raw encode_batch_fast, no "
          f"offsets, as the stage uses: {f / 1e6:.3f} M tok/s, stage/fast = {s / f:.2f})")

    # 2. peak RSS, each in a fresh subprocess
    del texts
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = run_child(Path(tmp), cfg, do_run=False)
        print(f"RSS imports only: {base:.0f} MiB")
        for scale in (1, args.scale):
            root = Path(tmp) / f"x{scale}"
            (root / paths.CORPUS).mkdir(parents=True)
            os.symlink((data_root / paths.TOKENIZER).resolve(), root / paths.TOKENIZER)
            src = (data_root / train).read_bytes()
            with open(root / paths.CORPUS / "train.jsonl", "wb") as f:
                for _ in range(scale):
                    f.write(src)
            os.symlink((data_root / paths.CORPUS / "validation.jsonl").resolve(),
                       root / paths.CORPUS / "validation.jsonl")
            rss, secs = run_child(root, cfg, do_run=True)
            m = json.loads((root / paths.SHARDS / "manifest.json").read_text())
            print(f"RSS {scale:>2}x corpus: peak {rss:.0f} MiB (imports {base:.0f} MiB + "
                  f"{rss - base:.0f} MiB), {m['train']['corpus_tokens'] + m['validation']['corpus_tokens']} "
                  f"tokens, {m['train']['blocks']} train blocks in {len(m['train']['shards'])} "
                  f"shard(s), {secs:.1f} s")


if __name__ == "__main__":
    main()
