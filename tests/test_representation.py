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
