"""scripts/results.py on a tiny fake run: metrics in the stages' own formats (forgetting.json built
with the forgetting stage's helpers), the repo's real dvc.yaml/params.yaml, a 2-layer Llama as the
pretrained model and one saved classifier. Shows: every number in the page's tables is a value that
`dvc metrics show` reports for those files; the verdict paragraphs follow `claims`; the notes are
included verbatim; dvc.lock's hash is stamped; an unclean `dvc status` refuses and writes nothing.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import results as rs
from ptf.measures import cl_metrics as cl
from ptf.measures.stats import mean_std
from stages import forgetting as fg
from ptf.common.config import load_section, read_params
from tests.finetune_fixtures import make_pretrained, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]
SEEDS = ["seed0", "seed1", "seed2"]
STRATEGIES = ["full", "linear_probe", "lora", "scratch"]
R = random.Random(7)


def val(lo: float, hi: float) -> float:
    """A distinctive value (5 decimals) so that a table cell cannot match a wrong leaf by chance."""
    return round(R.uniform(lo, hi), 5)


def write(root: Path, rel: str, obj) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def finetune_json(task: str, strategy: str, accs: list[float], frac: float) -> dict:
    """The shape `stages.finetune.run` writes."""
    seeds = [{"seed": i, "test_accuracy": a, "test_macro_f1": a - 0.01, "val_accuracy": a,
              "trainable_params": int(frac * 1e6), "total_params": 1_000_000, "trainable_fraction": frac,
              "lr": 1e-4, "n_train": 100} for i, a in enumerate(accs)]
    m = sum(accs) / len(accs)
    return {"task": task, "strategy": strategy, "seeds": seeds, "chosen_lr": 1e-4,
            "test_accuracy": {"mean": m, "std": 0.01}, "trainable_fraction": frac,
            "trainable_params": int(frac * 1e6), "n_train": 100}


def save_classifier(pre: Path, dest: Path, strategy: str) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        pre, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    dest.mkdir(parents=True)
    model.save_pretrained(dest)
    (dest / "finetune_meta.json").write_text(json.dumps(
        {"strategy": strategy, "task": "movies", "label_names": LABELS, "pooling": "last",
         "peft": False, "pretrained_dir": str(pre), "max_length": 16}))


def make_fake_run(root: Path, tokenizer_pre: Path) -> Path:
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    # the fake run is of `movies`, whatever task the default params fine-tune
    params = read_params(REPO / "params.yaml")
    params["finetune"]["tasks"] = ["movies"]
    (root / "params.yaml").write_text(json.dumps(params, indent=2))   # JSON is YAML
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n# fake lock\n")
    cfg = load_section("forgetting", fg.Config, root / "params.yaml")
    write(root, "data/metrics/pretrain.json", {
        "objective": "clm", "val_loss": val(3, 4), "val_ppl": val(20, 50), "unigram_ppl": val(300, 600),
        "steps": 500, "tokens_seen": 2048000, "params_total": 4321987, "params_non_embedding": 1234567,
        "train_time_s": val(100, 300), "wall_time_s": 400.0, "distributed_type": "MULTI_CPU"})
    # curves: the csv rows of stages.curves and its JSON summary
    rows, results = [], {}
    for s in ("full", "linear_probe", "scratch"):
        for frac, n in ((0.01, 20), (0.2, 400), (1.0, 2000)):
            accs = [val(0.5, 0.9) for _ in SEEDS]
            rows += [{"task": "movies", "strategy": s, "fraction": frac, "n_labels": n, "seed": i,
                      "test_accuracy": a} for i, a in enumerate(accs)]
            ms = mean_std(accs)
            results.setdefault(s, {})[f"{frac:g}"] = {"mean": ms["mean"], "std": ms["std"],
                                                      "n_labels": n, "chosen_lr": 1e-3}
    write(root, "data/metrics/curves.json", {"task": "movies", "seeds": [0, 1, 2], "max_steps": 60,
                                            "results": results})
    seq = {"order": ["movies", "tweets"], "strategy": ["full", "full"],
           "matrix": [[val(0.4, 0.6), val(0.4, 0.6)], [val(0.8, 0.9), val(0.5, 0.7)],
                      [val(0.6, 0.8), val(0.8, 0.9)]],
           "chance": [0.5, 0.5], "n_classes": [2, 2], "majority": [0.51, 0.52], "seed": 0}
    write(root, "data/metrics/sequential.json", seq)
    # fine-tune metrics and forgetting.json through the forgetting stage's own helpers
    tasks = {}
    for s in STRATEGIES:
        accs = [val(0.6, 0.95) for _ in SEEDS]
        frac = {"full": 1.0, "linear_probe": 0.00047, "lora": 0.0123, "scratch": 1.0}[s]
        obj = finetune_json("movies", s, accs, frac)
        write(root, f"data/metrics/finetune/movies/{s}.json", obj)
    runs = fg.discover_runs(root)
    for t in runs:
        scratch = runs[t].get("scratch")
        smean = sum(r["test_accuracy"] for r in scratch.values()) / len(scratch)
        tasks[t] = {}
        for s, seeds in runs[t].items():
            per = {}
            for seed, rec in seeds.items():
                rec["n_classes"] = 2.0
                d = val(0.001, 0.2)
                drift = {"loss_pretrained": 3.5, "loss_finetuned": 3.5 + d, "ppl_pretrained": 33.1,
                         "ppl_finetuned": 33.1 * (1 + d), "delta_loss": d, "rel_delta_pct": 100 * d / 3.5,
                         "ppl_ratio": 1 + d, "share_worse": val(0.3, 0.9)}
                per[seed] = fg.per_model_record(rec, drift, smean, applicable=s != "scratch")
            tasks[t][s] = fg.aggregate(per)
    curves = fg.read_curves(_csv(root, rows))
    forgetting = {
        "eval": {"objective": "clm", "blocks": 128, "tokens": 16256, "loss_pretrained": 3.5,
                 "ppl_pretrained": 33.1},
        "tasks": tasks,
        "sequential": fg.sequential_block(fg.read_sequential(root / "data/metrics/sequential.json")),
        "claims": {"few_labels": fg.claim_few_labels(curves, cfg), "forget_less": fg.claim_forget_less(tasks, cfg)},
    }
    write(root, "data/metrics/forgetting.json", forgetting)
    for name in ("tradeoff", "learning_curves", "accuracy_matrix"):
        p = root / "data/plots" / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    pre = root / "data/models/pretrained"
    shutil.copytree(tokenizer_pre, pre)
    t, s, seed, _ = rs.best_model(forgetting)
    save_classifier(pre, root / "data/models/finetuned" / t / s / seed, s)
    return root


def _csv(root: Path, rows: list[dict]) -> Path:
    p = root / "data/plots/curves.csv"
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = ["task", "strategy", "fraction", "n_labels", "seed", "test_accuracy"]
    p.write_text(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))
    return p


def set_verdicts(root: Path, few: str, forget: str) -> None:
    f = root / "data/metrics/forgetting.json"
    obj = json.loads(f.read_text())
    obj["claims"]["few_labels"]["verdict"] = few
    obj["claims"]["forget_less"]["verdict"] = forget
    f.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return make_pretrained(tmp_path_factory.mktemp("pre") / "pretrained", make_tokenizer())


@pytest.fixture(scope="module")
def fake(tmp_path_factory, pretrained) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("run"), pretrained)


@pytest.fixture(scope="module")
def page(fake) -> str:
    (fake / "docs").mkdir(exist_ok=True)
    (fake / "docs/results_notes.md").write_text(
        "# Notes\n\n## few_labels\n<!-- why claim 1 fails -->\n\n## forget_less\n"
        "Replay mixes only 4 blocks per step: *too few to anchor the backbone*.\n\n"
        "## general\nThe default run is sized for a 2-core CPU.\n")
    set_verdicts(fake, cl.REPRODUCED, cl.NOT_REPRODUCED)
    rs.run(fake, repeats=3, status_fn=lambda root: {})
    return (fake / "docs/results.md").read_text()


# ---------------------------------------------------------------- numbers come from the metrics

def dvc_metrics_leaves(root: Path) -> list[float]:
    """Every number `dvc metrics show --json` reports for the workspace (+ numeric keys)."""
    work = root.parent / (root.name + "-dvc")
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("models"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, check=True, env=env)
    p = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=work,
                       capture_output=True, text=True, env=env, check=True)
    shown = json.loads(p.stdout)
    out: list[float] = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                try:
                    out.append(float(k))
                except ValueError:
                    pass
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(float(x))

    walk(shown)
    files = json.dumps(shown)
    for rel in ("pretrain.json", "curves.json", "sequential.json", "forgetting.json", "finetune/movies/lora.json"):
        assert f"data/metrics/{rel}" in files, f"dvc metrics show does not report {rel}"
    return out


NUMBER = re.compile(r"^([+-]?\d+(?:\.\d+)?)(?: ± (\d+(?:\.\d+)?))?$")


def table_numbers(page: str, matrix_rows: bool = False) -> list[str]:
    """Numeric cells of the tables above the evidence card: those of the accuracy-matrix rows
    (`| before |`, `| after <task> |`) when `matrix_rows`, else all the others."""
    body = page.split("## Evidence card")[0]
    cells = []
    for line in body.splitlines():
        is_matrix = line.startswith(("| before |", "| after "))
        if line.startswith("|") and not line.startswith("|---") and is_matrix == matrix_rows:
            for c in line.strip().strip("|").split(" | "):
                m = NUMBER.match(c.strip())
                if m:
                    cells += [g for g in m.groups() if g is not None]
    return cells


def matches(text: str, leaves: list[float]) -> bool:
    d = len(text.split(".")[1]) if "." in text else 0
    want = float(text)
    return any(abs(float(f"{v * scale:.{d}f}") - want) < 1e-12 for v in leaves for scale in (1, 100))


def test_every_table_number_is_a_dvc_metric(fake, page):
    leaves = dvc_metrics_leaves(fake)
    nums = table_numbers(page)
    assert len(nums) > 80, nums
    bad = [n for n in nums if not matches(n, leaves)]
    assert not bad, f"table numbers not in `dvc metrics show`: {bad}"
    # `dvc metrics show` leaves lists out: the accuracy matrix is checked against the file itself
    matrix = json.loads((fake / "data/metrics/sequential.json").read_text())["matrix"]
    cells = table_numbers(page, matrix_rows=True)
    assert len(cells) == sum(map(len, matrix))
    assert all(matches(n, [a for row in matrix for a in row]) for n in cells), cells


def test_tables_hold_the_key_values(fake, page):
    fgj = json.loads((fake / "data/metrics/forgetting.json").read_text())
    pre = json.loads((fake / "data/metrics/pretrain.json").read_text())
    seq = json.loads((fake / "data/metrics/sequential.json").read_text())
    cur = json.loads((fake / "data/metrics/curves.json").read_text())
    assert f"| validation perplexity | {pre['val_ppl']:.2f} |" in page
    assert f"| unigram baseline perplexity | {pre['unigram_ppl']:.2f} |" in page
    for s in STRATEGIES:
        ms = fgj["tasks"]["movies"][s]["mean_std"]
        acc = f"{ms['test_accuracy']['mean']:.3f} ± {ms['test_accuracy']['std']:.3f}"
        row = next(line for line in page.splitlines() if line.startswith(f"| movies | {s} |"))
        assert acc in row
        assert f"{ms['gain_over_chance']['mean']:+.3f}" in row
        if s != "scratch":
            assert f"{ms['delta_loss']['mean']:+.4f}" in row
        else:
            assert "n/a (no pretrained backbone)" in row
    assert "| 0.0470 |" in page                      # linear probe's trainable %: 3 significant digits
    r = cur["results"]["scratch"]["0.01"]
    assert f"{r['mean']:.3f} ± {r['std']:.3f}" in page
    assert "| after movies | " + " | ".join(f"{a:.3f}" for a in seq["matrix"][1]) + " |" in page
    m = fgj["sequential"]["full"]["raw"]
    assert f"| raw | {m['acc']:.3f} | {m['bwt']:+.3f} | {m['fwt']:+.3f} | {m['avg_forgetting']:.3f} |" in page


def test_stamp_and_figures(fake, page):
    import hashlib

    lock = hashlib.sha256((fake / "dvc.lock").read_bytes()).hexdigest()
    assert f"`dvc.lock` sha256 `{lock}`" in page
    for name in ("tradeoff", "learning_curves", "accuracy_matrix"):
        assert f"](figures/{name}.png)" in page
        assert (fake / "docs/figures" / f"{name}.png").read_bytes() == \
            (fake / "data/plots" / f"{name}.png").read_bytes()
    assert not list((fake / "docs").glob(".*tmp-*"))


def test_verdicts_follow_claims_and_notes_are_verbatim(fake, page):
    claims = page.split("## Does the default run")[1].split("## Evidence card")[0]
    c1, c2 = claims.split("### Claim 2")
    assert f"**Verdict: {cl.REPRODUCED}.**" in c1 and "Where it does not reproduce" not in c1
    assert f"**Verdict: {cl.NOT_REPRODUCED}.**" in c2 and "Where it does not reproduce" in c2
    assert "Replay mixes only 4 blocks per step: *too few to anchor the backbone*." in c2
    assert "The default run is sized for a 2-core CPU." in c2
    for k in json.loads((fake / "data/metrics/forgetting.json").read_text())["claims"]["forget_less"]["comparisons"]:
        assert f"`{k}`" in c2


def test_verdict_swap_changes_the_page(fake, page, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(fake, root, ignore=shutil.ignore_patterns("docs"))
    set_verdicts(root, cl.WITHIN_STD, cl.REPRODUCED)
    rs.run(root, repeats=1, status_fn=lambda r: {})
    claims = (root / "docs/results.md").read_text().split("## Does the default run")[1]
    c1, c2 = claims.split("### Claim 2")
    assert f"**Verdict: {cl.WITHIN_STD}.**" in c1 and "Where it does not reproduce" in c1
    assert "No explanation written yet" in c1           # no notes file in this copy
    assert f"**Verdict: {cl.REPRODUCED}.**" in c2.split("## Evidence")[0]


def test_evidence_card(page):
    card = page.split("## Evidence card")[1]
    assert "`LlamaForCausalLM`" in card and "2 layers" in card
    assert "input_ids:" in card and "attention_mask:" in card and "batch shape:    (1," in card
    assert re.search(r"\*\*Task result\*\* for the example sentence: \*\*(negative|positive)\*\*", card)
    assert "Longer than the model's maximum" in card and "truncates it to 16 tokens" in card
    assert "Out of domain (code)" in card and "Out of domain (German)" in card
    assert re.search(r"median \d+\.\d\d ms over 3 repeats", card)


def test_notes_sections(tmp_path):
    f = tmp_path / "notes.md"
    f.write_text("intro\n## few_labels\n<!-- only a comment -->\n\n## forget_less\nline 1\n\nline 2\n")
    assert rs.read_notes(f) == {"forget_less": "line 1\n\nline 2"}
    assert rs.read_notes(tmp_path / "absent.md") == {}


def test_missing_metric_is_a_clear_error(fake, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(fake, root, ignore=shutil.ignore_patterns("docs", "models"))
    (root / "data/metrics/curves.json").unlink()
    with pytest.raises(rs.ResultsError, match="curves.json: missing"):
        rs.run(root, status_fn=lambda r: {})
    assert not (root / "docs/results.md").exists()


# ---------------------------------------------------------------- dvc status must be clean

def test_unclean_dvc_status_refuses(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    assert rs.dvc_status(repo) == {}                 # nothing to run: clean
    (repo / "in.txt").write_text("1\n")
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp in.txt out.json\n    deps: [in.txt]\n"
                                   "    metrics:\n      - out.json:\n          cache: false\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.raises(rs.ResultsError, match=r"dvc status` is not clean.*\bs \(changed"):
        rs.run(repo)                                  # a stage never run: stale
    assert not (repo / "docs").exists()


def test_check_clean_names_stages_and_files():
    rs.check_clean({})
    with pytest.raises(rs.ResultsError, match=r"forgetting \(changed deps: stages/forgetting.py\)"):
        rs.check_clean({"forgetting": [{"changed deps": {"stages/forgetting.py": "modified"}}]})


def test_cli_prints_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "scripts.results", "--root", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert p.returncode == 1
    assert p.stderr.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
