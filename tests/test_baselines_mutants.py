"""ptf/measures/baselines.py: what the tests of tests/test_baselines.py leave open, found by
mutation testing (`make mutate GROUPS=baselines`). Fast (no stage run): these run first in the
group, so most mutants stop at them.

The logistic regression is checked against its definition, not against its code: the returned
weights must make the gradient of mean cross-entropy + l2/2 ||W||^2 (computed here by autograd,
with torch's own cross_entropy) vanish, and the returned loss must be that objective's value.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from ptf.measures.baselines import Vocabulary, fit_logreg, majority_label, scores, select_l2

# four examples over three token columns; classes 0, 1, 2, 1 (not separable by one column alone)
DENSE = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0]],
                     dtype=torch.float64)
LABELS = [0, 1, 2, 1]


def _objective(x, y, w, b, l2):
    """mean cross-entropy + l2/2 ||W||^2, the bias not penalised (the module docstring)."""
    return (torch.nn.functional.cross_entropy(x @ w + b, torch.tensor(y)) + 0.5 * l2 * (w * w).sum())


def _gradient_at(model, x, y):
    w = model.weight.clone().requires_grad_(True)
    b = model.bias.clone().requires_grad_(True)
    loss = _objective(x, y, w, b, model.l2)
    loss.backward()
    return loss.item(), w.grad, b.grad


def test_majority_of_nothing_is_refused_with_its_message():
    with pytest.raises(ValueError) as e:
        majority_label([])
    assert str(e.value) == "majority of an empty label list"
    assert majority_label([3]) == 3


def test_vocabulary_length_and_rows_with_no_known_token():
    v = Vocabulary.from_sequences([[5, 3, 5], [7]])
    assert len(v) == 3
    # a row with no training token is a row of zeros; no rows at all is a (0, 3) matrix
    assert v.counts([[99], [3, 3]]).to_dense().tolist() == [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]
    assert v.counts([[99]]).to_dense().tolist() == [[0.0, 0.0, 0.0]]
    assert tuple(v.counts([]).shape) == (0, 3)
    assert v.counts([[7, 3]]).dtype == torch.float64


@pytest.mark.parametrize("l2", [0.5, 0.05])
@pytest.mark.parametrize("sparse", [False, True])
def test_fit_minimises_the_stated_objective(l2, sparse):
    x = DENSE.to_sparse() if sparse else DENSE
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the CSR beta warning is silenced by the module
        m = fit_logreg(x, LABELS, 3, l2=l2, max_iter=200)
    loss, gw, gb = _gradient_at(m, DENSE, LABELS)
    # L-BFGS stops at a small, not a zero gradient; a wrong formula leaves one of order 0.1
    assert gw.abs().max().item() < 1e-4 and gb.abs().max().item() < 1e-4
    assert m.loss == pytest.approx(loss, rel=1e-9)
    assert m.l2 == l2 and 0 < m.iterations <= 200
    assert m.weight.dtype == torch.float64 and tuple(m.weight.shape) == (3, 3)
    assert m.predict(DENSE) == m.predict(DENSE.to_sparse())


def test_float32_input_and_an_iteration_cap():
    # the input's dtype does not matter (float64 inside), and max_iter caps L-BFGS
    m = fit_logreg(DENSE.float(), LABELS, 3, l2=0.05, max_iter=200)
    ref = fit_logreg(DENSE, LABELS, 3, l2=0.05, max_iter=200)
    assert torch.allclose(m.weight, ref.weight, atol=1e-6)
    assert m.predict(DENSE.float()) == ref.predict(DENSE)
    one = fit_logreg(DENSE, LABELS, 3, l2=0.05, max_iter=1)
    assert one.iterations == 1 and one.loss > ref.loss


def test_balanced_labels_on_a_constant_feature_stay_at_zero():
    # every example has the same features and the classes are balanced: the gradient at the zero
    # start is already 0, so W = 0, b = 0 and the loss is ln 2 (two classes, uniform softmax)
    x = torch.ones(4, 2, dtype=torch.float64)
    m = fit_logreg(x, [0, 1, 0, 1], 2, l2=1.0)
    assert m.weight.abs().max().item() == 0.0 and m.bias.abs().max().item() == 0.0
    assert m.loss == pytest.approx(math.log(2))


@pytest.mark.parametrize("l2", [0.0, -1.0])
def test_non_positive_l2_is_refused(l2):
    with pytest.raises(ValueError) as e:
        fit_logreg(DENSE, LABELS, 3, l2=l2)
    assert str(e.value) == f"l2 must be > 0, got {l2}"


def test_scores_edge_cases():
    # one example, right: accuracy 1; class 1 f1 = 2*1 / (2*1 + 0 + 0) = 1, class 0 absent -> 0
    assert scores([1], [1], 2) == {"accuracy": 1.0, "macro_f1": 0.5}
    # no examples: accuracy 0 (not a division by zero), every f1 0
    assert scores([], [], 2) == {"accuracy": 0.0, "macro_f1": 0.0}
    # all wrong, 2 classes: gold 0 0, pred 1 1 -> class 0: tp 0 fn 2 -> 0; class 1: tp 0 fp 2 -> 0
    assert scores([1, 1], [0, 0], 2) == {"accuracy": 0.0, "macro_f1": 0.0}
    # gold 0 1 1 1, pred 0 0 1 1: class 0 2*1/(2+1+0) = 2/3, class 1 2*2/(4+0+1) = 4/5
    s = scores([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert s["accuracy"] == 0.75 and s["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_select_l2_ties_go_to_the_stronger_l2_and_progress_is_called_per_fit():
    # a single constant feature with balanced labels: every L2 gives the same validation accuracy
    x = torch.ones(4, 1, dtype=torch.float64)
    calls = []
    sel = select_l2(x, [0, 1, 0, 1], x, [0, 0, 1, 1], 2, [0.1, 10.0, 1.0], max_iter=50,
                    progress=lambda: calls.append(1))
    assert sel.model.l2 == 10.0
    assert sel.val_accuracy == {0.1: 0.5, 10.0: 0.5, 1.0: 0.5}
    assert len(calls) == 3
    # the best validation accuracy wins over a stronger L2
    xtr = DENSE
    weak = select_l2(xtr, LABELS, xtr, LABELS, 3, [1e-3, 1e3], max_iter=200)
    assert weak.model.l2 == 1e-3 and weak.val_accuracy[1e-3] == 1.0 and weak.val_accuracy[1e3] == 0.5
    with pytest.raises(AssertionError, match="^empty L2 grid$"):
        select_l2(x, [0, 1, 0, 1], x, [0, 1, 0, 1], 2, [])


def test_select_l2_passes_its_iteration_cap_on():
    sel = select_l2(DENSE, LABELS, DENSE, LABELS, 3, [0.05], max_iter=1)
    assert sel.model.iterations == 1


def test_a_class_absent_from_train_still_has_a_column():
    # 3 classes declared, only 0 and 1 in the training labels: W is (features, 3), and the
    # absent class is never predicted (its logit only loses: mean softmax mass pushed down)
    m = fit_logreg(DENSE, [0, 1, 0, 1], 3, l2=0.05, max_iter=200)
    assert tuple(m.weight.shape) == (3, 3) and tuple(m.bias.shape) == (3,)
    assert 2 not in m.predict(DENSE)
    assert m.bias[2] < m.bias[0] and m.bias[2] < m.bias[1]
