"""ptf/measures/claims.py: what tests/test_claims.py leaves open, found by mutation testing
(`make mutate GROUPS=claims`): Student's t at every parity of df (closed forms worked out below),
the critical value's bracket and precision, the bootstrap's fallbacks and pairing, Holm's
intervals, p-values and fields, the claims' keys, texts and missing-data reasons. Fast (no
simulation): these run first in the group."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ptf.measures import claims as cm

R, N, I = cm.REPRODUCED, cm.NOT_REPRODUCED, cm.INCONCLUSIVE


# ---------------------------------------------------------------- Student's t

@pytest.mark.parametrize("t, df, p", [
    # theta = atan(t / sqrt(df)) = pi/4 in each case, so cos^2 = 1/2, sin cos = 1/2 (A&S 26.7.3-4):
    (math.sqrt(3), 3, 0.5 - 1 / math.pi),                                 # 1 - 2/pi (pi/4 + 1/2)
    (2.0, 4, 1 - math.sqrt(2) / 2 * (1 + 1 / 4)),                         # 1 - sin (1 + c2/2)
    (math.sqrt(5), 5, 0.5 - 4 / (3 * math.pi)),                           # 1 - 2/pi (pi/4 + 1/2 (1 + 2/3 c2))
    (math.sqrt(6), 6, 1 - math.sqrt(2) / 2 * (1 + 1 / 4 + 3 / 32)),       # 1 - sin (1 + c2/2 + 3/8 c2^2)
    (math.sqrt(7), 7, 0.5 - (2 / math.pi) * (0.5 * (1 + 1 / 3 + 8 / 15 / 4))),  # ... + 2/3*4/5 c2^2
    (-1.0, 1, 0.5),                                                       # two-sided: |t|
    (-math.inf, 2, 0.0),
])
def test_t_two_sided_p_at_every_parity(t, df, p):
    assert cm.t_two_sided_p(t, df) == pytest.approx(p, rel=1e-12)


def test_t_p_value_bounds_and_bad_df():
    # a huge t: p tiny but never negative; df 1 closed form 1 - 2/pi atan(t)
    assert 0.0 <= cm.t_two_sided_p(1e12, 1) == pytest.approx(1 - 2 / math.pi * math.atan(1e12), abs=1e-15)
    assert cm.t_two_sided_p(0.0, 2) == 1.0
    for df in (0, -1):
        with pytest.raises(ValueError) as e:
            cm.t_two_sided_p(1.0, df)
        assert str(e.value) == f"df must be >= 1, got {df}"


def test_t_critical_bracket_and_precision():
    # df 1: t = tan(pi/2 (1 - alpha)); below 1 (alpha 0.6) and far above it (alpha 1e-6)
    assert cm.t_critical(0.6, 1) == pytest.approx(math.tan(math.pi / 2 * 0.4), rel=1e-10)
    assert cm.t_critical(1e-6, 1) == pytest.approx(math.tan(math.pi / 2 * (1 - 1e-6)), rel=1e-9)
    # df 2: p = 1 - t / sqrt(2 + t^2)  =>  t = (1 - a) sqrt(2 / (1 - (1 - a)^2))
    for a in (0.05, 0.5, 1e-4):
        assert cm.t_critical(a, 2) == pytest.approx((1 - a) * math.sqrt(2 / (1 - (1 - a) ** 2)), rel=1e-10)


# ---------------------------------------------------------------- samples

def test_samples_seeds_sorted_notes_and_units():
    s = cm.seed_sample({"seed1": 0.7, "seed0": 0.6}, note="why")
    assert s.seeds == ("seed0", "seed1") and s.values().tolist() == [0.6, 0.7]
    assert (s.units, s.note) == ("", "why") and s.den.tolist() == [[1.0], [1.0]]
    assert cm.seed_sample({"a": 1.0}).note == ""
    p = cm.prediction_sample({"s1": [1, 1, 0], "s0": [0, 1, 0]}, [0, 1, 1])
    assert p.seeds == ("s0", "s1") and p.values() == pytest.approx([2 / 3, 1 / 3])
    assert p.units == "test examples" and p.note == ""
    only = p.seeds_only("no examples")
    assert only.units == "" and only.note == "no examples" and only.num.shape == (2, 1)
    assert only.values() == pytest.approx([2 / 3, 1 / 3]) and only.den.tolist() == [[1.0], [1.0]]
    # a sample's own note wins over the caller's
    assert s.seeds_only("other").note == "why"
    b = cm.block_sample({"s0": np.array([3.0, 5.0])}, lambda _k: np.array([1.0, 1.0]), np.array([2.0, 4.0]))
    # (3 - 1 + 5 - 1) / (2 + 4) = 1
    assert b.values().tolist() == [1.0] and b.den.tolist() == [[2.0, 4.0]] and b.note == ""
    assert b.seeds == ("s0",) and b.units == "held-out blocks"
    two = cm.block_sample({"s1": np.array([2.0]), "s0": np.array([1.0])}, lambda _k: np.array([1.0]), np.array([1.0]))
    assert two.seeds == ("s0", "s1") and two.values().tolist() == [0.0, 1.0]


def test_draw_counts():
    rng = np.random.default_rng(0)
    d = cm._draw(rng, 2000, 3)
    assert d.shape == (2000, 3) and d.dtype == np.float64
    assert np.all(d.sum(1) == 3) and np.all(d >= 0) and np.all(d == np.round(d))
    # every item is drawn, once per resample on average (not only the first n - 1)
    assert d.mean(0) == pytest.approx([1, 1, 1], abs=0.1)
    # the resamples differ (each row is its own draw, not one draw repeated)
    assert len({tuple(r) for r in d}) == 10        # all compositions of 3 into 3 parts
    assert cm._draw(rng, 5, 1).tolist() == [[1.0]] * 5


# ---------------------------------------------------------------- the paired bootstrap

def test_bootstrap_with_one_seed_has_no_standard_error():
    a = cm.seed_sample({"s0": 0.9})
    b = cm.seed_sample({"s0": 0.5, "s1": 0.7})
    r = cm.paired_bootstrap(a, b, 100, np.random.default_rng(0))
    assert r == {"diff": pytest.approx(0.3), "se": None, "df": 0, "seeds": 1, "paired_seeds": False,
                 "resampled": "seeds only", "reason": "fewer than 2 seeds"}


def test_bootstrap_standard_error_of_two_seeds():
    # seeds only, values a = (1, 0), b = (0, 0): a resample's mean of a is 1, 1/2 or 0 with
    # probabilities 1/4, 1/2, 1/4: plug-in variance 1/8; times n / (n - 1) = 2 -> 1/4 -> se 1/2
    a = cm.seed_sample({"s0": 1.0, "s1": 0.0})
    b = cm.seed_sample({"s0": 0.0, "s1": 0.0})
    r = cm.paired_bootstrap(a, b, 40000, np.random.default_rng(3))
    assert r["diff"] == 0.5 and r["df"] == 1 and r["seeds"] == 2 and "reason" not in r
    assert r["se"] == pytest.approx(0.5, rel=0.02)


def test_bootstrap_resamples_examples_and_pairs_them():
    labels = [1, 1]
    # per seed, a is right on example 0 only and b on example 1 only: equal accuracies (diff 0),
    # so only resampling the examples moves the difference
    a = cm.prediction_sample({"s0": [1, 0], "s1": [1, 0]}, labels)
    b = cm.prediction_sample({"s0": [0, 1], "s1": [0, 1]}, labels)
    r = cm.paired_bootstrap(a, b, 400, np.random.default_rng(0))
    assert r["diff"] == 0.0 and r["se"] > 0.3 and r["resampled"] == "seeds and test examples"
    # the same examples and seeds drawn for both arms: identical arms never differ
    same = cm.paired_bootstrap(a, a, 400, np.random.default_rng(0))
    assert same["se"] == 0.0 and same["paired_seeds"] is True
    # other seed names: the seeds are drawn apart, so identical values still differ
    other = cm.prediction_sample({"s7": [1, 0], "s8": [0, 0]}, labels)
    mine = cm.prediction_sample({"s0": [1, 0], "s1": [0, 0]}, labels)
    apart = cm.paired_bootstrap(mine, other, 400, np.random.default_rng(0))
    assert apart["paired_seeds"] is False and apart["se"] > 0


def test_bootstrap_falls_back_to_seeds_when_the_examples_differ():
    a = cm.prediction_sample({"s0": [1, 0], "s1": [1, 1]}, [1, 1])
    b = cm.prediction_sample({"s0": [1, 0, 0], "s1": [1, 1, 0]}, [1, 1, 1])
    r = cm.paired_bootstrap(a, b, 100, np.random.default_rng(0))
    assert r["resampled"] == "seeds only (per-example data missing for one arm)"
    assert r["diff"] == pytest.approx(0.75 - 0.5)
    noted = cm.paired_bootstrap(a, cm.seed_sample({"s0": 0.5, "s1": 0.5}, note="n"), 100,
                                np.random.default_rng(0))
    assert noted["resampled"] == "seeds only (n)"
    # a note on the first arm counts too
    first = cm.paired_bootstrap(cm.seed_sample({"s0": 0.5, "s1": 0.5}, note="m"), a, 100,
                                np.random.default_rng(0))
    assert first["resampled"] == "seeds only (m)"


def test_comparison_rng_is_per_key():
    a = cm.comparison_rng(7, "movies/lora").random(3)
    assert np.array_equal(a, cm.comparison_rng(7, "movies/lora").random(3))
    assert not np.array_equal(a, cm.comparison_rng(7, "movies/full").random(3))
    assert not np.array_equal(a, cm.comparison_rng(8, "movies/lora").random(3))
    import zlib
    assert np.array_equal(a, np.random.default_rng([7, zlib.crc32(b"movies/lora")]).random(3))


def test_missing():
    assert cm.missing("no rows") == {"diff": None, "se": None, "df": 0, "seeds": 0, "resampled": None,
                                     "reason": "missing data: no rows"}


# ---------------------------------------------------------------- Holm

def test_holm_one_comparison_by_hand():
    # diff 5, se 1, df 2: p = 1 - 5 / sqrt(27); the 95 % interval 5 ± t(0.05, 2) = 4.302652729749464
    comps = {"x": {"diff": 5.0, "se": 1.0, "df": 2}}
    cm.holm(comps, "greater", 0.05)
    c = comps["x"]
    assert c["p"] == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-12) and c["p_holm"] == c["p"]
    assert c["ci"] == pytest.approx([5 - 4.302652729749464, 5 + 4.302652729749464], rel=1e-9)
    assert c["ci_level"] == pytest.approx(0.95)
    assert (c["verdict"], c["reason"]) == (R, "")
    # the other direction: the same interval is wholly on the other side
    neg = {"x": {"diff": -5.0, "se": 1.0, "df": 2}}
    cm.holm(neg, "less", 0.05)
    assert neg["x"]["verdict"] == R and neg["x"]["ci"][1] == pytest.approx(-5 + 4.302652729749464)
    cm.holm(neg, "greater", 0.05)
    assert neg["x"]["verdict"] == N


def test_holm_p_values_capped_and_monotone():
    # two comparisons at p = 0.6 (|t| = tan(pi/2 * 0.4) with df 1): m * p = 1.2 -> capped at 1
    t = math.tan(math.pi / 2 * 0.4)
    comps = {"a": {"diff": t, "se": 1.0, "df": 1}, "b": {"diff": 2 * t, "se": 2.0, "df": 1}}
    cm.holm(comps, "greater", 0.05)
    assert comps["a"]["p"] == pytest.approx(0.6) and comps["a"]["p_holm"] == 1.0
    assert comps["b"]["p_holm"] == 1.0
    # ties in p: the key decides the rank ("a" first, at alpha / 2)
    assert comps["a"]["ci_level"] == pytest.approx(1 - 0.05 / 2)
    assert comps["b"]["ci_level"] == pytest.approx(1 - 0.05 / 1)
    # p_holm is the running max of (m - rank) p: 2 * 0.01 = 0.02, then max(0.02, 1 * 0.015)
    ta, tb = cm.t_critical(0.01, 3), cm.t_critical(0.015, 3)
    two = {"a": {"diff": ta, "se": 1.0, "df": 3}, "b": {"diff": tb, "se": 1.0, "df": 3}}
    cm.holm(two, "greater", 0.05)
    assert two["a"]["p_holm"] == pytest.approx(0.02) and two["b"]["p_holm"] == pytest.approx(0.02)
    assert two["a"]["verdict"] == R and two["b"]["verdict"] == R


def test_holm_zero_standard_error_and_no_standard_error():
    comps = {"sure": {"diff": 0.2, "se": 0.0, "df": 2}, "flat": {"diff": 0.0, "se": 0.0, "df": 2},
             "none": {"diff": 0.3, "se": None, "df": 0, "reason": "fewer than 2 seeds"}}
    cm.holm(comps, "greater", 0.05)
    sure, flat, none = comps["sure"], comps["flat"], comps["none"]
    assert sure["p"] == 0.0 and sure["ci"] == [0.2, 0.2] and sure["verdict"] == R
    assert flat["p"] == 1.0 and flat["ci"] == [0.0, 0.0] and flat["verdict"] == I
    assert flat["reason"] == "the corrected interval contains 0"
    assert none == {"diff": 0.3, "se": None, "df": 0, "reason": "fewer than 2 seeds", "p": None,
                    "p_holm": None, "ci": None, "ci_level": None, "verdict": I}
    # m counts only the comparisons with a standard error: "sure" at alpha / 2
    assert sure["ci_level"] == pytest.approx(1 - 0.05 / 2)


def test_holm_into_another_field_and_a_bad_direction():
    comps = {"x": {"diff": 5.0, "se": 1.0, "df": 2}, "y": {"diff": 1.0, "se": None, "df": 0}}
    cm.holm(comps, "greater", 0.05, field="verdict_lower_accuracy")
    assert comps["x"]["verdict_lower_accuracy"] == R and "verdict" not in comps["x"]
    assert "reason" not in comps["x"] and comps["y"]["verdict_lower_accuracy"] == I
    with pytest.raises(ValueError) as e:
        cm.holm({}, "more", 0.05)
    assert str(e.value) == "expect must be 'greater' or 'less', got 'more'"


# ---------------------------------------------------------------- verdicts of a claim

def test_overall_and_by_task():
    assert cm.overall([N]) == {"verdict": N, "counts": {R: 0, N: 1, I: 0, "total": 1}}
    assert cm.overall([R, N])["verdict"] == N
    assert cm.overall([I])["verdict"] == I
    comps = {"a/x": {"task": "a", "verdict": R}, "a/y": {"task": "a", "verdict": I},
             "b/x": {"task": "b", "verdict": N}, "all/x": {"task": None, "verdict": R}}
    assert cm.by_task(comps) == {"": cm.overall([R]), "a": cm.overall([R, I]), "b": cm.overall([N])}
    assert list(cm.by_task(comps)) == ["", "a", "b"]


CFG = SimpleNamespace(alpha=0.05, bootstrap_resamples=200, bootstrap_seed=7, scratch_strategy="scratch",
                      few_label_strategies=["full", "lora"], reference_strategy="full",
                      forget_less_strategies=[])


RULE_1000_7 = (
    "Each difference gets a paired bootstrap interval (1000 resamples, seed 7): the seeds are drawn with "
    "replacement (the same draw for both arms when they ran the same seeds; with several pretrained "
    "backbones, first the backbones, then the seeds within each drawn backbone) and, within them, the test "
    "examples (for Δ LM loss: the held-out blocks), the same draw for both arms; where an arm has no "
    "per-example data only the seeds are drawn, and the comparison says so. The interval is the "
    "difference ± t(seeds − 1) × the bootstrap standard error (scaled by √(n/(n−1)) for n seeds). "
    "Holm's correction within each claim at α = 0.05: of m comparisons, the one with the k-th smallest "
    "p-value gets a 1 − α/(m − k + 1) interval, and is decisive only if every one before it was. A "
    "comparison is *reproduced* when its corrected interval lies wholly on the claimed side of 0, *not "
    "reproduced* when wholly on the other side, *inconclusive* otherwise (or with fewer than 2 seeds). "
    "A claim is reproduced when every comparison is, not reproduced when any is not, partly reproduced "
    "when some are and the rest are inconclusive, inconclusive otherwise.")


def test_rule_text():
    # the rule as the results page prints it: every statement of it is the module's statistics
    # (t with seeds - 1 df, the sqrt(n / (n - 1)) scaling, Holm's 1 - alpha / (m - k + 1))
    assert cm.rule(0.05, 1000, 7) == RULE_1000_7
    assert cm.rule(0.1, 500, 0) == (RULE_1000_7.replace("(1000 resamples, seed 7)", "(500 resamples, seed 0)")
                                    .replace("α = 0.05:", "α = 0.1:"))


def _row(task, strategy, fraction, seed, acc, n_labels):
    return {"task": task, "strategy": strategy, "fraction": fraction, "seed": seed,
            "test_accuracy": acc, "n_labels": n_labels}


def test_claim_few_labels_keys_counts_and_missing_rows():
    curves = [_row("movies", s, f, seed, acc, n)
              for s, base in (("full", 0.8), ("scratch", 0.5))
              for f, n in ((0.1, 20), (1.0, 200))
              for seed, acc in (("seed0", base), ("seed1", base + 0.02))]
    curves.append(_row("movies", "full", 0.1, "seed2", 0.81, 21))
    out = cm.claim_few_labels(curves, CFG)
    assert set(out["comparisons"]) == {"movies/full", "movies/lora"}
    full, lora = out["comparisons"]["movies/full"], out["comparisons"]["movies/lora"]
    assert (full["task"], full["strategy"], full["fraction"]) == ("movies", "full", 0.1)
    assert full["n_labels"] == [20, 21]
    assert full["accuracy"]["n"] == 3 and full["accuracy"]["mean"] == pytest.approx((0.8 + 0.82 + 0.81) / 3)
    assert full["scratch_accuracy"]["mean"] == pytest.approx(0.51)
    assert full["resampled"] == "seeds only (curves.csv records per-seed accuracies only)"
    assert lora["reason"] == "missing data: no curves rows of lora at fraction 0.1"
    assert lora["verdict"] == I and lora["accuracy"]["n"] == 0
    assert out["claim"] == "pretrained (full, lora) beats scratch at the smallest label fraction"
    assert out["rule"] == cm.rule(0.05, 200, 7) and out["alpha"] == 0.05
    assert "missing" not in out and set(out["by_task"]) == {"movies"}
    # no scratch rows at the smallest fraction; a task named "" is keyed "all"
    no_scratch = [r for r in curves if r["strategy"] != "scratch"]
    for r in no_scratch:
        r["task"] = ""
    out2 = cm.claim_few_labels(no_scratch, CFG)
    assert out2["comparisons"]["all/full"]["reason"] == "missing data: no curves rows of scratch at fraction 0.1"
    empty = cm.claim_few_labels([], CFG)
    assert empty["missing"] == "no curves.csv" and empty["verdict"] == I and empty["comparisons"] == {}


def _arm(delta):
    return {"mean_std": {"delta_loss": {"mean": delta, "std": 0.0, "n": 2}}}


def test_claim_forget_less_names_costs_and_titles():
    def samples(d0, d1, acc):
        return {"delta": cm.seed_sample({"s0": d0, "s1": d1}),
                "accuracy": cm.seed_sample({"s0": acc, "s1": acc + 0.01})}

    tasks = {"movies": {"full": _arm(0.5), "lora": _arm(0.1), "l2sp": _arm(0.2), "scratch": _arm(0.0)},
             "aaa": {"lora": _arm(0.1)}, "news": {"lora": _arm(0.1)}}   # no reference: skipped
    smp = {("movies", "full"): samples(0.5, 0.52, 0.80), ("movies", "lora"): samples(0.1, 0.12, 0.70),
           ("movies", "l2sp"): samples(0.2, 0.21, 0.79), ("movies", "scratch"): samples(0.0, 0.0, 0.5)}
    out = cm.claim_forget_less(tasks, smp, CFG)
    assert set(out["comparisons"]) == {"movies/l2sp", "movies/lora"}        # not full, not scratch
    lora = out["comparisons"]["movies/lora"]
    assert (lora["task"], lora["strategy"]) == ("movies", "lora") and set(out["by_task"]) == {"movies"}
    assert lora["delta_loss"] == {"mean": 0.1, "std": 0.0, "n": 2}
    assert lora["reference_delta_loss"] == {"mean": 0.5, "std": 0.0, "n": 2}
    assert lora["diff"] == pytest.approx(0.11 - 0.51)
    cost = lora["accuracy_cost"]
    assert cost["diff"] == pytest.approx(0.705 - 0.805) and "verdict_lower_accuracy" in cost
    assert "verdict" not in cost
    assert out["claim"] == "l2sp, lora forget less than full (smaller Δ held-out LM loss)"
    one = cm.claim_forget_less(tasks, smp, SimpleNamespace(**{**vars(CFG), "forget_less_strategies": ["lora", "dora"]}))
    assert set(one["comparisons"]) == {"movies/lora"}
    assert one["claim"] == "lora forgets less than full (smaller Δ held-out LM loss)"
    none = cm.claim_forget_less({"news": {"lora": _arm(0.1)}}, smp, CFG)
    assert none["claim"] == "the other strategies forget less than full (smaller Δ held-out LM loss)"
    assert none["missing"] == "full or every compared strategy is not in the declared matrix"


def test_a_note_on_either_arm_is_reported_when_both_have_seeds_only():
    # both arms per-seed (no fallback): the first arm's note, or else the second's
    a = cm.seed_sample({"s0": 0.6, "s1": 0.7}, note="m")
    b = cm.seed_sample({"s0": 0.5, "s1": 0.5})
    assert cm.paired_bootstrap(a, b, 100, np.random.default_rng(0))["resampled"] == "seeds only (m)"
    assert cm.paired_bootstrap(b, a, 100, np.random.default_rng(0))["resampled"] == "seeds only (m)"


def test_bootstrap_standard_error_is_a_sample_std():
    # the standard error is the sample std (ddof 1) of the resampled differences: defined from 2
    # resamples on (ddof 2 would divide by zero there)
    a = cm.seed_sample({"s0": 1.0, "s1": 0.0, "s2": 0.5})
    b = cm.seed_sample({"s0": 0.0, "s1": 0.0, "s2": 0.0})
    with np.errstate(all="raise"):
        r = cm.paired_bootstrap(a, b, 2, np.random.default_rng(0))
    assert math.isfinite(r["se"]) and r["se"] >= 0


def test_claim_forget_less_not_measured_without_an_lm_head():
    # arms and samples that would give comparisons: `not_applicable` says why none is made
    tasks = {"movies": {"full": _arm(0.5), "lora": _arm(0.1)}}
    smp = {("movies", s): {"delta": cm.seed_sample({"s0": d, "s1": d + 0.01}),
                           "accuracy": cm.seed_sample({"s0": 0.7, "s1": 0.8})}
           for s, d in (("full", 0.5), ("lora", 0.1))}
    out = cm.claim_forget_less(tasks, smp, CFG, not_applicable="the model has no LM head")
    assert out == {"claim": "the other strategies forget less than full (smaller Δ held-out LM loss)",
                   "rule": cm.rule(CFG.alpha, CFG.bootstrap_resamples, CFG.bootstrap_seed),
                   "alpha": CFG.alpha, "comparisons": {}, "by_task": {}, "verdict": I,
                   "counts": {cm.REPRODUCED: 0, cm.NOT_REPRODUCED: 0, I: 0, "total": 0},
                   "missing": "not measured on LM drift: the model has no LM head", "applicable": False}
    # measured (the default): comparisons, and no `applicable` key
    measured = cm.claim_forget_less(tasks, smp, CFG)
    assert set(measured["comparisons"]) == {"movies/lora"} and "applicable" not in measured
    assert cm.claim_forget_less(tasks, smp, CFG, None)["comparisons"].keys() == {"movies/lora"}
