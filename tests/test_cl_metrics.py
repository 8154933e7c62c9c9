"""Continual-learning measures on hand-made inputs whose answers are worked out in comments."""
from __future__ import annotations

import math

import pytest

from ptf.measures import cl_metrics as cl
from ptf.measures.stats import mean_std

# T = 3 tasks. Row 0: before training; row i: after training task i-1. R[i][j]: accuracy on task j.
R = [
    [0.50, 0.30, 0.25],  # before any training
    [0.90, 0.40, 0.20],  # after task 0
    [0.70, 0.85, 0.30],  # after task 1
    [0.60, 0.80, 0.95],  # after task 2 (final)
]
MAJORITY = [0.5, 0.5, 0.2]


def test_acc_and_learning_accuracy():
    # ACC = (0.60 + 0.80 + 0.95) / 3 = 2.35 / 3
    assert cl.final_accuracy(R) == pytest.approx(2.35 / 3)
    # just-learned: R[1][0], R[2][1], R[3][2]
    assert cl.learning_accuracy(R) == pytest.approx([0.90, 0.85, 0.95])


def test_forgetting_chaudhry():
    # task 0: max(R[1][0], R[2][0]) = max(0.90, 0.70) = 0.90; minus final 0.60 -> 0.30
    # task 1: max(R[1][1], R[2][1]) = max(0.40, 0.85) = 0.85; minus final 0.80 -> 0.05
    # task 2 (last): not defined. Average (0.30 + 0.05) / 2 = 0.175
    assert cl.forgetting_per_task(R) == pytest.approx([0.30, 0.05])
    assert cl.average_forgetting(R) == pytest.approx(0.175)


def test_forgetting_ignores_row_zero():
    # Row 0 (before the sequence) is not an "earlier point": a high row-0 accuracy on task 0
    # (0.99) does not count; max over rows 1..2 is 0.8, final 0.8 -> forgetting 0.
    M = [[0.99, 0.5, 0.5], [0.8, 0.5, 0.5], [0.8, 0.9, 0.5], [0.8, 0.9, 0.9]]
    assert cl.forgetting_per_task(M) == pytest.approx([0.0, 0.0])


def test_bwt():
    # ((R[3][0] - R[1][0]) + (R[3][1] - R[2][1])) / 2 = ((0.60 - 0.90) + (0.80 - 0.85)) / 2 = -0.175
    assert cl.backward_transfer(R) == pytest.approx(-0.175)


def test_fwt_relative_to_row_zero_and_to_a_baseline():
    # Row-0 baseline: ((R[1][1] - R[0][1]) + (R[2][2] - R[0][2])) / 2 = ((0.40-0.30) + (0.30-0.25)) / 2 = 0.075
    assert cl.forward_transfer(R) == pytest.approx(0.075)
    # Given b = [0.5, 0.5, 0.2]: ((0.40 - 0.5) + (0.30 - 0.2)) / 2 = 0.0
    assert cl.forward_transfer(R, baseline=[0.5, 0.5, 0.2]) == pytest.approx(0.0)


def test_majority_adjustment():
    # (a - c) / (1 - c) per column, c = [0.5, 0.5, 0.2]:
    # row 0: [0, -0.4, 0.0625]; row 1: [0.8, -0.2, 0]; row 2: [0.4, 0.7, 0.125]; row 3: [0.2, 0.6, 0.9375]
    A = cl.majority_adjust(R, MAJORITY)
    expected = [[0, -0.4, 0.0625], [0.8, -0.2, 0], [0.4, 0.7, 0.125], [0.2, 0.6, 0.9375]]
    assert A.ravel().tolist() == pytest.approx(sum(expected, []))
    m = cl.sequential_measures(R, majority=MAJORITY)
    adj = m["majority_adjusted"]
    assert adj["acc"] == pytest.approx((0.2 + 0.6 + 0.9375) / 3)
    # forgetting: max(0.8, 0.4) - 0.2 = 0.6 ; max(-0.2, 0.7) - 0.6 = 0.1 (= raw / (1 - c))
    assert adj["forgetting"] == pytest.approx([0.6, 0.1])
    assert adj["avg_forgetting"] == pytest.approx(0.35)
    # BWT: ((0.2 - 0.8) + (0.6 - 0.7)) / 2 = -0.35
    assert adj["bwt"] == pytest.approx(-0.35)
    # FWT vs adjusted row 0: ((R'[1][1] - R'[0][1]) + (R'[2][2] - R'[0][2])) / 2
    #   = ((-0.2 - -0.4) + (0.125 - 0.0625)) / 2 = 0.13125
    assert adj["fwt"] == pytest.approx(0.13125)
    assert m["raw"]["bwt"] == pytest.approx(-0.175)
    # A scalar rate applies to every task; the majority rate maps to 0, perfect to 1.
    assert cl.majority_adjust([[0.5, 1.0]], 0.5).tolist() == [[0.0, 1.0]]


def test_single_task_has_no_transfer_or_forgetting():
    m = cl.sequential_measures([[0.5], [0.9]], majority=0.5)
    assert m["raw"]["acc"] == pytest.approx(0.9)
    assert m["raw"]["bwt"] is None and m["raw"]["fwt"] is None and m["raw"]["avg_forgetting"] is None
    assert m["raw"]["forgetting"] == []


@pytest.mark.parametrize("bad", [[[0.5, 0.5]], [[0.5], [0.6], [0.7]], [[0.1, float("nan")], [1, 1], [1, 1]], "x"])
def test_bad_matrices_are_refused(bad):
    with pytest.raises(cl.MatrixError):
        cl.sequential_measures(bad)


def test_bad_majority_is_refused():
    with pytest.raises(cl.MatrixError):
        cl.majority_adjust(R, [0.5, 1.0, 0.2])
    with pytest.raises(cl.MatrixError):
        cl.majority_adjust(R, [0.5, 0.5])


def test_drift_paired():
    # Two blocks of 10 predicted tokens. Reference NLL sums 20, 30 -> loss 50/20 = 2.5;
    # fine-tuned 25, 28 -> 53/20 = 2.65. Delta 0.15 (6 %). Block 0 worse (+0.5/token), block 1
    # better (-0.2/token): share worse 0.5.
    d = cl.drift([20, 30], [25, 28], [10, 10])
    assert d["loss_pretrained"] == pytest.approx(2.5)
    assert d["loss_finetuned"] == pytest.approx(2.65)
    assert d["delta_loss"] == pytest.approx(0.15)
    assert d["rel_delta_pct"] == pytest.approx(6.0)
    assert d["ppl_finetuned"] == pytest.approx(math.exp(2.65))
    assert d["ppl_ratio"] == pytest.approx(math.exp(0.15))
    assert d["share_worse"] == 0.5
    # A margin of 0.5 nats/token: block 0 (+0.5) is not strictly above it.
    assert cl.drift([20, 30], [25, 28], [10, 10], worse_margin=0.5)["share_worse"] == 0.0
    same = cl.drift([20, 30], [20, 30], [10, 10])
    assert same["delta_loss"] == 0.0 and same["share_worse"] == 0.0


def test_mean_std():
    # sample std of [1, 2, 3] = 1
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}


# ---------------------------------------------------------------- gaps found by mutation testing
# Each test below fails under a change to cl_metrics.py / stats.py that the tests above let pass
# (`make mutate GROUPS=cl_metrics`). The error messages are checked whole: they are what a user
# sees when a matrix of the wrong shape reaches the forgetting stage.

def _message(excinfo) -> str:
    return str(excinfo.value)


def test_forgetting_with_two_tasks():
    # T = 2: only task 0 has forgetting, f_0 = max over row 1 alone (0.9) - final 0.6 = 0.3.
    # Row 0 (0.95) is not a point of the sequence; task 1 (just learned) has no value.
    M = [[0.95, 0.5], [0.9, 0.4], [0.6, 0.8]]
    assert cl.forgetting_per_task(M) == pytest.approx([0.3])
    assert cl.average_forgetting(M) == pytest.approx(0.3)
    # BWT = R[2][0] - R[1][0] = -0.3; FWT = R[1][1] - R[0][1] = 0.4 - 0.5 = -0.1
    assert cl.backward_transfer(M) == pytest.approx(-0.3)
    assert cl.forward_transfer(M) == pytest.approx(-0.1)
    assert cl.learning_accuracy(M) == pytest.approx([0.9, 0.8])
    assert cl.final_accuracy(M) == pytest.approx(0.7)


@pytest.mark.parametrize("bad, message", [
    ([[0.5, 0.5]], "accuracy matrix must have T+1 rows and T >= 1 columns, got shape (1, 2)"),
    ([[]], "accuracy matrix must have T+1 rows and T >= 1 columns, got shape (1, 0)"),
    ([0.5, 0.5], "accuracy matrix must have T+1 rows and T >= 1 columns, got shape (2,)"),
    ([[0.1, float("inf")], [1, 1], [1, 1]], "accuracy matrix has non-finite entries"),
    ("x", "accuracy matrix is not a rectangular table of numbers: could not convert string to float: 'x'"),
])
def test_bad_matrix_messages(bad, message):
    with pytest.raises(cl.MatrixError) as e:
        cl.as_matrix(bad)
    assert _message(e) == message


def test_bad_majority_and_baseline_messages():
    with pytest.raises(cl.MatrixError) as e:
        cl.majority_adjust(R, [0.5, 0.5])
    assert _message(e) == "majority must be a number or a vector of length T=3, got shape (2,)"
    with pytest.raises(cl.MatrixError) as e:
        cl.majority_adjust(R, [0.5, float("nan"), 0.2])
    assert _message(e) == "majority has non-finite entries"
    with pytest.raises(cl.MatrixError) as e:
        cl.majority_adjust(R, [0.5, 1.0, 0.2])
    assert _message(e) == "majority-class rates must be in [0, 1), got [0.5, 1.0, 0.2]"
    with pytest.raises(cl.MatrixError) as e:
        cl.majority_adjust(R, -0.1)
    assert _message(e) == "majority-class rates must be in [0, 1), got [-0.1, -0.1, -0.1]"
    with pytest.raises(cl.MatrixError) as e:
        cl.forward_transfer(R, baseline=[0.5, 0.5])
    assert _message(e) == "baseline must be a number or a vector of length T=3, got shape (2,)"
    with pytest.raises(cl.MatrixError) as e:
        cl.sequential_measures(R, baseline=[0.5, float("inf"), 0.2])
    assert _message(e) == "baseline has non-finite entries"


def test_majority_zero_is_the_identity_and_a_scalar_baseline_applies_to_every_task():
    # c = 0 is allowed (the bound is [0, 1)): (a - 0) / (1 - 0) = a.
    assert cl.majority_adjust(R, 0.0).tolist() == R
    # c just below 1 is allowed too: (0.995 - 0.99) / 0.01 = 0.5
    assert cl.majority_adjust([[0.995]], 0.99)[0].tolist() == pytest.approx([0.5])
    # baseline 0.3 for every task: ((0.40 - 0.3) + (0.30 - 0.3)) / 2 = 0.05
    assert cl.forward_transfer(R, baseline=0.3) == pytest.approx(0.05)


def test_sequential_measures_with_a_baseline():
    # baseline b = [0.5, 0.6, 0.4]; raw FWT = ((0.40 - 0.6) + (0.30 - 0.4)) / 2 = -0.15.
    # Adjusted with c = [0.5, 0.5, 0.2]: b' = [0, 0.2, 0.25]; R'[1][1] = -0.2, R'[2][2] = 0.125
    # (test_majority_adjustment) -> ((-0.2 - 0.2) + (0.125 - 0.25)) / 2 = -0.2625.
    m = cl.sequential_measures(R, majority=MAJORITY, baseline=[0.5, 0.6, 0.4])
    assert m["fwt_baseline"] == "given"
    assert m["raw"]["fwt"] == pytest.approx(-0.15)
    assert m["majority_adjusted"]["fwt"] == pytest.approx(-0.2625)
    # every key of a block, raw and adjusted
    assert m["raw"] == {
        "acc": pytest.approx(2.35 / 3), "learning_accuracy": pytest.approx([0.90, 0.85, 0.95]),
        "forgetting": pytest.approx([0.30, 0.05]), "avg_forgetting": pytest.approx(0.175),
        "bwt": pytest.approx(-0.175), "fwt": pytest.approx(-0.15), "matrix": R,
    }
    adj = m["majority_adjusted"]
    # learning accuracy adjusted: R'[1][0] = 0.8, R'[2][1] = 0.7, R'[3][2] = 0.9375
    assert adj["learning_accuracy"] == pytest.approx([0.8, 0.7, 0.9375])
    expected = [[0, -0.4, 0.0625], [0.8, -0.2, 0], [0.4, 0.7, 0.125], [0.2, 0.6, 0.9375]]
    assert [x for row in adj["matrix"] for x in row] == pytest.approx(sum(expected, []))
    assert all(type(x) is float for row in adj["matrix"] for x in row)
    # without a baseline: FWT against row 0, and no adjusted block without majority rates
    plain = cl.sequential_measures(R)
    assert plain["fwt_baseline"] == "row 0" and "majority_adjusted" not in plain
    assert plain["raw"]["fwt"] == pytest.approx(0.075)


def test_pooled_loss_token_counts():
    # one predicted token is enough: 3.0 / 1
    assert cl.pooled_loss([3.0], [1]) == 3.0
    # (2 + 4) / (1 + 2) = 2.0
    assert cl.pooled_loss([2.0, 4.0], [1, 2]) == 2.0
    for counts in ([0], [0, 0], [-1]):
        with pytest.raises(ValueError) as e:
            cl.pooled_loss([1.0] * len(counts), counts)
        assert _message(e) == "no predicted tokens"


def test_drift_every_key_and_its_input_checks():
    # blocks: reference 20, 30 over 10, 10 tokens; fine-tuned 25, 28 (test_drift_paired)
    d = cl.drift([20, 30], [25, 28], [10, 10])
    assert d == {
        "loss_pretrained": pytest.approx(2.5), "loss_finetuned": pytest.approx(2.65),
        "ppl_pretrained": pytest.approx(math.exp(2.5)), "ppl_finetuned": pytest.approx(math.exp(2.65)),
        "delta_loss": pytest.approx(0.15), "rel_delta_pct": pytest.approx(6.0),
        "ppl_ratio": pytest.approx(math.exp(0.15)), "share_worse": 0.5, "blocks": 2, "tokens": 20,
    }
    assert type(d["blocks"]) is int and type(d["tokens"]) is int
    # a block with a single token is enough; the tokens are counted, not the blocks:
    # (4 - 2) / 1 = +2 per token for block 0, 0 for block 1 -> share worse 0.5
    one = cl.drift([2.0, 10.0], [4.0, 10.0], [1, 5])
    assert one["tokens"] == 6 and one["blocks"] == 2 and one["share_worse"] == 0.5
    assert one["loss_pretrained"] == pytest.approx(2.0) and one["loss_finetuned"] == pytest.approx(14 / 6)
    # reference loss 0: the relative change is undefined (nan), the rest is computed
    zero = cl.drift([0.0], [1.0], [2])
    assert math.isnan(zero["rel_delta_pct"]) and zero["delta_loss"] == pytest.approx(0.5)
    shape_message = "need equal, non-empty 1-d per-block vectors, got {}, {}, {}"
    for args, shapes in [(([1, 2], [1, 2], [1]), ("(2,)", "(2,)", "(1,)")),
                         (([1], [1, 2], [1, 2]), ("(1,)", "(2,)", "(2,)")),
                         (([[1]], [[1]], [[1]]), ("(1, 1)",) * 3),
                         (([], [], []), ("(0,)",) * 3)]:
        with pytest.raises(ValueError) as e:
            cl.drift(*args)
        assert _message(e) == shape_message.format(*shapes)
    with pytest.raises(ValueError) as e:
        cl.drift([1, 2], [1, 2], [5, 0])
    assert _message(e) == "every block needs at least one predicted token"


def test_exp_saturates_to_inf_from_700():
    # exp(700) ~ 1.0e304 is still finite, but the module maps every x >= 700 to inf
    assert cl._exp(699.0) == math.exp(699.0)
    assert cl._exp(700.0) == float("inf")
    assert cl._exp(710.0) == float("inf")  # math.exp would raise OverflowError here
    # through drift: reference loss 0, fine-tuned 720 nats/token -> perplexity inf, not an error
    d = cl.drift([0.0], [720.0], [1])
    assert d["ppl_finetuned"] == float("inf") and d["ppl_ratio"] == float("inf")
    assert d["ppl_pretrained"] == 1.0


def test_mean_std_of_two_values_and_none_skipped():
    # sample std of [1, 2]: sqrt(((1 - 1.5)^2 + (2 - 1.5)^2) / 1) = sqrt(0.5)
    assert mean_std([1.0, 2.0]) == {"mean": 1.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert mean_std([1.0, None, 2.0]) == {"mean": 1.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    out = mean_std([1, 3])
    assert type(out["mean"]) is float and type(out["std"]) is float and type(out["n"]) is int


def test_forgetting_takes_the_best_earlier_accuracy_of_each_task():
    # rows 1..2 of tasks 0..1: [[0.9, 0.95], [0.3, 0.8]]: the best earlier accuracy is per task
    # (column): task 0 max(0.9, 0.3) = 0.9, task 1 max(0.95, 0.8) = 0.95 (not per row: 0.95, 0.8).
    # Final 0.6, 0.7 -> forgetting 0.3, 0.25.
    M = [[0.5, 0.5, 0.5], [0.9, 0.95, 0.5], [0.3, 0.8, 0.5], [0.6, 0.7, 0.9]]
    assert cl.forgetting_per_task(M) == pytest.approx([0.3, 0.25])


def test_drift_relative_change_below_one_nat():
    # reference loss 5 / 10 = 0.5 nats/token (> 0, below 1), fine-tuned 0.6: +20 %
    assert cl.drift([5.0], [6.0], [10])["rel_delta_pct"] == pytest.approx(20.0)


# ---------------------------------------------------------------- majority rates, not 1/n

def test_majority_adjustment_is_not_one_over_n():
    # A binary task whose test split is 70 % one class: a model that always answers it scores 0.7.
    # With 1/n (0.5) that would be (0.7 - 0.5) / 0.5 = 0.4 "above chance"; against the majority
    # rate it is (0.7 - 0.7) / 0.3 = 0, and 0.85 is (0.85 - 0.7) / 0.3 = 0.5.
    M = [[0.70, 0.50], [0.85, 0.50], [0.70, 0.80]]      # task 1: balanced, majority 0.5
    A = cl.majority_adjust(M, [0.7, 0.5])
    assert A.ravel().tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0, 0.0, 0.6])
    m = cl.sequential_measures(M, majority=[0.7, 0.5])
    # raw BWT = 0.70 - 0.85 = -0.15; adjusted = 0.0 - 0.5 = -0.5 (task 0 fell back to the majority rate)
    assert m["raw"]["bwt"] == pytest.approx(-0.15) and m["majority_adjusted"]["bwt"] == pytest.approx(-0.5)
    assert m["majority_adjusted"]["acc"] == pytest.approx(0.3)     # (0 + 0.6) / 2


def test_fwt_against_a_random_init_baseline():
    # GEM: b = the random-init accuracies [0.5, 0.45]. T = 2: FWT = R[1][1] - b[1] = 0.55 - 0.45 = 0.10
    # (row 0, the pretrained backbone with fresh heads, would give 0.55 - 0.60 = -0.05).
    M = [[0.50, 0.60], [0.90, 0.55], [0.80, 0.95]]
    m = cl.sequential_measures(M, majority=[0.5, 0.5], baseline=[0.5, 0.45])
    assert m["raw"]["fwt"] == pytest.approx(0.10) and m["fwt_baseline"] == "given"
    assert cl.sequential_measures(M)["raw"]["fwt"] == pytest.approx(-0.05)
    # adjusted: (0.55 - 0.5) / 0.5 - (0.45 - 0.5) / 0.5 = 0.1 + 0.1 = 0.2
    assert m["majority_adjusted"]["fwt"] == pytest.approx(0.2)


# ---------------------------------------------------------------- forgetting events (Toneva et al. 2019)

# T = 3 tasks, 4 test examples each. C[i][j]: correctness on task j after i tasks (row 0: before).
C = [
    ["0000", "1100", "0101"],   # before any training: not counted (task j counts from row j+1)
    ["1110", "0000", "1111"],   # after task 0: task 0 just learned
    ["0111", "1101", "0000"],   # after task 1: task 0 example 0 forgotten (1 -> 0); task 1 just learned
    ["1010", "0110", "1111"],   # after task 2: task 0 ex 1 and 3 forgotten; task 1 ex 0 and 3 forgotten
]


def test_forgetting_events_on_a_hand_made_table():
    ev = cl.forgetting_events(C)
    # task 0, rows 1..3: ex0 1,0,1 -> 1 event; ex1 1,1,0 -> 1; ex2 1,1,1 -> 0; ex3 0,1,0 -> 1.
    # events 3, forgotten (>= 1 event) 3 of 4, never forgotten 1/4.
    assert ev[0] == {"events": 3, "forgotten": 3, "never_forgotten": 0.25, "n": 4}
    # task 1, rows 2..3: 1101 -> 0110: ex0 1->0, ex3 1->0 (ex1 stays, ex2 0->1 is learning): 2 events.
    # Row 0's 1100 -> row 1's 0000 is before task 1 was learned: not counted.
    assert ev[1] == {"events": 2, "forgotten": 2, "never_forgotten": 0.5, "n": 4}
    # task 2 is the last: no later evaluation (its 1111 -> 0000 drop at rows 1 -> 2 is before it was learned)
    assert ev[2] is None


def test_an_example_forgotten_twice_counts_two_events_and_once_as_forgotten():
    # T = 3, task 0 with one example: 1, 0, 1 ... rows 1..3 = 1, 0, 1 -> one event; with T = 4 and
    # 1, 0, 1, 0: two events, one example forgotten.
    C4 = [["0", "0", "0", "0"], ["1", "0", "0", "0"], ["0", "1", "0", "0"], ["1", "1", "1", "0"],
          ["0", "1", "1", "1"]]
    ev = cl.forgetting_events(C4)
    assert ev[0] == {"events": 2, "forgotten": 1, "never_forgotten": 0.0, "n": 1}
    assert ev[1] == {"events": 0, "forgotten": 0, "never_forgotten": 1.0, "n": 1}


@pytest.mark.parametrize("bad, message", [
    ([["1"]], "correctness table must have T+1 rows of T cells, got [1]"),
    ([["1", "0"], ["1"], ["1", "1"]], "correctness table must have T+1 rows of T cells, got [2, 1, 2]"),
    ([["1", "0"], ["10", "0"], ["1", "1"]], "correctness of task 0: every row needs the same 2 examples, as 0/1"),
    ([["1", "0"], ["2", "0"], ["1", "1"]], "correctness of task 0: every row needs the same 1 examples, as 0/1"),
])
def test_bad_correctness_tables_are_refused(bad, message):
    with pytest.raises(cl.MatrixError) as e:
        cl.forgetting_events(bad)
    assert _message(e) == message


def test_forgetting_events_edge_cases():
    # one task: nothing after it, so no events, but a valid table
    assert cl.forgetting_events([["1"], ["0"]]) == [None]
    # no rows at all: refused as a table, not an IndexError
    with pytest.raises(cl.MatrixError, match="T\\+1 rows of T cells, got \\[\\]"):
        cl.forgetting_events([])
    # a task with no test examples: no share of never-forgotten ones (not a NaN)
    assert cl.forgetting_events([["", ""], ["", ""], ["", ""]])[0] == {
        "events": 0, "forgotten": 0, "never_forgotten": None, "n": 0}
