"""The results page of one pipeline run: docs/results.md and docs/figures/*.png.

In:  a workspace whose `dvc status` is clean (the page describes exactly the `dvc.lock` there);
     the metrics that dvc.yaml declares (the files `dvc metrics show` reads):
       data/metrics/pretrain.json            validation perplexity vs the unigram baseline
       data/metrics/curves.json              accuracy per label fraction and strategy
       data/metrics/finetune/<task>/<s>.json per-seed test accuracy, trainable parameters
       data/metrics/sequential.json          the accuracy matrix of the sequential run
       data/metrics/forgetting.json          drift, gains, CL measures and the claims' verdicts
     the figures of the forgetting stage: data/plots/{tradeoff,learning_curves,accuracy_matrix}.png;
     data/models/pretrained/ and the best fine-tuned model (the evidence card);
     docs/results_notes.md: human-written explanations, one `## <claim>` section per claim
     (`few_labels`, `forget_less`, `general`), included verbatim.
Out: docs/figures/ (replaced whole, atomically), then docs/results.md (atomically), stamped with
     the sha256 of dvc.lock and the git commit (when the tree is clean).
Run: python -m scripts.results [--root .] [--repeats 30] [--sentence "..."]
     (`make results`). Refuses, with `error: ...` and exit 1, when `dvc status` is not clean or a
     metrics file is missing.

Every number in the page's tables is a value of those metrics files (scaled by 100 for the %
columns); the verdicts are the `claims` computed by the forgetting stage, never written here.
Only the evidence card (tokenizer output, predictions, latency) is measured when the page is made.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.atomic import atomic_dir, write_text
from ptf.common.cli import StageError, main_guard

PAGE = Path("docs/results.md")
FIGURES = Path("docs/figures")
NOTES = Path("docs/results_notes.md")
LOCK = Path("dvc.lock")
METRICS = {
    "pretrain": paths.METRICS / "pretrain.json",
    "curves": paths.METRICS / "curves.json",
    "sequential": paths.METRICS / "sequential.json",
    "forgetting": paths.METRICS / "forgetting.json",
}
FINETUNE_GLOB = "data/metrics/finetune/*/*.json"
FIGURE_FILES = {name: paths.PLOTS / f"{name}.png"
                for name in ("tradeoff", "learning_curves", "accuracy_matrix")}
CLAIMS = ("few_labels", "forget_less")
EXAMPLE = "A gripping, beautifully acted film that stays with you long after the credits roll."
OUT_OF_DOMAIN = {
    "code": "def area(r):\n    return 3.14159 * r ** 2  # TODO: use math.pi",
    "German": "Der Zug nach Berlin fährt morgen früh um acht Uhr vom Hauptbahnhof ab.",
}
REPRODUCED = "reproduced"


class ResultsError(StageError):
    """The workspace cannot give a faithful page (stale pipeline, missing metrics or models)."""


# ---------------------------------------------------------------- provenance: dvc.lock, git, dvc status

def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def lock_stamp(root: Path) -> dict[str, Any]:
    """sha256 of dvc.lock's bytes; the git commit, and whether the tree is clean apart from the
    page's own outputs (then the commit alone reproduces the page)."""
    lock = root / LOCK
    if not lock.is_file():
        raise ResultsError(f"{lock}: missing; run `dvc repro` first")
    commit = _git(root, "rev-parse", "--verify", "HEAD")
    porcelain = _git(root, "status", "--porcelain", "--", ".",
                     f":(exclude){PAGE.as_posix()}", f":(exclude){FIGURES.as_posix()}")
    return {"lock_sha256": sha256_file(lock),
            "git_commit": commit.strip() if commit else None,
            "git_clean": porcelain is not None and porcelain.strip() == "" and bool(commit)}


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json` in `root`, parsed ({} when every stage is up to date)."""
    try:
        p = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root,
                           capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        raise ResultsError(f"`dvc status --json` could not run in {root}: {e}") from None
    if p.returncode != 0:
        raise ResultsError(f"`dvc status --json` failed in {root} (exit {p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-500:]}")
    text = p.stdout.strip()
    try:
        return json.loads(text[text.index("{"):]) if text else {}
    except (ValueError, json.JSONDecodeError):
        raise ResultsError(f"`dvc status --json` printed no JSON: {text[-300:]!r}") from None


def check_clean(status: dict[str, Any]) -> None:
    """Refuse unless every stage is up to date: the page must describe exactly dvc.lock."""
    if not status:
        return
    lines = []
    for stage, changes in sorted(status.items()):
        what = []
        for ch in changes if isinstance(changes, list) else [changes]:
            if isinstance(ch, dict):
                for kind, files in ch.items():
                    names = sorted(files) if isinstance(files, dict) else [str(files)]
                    more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
                    what.append(f"{kind}: {', '.join(names[:4])}{more}")
            else:
                what.append(str(ch))
        lines.append(f"{stage} ({'; '.join(what) or 'changed'})")
    more = f" | (+{len(lines) - 6} more stages)" if len(lines) > 6 else ""
    raise ResultsError("`dvc status` is not clean, so the outputs do not match dvc.lock: "
                       + " | ".join(lines[:6]) + more + ". Run `dvc repro` (or `dvc checkout`) first.")


# ---------------------------------------------------------------- the metrics dvc.yaml declares

def declared_metrics(root: Path) -> list[str]:
    """The metrics paths of dvc.yaml, `${item.x}` templates turned into `*` globs."""
    import yaml

    f = root / "dvc.yaml"
    if not f.is_file():
        raise ResultsError(f"{f}: missing")
    spec = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    out = []
    for stage in (spec.get("stages") or {}).values():
        for m in stage.get("metrics") or []:
            p = next(iter(m)) if isinstance(m, dict) else m
            out.append(re.sub(r"\$\{[^}]*\}", "*", str(p)))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: missing; run `dvc repro`") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e.msg})") from None


def load_metrics(root: Path) -> dict[str, Any]:
    """{name: content} of the page's metrics files, each checked to be a metric of dvc.yaml;
    `finetune` maps "<task>/<strategy>" to its file's content."""
    declared = declared_metrics(root)

    def is_declared(rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, pat) for pat in declared)

    out: dict[str, Any] = {}
    for name, rel in METRICS.items():
        if not is_declared(rel.as_posix()):
            raise ResultsError(f"{rel} is not a metric of dvc.yaml; the page reads only declared metrics")
        out[name] = _read_json(root / rel)
    if not is_declared(FINETUNE_GLOB.replace("*", "x")):
        raise ResultsError(f"{FINETUNE_GLOB} is not a metric of dvc.yaml")
    out["finetune"] = {f"{f.parent.name}/{f.stem}": _read_json(f)
                       for f in sorted(root.glob(FINETUNE_GLOB))}
    for key in ("tasks", "claims", "sequential"):
        if key not in out["forgetting"]:
            raise ResultsError(f"{root / METRICS['forgetting']}: no `{key}`; rerun `dvc repro forgetting`")
    return out


def source_files(root: Path) -> list[Path]:
    return [root / p for p in METRICS.values()] + sorted(root.glob(FINETUNE_GLOB))


# ---------------------------------------------------------------- formatting (pure)

def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    if not _is_num(x):
        return "n/a"
    return f"{x * scale:{'+' if sign else ''}.{digits}f}"


def pm(stats: dict[str, Any] | None, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    """`mean ± std` of a {mean, std, n} block (the std only with 2 or more seeds)."""
    if not isinstance(stats, dict) or not _is_num(stats.get("mean")):
        return "n/a"
    m = num(stats["mean"], digits, scale, sign)
    if (stats.get("n") or 0) < 2 or not _is_num(stats.get("std")):
        return m
    return f"{m} ± {num(stats['std'], digits, scale)}"


def pct_digits(fraction: Any) -> int:
    """Decimals for a share shown in %: small shares (linear probe, LoRA) keep 3 significant."""
    if not _is_num(fraction) or fraction == 0 or abs(fraction) >= 0.01:
        return 2
    return min(6, 2 - int(math.floor(math.log10(abs(fraction) * 100))))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header, *rows]]
    return (["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def _frac_key(k: str) -> float:
    try:
        return float(k)
    except ValueError:
        return math.inf


# ---------------------------------------------------------------- notes written by people

def read_notes(path: Path) -> dict[str, str]:
    """`## <name>` sections of docs/results_notes.md, verbatim (HTML comments kept; a section
    holding only comments or blanks counts as empty and is left out)."""
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    name, buf = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^##\s+(\S+)\s*$", line)
        if m:
            if name is not None:
                out[name] = "\n".join(buf).strip("\n")
            name, buf = m.group(1), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf).strip("\n")
    return {k: v for k, v in out.items()
            if re.sub(r"<!--.*?-->", "", v, flags=re.S).strip()}


# ---------------------------------------------------------------- sections of the page (pure)

def section_pretrain(pre: dict[str, Any]) -> list[str]:
    L = ["## Pretraining", "",
         f"Objective `{pre.get('objective', 'n/a')}`; the unigram baseline is the perplexity of the "
         "same held-out targets under add-one-smoothed token frequencies of the training shards: a "
         "floor any language model must beat (`data/metrics/pretrain.json`).", ""]
    rows = [["validation loss (nats/token)", num(pre.get("val_loss"), 4)],
            ["validation perplexity", num(pre.get("val_ppl"), 2)],
            ["unigram baseline perplexity", num(pre.get("unigram_ppl"), 2)],
            ["optimizer steps", num(pre.get("steps"), 0)],
            ["tokens seen", num(pre.get("tokens_seen"), 0)],
            ["parameters (total)", num(pre.get("params_total"), 0)],
            ["parameters (non-embedding)", num(pre.get("params_non_embedding"), 0)],
            ["train time (s)", num(pre.get("train_time_s"), 1)]]
    L += table(["measure", "value"], rows)
    v, u = pre.get("val_ppl"), pre.get("unigram_ppl")
    if _is_num(v) and _is_num(u):
        L += ["", f"The pretrained model's validation perplexity is "
                  f"{'below' if v < u else 'NOT below'} the unigram baseline "
                  f"({num(v, 2)} vs {num(u, 2)}): it "
                  f"{'learned more than token frequencies' if v < u else 'did not learn more than token frequencies'}."]
    return L


def section_curves(curves: dict[str, Any], scratch: str) -> list[str]:
    res = curves.get("results") or {}
    n_seeds = len(curves.get("seeds") or []) or None
    strategies = list(res)
    fracs = sorted({k for by_f in res.values() for k in by_f}, key=_frac_key)
    L = ["## Data efficiency", "",
         f"Task `{curves.get('task', 'n/a')}`: test accuracy (mean ± std over seeds "
         f"{curves.get('seeds', 'n/a')}) for each fraction of the training labels, pretrained "
         f"backbone against `{scratch}` (random init, same architecture and budget: "
         f"{curves.get('max_steps', 'n/a')} steps) (`data/metrics/curves.json`).", ""]
    rows = []
    for f in fracs:
        labels = sorted({res[s][f]["n_labels"] for s in strategies
                         if f in res[s] and _is_num(res[s][f].get("n_labels"))})
        rows.append([f, " / ".join(str(int(n)) for n in labels) or "n/a"]
                    + [pm({"n": n_seeds, **res[s][f]}) if f in res[s] else "n/a" for s in strategies])
    L += table(["fraction", "labels", *strategies], rows)
    L += ["", "![Learning curves: test accuracy against the number of labels](figures/learning_curves.png)"]
    return L


def section_tasks(fg: dict[str, Any]) -> list[str]:
    ev = fg.get("eval") or {}
    L = ["## Per task and strategy: what fine-tuning bought and what it cost", "",
         "Gain = test accuracy minus chance (1 / classes) or minus the mean `scratch` accuracy of the "
         "task. Forgetting = Δ held-out LM loss: the fine-tuned backbone under the pretrained LM head "
         f"minus the pretrained model, on the same {ev.get('blocks', 'n/a')} held-out blocks "
         f"({ev.get('tokens', 'n/a')} tokens; pretrained loss {num(ev.get('loss_pretrained'), 4)}); "
         "> 0 means the pretraining objective got worse. Mean ± std over seeds "
         "(`data/metrics/forgetting.json`, from `data/metrics/finetune/<task>/<strategy>.json`).", ""]
    rows = []
    for task in sorted(fg["tasks"]):
        for s in sorted(fg["tasks"][task]):
            a = fg["tasks"][task][s]
            ms = a.get("mean_std") or {}
            drift = a.get("drift_applicable", True)
            tf = (ms.get("trainable_fraction") or {}).get("mean")
            rows.append([task, s, num((ms.get("test_accuracy") or {}).get("n"), 0),
                         pm(ms.get("test_accuracy")),
                         pm(ms.get("gain_over_chance"), sign=True),
                         pm(ms.get("gain_over_scratch"), sign=True),
                         pm(ms.get("delta_loss"), 4, sign=True) if drift else "n/a (no pretrained backbone)",
                         pm(ms.get("rel_delta_pct"), 2, sign=True) if drift else "n/a",
                         pm(ms.get("share_worse"), 1, scale=100) if drift else "n/a",
                         num(tf, pct_digits(tf), scale=100)])
    L += table(["task", "strategy", "seeds", "test accuracy", "gain vs chance", "gain vs scratch",
                "Δ LM loss (nats/token)", "Δ LM loss %", "blocks worse %", "trainable %"], rows)
    L += ["", "![Learning vs forgetting: gain against Δ held-out LM loss](figures/tradeoff.png)"]
    return L


def _sequential_runs(seq_json: Any) -> list[dict[str, Any]]:
    """The runs of sequential.json with the names the forgetting stage gives them."""
    from stages.forgetting import run_name, sequential_runs

    runs = sequential_runs(seq_json, "data/metrics/sequential.json") if seq_json else []
    return [{**it, "name": run_name(it, i)} for i, it in enumerate(runs)]


def section_sequential(seq_json: Any, fg: dict[str, Any]) -> list[str]:
    runs = _sequential_runs(seq_json)
    measures = fg.get("sequential") or {}
    L = ["## Sequential fine-tuning: the accuracy matrix", ""]
    if not runs:
        return L + ["No sequential run in `data/metrics/sequential.json`."]
    L += ["R[i][j] = test accuracy on task j after training the first i tasks of the order (row 0: "
          "before any training, fresh heads) (`data/metrics/sequential.json`). ACC = mean final "
          "accuracy; BWT = mean change of each earlier task from just after learning it to the end "
          "(< 0: forgotten); FWT = accuracy on a task before training it minus row 0; forgetting = "
          "Chaudhry et al.'s mean drop from the best earlier accuracy; *adj* = the same on "
          "chance-adjusted accuracies (`data/metrics/forgetting.json`, `sequential`).", ""]
    for run in runs:
        M = run.get("matrix") or []
        order = [str(t) for t in (run.get("order") or [f"task{j}" for j in range(len(M[0]) if M else 0)])]
        strat = run.get("strategy")
        strat = (" → ".join(map(str, strat)) if isinstance(strat, list)
                 else ", ".join(f"{k}: {v}" for k, v in strat.items()) if isinstance(strat, dict)
                 else str(strat))
        L += [f"### Run `{run['name']}`: {' → '.join(order)} (strategy {strat})", ""]
        labels = ["before"] + [f"after {t}" for t in order]
        L += table(["", *order], [[labels[i] if i < len(labels) else f"row {i}",
                                   *[num(a) for a in row]] for i, row in enumerate(M)])
        m = measures.get(run["name"])
        if m:
            r, a = m.get("raw") or {}, m.get("chance_adjusted") or {}
            L += [""] + table(
                ["measure", "ACC", "BWT", "FWT", "forgetting"],
                [["raw", num(r.get("acc")), num(r.get("bwt"), sign=True), num(r.get("fwt"), sign=True),
                  num(r.get("avg_forgetting"))],
                 ["chance-adjusted", num(a.get("acc")), num(a.get("bwt"), sign=True),
                  num(a.get("fwt"), sign=True), num(a.get("avg_forgetting"))]])
            bwt = r.get("bwt")
            if _is_num(bwt):
                L += ["", f"BWT {num(bwt, sign=True)}: "
                          + ("earlier tasks lost accuracy as later ones were learned (catastrophic "
                             "forgetting of tasks)." if bwt < 0 else
                             "earlier tasks did not lose accuracy on average.")]
        L.append("")
    L += ["![Accuracy matrix of the sequential run](figures/accuracy_matrix.png)"]
    return L


def _why_not(c: dict[str, Any]) -> str:
    v = str(c.get("verdict", ""))
    if v == REPRODUCED:
        return "reproduced"
    if v.startswith("not reproduced"):
        return f"the difference is on the other side (beyond its spread {num(c.get('spread'))})"
    if "within 1 std" in v:
        return (f"the difference {num(c.get('diff'), 4, sign=True)} is within its seed spread "
                f"{num(c.get('spread'), 4)}")
    if "fewer than 2 seeds" in v:
        return "fewer than 2 seeds: no spread to judge the difference against"
    return v or "no verdict"


def _explain(claim: str, comps: dict[str, Any], notes: dict[str, str]) -> list[str]:
    bad = {k: c for k, c in comps.items() if c.get("verdict") != REPRODUCED}
    L = [f"**Where it does not reproduce.** {len(bad)} of {len(comps)} comparisons are not "
         "reproduced; what the measurements say about each:", ""]
    L += [f"- `{k}`: {c.get('verdict')}: {_why_not(c)}." for k, c in sorted(bad.items())]
    L += ["", f"<!-- BEGIN notes: docs/results_notes.md, section `## {claim}` (written by people) -->"]
    L += [notes[claim]] if claim in notes else [
        f"*No explanation written yet: add one under `## {claim}` in `docs/results_notes.md`.*"]
    L += [f"<!-- END notes `## {claim}` -->"]
    return L


def section_claims(fg: dict[str, Any], notes: dict[str, str], reference: str) -> list[str]:
    claims = fg.get("claims") or {}
    L = ["## Does the default run reproduce the paradigm's claims?", "",
         "The verdicts are computed by the forgetting stage (`claims` in "
         "`data/metrics/forgetting.json`): a claim is *reproduced* when the difference of the seed "
         "means is on the claimed side and larger than sqrt(std_a² + std_b²), *not reproduced* when "
         "it is that large on the other side, otherwise inconclusive.", ""]
    c1 = claims.get("few_labels") or {}
    comps1 = c1.get("comparisons") or {}
    L += [f"### Claim 1 (data efficiency): a pretrained backbone beats scratch when labels are few", "",
          f"**Verdict: {c1.get('verdict', 'n/a')}.** Tested: {c1.get('claim', 'n/a')}."]
    parts = []
    for k in sorted(comps1):
        c = comps1[k]
        nl = c.get("n_labels") or []
        parts.append(f"on `{k}` with {', '.join(map(str, nl))} labels (fraction {c.get('fraction')}) "
                     f"the pretrained arm reaches {pm(c.get('accuracy'))} against "
                     f"{pm(c.get('scratch_accuracy'))} from scratch (difference "
                     f"{num(c.get('diff'), sign=True)}, spread {num(c.get('spread'))}: {c.get('verdict')})")
    if parts:
        text = "; ".join(parts)
        L[-1] += " " + text[0].upper() + text[1:] + "."
    if c1.get("verdict") != REPRODUCED:
        L += [""] + _explain("few_labels", comps1, notes)
    L += ["", f"### Claim 2 (forgetting): `{reference}` fine-tuning forgets more of the pretraining "
          "objective than parameter-efficient, frozen, low-LR or replay strategies, and they pay for "
          "that in some task accuracy", ""]
    c2 = claims.get("forget_less") or {}
    comps2 = c2.get("comparisons") or {}
    L += [f"**Verdict: {c2.get('verdict', 'n/a')}.** Tested: {c2.get('claim', 'n/a')}."]
    if comps2:
        L += [""]
        for k in sorted(comps2):
            c = comps2[k]
            cost = c.get("accuracy_cost") or {}
            L.append(f"- `{k}`: Δ LM loss {pm(c.get('delta_loss'), 4)} vs `{reference}` "
                     f"{pm(c.get('reference_delta_loss'), 4)} (difference {num(c.get('diff'), 4, sign=True)}, "
                     f"spread {num(c.get('spread'), 4)}: {c.get('verdict')}); accuracy against "
                     f"`{reference}` {num(cost.get('diff'), sign=True)} (spread {num(cost.get('spread'))}: "
                     f"lower accuracy {cost.get('verdict_lower_accuracy', 'n/a')}).")
        paid = [k for k, c in comps2.items()
                if (c.get("accuracy_cost") or {}).get("verdict_lower_accuracy") == REPRODUCED]
        L += ["", f"Accuracy paid for forgetting less: significantly lower test accuracy than "
                  f"`{reference}` in {len(paid)} of {len(comps2)} comparisons"
                  + (f" ({', '.join(f'`{k}`' for k in sorted(paid))})." if paid else ".")]
    if c2.get("verdict") != REPRODUCED:
        L += [""] + _explain("forget_less", comps2, notes)
    if "general" in notes:
        L += ["", "### Notes", "", "<!-- BEGIN notes: docs/results_notes.md, section `## general` -->",
              notes["general"], "<!-- END notes `## general` -->"]
    return L


def best_model(fg: dict[str, Any]) -> tuple[str, str, str, float]:
    """(task, strategy, seed, mean test accuracy) of the arm with the highest mean test accuracy,
    and its best seed."""
    best = None
    for t in sorted(fg["tasks"]):
        for s in sorted(fg["tasks"][t]):
            a = fg["tasks"][t][s]
            m = ((a.get("mean_std") or {}).get("test_accuracy") or {}).get("mean")
            if _is_num(m) and (best is None or m > best[3]):
                seeds = a.get("seeds") or {}
                seed = max(sorted(seeds), key=lambda k: seeds[k].get("test_accuracy") or -1) if seeds else "seed0"
                best = (t, s, seed, m)
    if best is None:
        raise ResultsError("forgetting.json: no task x strategy with a test accuracy")
    return best


# ---------------------------------------------------------------- evidence card (measured now)

def count_parameters(model_dir: Path) -> int | None:
    """Parameters stored in the safetensors files of an HF directory (tied weights once)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def evidence_card(pretrained: Path, model_dir: Path, sentence: str = EXAMPLE, repeats: int = 30,
                  out_of_domain: dict[str, str] | None = None) -> dict[str, Any]:
    """Model choice, tokenizer output, the fine-tuned model's prediction for `sentence`, the
    failure checks (too long, out of domain) and the CPU latency per sentence (batch 1)."""
    import torch
    from transformers import AutoTokenizer

    from ptf.models.artifacts import load_classifier, read_meta
    from ptf.models.strategies import pooled_logits

    pretrained, model_dir = Path(pretrained), Path(model_dir)
    cfg = json.loads((pretrained / "config.json").read_text(encoding="utf-8"))
    meta = read_meta(model_dir)
    tok = AutoTokenizer.from_pretrained(pretrained)
    max_pos = cfg.get("max_position_embeddings")
    max_len = int(meta.get("max_length") or min(max_pos or 512, tok.model_max_length))
    enc = tok([sentence], truncation=True, max_length=max_len, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    card: dict[str, Any] = {
        "model": {"architecture": (cfg.get("architectures") or ["n/a"])[0],
                  "model_type": cfg.get("model_type"),
                  **{k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size", "vocab_size", "max_position_embeddings")},
                  "parameters": count_parameters(pretrained)},
        "tokenizer": {"class": type(tok).__name__, "sentence": sentence, "input_ids": ids,
                      "tokens": tok.convert_ids_to_tokens(ids),
                      "attention_mask": enc["attention_mask"][0].tolist(),
                      "batch_shape": list(enc["input_ids"].shape),
                      "decoded": tok.decode(ids), "padding_side": tok.padding_side,
                      "model_max_length": tok.model_max_length},
        "finetuned": {"dir": str(model_dir), "strategy": meta.get("strategy"), "task": meta.get("task"),
                      "pooling": meta.get("pooling"), "peft": meta.get("peft"), "max_length": max_len},
    }
    ctok = AutoTokenizer.from_pretrained(model_dir) if (model_dir / "tokenizer_config.json").is_file() else tok
    model = load_classifier(model_dir, pretrained).eval()
    labels = list(meta.get("label_names") or [])

    @torch.no_grad()
    def predict(text: str, truncate: bool = True) -> dict[str, Any]:
        e = ctok([text], return_tensors="pt", **({"truncation": True, "max_length": max_len}
                                                  if truncate else {}))
        probs = torch.softmax(pooled_logits(model, e["input_ids"], e["attention_mask"]).float(), -1)[0]
        k = int(probs.argmax())
        return {"label": labels[k] if k < len(labels) else str(k), "confidence": float(probs[k]),
                "probs": {(labels[i] if i < len(labels) else str(i)): float(p) for i, p in enumerate(probs)},
                "tokens": int(e["input_ids"].shape[1])}

    card["prediction"] = predict(sentence)
    long = " ".join([sentence] * (1 + 2 * max(max_pos or 0, max_len) // max(1, len(ids))))
    n_long = len(ctok(long)["input_ids"])
    checks: dict[str, Any] = {"long": {"tokens": n_long, "max_length": max_len, "max_position_embeddings": max_pos,
                                       "truncated": predict(long)}}
    try:
        checks["long"]["untruncated"] = predict(long, truncate=False)
    except Exception as e:  # noqa: BLE001 - the failure itself is the evidence
        checks["long"]["untruncated_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    checks["out_of_domain"] = {k: {"text": v, **predict(v)} for k, v in (out_of_domain or OUT_OF_DOMAIN).items()}
    card["checks"] = checks

    for _ in range(3):
        predict(sentence)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        predict(sentence)
        times.append(time.perf_counter() - t0)
    card["latency"] = {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
                       "max_ms": 1000 * max(times), "repeats": len(times), "batch_size": 1,
                       "device": "cpu", "torch_threads": torch.get_num_threads(),
                       "includes": "tokenization + forward pass + softmax"}
    return card


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "⏎") + "`"


def render_card(card: dict[str, Any], best: tuple[str, str, str, float]) -> list[str]:
    m, t, ft, p = card["model"], card["tokenizer"], card["finetuned"], card["prediction"]
    task, strategy, seed, acc = best
    L = ["## Evidence card of the default run", "",
         "Measured when this page was generated (not a DVC metric).", "",
         f"- **Model**: `{m['architecture']}` ({m['model_type']}), {m['num_hidden_layers']} layers, hidden "
         f"{m['hidden_size']}, {m['num_attention_heads']} heads, MLP {m['intermediate_size']}, vocabulary "
         f"{m['vocab_size']}, {m['max_position_embeddings']} positions; "
         f"{m['parameters'] if m['parameters'] is not None else 'n/a'} parameters "
         "(stored in `data/models/pretrained/`, tied weights counted once).",
         f"- **Tokenizer** (`AutoTokenizer.from_pretrained('data/models/pretrained')`, "
         f"{t['class']}, padding side {t['padding_side']}) on the example sentence:", "",
         "```text",
         f"sentence:       {t['sentence']}",
         f"tokens:         {t['tokens']}",
         f"input_ids:      {t['input_ids']}",
         f"attention_mask: {t['attention_mask']}",
         f"batch shape:    {tuple(t['batch_shape'])}",
         f"decoded:        {t['decoded']}",
         "```", "",
         f"- **Best fine-tuned model** (highest mean test accuracy in `forgetting.json`): `{task}` / "
         f"`{strategy}`, mean test accuracy {num(acc)}; its best seed `{seed}` "
         f"(`{ft['dir']}`, pooling {ft['pooling']}, peft {ft['peft']}).",
         f"- **Task result** for the example sentence: **{p['label']}** with confidence "
         f"{num(p['confidence'])} (probabilities "
         + ", ".join(f"{k} {num(v)}" for k, v in p["probs"].items()) + ").", "",
         "**Failure checks**", ""]
    lg = card["checks"]["long"]
    tr = lg["truncated"]
    L.append(f"- *Longer than the model's maximum*: {lg['tokens']} tokens against max_length "
             f"{lg['max_length']} (fine-tuning's truncation) and {lg['max_position_embeddings']} "
             f"positions. The pipeline's tokenizer call truncates it to {tr['tokens']} tokens: "
             f"{tr['label']} ({num(tr['confidence'])}).")
    if "untruncated" in lg:
        u = lg["untruncated"]
        beyond = lg["max_position_embeddings"] is not None and u["tokens"] > lg["max_position_embeddings"]
        L.append(f"  Untruncated ({u['tokens']} tokens) the model runs without an error"
                 + (" although the input is beyond the positions it was trained on, so this prediction "
                    "is unreliable" if beyond else "") + f": {u['label']} ({num(u['confidence'])}). "
                 "Always truncate (as `ptf.models.artifacts.classify` does).")
    else:
        L.append(f"  Untruncated it fails clearly: `{lg['untruncated_error']}`.")
    for k, o in card["checks"]["out_of_domain"].items():
        L.append(f"- *Out of domain ({k})*: {_code(o['text'])} → {o['label']} with confidence "
                 f"{num(o['confidence'])}: a sentiment classifier has no 'none of these' answer, so "
                 "its confidence on such inputs is no evidence of correctness.")
    la = card["latency"]
    L += ["", f"**Latency** per sentence, batch 1, CPU ({la['torch_threads']} torch threads, "
              f"{la['includes']}): median {num(la['median_ms'], 2)} ms over {la['repeats']} repeats "
              f"(min {num(la['min_ms'], 2)}, max {num(la['max_ms'], 2)})."]
    return L


# ---------------------------------------------------------------- the page

def render_page(metrics: dict[str, Any], stamp: dict[str, Any], notes: dict[str, str],
                card_lines: list[str], sources: dict[str, str], figures: dict[str, str],
                reference: str = "full", scratch: str = "scratch") -> str:
    commit = stamp.get("git_commit")
    git = (f"git commit `{commit}` (clean tree)" if stamp.get("git_clean")
           else f"git commit `{commit}` **plus uncommitted changes**" if commit else "no git commit")
    L = ["# Results of the default run", "",
         "<!-- Generated by `python -m scripts.results` (make results). Do not edit: edit "
         "docs/results_notes.md and regenerate. -->", "",
         f"Generated from `dvc.lock` sha256 `{stamp['lock_sha256']}` with `dvc status` clean; "
         f"{git}. Every number in the tables below is a value of the metrics files that `dvc.yaml` "
         "declares (`dvc metrics show`); the verdicts are those computed by the forgetting stage.", ""]
    L += section_pretrain(metrics["pretrain"]) + [""]
    L += section_curves(metrics["curves"], scratch) + [""]
    L += section_tasks(metrics["forgetting"]) + [""]
    L += section_sequential(metrics["sequential"], metrics["forgetting"]) + [""]
    L += section_claims(metrics["forgetting"], notes, reference) + [""]
    L += card_lines + [""]
    L += ["## Sources", "", "sha256 of every file this page was made from:", ""]
    L += [f"- `{k}`: `{v}`" for k, v in sorted({**sources, **figures}.items())]
    L.append("")
    return "\n".join(L)


def _reference_and_scratch(root: Path) -> tuple[str, str]:
    """The forgetting stage's reference and scratch strategies (params.yaml), for the prose."""
    import yaml

    f = root / "params.yaml"
    sec = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("forgetting", {}) if f.is_file() else {}
    return str(sec.get("reference_strategy", "full")), str(sec.get("scratch_strategy", "scratch"))


def run(root: Path = Path("."), repeats: int = 30, sentence: str = EXAMPLE,
        status_fn: Callable[[Path], dict[str, Any]] = dvc_status) -> Path:
    root = Path(root)
    check_clean(status_fn(root))
    stamp = lock_stamp(root)
    metrics = load_metrics(root)
    for name, f in FIGURE_FILES.items():
        if not (root / f).is_file():
            raise ResultsError(f"{root / f}: missing figure; run `dvc repro forgetting`")
    reference, scratch = _reference_and_scratch(root)
    best = best_model(metrics["forgetting"])
    mdir = root / paths.FINETUNED / best[0] / best[1] / best[2]
    if not mdir.is_dir():
        raise ResultsError(f"{mdir}: the best fine-tuned model is missing; run `dvc pull` or `dvc repro`")
    card = evidence_card(root / paths.PRETRAINED, mdir, sentence=sentence, repeats=repeats)
    card["finetuned"]["dir"] = mdir.relative_to(root).as_posix()
    sources = {f.relative_to(root).as_posix(): sha256_file(f) for f in source_files(root)}
    notes_path = root / NOTES
    if notes_path.is_file():
        sources[NOTES.as_posix()] = sha256_file(notes_path)
    figures = {f"{FIGURES.as_posix()}/{f.name}": sha256_file(root / f) for f in FIGURE_FILES.values()}
    page = render_page(metrics, stamp, read_notes(notes_path), render_card(card, best), sources,
                       figures, reference, scratch)
    with atomic_dir(root / FIGURES) as tmp:
        for f in FIGURE_FILES.values():
            shutil.copy2(root / f, tmp / f.name)
    write_text(root / PAGE, page)
    return root / PAGE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats (default 30)")
    ap.add_argument("--sentence", default=EXAMPLE, help="the evidence card's example sentence")
    args = ap.parse_args()

    def go():
        out = run(args.root, args.repeats, args.sentence)
        print(f"wrote {out} and {args.root / FIGURES}/")

    main_guard(go, expected=(ResultsError,))


if __name__ == "__main__":
    main()
