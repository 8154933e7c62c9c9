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
CHANCE = [0.5, 0.5, 0.2]


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


def test_chance_adjustment():
    # (a - c) / (1 - c) per column, c = [0.5, 0.5, 0.2]:
    # row 0: [0, -0.4, 0.0625]; row 1: [0.8, -0.2, 0]; row 2: [0.4, 0.7, 0.125]; row 3: [0.2, 0.6, 0.9375]
    A = cl.chance_adjust(R, CHANCE)
    expected = [[0, -0.4, 0.0625], [0.8, -0.2, 0], [0.4, 0.7, 0.125], [0.2, 0.6, 0.9375]]
    assert A.ravel().tolist() == pytest.approx(sum(expected, []))
    m = cl.sequential_measures(R, chance=CHANCE)
    adj = m["chance_adjusted"]
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
    # A scalar chance applies to every task; chance accuracy maps to 0, perfect to 1.
    assert cl.chance_adjust([[0.5, 1.0]], 0.5).tolist() == [[0.0, 1.0]]


def test_single_task_has_no_transfer_or_forgetting():
    m = cl.sequential_measures([[0.5], [0.9]], chance=0.5)
    assert m["raw"]["acc"] == pytest.approx(0.9)
    assert m["raw"]["bwt"] is None and m["raw"]["fwt"] is None and m["raw"]["avg_forgetting"] is None
    assert m["raw"]["forgetting"] == []


@pytest.mark.parametrize("bad", [[[0.5, 0.5]], [[0.5], [0.6], [0.7]], [[0.1, float("nan")], [1, 1], [1, 1]], "x"])
def test_bad_matrices_are_refused(bad):
    with pytest.raises(cl.MatrixError):
        cl.sequential_measures(bad)


def test_bad_chance_is_refused():
    with pytest.raises(cl.MatrixError):
        cl.chance_adjust(R, [0.5, 1.0, 0.2])
    with pytest.raises(cl.MatrixError):
        cl.chance_adjust(R, [0.5, 0.5])


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
