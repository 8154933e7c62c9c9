"""The measurement campaign behind the default parameters (issue 8): what transfers on this CPU.

Run:  .venv/bin/python bench/transfer_campaign.py [--budget-s 150] [--seeds 5] [--part probe|pretrain|all]
      (~35 min on the 2-core CPU with the defaults; needs `dvc repro pretrain` or `dvc pull` first)
Out:  bench/results/transfer/*.json (one file per measurement, reused by a rerun: delete to redo)
      docs/campaign.md (its generated block: the tables below, rebuilt from those files at the end
      of every run; the findings around it are written by people)

Part 1, `probe` (the default run's pretrained model, data/models/pretrained):
  A linear probe fitted to convergence on frozen features, the sharpest test of representation
  quality: features of the pretrained backbone against the SAME architecture at random init,
  mean-pooled against last-token, plus a bag-of-tokens probe (the same tokenizer's token
  presence vector: how far words alone go). Every task (movies, amazon, nyt, tweets, and the
  4-way `source` task), label budgets of 20 / 100 / 400 / all (capped at finetune.data.max_train)
  examples, `--seeds` stratified draws each. The probe is multinomial logistic regression
  (L-BFGS, full batch) on standardised features. Every number is VALIDATION accuracy,
  cross-fitted: the probe's L2 is chosen from a grid on one half of the validation split (by
  position) and scored on the other, both ways round, and the two halves pooled. The test
  split, which the pipeline's final evaluation reads once, is never read here: these numbers
  choose the defaults. Mean +- std over the draws.

Part 2, `pretrain` (short pretraining runs, each given the same wall-clock budget `--budget-s`):
  one variant per question, every other setting as in params.yaml:
    base        the default: clm, Llama d=128 x 2 layers, vocab 8192, block 128, task text on
    no_tapt     without the tasks' training text in the corpus (Gururangan et al. 2020)
    mlm         BERT masked LM (wordpiece 8192, lr 5e-4: post-LN BERT stalls higher)
    block64     sequence length 64 (task sentences are ~32 tokens)
    d192x4      d=192 x 4 layers (the previous default);   d256x4   d=256 x 4 layers
    vocab4k     vocabulary 4096;         vocab16k  vocabulary 16384
  The number of steps of each variant is set from its own throughput, measured by a short run
  just before, so that all get about the same CPU time. Reported: validation loss in bits per
  character (comparable across vocabularies; clm only), perplexity against the unigram baseline,
  and the Part 1 probe (mean pooling, all labels and 100 labels, 3 draws, cross-fitted validation
  accuracy) on movies and source.
  Each variant runs the real stages (stages.tokenizer/tokenize/pretrain `run`) in a scratch
  root under bench/results/transfer/roots/ (git-ignored); data/ is only read.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ptf.training.trainer import reset_accelerate  # noqa: E402
from ptf.common.atomic import write_json  # noqa: E402

OUT = REPO / "bench" / "results" / "transfer"
REPORT = REPO / "docs" / "campaign.md"
TASKS = ["movies", "amazon", "nyt", "tweets", "source"]
LABEL_BUDGETS = [20, 100, 400, None]          # None: all (finetune.data.max_train)
L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]       # per-example L2 strength of the probe
VARIANTS = {   # each against `base`, the default model of params.yaml (Llama d=128 x 2 layers)
    "base": {},
    "no_tapt": {"tapt": False},
    "mlm": {"tokenizer": {"kind": "wordpiece",
                          "special_tokens": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]",
                                             "sep": "[SEP]", "mask": "[MASK]"}},
            "pretrain": {"objective": "mlm", "lr": 5e-4}},
    "block64": {"tokenize": {"block_size": 64}, "pretrain": {"batch_size": 64}},
    "d192x4": {"pretrain": {"model": {"hidden": 192, "layers": 4, "heads": 4, "intermediate": 512}}},
    "d256x4": {"pretrain": {"model": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 688}}},
    "vocab4k": {"tokenizer": {"vocab_size": 4096}},
    "vocab16k": {"tokenizer": {"vocab_size": 16384}},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _cached(name: str, fn):
    """The JSON result `name` from OUT, or compute, store and return it."""
    f = OUT / f"{name}.json"
    if f.is_file():
        return json.loads(f.read_text())
    res = fn()
    write_json(f, res)
    return res


# --------------------------------------------------------------------------- features + probe

@torch.no_grad()
def features(backbone, ids: list[list[int]], pad_id: int, first_token_pool: bool,
             batch: int = 200) -> dict[str, torch.Tensor]:
    """Mean-pooled and last-token (BERT: [CLS]) final hidden states, (n, d) each."""
    backbone.eval()
    mean, last = [], []
    for i in range(0, len(ids), batch):
        rows = ids[i:i + batch]
        n = max(len(r) for r in rows)
        x = torch.full((len(rows), n), pad_id, dtype=torch.long)
        m = torch.zeros((len(rows), n), dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, :len(r)] = torch.tensor(r)
            m[j, :len(r)] = 1
        h = backbone(input_ids=x, attention_mask=m).last_hidden_state.float()
        mf = m[..., None].float()
        mean.append((h * mf).sum(1) / mf.sum(1))
        idx = torch.zeros(len(rows), dtype=torch.long) if first_token_pool else m.sum(1) - 1
        last.append(h[torch.arange(len(rows)), idx])
    return {"mean": torch.cat(mean), "last": torch.cat(last)}


def bag_of_tokens(ids: list[list[int]], vocab: int) -> torch.Tensor:
    x = torch.zeros(len(ids), vocab)
    for i, r in enumerate(ids):
        x[i, r] = 1.0
    return x


def fit_probe(xtr, ytr, n_classes: int, l2: float, standardize: bool = True):
    """Multinomial logistic regression by L-BFGS; returns a predict function."""
    if standardize:
        mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    else:
        mu, sd = torch.zeros(xtr.shape[1]), torch.ones(xtr.shape[1])
    x = (xtr - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, ytr) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda xs: (((xs - mu) / sd) @ w + b).argmax(-1)


def probe(feats: dict[str, torch.Tensor], labels: dict[str, list[int]], n_classes: int,
          budgets: list[int | None], seeds: int, standardize: bool = True) -> dict[str, dict]:
    """Validation accuracy, cross-fitted (mean, std over `seeds` stratified draws) per label
    budget. The test split is not read: the L2 is chosen on one half of the validation split and
    the accuracy scored on the other, both ways round, and the two scores pooled (so the number
    reported is never the one the L2 was chosen on)."""
    from ptf.data.tasks import stratified_fraction
    from ptf.measures.frontier import HALVES, half_index
    from ptf.measures.stats import mean_std

    ytr_all = torch.tensor(labels["train"])
    yva = torch.tensor(labels["validation"])
    halves_ = [torch.as_tensor(half_index(len(yva), h)) for h in HALVES]   # even, odd positions
    out = {}
    for n in budgets:
        accs, l2s = [], []
        frac = 1.0 if n is None else min(1.0, n / len(ytr_all))
        for s in range(seeds if n is not None else 1):   # all labels: one draw, nothing to vary
            idx = torch.tensor(stratified_fraction(labels["train"], frac, s))
            xtr, ytr = feats["train"][idx], ytr_all[idx]
            right = {}
            for l2 in L2_GRID:
                pred = fit_probe(xtr, ytr, n_classes, l2, standardize)
                right[l2] = (pred(feats["validation"]) == yva).float()
            correct, chosen = 0.0, []
            for pick, score in (halves_, halves_[::-1]):
                l2 = max(L2_GRID, key=lambda v: (right[v][pick].mean().item(), -L2_GRID.index(v)))
                correct += right[l2][score].sum().item()
                chosen.append(l2)
            accs.append(correct / len(yva))
            l2s.append(chosen)
        ms = mean_std(accs)
        out["all" if n is None else str(n)] = {"mean": ms["mean"], "std": ms["std"], "n": len(idx),
                                               "draws": len(accs), "l2": l2s}
    return out


def probe_model(model_dir: Path, tasks: list[str], budgets, seeds: int, kinds=("pretrained", "random"),
                bow: bool = True) -> dict:
    """Part 1 for one pretrained directory: {task: {features: {budget: {mean, std}}}}."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from ptf.common.config import load_section
    from ptf.data.tasks import DataCfg, load_task
    from ptf.training.finetune_config import FinetuneSection as FtConfig

    data_cfg: DataCfg = load_section("finetune", FtConfig, REPO / "params.yaml").data
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    is_bert = cfg.model_type == "bert"
    backbones = {}
    if "pretrained" in kinds:
        backbones["pretrained"] = AutoModel.from_pretrained(model_dir)
    if "random" in kinds:
        torch.manual_seed(0)
        backbones["random"] = AutoModel.from_config(cfg)
    res: dict = {}
    for task in tasks:
        d = load_task(REPO, task, tok, data_cfg)   # the pipeline's own tokenized, capped splits
        splits = {"train": d.train, "validation": d.validation}   # the test split is not read
        labels = {s: sp.labels for s, sp in splits.items()}
        res[task] = {}
        for kind, bb in backbones.items():
            f = {s: features(bb, sp.ids, tok.pad_token_id, is_bert) for s, sp in splits.items()}
            for pool in ("mean", "last"):
                res[task][f"{kind}/{pool}"] = probe({s: f[s][pool] for s in f}, labels,
                                                    d.n_classes, budgets, seeds)
        if bow:
            f = {s: bag_of_tokens(sp.ids, len(tok)) for s, sp in splits.items()}
            res[task]["bag_of_tokens"] = probe(f, labels, d.n_classes, budgets, seeds,
                                               standardize=False)
        va = labels["validation"]
        res[task]["_majority"] = max(va.count(c) for c in set(va)) / len(va)
        print(f"probe {model_dir.name} {task}: " + ", ".join(
            f"{k} {v['all']['mean']:.3f}" for k, v in res[task].items() if not k.startswith("_")),
            flush=True)
    return res


# --------------------------------------------------------------------------- pretraining variants

def _params() -> dict:
    from ptf.common.config import read_params
    return read_params(REPO / "params.yaml")


def prepare_data(variant: dict, roots: Path) -> Path:
    """A root with data/corpus (+ tasks) and the variant's tokenizer and shards, shared by every
    variant with the same corpus, tokenizer and tokenize settings."""
    from ptf.common import paths
    from stages import tokenize, tokenizer
    from ptf.common.config import parse_section

    p = _params()
    tapt = variant.get("tapt", True)
    tok_raw = _merge(p["tokenizer"], variant.get("tokenizer", {}))
    if "special_tokens" in variant.get("tokenizer", {}):   # replaced whole: wordpiece has no bos/eos
        tok_raw["special_tokens"] = variant["tokenizer"]["special_tokens"]
    tz_raw = _merge(p["tokenize"], variant.get("tokenize", {}))
    root = roots / ("data-" + _key([tapt, tok_raw, tz_raw]))
    if (root / "data" / "shards" / "manifest.json").is_file():
        return root
    corpus = root / paths.CORPUS
    corpus.mkdir(parents=True, exist_ok=True)
    src = REPO / paths.CORPUS
    with open(src / "train.jsonl") as fin, open(corpus / "train.jsonl", "w") as fout:
        for line in fin:   # task-adaptive text is appended by download as ids "task:..."
            if tapt or not json.loads(line)["id"].startswith("task:"):
                fout.write(line)
    (corpus / "validation.jsonl").write_bytes((src / "validation.jsonl").read_bytes())
    tokenizer.run(parse_section("tokenizer", tok_raw, tokenizer.Config), root)
    tokenize.run(parse_section("tokenize", tz_raw, tokenize.Config), root)
    return root


def bits_per_char(root: Path, val_loss: float) -> float:
    """Validation loss (nats/token, clm) as bits per character of the validation text."""
    from transformers import AutoTokenizer

    from ptf.common import paths
    tok = AutoTokenizer.from_pretrained(root / paths.TOKENIZER)
    texts = [json.loads(line)["text"] for line in open(root / paths.CORPUS / "validation.jsonl")]
    n_tok = sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    return val_loss * n_tok / sum(len(t) for t in texts) / math.log(2)


def run_variant(name: str, budget_s: float, roots: Path, seeds: int) -> dict:
    import shutil

    from ptf.common import paths
    from stages import pretrain
    from ptf.common.config import parse_section

    variant = VARIANTS[name]
    data_root = prepare_data(variant, roots)
    root = roots / name
    if root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    for sub in ("corpus", "tokenizer", "shards"):
        (root / "data" / sub).symlink_to(data_root / "data" / sub)
    base = _merge(_params()["pretrain"], variant.get("pretrain", {}))
    base.update(checkpoint_every=0, log_every=10)
    # throughput of this variant, then the steps that fill the budget
    # (twice: the first run in a process also pays one-off warm-up costs)
    probe_cfg = _merge(base, {"max_steps": 8, "warmup_steps": 1, "eval_every": 0, "eval_blocks": 8})
    for _ in range(2):
        reset_accelerate()
        m0 = pretrain.run(parse_section("pretrain", probe_cfg, pretrain.Config), root)
    step_s = m0["train_time_s"] / m0["steps"]
    steps = max(20, int(budget_s / step_s))
    cfg = _merge(base, {"max_steps": steps, "warmup_steps": max(1, steps // 10),
                        "eval_every": 0, "eval_blocks": 0})
    reset_accelerate()
    m = pretrain.run(parse_section("pretrain", cfg, pretrain.Config), root)
    out = {k: m[k] for k in ("objective", "val_loss", "val_ppl", "unigram_ppl", "steps",
                             "tokens_seen", "tokens_per_s", "train_time_s", "params_total",
                             "params_non_embedding")}
    out["variant"] = variant
    out["bits_per_char"] = bits_per_char(root, m["val_loss"]) if m["objective"] == "clm" else None
    out["probe"] = probe_model(root / paths.PRETRAINED, ["movies", "source"], [100, None],
                               seeds, kinds=("pretrained",), bow=False)
    return out


# --------------------------------------------------------------------------- report

def _ms(v: dict) -> str:
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if v.get("draws", 2) > 1 else f"{v['mean']:.3f}"


def report(probe_res: dict | None, variants: dict[str, dict], budget_s: float, seeds: int) -> str:
    lines = ["*Tables written by `bench/transfer_campaign.py` from bench/results/transfer/*.json "
             "(rerun it to regenerate them); how each number is measured is in its docstring.*", ""]
    if probe_res:
        lines += ["### 1. Linear probe on frozen features (the default run's pretrained model)", "",
                  f"Validation accuracy, cross-fitted, mean ± std over {seeds} stratified label draws "
                  "(one draw for *all*): the probe's L2 is chosen on one half of the validation split "
                  "and scored on the other, both ways round; the test split is not read. *random* is the same "
                  "architecture at random init; *bag of tokens* is a probe on token presence.", ""]
        feats = ["pretrained/mean", "pretrained/last", "random/mean", "random/last", "bag_of_tokens"]
        for task in (t for t in TASKS if t in probe_res):
            by_feat = probe_res[task]
            budgets = ["all" if b is None else str(b) for b in LABEL_BUDGETS]
            n_all = by_feat[feats[0]]["all"]["n"]
            lines += [f"**{task}** (majority class {by_feat['_majority']:.3f} of validation; all = {n_all} labels)", "",
                      "| features | " + " | ".join(f"{b} labels" for b in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for feat in feats:
                lines.append(f"| {feat} | " + " | ".join(_ms(by_feat[feat][b]) for b in budgets) + " |")
            lines.append("")
    if variants:
        lines += ["### 2. Short pretraining runs at the same CPU time", "",
                  f"Each variant pretrained for about {budget_s:.0f} s of training time, "
                  "everything else as in params.yaml. bits/char: validation loss per character "
                  "(comparable across vocabularies; masked LM loss is not). ppl / unigram: "
                  "perplexity over the unigram baseline of the same targets (lower is better). "
                  "Probe: Part 1's mean-pooled probe on this model, cross-fitted validation accuracy.", "",
                  "| variant | params | steps | tokens/s | train s | bits/char | ppl / unigram "
                  "| movies 100 | movies all | source 100 | source all |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in variants.items():
            pm, ps = v["probe"]["movies"]["pretrained/mean"], v["probe"]["source"]["pretrained/mean"]
            bpc = f"{v['bits_per_char']:.3f}" if v["bits_per_char"] is not None else "n/a (mlm)"
            lines.append(
                f"| {name} | {v['params_total'] / 1e6:.2f} M | {v['steps']} | {v['tokens_per_s']:,.0f} "
                f"| {v['train_time_s']:.0f} | {bpc} | {v['val_ppl'] / v['unigram_ppl']:.3f} "
                f"| {_ms(pm['100'])} | {_ms(pm['all'])} | {_ms(ps['100'])} | {_ms(ps['all'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- BEGIN generated by bench/transfer_campaign.py -->", "<!-- END generated -->"


def write_report(tables: str) -> None:
    """Replace the generated block of docs/campaign.md; the prose around it is written by people."""
    old = REPORT.read_text() if REPORT.is_file() else f"{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{REPORT}: the markers {BEGIN} ... {END} are missing; restore them")
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tmp = REPORT.with_suffix(".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{tables}{END}{tail}")
    tmp.replace(REPORT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--part", choices=["probe", "pretrain", "all"], default="all")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    from ptf.common import paths

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    probe_res = None
    if args.part in ("probe", "all"):
        probe_res = _cached(f"probe-s{args.seeds}-val", lambda: probe_model(
            REPO / paths.PRETRAINED, TASKS, LABEL_BUDGETS, args.seeds))
    variants = {}
    if args.part in ("pretrain", "all"):
        roots = OUT / "roots"
        for name in args.variants:
            variants[name] = _cached(f"variant-{name}-{args.budget_s:g}s-val", lambda name=name: run_variant(
                name, args.budget_s, roots, min(args.seeds, 3)))
    text = report(probe_res, variants, args.budget_s, args.seeds)
    write_report(text)
    print(text)
    print(f"campaign: {time.perf_counter() - t0:.0f} s; wrote {REPORT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
