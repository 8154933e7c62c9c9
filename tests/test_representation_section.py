"""ptf/report/representation_section.py: every number of the section comes from
representation.json; the LM columns say why they do not apply for a bare encoder."""
from __future__ import annotations

import copy

from ptf.report import representation_section as rs
from ptf.report.representation_section import section_representation


def ms(mean, std=0.0, n=2):
    return {"mean": mean, "std": std, "n": n}


REP = {
    "held_out": {"split": "validation", "blocks": 64, "block_len": 128, "pooling": "tokens",
                 "examples": 8192, "hidden_states": 3},
    "probe": {"tasks": ["movies", "nyt"], "layer": -1, "train_split": "train", "score_split": "validation",
              "n_train": {"movies": 500, "nyt": 400}, "n_validation": {"movies": 300, "nyt": 250},
              "before": {"movies": 0.8123, "nyt": 0.7},
              },
    "lm": {"applicable": True, "blocks": 128, "text_tokens": 15000, "text_bytes": 60000,
           "tokens_per_byte": 0.25, "loss_pretrained": 5.3, "bpb_pretrained": 1.9116},
    "tasks": {
        "movies": {
            "full": {"applicable": True, "seeds": {"seed0": {}, "seed1": {}},
                     "mean_std": {"cka_last": ms(0.61, 0.02), "cka_min": ms(0.55, 0.01),
                                  "probe_lost_mean": ms(0.051, 0.01), "probe_after_mean": ms(0.65),
                                  "lm.delta_loss": ms(0.2441, 0.01), "lm.delta_bpb": ms(0.088, 0.004),
                                  "cka.layer0": ms(0.99), "cka.layer1": ms(0.8), "cka.layer2": ms(0.61)}},
            "linear_probe": {"applicable": True, "seeds": {"seed0": {}, "seed1": {}},
                             "mean_std": {"cka_last": ms(1.0), "cka_min": ms(1.0), "probe_lost_mean": ms(0.0),
                                          "probe_after_mean": ms(0.7), "lm.delta_loss": ms(0.0),
                                          "lm.delta_bpb": ms(0.0), "cka.layer0": ms(1.0),
                                          "cka.layer1": ms(1.0), "cka.layer2": ms(1.0)}},
            "scratch": {"applicable": False, "seeds": {"seed0": {}, "seed1": {}}, "mean_std": {}},
        },
    },
}


def test_section_from_numbers():
    text = "\n".join(section_representation(REP))
    assert "on 64 held-out validation blocks of 128 tokens, over 8192 tokens" in text
    assert "3 hidden states" in text
    assert "`movies` 0.812 (500 train, 400 validation)" not in text      # nyt's sizes are its own
    assert "`movies` 0.812 (500 train, 300 validation); `nyt` 0.700 (400 train, 250 validation)" in text
    assert "| movies | full | 2 | 0.610 ± 0.020 | 0.550 ± 0.010 | +0.051 ± 0.010 | 0.650 ± 0.000 | +0.2441 ± 0.0100 | +0.0880 ± 0.0040 |" in text
    assert "| movies | scratch | 2 | n/a (random init) |" in text
    assert "| movies/full | 0.990 ± 0.000 | 0.800 ± 0.000 | 0.610 ± 0.000 |" in text
    assert "moved most under `movies/full` (CKA 0.610) and least under `movies/linear_probe` (CKA 1.000)" in text
    assert ("Probe accuracy on the other tasks fell most under `movies/full` (by 0.051), and did not change "
            "under `movies/linear_probe`.") in text
    assert "5.3000 nats/token = 1.9116 bits/byte" in text and "0.2500 tokens per byte" in text
    assert "Not applicable (random init: no pretrained backbone to drift from): `movies/scratch`." in text


def test_bare_encoder_says_why():
    rep = copy.deepcopy(REP)
    rep["lm"] = {"applicable": False, "note": "not applicable: the pretrained model (BertModel) has no LM head"}
    text = "\n".join(section_representation(rep))
    assert "LM loss drift: not applicable: the pretrained model (BertModel) has no LM head." in text
    assert "| n/a (no LM head) | n/a (no LM head) |" in text and "bits/byte beside" not in text


def test_one_arm_no_comparison_sentence():
    rep = copy.deepcopy(REP)
    del rep["tasks"]["movies"]["linear_probe"]
    text = "\n".join(section_representation(rep))
    assert "moved most" not in text and "Probe accuracy on the other tasks: `movies/full` lost +0.051." in text


def test_the_probe_sentence_takes_its_verb_from_the_sign():
    """A negative "accuracy lost" is a gain: the sentence says "rose", never "fell least"
    (the foundation run's probes rose under every fine-tuned arm)."""
    assert rs.probe_change(("a/probe", 0.0), ("b/full", -0.048)) == \
        "fell under no arm, and rose most under `b/full` (by 0.048)"
    assert rs.probe_change(("a/full", 0.051), ("b/lora", 0.012)) == \
        "fell most under `a/full` (by 0.051), and fell least under `b/lora` (by 0.012)"
    assert rs.probe_change(("a/full", 0.03), ("b/full", -0.01)) == \
        "fell most under `a/full` (by 0.030), and rose most under `b/full` (by 0.010)"
