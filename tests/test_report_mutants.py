"""The results page and the forgetting summary, whole, against reviewed snapshots: the test that
kills the report group's mutants in milliseconds (`make mutate GROUPS=report`), which would
otherwise each need tests/test_results.py's fake DVC run.

In:  tests/data/report/inputs.json: what `scripts/results.run` hands to `sections.render_page`
     (the metrics files, the evidence card, notes, stamp, sources) and what the forgetting stage
     hands to `render_summary` and the plot-data writers, captured once from the fake run of
     tests/test_results.py (its values are distinctive: a cell quoting the wrong source differs).
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
from ptf.report.forgetting_report import render_summary

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
    """No git commit, partly reproduced claims, no WiSE-FT, notes only for the claims."""
    inp = copy.deepcopy(inp)
    fg = inp["metrics"]["forgetting"]
    _flip(fg["claims"]["few_labels"], cm.PARTLY)
    _flip(fg["claims"]["forget_less"], cm.NOT_REPRODUCED)
    fg["wise_ft"] = None
    fg["tasks"] = {t: {s: a for s, a in arms.items() if s != "wise_ft"} for t, arms in fg["tasks"].items()}
    inp["notes"] = {k: v for k, v in inp["notes"].items() if k in ("few_labels", "forget_less")}
    inp["stamp"] = {"lock_sha256": inp["stamp"]["lock_sha256"], "git_commit": None}
    inp["metrics"]["pretrain"].pop("unigram_ppl", None)
    return inp


VARIANTS = {"run": lambda inp: copy.deepcopy(inp), "contrary": _contrary, "bare": _bare}


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
    page = sections.render_page(inp["metrics"], inp["stamp"], inp["notes"],
                                evidence.render_card(inp["card"], best), inp["sources"],
                                inp["reference"], inp["scratch"])
    _check(f"page-{variant}.md", page)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forgetting_summary(variant):
    inp = VARIANTS[variant](INPUTS)
    _check(f"summary-{variant}.md", render_summary(inp["metrics"]["forgetting"], _cfg(inp)))


@pytest.mark.parametrize("variant", ["run", "bare"])
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
