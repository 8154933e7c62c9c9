"""The learning-forgetting frontiers and claim 2 decided on them (ptf.measures.frontier), and the
page's frontier section (ptf.report.frontier_section): hand-worked points, the selection/report
split of the held-out blocks, a null-effect simulation, and contradicting numbers."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ptf.measures import frontier as fr
from ptf.measures.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from ptf.report import frontier_section

CFG = SimpleNamespace(reference_strategy="full", alpha=0.05, bootstrap_resamples=400, bootstrap_seed=0)


def pt(key, acc, delta, test=None):
    return {"key": key, "lr": 1e-3, "steps": 10, "knob": None, "value": None, "val_accuracy": acc,
            "test_accuracy": acc if test is None else test, "delta_select": delta, "delta_report": delta,
            "delta_all": delta, "unchanged": False}


def test_pareto_keeps_exactly_the_non_dominated_points():
    pts = [pt("a", 0.90, 0.30), pt("b", 0.85, 0.10), pt("c", 0.80, 0.20),   # c: b is better on both
           pt("d", 0.70, 0.00), pt("e", 0.90, 0.35), pt("f", 0.85, 0.10)]   # e: a ties acc, less Δ; f = b
    assert fr.pareto(pts) == ["d", "b", "f", "a"]


def test_at_level_picks_the_least_forgetting_point_that_reaches_it():
    pts = [pt("a", 0.90, 0.30), pt("b", 0.85, 0.10), pt("d", 0.70, 0.00)]
    assert fr.at_level(pts, 0.70)["key"] == "d"
    assert fr.at_level(pts, 0.71)["key"] == "b"
    assert fr.at_level(pts, 0.86)["key"] == "a"
    assert fr.at_level(pts, 0.91) is None
    assert fr.val_best(pts)["key"] == "a"
    assert fr.val_best([pt("x", 0.9, 0.2), pt("y", 0.9, 0.1)])["key"] == "y"


def test_matched_levels_lie_between_the_majority_rate_and_the_lower_top():
    assert fr.matched_levels(0.5, 0.9, 0.8, [0.5, 1.0]) == pytest.approx([0.65, 0.8])
    assert fr.matched_levels(0.5, 0.5, 0.9, [0.5, 1.0]) == []   # one never rose above the majority


def test_halves_alternate_and_cover_every_block():
    s, r = fr.half_index(7, "select"), fr.half_index(7, "report")
    assert s.tolist() == [0, 2, 4, 6] and r.tolist() == [1, 3, 5]
    with pytest.raises(ValueError):
        fr.half_index(7, "all")


# ------------------------------------------------------------------ synthetic sweep records

def sweep(configs: dict[str, dict], n_blocks=16, n_test=60, seed=0) -> dict:
    """A sweep record: configs {key: {"acc": val accuracy, "test": [per-seed test accuracies],
    "delta": [per-seed per-block Δ arrays]}}; every block scores 10 tokens of base loss 50."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_test).tolist()
    base = [50.0] * n_blocks
    out = {"blocks": {"base_sums": base, "counts": [10] * n_blocks}, "test_labels": labels, "configs": {}}
    for key, c in configs.items():
        seeds = {}
        for s, (d, t) in enumerate(zip(c["delta"], c["test"])):
            right = rng.random(n_test) < t
            pred = [y if ok else 1 - y for y, ok in zip(labels, right)]
            seeds[str(s)] = {"val_accuracy": c["acc"], "test_accuracy": float(np.mean(right)),
                             "test_predictions": pred, "lm_sums": (np.asarray(base) + 10 * np.asarray(d)).tolist()}
        out["configs"][key] = {"lr": 1e-3, "steps": 10, "knob": None, "value": None, "seeds": seeds}
    return out


def test_points_average_the_seeds_and_split_the_blocks_by_position():
    d0 = np.array([0.1, 0.3] * 4)          # even blocks 0.1, odd 0.3 (nats/token)
    d1 = np.array([0.2, 0.5] * 4)
    sw = sweep({"k": {"acc": 0.8, "test": [0.7, 0.9], "delta": [d0, d1]}}, n_blocks=8)
    (p,) = fr.points(sw)
    assert p["delta_select"] == pytest.approx(0.15)
    assert p["delta_report"] == pytest.approx(0.4)
    assert p["delta_all"] == pytest.approx(0.275)
    assert p["val_accuracy"] == pytest.approx(0.8) and p["unchanged"] is False


def test_the_reported_delta_and_its_interval_come_from_the_report_half():
    """X's chosen configuration looks best on the selection half; the reported number is its
    report-half value, not the selection-half one."""
    n = 16
    low_select = np.where(np.arange(n) % 2 == 0, 0.0, 0.4)   # selection 0, report 0.4
    ref = np.full(n, 0.2)
    sweeps = {"t": {"x": sweep({"a": {"acc": 0.9, "test": [0.9] * 3, "delta": [low_select] * 3}}),
                    "full": sweep({"r": {"acc": 0.9, "test": [0.9] * 3, "delta": [ref] * 3}})}}
    res = fr.claims(sweeps, {"t": 0.5}, CFG, [1.0])
    (c,) = res["matched"]["comparisons"].values()
    assert c["delta_loss"] == pytest.approx(0.4) and c["diff"] == pytest.approx(0.2)
    assert c["verdict"] == NOT_REPRODUCED   # on the report half X forgets MORE


def two_strategy_sweeps(x_delta: float, ref_delta: float, rng, seeds=5, n_blocks=32, configs_x=6,
                        noise=0.05, seed_sd=0.05):
    """X with `configs_x` configurations, the reference with 2; a seed's effect is shared by every
    configuration of both (same data order, same head init), the blocks' noise is each one's own."""
    seed_eff = rng.normal(0, seed_sd, seeds)

    def cfgs(prefix, k, mean):
        return {f"{prefix}{i}": {"acc": 0.9, "test": [0.85] * seeds,
                                 "delta": [mean + seed_eff[s] + rng.normal(0, noise, n_blocks) for s in range(seeds)]}
                for i in range(k)}
    return {"t": {"x": sweep(cfgs("x", configs_x, x_delta), n_blocks, seed=int(rng.integers(1 << 30))),
                  "full": sweep(cfgs("r", 2, ref_delta), n_blocks, seed=int(rng.integers(1 << 30)))}}


def test_a_true_effect_is_reproduced_and_the_opposite_numbers_are_not():
    rng = np.random.default_rng(1)
    less = fr.claims(two_strategy_sweeps(0.05, 0.5, rng), {"t": 0.5}, CFG, [0.5, 1.0])["matched"]
    assert less["verdict"] == REPRODUCED
    more = fr.claims(two_strategy_sweeps(0.5, 0.05, rng), {"t": 0.5}, CFG, [0.5, 1.0])["matched"]
    assert more["verdict"] == NOT_REPRODUCED
    page_less = "\n".join(frontier_section.section(fake_frontier(less)))
    page_more = "\n".join(frontier_section.section(fake_frontier(more)))
    assert "**Verdict: reproduced.**" in page_less and "**Verdict: not reproduced.**" in page_more
    assert "`t/x`: reproduced (2 of 2 comparisons reproduced" in page_less
    assert "`t/x`: not reproduced (0 of 2 comparisons reproduced, 2 not reproduced" in page_more


def test_null_effect_gives_a_false_decisive_verdict_at_most_5_percent_of_the_time():
    """X has 12 configurations, the reference 2, all with the same true forgetting, 5 seeds:
    claim 2 at matched accuracy (X's least-forgetting configuration chosen) must come out
    decisive, either way, in at most 5 % of the runs."""
    rng = np.random.default_rng(0)
    cfg = SimpleNamespace(**{**vars(CFG), "bootstrap_resamples": 200})
    sims, decisive = 100, 0
    for _ in range(sims):
        claim = fr.claims(two_strategy_sweeps(0.2, 0.2, rng, configs_x=12, noise=0.1), {"t": 0.5}, cfg,
                          [0.5, 1.0])["matched"]
        decisive += claim["verdict"] != INCONCLUSIVE
    assert decisive / sims <= 0.05


def fake_frontier(claim: dict) -> dict:
    empty = {"verdict": INCONCLUSIVE, "counts": {"total": 0}, "comparisons": {}, "missing": "none", "rule": ""}
    pts = [pt("x0", 0.9, 0.1)]
    return {"reference": "full", "levels": [0.5, 1.0], "seeds": [0, 1], "majority_val": {"t": 0.5},
            "halves": {"select": "the blocks at even positions", "report": "the blocks at odd positions"},
            "tasks": {"t": {"x": {"points": pts, "frontier": ["x0"], "val_best": "x0"}}},
            "claims": {"matched": claim, "val_best": empty}}


def test_the_section_says_when_a_strategy_forgets_nothing_by_construction():
    rng = np.random.default_rng(2)
    sweeps = two_strategy_sweeps(0.0, 0.3, rng, noise=0.0)
    for c in sweeps["t"]["x"]["configs"].values():          # the backbone never moved
        for r in c["seeds"].values():
            r["lm_sums"] = list(sweeps["t"]["x"]["blocks"]["base_sums"])
    claim = fr.claims(sweeps, {"t": 0.5}, CFG, [1.0])["matched"]
    assert all(c["unchanged_backbone"] for c in claim["comparisons"].values())
    text = "\n".join(frontier_section.section(fake_frontier(claim)))
    assert "`x` left every backbone weight as pretrained" in text
    sweeps = two_strategy_sweeps(0.01, 0.3, rng)
    claim = fr.claims(sweeps, {"t": 0.5}, CFG, [1.0])["matched"]
    assert "left every backbone weight" not in "\n".join(frontier_section.section(fake_frontier(claim)))


def test_grid_sentence_states_the_spans_of_the_points():
    pts = [{**pt(f"k{i}", 0.8, 0.1), "lr": lr, "steps": st, "knob": "r", "value": v}
           for i, (lr, st, v) in enumerate([(1e-4, 20, 2), (3e-3, 60, 32), (1e-3, 20, 8)])]
    s = frontier_section.grid_sentence("lora", pts, 3)
    assert s == ("`lora`: 3 configurations × 3 seeds: 3 learning rates from 0.0001 to 0.003 (span 30×) × "
                 "2 lengths (20, 60 steps) × `r` ∈ {2, 8, 32} (span 16×)")


def test_the_section_prints_each_number_in_its_place():
    """The frontier table's cells and a comparison line, exactly, from hand-set numbers (a fast
    check of ptf.report.frontier_section, which the page test exercises only through a run)."""
    comp = {"task": "t", "strategy": "x", "level": 0.7, "config": "lr=0.001 steps=10",
            "val_accuracy": 0.72, "delta_loss": 0.1234, "reference_config": "lr=0.0003 steps=20",
            "reference_val_accuracy": 0.71, "reference_delta_loss": 0.4567, "diff": -0.3333,
            "ci": [-0.5, -0.1], "ci_level": 0.975, "verdict": REPRODUCED, "resampled": "seeds and blocks",
            "test_accuracy": 0.66, "reference_test_accuracy": 0.69,
            "accuracy_cost": {"diff": -0.03, "ci": [-0.08, 0.02], "ci_level": 0.975,
                              "verdict_lower_accuracy": INCONCLUSIVE}}
    line = frontier_section.comparison_line("t/x@0.7", comp, "full")
    assert line == ("`t/x@0.7` at accuracy level 0.700 (validation): `lr=0.001 steps=10` (val 0.720) Δ LM loss "
                    "0.1234 against `lr=0.0003 steps=20` (val 0.710) 0.4567 for `full`; difference -0.3333, "
                    "Holm-corrected 97.5 % interval [-0.5000, -0.1000] → reproduced; resampled: seeds and "
                    "blocks. Test accuracy 0.660 against 0.690: difference -0.030, Holm-corrected 97.5 % "
                    "interval [-0.080, +0.020] → lower accuracy inconclusive")
    best = frontier_section.comparison_line("t/x", {**comp, "level": None}, "full")
    assert "` at validation-best configurations: `lr=0.001" in best
    block = {"x": {"points": [pt("a", 0.8, 0.2, test=0.75), pt("b", 0.9, 0.3125, test=0.85)],
                   "frontier": ["a", "b"], "val_best": "b"},
             "full": {"points": [pt("c", 0.6, 0.05)], "frontier": ["c"], "val_best": "c"}}
    rows = frontier_section.tasks_table("t", block, 0.55)
    assert rows[2:] == ["| `full` | 1 | 1 | `c` | 0.600 | +0.050 | 0.600 | 0.0500 |",
                        "| `x` | 2 | 2 | `b` | 0.900 | +0.350 | 0.850 | 0.3125 |"]


GOLDEN = Path(__file__).parent / "golden" / "frontier_section.md"


def test_the_section_as_a_whole_matches_its_snapshot():
    """The whole section for one simulated claim, against tests/golden/frontier_section.md: a
    change of any heading, sentence, figure path or cell shows as a diff. After a deliberate
    wording change, regenerate with `PTF_UPDATE_GOLDEN=1 pytest tests/test_frontier.py -k snapshot`
    and review the diff of the golden file."""
    rng = np.random.default_rng(1)
    claim = fr.claims(two_strategy_sweeps(0.05, 0.5, rng), {"t": 0.5}, CFG, [0.5, 1.0])["matched"]
    text = "\n".join(frontier_section.section(fake_frontier(claim))) + "\n"
    if os.environ.get("PTF_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    assert frontier_section.section(None) == frontier_section.section({}) == []
    assert frontier_section.section({"reference": "full", "applicable": False, "missing": "no LM head"}) == [
        "## Learning vs forgetting: the frontiers of the sweep", "", "**Not measured on LM drift**: no LM head."]
