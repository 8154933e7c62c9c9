"""The results page and the forgetting summary, whole, against reviewed snapshots: the test that
kills the report group's mutants in milliseconds (`make mutate GROUPS=report`), which would
otherwise each need tests/test_results.py's fake DVC run.

In:  tests/data/report/inputs.json: what `scripts/results.run` hands to `sections.render_page`
     (the metrics files, the evidence card, notes, stamp, sources) and what the forgetting stage
     hands to `render_summary` and the plot-data writers, captured once from the fake run of
     tests/test_results.py (its values are distinctive: a cell quoting the wrong source differs),
     plus a representation.json in the shape of tests/test_representation_section.py's.
     Variants change the inputs where the page branches (verdicts, notes, git state, missing
     parts).
Out: tests/data/report/<variant>.md|.csv; a difference fails with a unified diff.

What the numbers must be is checked cell by cell in tests/test_results.py and the sentences
against contradicting numbers in tests/test_report_prose.py; this file pins everything else a
reader sees (wording, order, formatting, which branch is taken). After an intended change of the
page, review the diff and rewrite the snapshots:

    PTF_UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/test_report_mutants.py
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from ptf.measures import claims as cm
from ptf.report import evidence, plot_data, sections
from ptf.measures.drift import NO_LM_HEAD
from ptf.report.forgetting_report import render_summary
from ptf.report.foundation_section import section_beside, section_foundation
from tests.test_results_foundation import without_lm_drift

DATA = Path(__file__).resolve().parent / "data" / "report"
INPUTS = json.loads((DATA / "inputs.json").read_text())
UPDATE = os.environ.get("PTF_UPDATE_SNAPSHOTS") == "1"


def _flip(claim: dict, verdict: str) -> None:
    for c in claim["comparisons"].values():
        c["verdict"] = verdict
        if "accuracy_cost" in c:
            c["accuracy_cost"]["verdict_lower_accuracy"] = verdict
    claim["verdict"] = verdict
    for t in claim.get("by_task", {}).values():
        t["verdict"] = verdict


def _contrary(inp: dict) -> dict:
    """Every verdict the other way, no notes, an unclean tree, no WiSE-FT, no card latency extras."""
    inp = copy.deepcopy(inp)
    fg = inp["metrics"]["forgetting"]
    _flip(fg["claims"]["few_labels"], cm.NOT_REPRODUCED)
    _flip(fg["claims"]["forget_less"], cm.INCONCLUSIVE)
    inp["notes"] = {}
    inp["stamp"]["git_clean"] = False
    return inp


def _bare(inp: dict) -> dict:
    """No git commit, partly reproduced claims, no WiSE-FT, no sequential run, notes only for the
    claims."""
    inp = copy.deepcopy(inp)
    fg = inp["metrics"]["forgetting"]
    _flip(fg["claims"]["few_labels"], cm.PARTLY)
    _flip(fg["claims"]["forget_less"], cm.NOT_REPRODUCED)
    fg["wise_ft"] = None
    fg["tasks"] = {t: {s: a for s, a in arms.items() if s != "wise_ft"} for t, arms in fg["tasks"].items()}
    inp["notes"] = {k: v for k, v in inp["notes"].items() if k in ("few_labels", "forget_less")}
    inp["stamp"] = {"lock_sha256": inp["stamp"]["lock_sha256"], "git_commit": None}
    inp["metrics"]["pretrain"].pop("unigram_ppl", None)
    inp["metrics"]["sequential"], fg["sequential"] = None, {}     # no sequential run
    inp["metrics"]["representation"]["lm"] = {
        "applicable": False, "note": "not applicable: the pretrained model (BertModel) has no LM head"}
    return inp


FOUNDATION = {"name": "org/tiny-foundation", "revision": "0.1.0", "sha256": "cd" * 32, "source": "pypi",
              "architecture": "BertModel", "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
              "layers": 6}


def _foundation(inp: dict) -> dict:
    """A foundation run without an LM head (as tests/test_results_foundation.py makes one): no LM
    drift anywhere, claim 2 not measured, its own notes file and figures folder, and its arms
    beside the run's (`beside`: full +0.01, linear_probe the same, scratch -0.02; lora not in
    the other run, wise_ft never compared)."""
    inp = copy.deepcopy(inp)
    m = inp["metrics"]
    other = copy.deepcopy(m["forgetting"])
    del other["tasks"]["movies"]["lora"]
    m["pretrain"] = {**m["pretrain"], "init": "foundation", "lm_head": None, "val_loss": None, "val_ppl": None,
                     "steps": 0, "foundation": FOUNDATION}
    fg = m["forgetting"]
    without_lm_drift(fg)
    shift = {"full": 0.01, "linear_probe": 0.0, "scratch": -0.02, "lora": 0.05}
    for s, d in shift.items():
        fg["tasks"]["movies"][s]["mean_std"]["test_accuracy"]["mean"] += d
    fg["claims"]["forget_less"] = cm.claim_forget_less({}, {}, _cfg(inp), not_applicable=NO_LM_HEAD)
    inp["fig"] = "figures-foundation"
    inp["beside"] = section_beside(fg, other, "the default run", "ef" * 32, "`finetune.train.max_steps` 20 (here 40)")
    return inp


VARIANTS = {"run": lambda inp: copy.deepcopy(inp), "contrary": _contrary, "bare": _bare, "foundation": _foundation}


def _check(name: str, got: str) -> None:
    path = DATA / name
    if UPDATE:
        path.write_text(got)
        return
    want = path.read_text()
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                            f"{name} (snapshot)", f"{name} (rendered)", n=1))
        pytest.fail(f"{name} differs from its snapshot (intended? PTF_UPDATE_SNAPSHOTS=1):\n{diff[:6000]}")


def _cfg(inp: dict) -> SimpleNamespace:
    return SimpleNamespace(**inp["forgetting_params"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_results_page(variant):
    inp = VARIANTS[variant](INPUTS)
    best = tuple(inp["best"])
    notes = inp["notes"]
    if variant == "foundation":
        notes = sections.Notes(notes, Path("docs/results-foundation_notes.md"))
        kw = {"fig": inp["fig"], "beside": inp["beside"]}
    else:
        kw = {}
    page = sections.render_page(inp["metrics"], inp["stamp"], notes,
                                evidence.render_card(inp["card"], best), inp["sources"],
                                inp["reference"], inp["scratch"], **kw)
    _check(f"page-{variant}.md", page)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forgetting_summary(variant):
    inp = VARIANTS[variant](INPUTS)
    _check(f"summary-{variant}.md", render_summary(inp["metrics"]["forgetting"], _cfg(inp)))


@pytest.mark.parametrize("variant", ["run", "bare", "foundation"])
def test_plot_data(variant):
    inp = VARIANTS[variant](INPUTS)
    fg = inp["metrics"]["forgetting"]
    parts = []
    for gain in ("chance", "scratch"):
        rows = plot_data.tradeoff_rows(fg["tasks"], gain, fg.get("wise_ft"))
        parts.append(plot_data.to_csv(rows, plot_data.TRADEOFF_COLUMNS))
    parts.append(plot_data.to_csv(plot_data.curve_rows(inp["curves_rows"]), plot_data.CURVES_COLUMNS))
    parts.append(plot_data.to_csv(plot_data.matrix_rows(fg["sequential"]), plot_data.MATRIX_COLUMNS))
    _check(f"plot-data-{variant}.csv", "\n".join(parts))


# ---------------------------------------------------------------- workspace checks (fast cases)

from ptf.report import workspace as ws  # noqa: E402


def test_check_clean_message():
    ws.check_clean({})
    status = {f"stage{i}": [{"changed outs": {f"f{j}": "modified" for j in range(6)}}, "always changed"]
              for i in range(8)}
    status["a"] = {"changed deps": "params.yaml"}
    status["b"] = []
    with pytest.raises(ws.ResultsError) as e:
        ws.check_clean(status)
    assert str(e.value) == (
        "`dvc status` is not clean, so the outputs do not match dvc.lock: "
        "a (changed deps: params.yaml) | b (changed) | "
        "stage0 (changed outs: f0, f1, f2, f3 (+2 more); always changed) | "
        "stage1 (changed outs: f0, f1, f2, f3 (+2 more); always changed) | "
        "stage2 (changed outs: f0, f1, f2, f3 (+2 more); always changed) | "
        "stage3 (changed outs: f0, f1, f2, f3 (+2 more); always changed) | (+4 more stages). "
        "Run `dvc repro` (or `dvc checkout`) first.")
    with pytest.raises(ws.ResultsError) as e:
        ws.check_clean({"s": [{"changed outs": {"a": 1, "b": 2, "c": 3, "d": 4}}]})
    assert "s (changed outs: a, b, c, d)." in str(e.value)


def test_lock_stamp_in_a_git_repo(tmp_path):
    import subprocess

    with pytest.raises(ws.ResultsError) as e:
        ws.lock_stamp(tmp_path)
    assert str(e.value) == f"{tmp_path / 'dvc.lock'}: missing; run `dvc repro` first"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    import hashlib
    sha = hashlib.sha256(b"schema: '2.0'\n").hexdigest()
    assert ws.sha256_file(tmp_path / "dvc.lock") == sha
    assert ws.lock_stamp(tmp_path) == {"lock_sha256": sha, "git_commit": None, "git_clean": False}

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    assert ws.lock_stamp(tmp_path)["git_commit"] is None          # no commit yet
    git("add", "-A")
    git("commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert ws.lock_stamp(tmp_path) == {"lock_sha256": sha, "git_commit": head, "git_clean": True}
    (tmp_path / "docs/figures").mkdir(parents=True)
    (tmp_path / "docs/results.md").write_text("page")                # the page's own outputs
    (tmp_path / "docs/figures/a.png").write_text("png")
    assert ws.lock_stamp(tmp_path)["git_clean"] is True
    (tmp_path / "other.txt").write_text("x")
    assert ws.lock_stamp(tmp_path)["git_clean"] is False


def test_declared_metrics_and_sources(tmp_path):
    with pytest.raises(ws.ResultsError) as e:
        ws.declared_metrics(tmp_path)
    assert str(e.value) == f"{tmp_path / 'dvc.yaml'}: missing"
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  a:\n    cmd: x\n    metrics:\n    - data/metrics/a.json:\n        cache: false\n    - data/b.json\n"
        "  ft:\n    foreach: ${finetune.runs}\n    do:\n      cmd: y\n"
        "      metrics:\n      - data/metrics/finetune/${item.task}/${item.strategy}.json\n"
        "  c:\n    cmd: z\n")
    assert ws.declared_metrics(tmp_path) == ["data/metrics/a.json", "data/b.json", "data/metrics/finetune/*/*.json"]
    (tmp_path / "dvc.yaml").write_text("")
    assert ws.declared_metrics(tmp_path) == []
    from ptf.measures.outputs import Matrix
    m = Matrix.grid(["t"], ["full"])
    # every metrics file of the page, then the declared arms' fine-tune metrics
    assert [p.relative_to(tmp_path).as_posix() for p in ws.source_files(tmp_path, m)] == [
        *(p.as_posix() for p in ws.METRICS.values()), "data/metrics/finetune/t/full.json"]
    assert {"data/metrics/pretrain.json", "data/metrics/curves.json", "data/metrics/sequential.json",
            "data/metrics/forgetting.json", "data/metrics/baselines.json"} <= {
                p.as_posix() for p in ws.METRICS.values()}
    (tmp_path / "params.yaml").write_text("x: 1\n")                     # no forgetting section
    assert ws.reference_and_scratch(tmp_path) == ("full", "scratch")
    (tmp_path / "params.yaml").write_text("forgetting:\n  reference_strategy: lora\n  scratch_strategy: s2\n")
    assert ws.reference_and_scratch(tmp_path) == ("lora", "s2")


# ---------------------------------------------------------------- plot data: the edge cases

def _ms(mean, std=0.0, n=2):
    return {"mean": mean, "std": std, "n": n}


def _arm_stats(delta, gain, tf):
    return {"delta_loss": _ms(delta, 0.01), "gain_over_chance": _ms(gain, 0.02), "gain_over_scratch": _ms(gain),
            "test_accuracy": _ms(0.5), "trainable_fraction": _ms(tf)}


def test_tradeoff_rows_skip_what_has_no_point():
    tasks = {"t": {"a": {"drift_applicable": True, "mean_std": _arm_stats(0.1, 0.2, None)},
                   "b": {"drift_applicable": False, "mean_std": _arm_stats(0.1, 0.2, 1.0)},      # scratch
                   "c": {"drift_applicable": True, "mean_std": _arm_stats(None, 0.2, 1.0)},     # no drift
                   "d": {"drift_applicable": True, "mean_std": _arm_stats(0.3, None, 0.5)},     # no gain
                   "e": {"drift_applicable": True, "mean_std": _arm_stats(0.4, 0.1, 0.25)},
                   "wise_ft": {"drift_applicable": True, "mean_std": _arm_stats(0.1, 0.2, 1.0)}}}
    rows = plot_data.tradeoff_rows(tasks, "chance")
    assert [r["strategy"] for r in rows] == ["a", "e"]          # c, d skipped, e still reached
    assert rows[0]["trainable_pct"] is None and rows[1]["trainable_pct"] == 25.0
    csv_text = plot_data.to_csv(rows + [{"task": "x", "extra": 1}], ["task", "strategy", "trainable_pct"])
    assert csv_text == "task,strategy,trainable_pct\nt,a,\nt,e,25\nx,,\n"


def test_curve_and_matrix_rows_without_task_order_or_adjustment():
    rows = plot_data.curve_rows([{"task": "", "strategy": "full", "fraction": 0.5, "n_labels": 10,
                                  "test_accuracy": 0.75}])
    assert rows[0]["series"] == "full" and rows[0]["seeds"] == 1
    seq = {"groups": {"full/a-b": {"order": ["a", "b"], "seeds": [0, 1], "matrix": [[0.5, 0.4], [0.9, 0.45], [0.8, 0.95]],
                                   "matrix_majority_adjusted": [[0.0, -0.1], [0.8, -0.05], [0.6, 0.9]]}}}
    m = plot_data.matrix_rows(seq)
    assert [(r["after"], r["task"]) for r in m[:3]] == [("full/a-b 0 before", "a"), ("full/a-b 0 before", "b"),
                                                         ("full/a-b 1 after a", "a")]
    assert [r["accuracy_majority_adjusted"] for r in m] == [0.0, -0.1, 0.8, -0.05, 0.6, 0.9]
    assert {r["seeds"] for r in m} == {2} and len(m) == 6
    assert plot_data.matrix_rows({}) == []


# ---------------------------------------------------------------- WiSE-FT sentence: every branch

def _wise(chosen: float, points: dict[float, tuple[float, float]]) -> dict:
    """wise_ft's shape: per alpha (test accuracy mean, Δ LM loss mean), stds 0.01 / 0.001, 3 seeds."""
    return {"source": "full", "chosen_alpha": {"alpha": chosen, "rule": "highest mean validation accuracy"},
            "points": {f"alpha={a:g}": {"alpha": a, "mean_std": {"test_accuracy": _ms(acc, 0.01, 3),
                                                                  "delta_loss": _ms(dl, 0.001, 3)}}
                       for a, (acc, dl) in points.items()}}


def test_wise_ft_sentence_more_forgetting_than_alpha_one():
    from ptf.report import prose

    # chosen 0.5: accuracy 0.8 - 0.9 = -0.1, Δ LM loss 0.03 - 0.01 = +0.02 (forgets more than α = 1)
    w = _wise(0.5, {0.0: (0.7, 0.0), 0.5: (0.8, 0.03), 1.0: (0.9, 0.01)})
    assert prose.wise_ft_sentence(w) == (
        "The α chosen on validation is 0.5 (highest mean validation accuracy): test accuracy 0.800 ± 0.010, "
        "Δ LM loss +0.0300 ± 0.0010. Against α = 1 (`full` itself) that is -0.100 test accuracy and "
        "+0.0200 nats/token of Δ LM loss (more forgetting).")


def test_wise_ft_sentence_less_and_no_change():
    from ptf.report import prose

    w = _wise(0.25, {0.25: (0.95, 0.005), 1.0: (0.75, 0.02)})
    w["source"] = "lora"
    assert prose.wise_ft_sentence(w) == (
        "The α chosen on validation is 0.25 (highest mean validation accuracy): test accuracy 0.950 ± 0.010, "
        "Δ LM loss +0.0050 ± 0.0010. Against α = 1 (`lora` itself) that is +0.200 test accuracy and "
        "-0.0150 nats/token of Δ LM loss (less forgetting).")
    w = _wise(0.5, {0.5: (0.75, 0.0625), 1.0: (0.5, 0.0625)})
    assert prose.wise_ft_sentence(w).endswith(
        "that is +0.250 test accuracy and +0.0000 nats/token of Δ LM loss (no change in forgetting).")


def test_wise_ft_sentence_without_alpha_one_to_compare():
    from ptf.report import prose

    first = ("The α chosen on validation is 1 (highest mean validation accuracy): test accuracy 0.900 ± 0.010, "
             "Δ LM loss -0.0100 ± 0.0010.")
    assert prose.wise_ft_sentence(_wise(1.0, {0.0: (0.5, 0.0), 1.0: (0.9, -0.01)})) == first   # α = 1 chosen
    assert prose.wise_ft_sentence(_wise(0.5, {0.0: (0.5, 0.0), 0.5: (0.6, 0.02)})) == (     # no α = 1 point
        "The α chosen on validation is 0.5 (highest mean validation accuracy): test accuracy 0.600 ± 0.010, "
        "Δ LM loss +0.0200 ± 0.0010.")


# ---------------------------------------------------------------- the foundation sections, by hand

def test_section_foundation_further_pretrained_with_a_head():
    pre = {"init": "foundation", "steps": 1500, "objective": "mlm", "lm_head": "BertForMaskedLM",
           "val_loss": 2.5, "unigram_ppl": 300.0, "params_total": 22713216,
           "foundation": {**FOUNDATION, "architecture": "BertForMaskedLM"}}
    assert section_foundation(pre) == [
        "## The foundation model", "",
        "Not pretrained here: the run starts from `org/tiny-foundation`, further pretrained on this run's "
        "corpus for 1500 steps (mlm; domain-adaptive pretraining) (`data/metrics/pretrain.json`, "
        "`foundation`). Its own tokenizer is used throughout.", "",
        "| measure | value |", "|---|---|",
        "| name | `org/tiny-foundation` |", "| revision | `0.1.0` |",
        f"| sha256 (tree hash of its files) | `{'cd' * 32}` |",
        "| architecture | `BertForMaskedLM` (bert) |", "| layers × hidden size | 6 × 384 |",
        "| vocabulary | 30522 |", "| parameters (total) | 22713216 |", "| LM head | BertForMaskedLM |",
        "| validation loss (nats/token) | 2.5000 |", "| unigram baseline perplexity | 300.00 |"]
    # nothing known: every cell says so, and no perplexity without a validation loss
    bare = section_foundation({"steps": None})
    assert bare[2].startswith("Not pretrained here: the run starts from `None`, used as it is: no pretraining step")
    assert "| LM head | none |" in bare and "| validation loss (nats/token) | n/a |" in bare
    assert "| layers × hidden size | n/a × n/a |" in bare
    assert bare[-1] == ("No validation perplexity: the foundation ships no LM head, and a head added here "
                        "would be random.") and bare[-2] == ""


def test_section_beside_edge_cases():
    def fg(**arms):
        return {"tasks": {"t": {s: {"mean_std": {"test_accuracy": _ms(*v)}} for s, v in arms.items()}}}

    head = ["## Beside B", "",
            "The same task × strategy arms in B (its `data/metrics/forgetting.json`, from the `dvc.lock` with "
            "sha256 `s`): test accuracy, mean ± std over seeds. What differs besides the starting model: d.", ""]
    assert section_beside(fg(full=(0.5,)), fg(lora=(0.5,)), "B", "s", "d") == head + [
        "No task × strategy arm is in both runs."]
    assert section_beside({}, fg(full=(0.5,)), "B", "s", "d")[-1] == "No task × strategy arm is in both runs."
    # one arm with no mean here: no difference, not counted; one higher of 2 arms
    got = section_beside(fg(a=(0.75, 0.05, 3), b=(None,), wise_ft=(0.9,)),
                         fg(a=(0.5, 0.0, 1), b=(0.25, 0.0, 1), wise_ft=(0.1,)), "B", "s", "d")
    assert got == head + ["| task | strategy | this run | B | difference |", "|---|---|---|---|---|",
                          "| t | a | 0.750 ± 0.050 | 0.500 | +0.250 |", "| t | b | n/a | 0.250 | n/a |",
                          "", "This run's mean test accuracy is higher on 1 of 2 arms (means only: the seeds "
                              "of the two runs are not paired)."]
    one = section_beside(fg(a=(0.5,)), fg(a=(0.5,)), "B", "s", "d")
    assert one[-1].startswith("This run's mean test accuracy is higher on 0 of 1 arm (")
    # the other run's arm has no accuracy block: not compared
    assert section_beside(fg(a=(0.5,)), {"tasks": {"t": {"a": {"mean_std": {}}}}}, "B", "s", "d")[-1] == \
        "No task × strategy arm is in both runs."
