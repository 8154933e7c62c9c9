"""Every sentence of the results page and the forgetting summary follows the numbers: fed
contradicting numbers (a negative or a positive BWT, tasks learned or not, claims that hold or
fail, arms that ran or not, a domain task), no sentence may still say the opposite."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from ptf.measures import claims as cm
from ptf.measures import cl_metrics as cl
from ptf.report import evidence, sections
from ptf.report.forgetting_report import render_summary

CFG = SimpleNamespace(alpha=0.05, bootstrap_resamples=500, bootstrap_seed=0, reference_strategy="full",
                      scratch_strategy="scratch", few_label_strategies=["full", "linear_probe"])
STAT = {"mean": 0.5, "std": 0.01, "n": 3}


def claim(kind: str, diffs: dict[str, float], se: float = 0.01) -> dict:
    """A claim over hand-made differences (df 2), through the real Holm step and verdict."""
    comps = {}
    for key, d in diffs.items():
        task, s = key.split("/")
        c = {"task": task, "strategy": s, "diff": d, "se": se, "df": 2, "seeds": 3,
             "resampled": "seeds only (simulated)"}
        if kind == "few_labels":
            c.update(fraction=0.01, n_labels=[20], accuracy=STAT, scratch_accuracy=STAT)
        else:
            cost = {"diff": -0.01, "se": 0.5, "df": 2, "resampled": "seeds and test examples"}
            c.update(delta_loss=STAT, reference_delta_loss=STAT, accuracy_cost=cost)
        comps[key] = c
    cm.holm(comps, "greater" if kind == "few_labels" else "less", CFG.alpha)
    if kind == "forget_less":
        costs = {k: c["accuracy_cost"] for k, c in comps.items()}
        cm.holm(costs, "less", CFG.alpha, field="verdict_lower_accuracy")
    return {"claim": f"{kind} claim", "rule": cm.rule(0.05, 500, 0), "comparisons": comps,
            "by_task": cm.by_task(comps), **cm.overall([c["verdict"] for c in comps.values()])}


def sequential(matrix: list[list[float]], majority: list[float]) -> tuple[dict, dict]:
    run = {"order": ["movies", "tweets", "amazon"], "strategy": ["full"] * 3, "matrix": matrix,
           "chance": [0.5] * 3, "n_classes": [2] * 3, "majority": majority, "seed": 0}
    block = {"full": {"order": run["order"], "majority": majority, "chance": run["chance"],
                      "n_classes": run["n_classes"], **cl.sequential_measures(matrix, chance=run["chance"])}}
    return run, block


def arm(delta: float | None) -> dict:
    ms = {k: dict(STAT) for k in ("test_accuracy", "macro_f1", "gain_over_chance", "gain_over_scratch",
                                  "trainable_fraction", "rel_delta_pct", "share_worse")}
    ms["delta_loss"] = {"mean": delta, "std": 0.01, "n": 3} if delta is not None else {"mean": None, "std": None, "n": 0}
    return {"seeds": {}, "mean_std": ms, "drift_applicable": delta is not None}


FORGETS = re.compile(r"BWT [+-]?\d\.\d+: on average, earlier tasks (lost|gained|neither lost nor gained) accuracy")
COUNTS = re.compile(r"Of (\d+) comparisons?, (\d+) (?:is|are) reproduced, (\d+) not reproduced and (\d+) inconclusive")


def check(text: str, fg: dict, strategies_run: set[str]) -> None:
    """No sentence of `text` contradicts the numbers of `fg` (forgetting.json)."""
    bwt = round(fg["sequential"]["full"]["raw"]["bwt"], 3)     # as printed
    said = FORGETS.findall(text)
    assert said and set(said) == {"lost" if bwt < 0 else "gained" if bwt > 0 else "neither lost nor gained"}
    assert "did not lose accuracy" not in text or bwt >= 0
    m = fg["sequential"]["full"]
    margins = {t: a - mj for t, a, mj in zip(m["order"], m["raw"]["learning_accuracy"], m["majority"])}
    weak = sorted(t for t, d in margins.items() if d <= 0.05)
    little = re.search(r"((?:`\w+`(?:, | and )?)+) rose at most 0\.05 above", text)
    assert sorted(re.findall(r"`(\w+)`", little.group(1))) == weak if weak else little is None
    for name, c in fg["claims"].items():
        n = c["counts"]
        want = (str(n["total"]), str(n[cm.REPRODUCED]), str(n[cm.NOT_REPRODUCED]), str(n[cm.INCONCLUSIVE]))
        found = [x for x in COUNTS.findall(text) if x == want]
        assert found or n["total"] == 0, (name, COUNTS.findall(text))
        for key, comp in c["comparisons"].items():
            lines = [x for x in text.splitlines() if f"`{key}`" in x and "→" in x]
            assert lines and all(f"→ {comp['verdict']}" in x for x in lines), (key, lines)
    every_count = COUNTS.findall(text)
    allowed = {(str(c["counts"]["total"]), str(c["counts"][cm.REPRODUCED]), str(c["counts"][cm.NOT_REPRODUCED]),
                str(c["counts"][cm.INCONCLUSIVE])) for c in fg["claims"].values()}
    assert set(every_count) <= allowed, every_count
    for s in ("replay", "lower_lr", "lora", "l2sp", "ewc", "linear_probe"):
        if s not in strategies_run:
            assert f"`{s}`" not in text and f" {s} " not in text, s
    assert "low-LR" not in text and "sentiment" not in text


SCENARIOS = {
    # earlier tasks lose accuracy; tweets barely rises above its majority rate; both claims fail
    "forgetting-and-failing": dict(
        matrix=[[0.5, 0.5, 0.5], [0.9, 0.5, 0.5], [0.7, 0.69, 0.5], [0.6, 0.6, 0.85]],
        majority=[0.51, 0.67, 0.55], few={"source/full": -0.2, "source/linear_probe": -0.3},
        forget={"source/lora": 0.3}, arms={"full", "lora", "scratch"}),
    # no task lost accuracy, every task well learned, both claims hold
    "no-forgetting-and-holding": dict(
        matrix=[[0.5, 0.5, 0.5], [0.9, 0.5, 0.5], [0.92, 0.95, 0.5], [0.95, 0.96, 0.9]],
        majority=[0.51, 0.5, 0.55], few={"source/full": 0.3, "source/linear_probe": 0.3},
        forget={"source/lora": -0.3, "source/replay": -0.4}, arms={"full", "lora", "replay", "scratch"}),
    # mixed verdicts: one reproduced, one inconclusive, one not reproduced; nothing compared in claim 2
    "mixed": dict(
        matrix=[[0.5, 0.5, 0.5], [0.8, 0.5, 0.5], [0.8, 0.7, 0.5], [0.8, 0.7, 0.7]],
        majority=[0.79, 0.5, 0.5], few={"a/full": 0.3, "b/full": 0.001, "c/full": -0.3},
        forget={}, arms={"full", "scratch"}),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_no_sentence_contradicts_the_numbers(name):
    sc = SCENARIOS[name]
    run, block = sequential(sc["matrix"], sc["majority"])
    tasks = {"source": {s: arm(None if s == "scratch" else 0.1) for s in sc["arms"]}}
    fg = {"eval": {"objective": "clm", "blocks": 4, "tokens": 100, "loss_pretrained": 3.0, "ppl_pretrained": 20.0},
          "tasks": tasks, "sequential": block,
          "claims": {"few_labels": claim("few_labels", sc["few"]), "forget_less": claim("forget_less", sc["forget"])}}
    notes = {"history": "The task was movies first, then source."}
    page = "\n".join(sections.section_history(notes) + sections.section_sequential(run, fg)
                     + sections.section_claims(fg, notes, "full", "scratch"))
    summary = render_summary(fg, CFG)
    for text in (page, summary):
        check(text, fg, sc["arms"])
    assert "The task was movies first, then source." in page      # whatever the verdicts
    c1 = fg["claims"]["few_labels"]
    assert f"**Verdict: {c1['verdict']}.**" in page and f"**{c1['verdict']}**" in summary
    assert ("Where it does not reproduce" in page) == (c1["verdict"] != cm.REPRODUCED
                                                        or fg["claims"]["forget_less"]["verdict"] != cm.REPRODUCED)
    if not sc["forget"]:
        assert "than the other strategies (none of them ran beside it)" in page
    # every task's verdict on each claim: its own comparisons', or "not measured" without any
    by_task = "\n".join(sections.section_verdicts_by_task(fg, "source"))
    want = [fg["claims"][k]["by_task"].get("source") for k in ("few_labels", "forget_less")]
    row = next(line for line in by_task.splitlines() if line.startswith("| source |"))
    cells = [c.strip() for c in row.strip("|").split(" | ")][1:]
    for cell, v in zip(cells, want):
        assert cell.startswith(f"{v['verdict']} (") if v else cell.startswith("not measured"), (cell, v)
    assert f"| source | {want[0]['verdict'] if want[0] else 'not measured'} |" in summary


def test_the_checker_catches_contradictions():
    """The check above fails on the sentences this page used to print regardless of the numbers."""
    run, block = sequential(SCENARIOS["forgetting-and-failing"]["matrix"], [0.51, 0.67, 0.55])
    fg = {"sequential": block, "claims": {"few_labels": claim("few_labels", {"source/full": -0.2, "x/full": 0.0})}}
    ok = ("BWT -0.100: on average, earlier tasks lost accuracy from just after learning them. `tweets` rose at "
          "most 0.05 above its majority rate. Of 2 comparisons, 0 are reproduced, 1 not reproduced and "
          "1 inconclusive.\n- `source/full` → not reproduced\n- `x/full` → inconclusive")
    check(ok, fg, {"full"})
    for bad in [ok.replace("lost accuracy", "gained accuracy"),
                ok + "\nBWT +0.020: earlier tasks did not lose accuracy on average.",
                ok.replace("→ not reproduced", "→ reproduced"),
                ok + "\n1 of 2 comparisons are not reproduced. Of 2 comparisons, 0 are reproduced, 2 not reproduced and 0 inconclusive",
                ok + "\nforgets more than parameter-efficient, frozen, low-LR or replay strategies",
                ok.replace("`tweets` rose", "`amazon` rose"),
                ok + "\na sentiment classifier has no 'none of these' answer"]:
        with pytest.raises(AssertionError):
            check(bad, fg, {"full"})


def test_out_of_domain_sentence_names_the_task_and_its_labels():
    card = {"model": {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 8,
                      "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 9,
                      "max_position_embeddings": 8, "parameters": 1},
            "tokenizer": {"class": "T", "sentence": "s", "input_ids": [1], "tokens": ["s"], "attention_mask": [1],
                          "batch_shape": [1, 1], "decoded": "s", "padding_side": "right"},
            "finetuned": {"dir": "d", "task": "source", "label_names": ["movies", "amazon", "nyt", "tweets"],
                          "pooling": "mean", "peft": False},
            "prediction": {"label": "nyt", "tokens": 1},
            "checks": {"long": {"tokens": 20, "max_length": 8, "max_position_embeddings": 8,
                                "truncated": {"label": "nyt", "tokens": 8}, "untruncated_error": "IndexError: x"},
                       "out_of_domain": {"code": {"text": "x = 1", "label": "tweets", "tokens": 3}}},
            "latency": {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "repeats": 1, "torch_threads": 1,
                        "includes": "classify"}}
    text = "\n".join(evidence.render_card(card, ("source", "full", "seed0", 0.9)))
    assert "→ tweets: the `source` classifier must answer one of its 4 labels (movies, amazon, nyt, tweets)" in text
    assert "sentiment" not in text


def test_curves_plateau_sentence_follows_the_best_steps():
    """Whether scratch was still improving at the largest fraction comes from its best-validation
    steps against its budget: the same cell with the best at the last step says the opposite."""
    from ptf.report.sections import plateau_sentence

    def cell(best):
        return {"scratch": {"0.1": {"steps": 40, "best_steps": [20, 40]},
                            "1": {"steps": 375, "best_steps": best}}}

    stopped = " ".join(plateau_sentence(cell([120, 200, 360]), "scratch", ["0.1", "1"]))
    assert "step 120, 200, 360 of 375" in stopped and "stopped improving before its 375 steps" in stopped
    going = " ".join(plateau_sentence(cell([120, 375, 375]), "scratch", ["0.1", "1"]))
    assert "in 2 of 3 seeds its best was its last step" in going and "stopped" not in going
    assert "No best-validation steps" in " ".join(plateau_sentence({}, "scratch", ["1"]))
