"""Every sentence of the results page and the forgetting summary follows the numbers: fed
contradicting numbers (a negative or a positive BWT, tasks learned or not, claims that hold or
fail, arms that ran or not, a domain task), no sentence may still say the opposite."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from ptf.measures import claims as cm
from ptf.measures import sequential as sq
from ptf.report import evidence, prose, sections, sequential_section
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


TASKS = ["movies", "tweets", "amazon"]
GROUP = "full/movies-tweets-amazon"


def sequential(matrix: list[list[float]], majority: list[float],
               replay: list[list[float]] | None = None) -> tuple[dict, dict]:
    """sequential.json with one order and two seeds of the same matrix (100 test examples per task,
    correctness consistent with it), `replay` a second strategy's matrix; and its block."""
    def correct(M):
        return [["1" * round(100 * a) + "0" * (100 - round(100 * a)) for a in row] for row in M]
    plans = [("full", matrix)] + ([("replay", replay)] if replay else [])
    runs = [{"order": TASKS, "strategy": s, "seed": k, "matrix": M, "correct": correct(M)}
            for s, M in plans for k in (0, 1)]
    obj = {"tasks": TASKS, "orders": [TASKS], "strategies": [s for s, _ in plans], "seeds": [0, 1],
           "n_classes": {t: 2 for t in TASKS}, "majority": dict(zip(TASKS, majority)),
           "random_init": {str(k): {t: 0.5 for t in TASKS} for k in (0, 1)}, "runs": runs}
    return obj, sq.sequential_block(obj)


def arm(delta: float | None) -> dict:
    ms = {k: dict(STAT) for k in ("test_accuracy", "macro_f1", "gain_over_chance", "gain_over_scratch",
                                  "trainable_fraction", "rel_delta_pct", "share_worse")}
    ms["delta_loss"] = {"mean": delta, "std": 0.01, "n": 3} if delta is not None else {"mean": None, "std": None, "n": 0}
    return {"seeds": {}, "mean_std": ms, "drift_applicable": delta is not None}


FORGETS = re.compile(r"BWT [+-]?\d\.\d+(?: ± \d\.\d+)? \(\d+ seeds?\): on average, earlier tasks "
                     r"(lost|gained|neither lost nor gained) accuracy")
POOLED = re.compile(r"Pooled over the orders, `(\w+)`'s BWT is .*? \(([+-]\d\.\d+)\): it lost "
                    r"(more|less|as much) of the earlier tasks")
COUNTS = re.compile(r"Of (\d+) comparisons?, (\d+) (?:is|are) reproduced, (\d+) not reproduced and (\d+) inconclusive")


def check(text: str, fg: dict, strategies_run: set[str]) -> None:
    """No sentence of `text` contradicts the numbers of `fg` (forgetting.json)."""
    g = fg["sequential"]["groups"][GROUP]["mean_std"]
    bwt = round(g["bwt"]["mean"], 3)     # as printed
    said = FORGETS.findall(text)
    assert said and said[0] == ("lost" if bwt < 0 else "gained" if bwt > 0 else "neither lost nor gained")
    assert "did not lose accuracy" not in text or bwt >= 0
    margins = {t: g[f"learned_above_majority.{t}"]["mean"] for t in TASKS}
    weak = sorted(t for t, d in margins.items() if d <= 0.05)
    little = re.search(r"((?:`\w+`(?:, | and )?)+) rose at most 0\.05 above", text)
    assert sorted(re.findall(r"`(\w+)`", little.group(1))) == weak if weak else little is None
    pooled = fg["sequential"]["strategies"]
    for s, d, word in POOLED.findall(text):
        diff = round(pooled[s]["mean_std"]["bwt"]["mean"] - pooled["full"]["mean_std"]["bwt"]["mean"], 3)
        assert float(d) == diff and word == ("more" if diff < 0 else "less" if diff > 0 else "as much"), (s, d, word)
    assert len(POOLED.findall(text)) == len(pooled) - 1 or not text.count("Pooled over the orders")
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
        replay=[[0.5, 0.5, 0.5], [0.9, 0.5, 0.5], [0.7, 0.9, 0.5], [0.6, 0.8, 0.9]],
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
    run, block = sequential(sc["matrix"], sc["majority"], sc.get("replay"))
    tasks = {"source": {s: arm(None if s == "scratch" else 0.1) for s in sc["arms"]}}
    fg = {"eval": {"objective": "clm", "blocks": 4, "tokens": 100, "loss_pretrained": 3.0, "ppl_pretrained": 20.0},
          "tasks": tasks, "sequential": block,
          "claims": {"few_labels": claim("few_labels", sc["few"]), "forget_less": claim("forget_less", sc["forget"])}}
    notes = {"history": "The task was movies first, then source."}
    page = "\n".join(sections.section_history(notes) + sequential_section.section(block, "full")
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
    run, block = sequential(SCENARIOS["forgetting-and-failing"]["matrix"], [0.51, 0.67, 0.55],
                            SCENARIOS["no-forgetting-and-holding"]["replay"])   # BWT -0.200 against -0.195
    fg = {"sequential": block, "claims": {"few_labels": claim("few_labels", {"source/full": -0.2, "x/full": 0.0})}}
    ok = ("BWT -0.100 (2 seeds): on average, earlier tasks lost accuracy from just after learning them. `tweets` rose at "
          "most 0.05 above its majority rate. Of 2 comparisons, 0 are reproduced, 1 not reproduced and "
          "1 inconclusive.\n- `source/full` → not reproduced\n- `x/full` → inconclusive")
    check(ok, fg, {"full", "replay"})
    check(ok + "\nPooled over the orders, `replay`'s BWT is -0.200 against -0.195 for `full` (-0.005): it lost "
               "more of the earlier tasks than `full`", fg, {"full", "replay"})
    for bad in [ok.replace("lost accuracy", "gained accuracy"),
                ok + "\nBWT +0.020: earlier tasks did not lose accuracy on average.",
                ok + "\nPooled over the orders, `replay`'s BWT is -0.200 against -0.195 for `full` (-0.005): "
                     "it lost less of the earlier tasks than `full`",
                ok.replace("→ not reproduced", "→ reproduced"),
                ok + "\n1 of 2 comparisons are not reproduced. Of 2 comparisons, 0 are reproduced, 2 not reproduced and 0 inconclusive",
                ok + "\nforgets more than parameter-efficient, frozen, low-LR or replay strategies",
                ok.replace("`tweets` rose", "`amazon` rose"),
                ok + "\na sentiment classifier has no 'none of these' answer"]:
        with pytest.raises(AssertionError):
            check(bad, fg, {"full", "replay"})


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


@pytest.mark.parametrize("other, word", [(-0.30, "lost more"), (-0.10, "lost less"), (-0.2004, "lost as much")])
def test_the_pooled_strategy_sentence_follows_the_sign_as_printed(other, word):
    # full's BWT -0.200; the other strategy's -0.300 (more lost), -0.100 (less), -0.2004 (the same to 3 decimals)
    def block(b):
        return {"mean_std": {"bwt": {"mean": b, "std": 0.01, "n": 3}}}
    text = " ".join(prose.strategy_sentences({"full": block(-0.2), "replay": block(other)}, "full"))
    assert f"it {word} of the earlier tasks" in text and "3 seeds; no test of the difference" in text
    assert text.count("Pooled over the orders") == 1
    assert prose.strategy_sentences({"full": block(-0.2)}, "full") == []
