"""ptf/measures/representation.py against hand-computed cases: linear CKA, per-layer features of
a tiny BERT, probe retention, bits per byte."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptf.measures.representation import (bits_per_byte, cka_per_layer, fit_probe, layer_features,
                                         linear_cka, probe_accuracy, probe_retention, utf8_bytes)


# ----------------------------------------------------------------------------- CKA
def test_cka_one_dimension_is_squared_correlation():
    # centred x = (-1, 0, 1), y = (-1, 1, 0): (x.y)^2 / (|x|^2 |y|^2) = 1 / 4
    assert linear_cka([[1], [2], [3]], [[1], [3], [2]]) == pytest.approx(0.25)


def test_cka_of_half_the_dimensions():
    # X^T X = diag(2, 2) (|.|_F = 2 sqrt 2), Y^T Y = [[2]], Y^T X = [2, 0]: 4 / (2 sqrt2 * 2) = 1/sqrt2
    x = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
    assert linear_cka(x, x[:, :1]) == pytest.approx(1 / math.sqrt(2))


def test_cka_invariances_and_gram_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert linear_cka(x, rng.normal(size=(50, 8))) < 0.5
    wide_x, wide_y = rng.normal(size=(6, 40)), rng.normal(size=(6, 30))  # n < d: Gram form
    xc, yc = wide_x - wide_x.mean(0), wide_y - wide_y.mean(0)
    direct = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(wide_x, wide_y) == pytest.approx(direct)
    assert math.isnan(linear_cka(np.ones((4, 2)), x[:4]))
    with pytest.raises(ValueError, match="same n >= 2 examples"):
        linear_cka(x, x[:10])


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()


def test_layer_features_and_cka_per_layer_locate_the_change():
    model = _tiny_bert()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (12, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 7:] = 0
    batches = [(ids[:6], mask[:6]), (ids[6:], mask[6:])]
    feats = layer_features(model, batches)
    assert len(feats) == 3 and all(f.shape == (12, 16) for f in feats)
    toks = layer_features(model, batches, pooling="tokens")
    assert toks[0].shape == (12 * 7, 16)
    changed = _tiny_bert()
    with torch.no_grad():
        for p in changed.encoder.layer[1].parameters():
            p.add_(torch.randn_like(p, generator=g) * 0.5)
    cka = cka_per_layer(feats, layer_features(changed, batches))
    assert cka[0] == pytest.approx(1.0) and cka[1] == pytest.approx(1.0) and cka[2] < 0.99


# ----------------------------------------------------------------------------- probes
def test_probe_retention_hand_case():
    x_sep = np.array([[-2.0], [-1.5], [-1.0], [-0.5], [1.0], [2.0]])  # class = sign
    y_tr = [0, 0, 0, 0, 1, 1]
    x_te, y_te = np.array([[-1.2], [-0.7], [1.5]]), [0, 0, 1]
    probe = fit_probe(x_sep, y_tr, 2)
    assert probe_accuracy(probe, x_te, y_te) == 1.0
    # after: every feature the same -> the probe learns only the prior: always class 0 (4 of 6)
    flat_tr, flat_te = np.zeros((6, 1)), np.zeros((3, 1))
    r = probe_retention((x_sep, y_tr, x_te, y_te), (flat_tr, y_tr, flat_te, y_te), 2)
    assert r == pytest.approx({"before": 1.0, "after": 2 / 3, "lost": 1 / 3, "retention": 2 / 3})


def test_probe_is_deterministic_and_multiclass():
    rng = np.random.default_rng(3)
    centres = np.array([[0, 4], [4, 0], [-4, -4]], dtype=float)
    y = np.repeat([0, 1, 2], 20)
    x = centres[y] + rng.normal(size=(60, 2))
    a, b = fit_probe(x, y, 3), fit_probe(x, y, 3)
    assert torch.equal(a.weight, b.weight) and probe_accuracy(a, x, y) > 0.95


# ----------------------------------------------------------------------------- bits per byte
def test_bits_per_byte():
    # 2 nats/token over 100 tokens = 200 nats; 400 bytes: 200 / (400 ln 2) = 0.7213 bits/byte
    assert bits_per_byte(2.0, 100, 400) == pytest.approx(0.5 / math.log(2))
    assert bits_per_byte(math.log(2) * 8, 1, 1) == pytest.approx(8.0)  # 8 bits for a 1-byte token
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 1, 0)


def test_utf8_bytes_of_token_rows():
    from tests.pretrain_fixtures import make_tokenizer

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenizer(Path(d), "bpe")
    rows = [tok("the cat sat.")["input_ids"] + [tok.eos_token_id], tok(" on a mat")["input_ids"]]
    assert utf8_bytes(tok, rows) == len("the cat sat.") + len(" on a mat")


# ----------------------------------------------------------------------------- gaps found by mutation testing
# Each test below fails under a change to representation.py that the tests above let pass
# (`make mutate GROUPS=representation`).

@pytest.mark.parametrize("x, y, shapes", [
    (np.ones((3, 2)), np.ones(3), "(3, 2) and (3,)"),           # y not a matrix
    (np.ones(3), np.ones((3, 2)), "(3,) and (3, 2)"),           # x not a matrix
    (np.ones((3, 2)), np.ones((4, 2)), "(3, 2) and (4, 2)"),    # different examples
    (np.ones((1, 2)), np.ones((1, 2)), "(1, 2) and (1, 2)"),    # one example
])
def test_cka_refuses_bad_shapes_with_its_message(x, y, shapes):
    with pytest.raises(ValueError) as e:
        linear_cka(x, y)
    assert str(e.value) == f"linear_cka needs two (n, d) matrices over the same n >= 2 examples, got {shapes}"


def test_cka_two_examples_and_small_scales():
    # n = 2 is enough: centred x = (-0.5, 0.5), y = (-1, 1): one direction each -> CKA 1
    assert linear_cka([[0.0], [1.0]], [[3.0], [5.0]]) == pytest.approx(1.0)
    # the 1-d case of test_cka_one_dimension_is_squared_correlation at a scale of 1e-3: the
    # denominator is ~1e-12, still > 0, and CKA is scale-free -> 1/4 again (not NaN)
    assert linear_cka([[1e-3], [2e-3], [3e-3]], [[1e-3], [3e-3], [2e-3]]) == pytest.approx(0.25)
    # the same in the Gram form (2 examples < 3 dims): rows (1,0,0), (0,1,0) vs (1,0,0), (0,0,1)
    # centred x = ±(0.5, -0.5, 0), y = ±(0.5, 0, -0.5): both Grams [[.5, -.5], [-.5, .5]] -> 1
    gx = np.array([[1e-3, 0, 0], [0, 1e-3, 0]])
    gy = np.array([[1e-3, 0, 0], [0, 0, 1e-3]])
    assert linear_cka(gx, gy) == pytest.approx(1.0)
    # no variance on the y side alone: NaN as well
    assert math.isnan(linear_cka([[1.0], [2.0], [3.0]], np.ones((3, 2))))


def test_cka_per_layer_needs_the_same_number_of_layers():
    x = np.array([[1.0], [2.0], [3.0]])
    with pytest.raises(ValueError) as e:
        cka_per_layer([x, x], [x])
    assert str(e.value) == "the models have 2 and 1 layers of features"
    assert cka_per_layer([x, x], [x, [[1.0], [3.0], [2.0]]]) == pytest.approx([1.0, 0.25])


def test_probe_standardises_and_keeps_constant_features():
    # feature 0 separates the classes, feature 1 is constant (std 0 -> divided by 1, not by 0)
    x = np.array([[-2.0, 5.0], [-1.0, 5.0], [1.0, 5.0], [2.0, 5.0]])
    p = fit_probe(x, [0, 0, 1, 1], 2)
    assert p.mean.tolist() == [0.0, 5.0]
    assert p.std.tolist() == pytest.approx([math.sqrt(2.5), 1.0])
    assert np.all(np.isfinite(p.weight.numpy()))
    assert p.predict(np.array([[-0.1, 5.0], [0.1, 5.0]])).tolist() == [0, 1]
    # the weight penalty is 1e-3 per example by default: the same fit as asking for it
    assert torch.equal(p.weight, fit_probe(x, [0, 0, 1, 1], 2, l2=1e-3).weight)
    # a strong penalty shrinks the weights
    assert fit_probe(x, [0, 0, 1, 1], 2, l2=1.0).weight.abs().max() < p.weight.abs().max()


def test_probe_retention_with_nothing_right_before():
    # the "before" probe is wrong on every test example (test labels flipped): before 0, so
    # the retention after / before is undefined (NaN), and the loss is 0 - after
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    y = [0, 0, 1, 1]
    r = probe_retention((x, y, np.array([[-1.5], [1.5]]), [1, 0]),
                        (x, y, np.array([[-1.5], [1.5]]), [0, 1]), 2)
    assert r["before"] == 0.0 and r["after"] == 1.0 and r["lost"] == -1.0
    assert math.isnan(r["retention"])


def test_bits_per_byte_message_and_negative_bytes():
    for n in (0, -3):
        with pytest.raises(ValueError) as e:
            bits_per_byte(1.0, 1, n)
        assert str(e.value) == f"bits_per_byte needs a positive byte count, got {n}"
