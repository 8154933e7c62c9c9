"""Bottleneck adapters (ptf.models.adapters / adapter_modeling) on a tiny 2-layer Llama and BERT:
exact identity at insertion, only adapter + head parameters train, original weights bitwise
unchanged by training, save/load of just the adapters (classifier and LM), the HF export loaded by
a plain client in a fresh process, and bad arm values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ptf.common.config import ConfigError
from ptf.models import adapters as A
from ptf.models.adapter_modeling import is_adapter_param
from ptf.models.lm import lm_loss, pretrained_lm
from tiny_models import LABELS, TEXTS, bert, classifier, encode, llama, tok  # noqa: F401 - fixtures


def train(model, enc, steps=3, lr=5e-2):
    """A few AdamW steps (weight decay on: it must not touch frozen weights either)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(steps):
        loss = model(**enc, labels=LABELS).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("placement", ["both", "attention", "ffn"])
def test_identity_at_insertion_and_trainable_set(request, tok, arch, placement):
    """Exactly equal logits (torch.equal, not allclose): `up` is zero, so each adapter adds an
    exact 0.0 to the sublayer output, and x + 0.0 == x for every finite float."""
    model = classifier(request.getfixturevalue(arch)).eval()
    enc = encode(tok, left=arch == "llama")
    with torch.no_grad():
        before = model(**enc).logits
    names = A.add_adapters(model, reduction_factor=4, placement=placement)
    assert len(names) == {"both": 4, "attention": 2, "ffn": 2}[placement]
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n, _ in model.named_parameters() if is_adapter_param(n)}
    head = ({"score.weight"} if arch == "llama" else
            {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
             "bert.pooler.dense.bias"})
    assert trainable == adapters | head
    assert len(adapters) == 4 * len(names)
    assert model.config.bottleneck_adapters == {"reduction_factor": 4, "placement": placement,
                                                "activation": "relu"}


def test_training_moves_only_adapters_and_head(llama, tok):
    model = classifier(llama)
    A.add_adapters(model, reduction_factor=2)
    original = {n: p.detach().clone() for n, p in model.named_parameters()
                if not is_adapter_param(n) and not A.is_head(model, n)}
    enc = encode(tok)
    with torch.no_grad():
        start = model(**enc).logits
    train(model, enc)
    for n, p in model.named_parameters():
        if n in original:
            assert torch.equal(p, original[n]), n          # bitwise
    assert not torch.equal(model.model.layers[0].mlp.down_proj.bottleneck_adapter.up.weight,
                           torch.zeros_like(model.model.layers[0].mlp.down_proj.bottleneck_adapter.up.weight))
    with torch.no_grad():
        assert not torch.equal(model(**enc).logits, start)


@pytest.fixture(scope="module")
def trained(llama, tok, tmp_path_factory):
    """A trained adapter classifier (mean pooling recorded as the pipeline records it), saved."""
    model = classifier(llama)
    A.add_adapters(model, reduction_factor=4, activation="gelu")
    train(model, encode(tok))
    model.config.classifier_pooling = "mean"
    dest = tmp_path_factory.mktemp("adapter-model") / "seed0"
    A.export_hf(model, dest)
    tok.save_pretrained(dest)
    return model, dest


def test_saved_adapter_reloads_to_same_predictions(llama, tok, trained):
    model, dest = trained
    meta = json.loads((dest / A.ADAPTER_CONFIG).read_text())
    assert meta["head"] == ["score.weight"] and meta["adapters"] == 16
    fresh = A.load_adapters(classifier(llama, seed=123), dest).eval()
    enc = encode(tok)
    with torch.no_grad():
        assert torch.equal(fresh(**enc).logits, model(**enc).logits)
    # the forgetting stage's view: the adapted backbone under the pretrained LM head
    lm = A.load_adapters(pretrained_lm(llama), dest, head=False).eval()
    ref = pretrained_lm(llama, backbone=model.model).eval()
    ids = encode(tok)["input_ids"]
    with torch.no_grad():
        assert float(lm_loss(lm, ids)) == float(lm_loss(ref, ids))
        assert float(lm_loss(lm, ids)) != float(lm_loss(pretrained_lm(llama).eval(), ids))


def test_load_refuses_mismatch_and_corruption(llama, bert, trained, tmp_path):
    from ptf.common.cli import StageError

    _, dest = trained
    with pytest.raises(StageError, match="not for this bert"):
        A.load_adapters(classifier(bert), dest)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / A.ADAPTER_CONFIG).write_bytes((dest / A.ADAPTER_CONFIG).read_bytes())
    (bad / A.ADAPTER_FILE).write_bytes((dest / A.ADAPTER_FILE).read_bytes()[:100])
    with pytest.raises(StageError, match="unreadable.*dvc checkout"):
        A.load_adapters(classifier(llama), bad)


CLIENT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    d, texts = sys.argv[1], json.loads(sys.argv[2])
    try:
        AutoModelForSequenceClassification.from_pretrained(d)
        refused = ""
    except ValueError as e:
        refused = str(e)
    m = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    with torch.no_grad():
        logits = m(**tok(texts, padding=True, return_tensors="pt")).logits
    labels = [r["label"] for r in pipeline("text-classification", model=d, trust_remote_code=True)(texts)]
    torch.save({"refused": refused, "logits": logits, "cls": type(m).__module__, "labels": labels},
               sys.argv[3])
""")


def test_export_loads_in_a_plain_client_and_predicts_exactly(trained, tok, tmp_path):
    """A fresh process without ptf: the bare Auto class refuses the directory unless
    trust_remote_code=True; with it, logits equal the pipeline's bit for bit (mean pooling
    included) and pipeline("text-classification") gives the same labels."""
    model, dest = trained
    enc = encode(tok)
    with torch.no_grad():                                  # the pipeline's mean pooling
        captured = {}
        h = model.score.register_forward_hook(lambda m, i, o: captured.__setitem__("o", o))
        model(**enc)
        h.remove()
        mask = enc["attention_mask"].to(captured["o"].dtype)
        want = (captured["o"] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    out = tmp_path / "client.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", CLIENT, str(dest), json.dumps(TEXTS), str(out)],
                       cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    assert "trust_remote_code=True" in got["refused"]
    assert got["cls"].startswith("transformers_modules.")     # the shipped file, not ptf
    assert torch.equal(got["logits"], want)
    names = model.config.id2label
    assert got["labels"] == [names[i] for i in want.argmax(-1).tolist()]


def test_bert_export_roundtrip_in_process(bert, tok, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = classifier(bert, n_labels=3)
    A.add_adapters(model, reduction_factor=8, placement="ffn")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter_param(n):
                p.normal_(0, 0.1)
    model.eval()
    A.export_hf(model, tmp_path / "bert")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    enc = encode(tok, left=False)
    with torch.no_grad():
        assert torch.equal(back(**enc).logits, model(**enc).logits)


def test_gpt2_conv1d_projections_take_adapters_and_export(tok, tmp_path):
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, pad_token_id=tok.pad_token_id)).eval()
    enc = encode(tok)
    with torch.no_grad():
        before = model(**enc).logits
    assert len(A.add_adapters(model, reduction_factor=8)) == 4
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)
    train(model, enc, steps=1)
    model.config.classifier_pooling = "mean"
    A.export_hf(model, tmp_path / "gpt2")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "gpt2").eval()
    with torch.no_grad():
        tok_logits = model.score(model.transformer(**enc).last_hidden_state)
        mask = enc["attention_mask"][..., None].float()
        want = (tok_logits * mask).sum(1) / mask.sum(1).clamp(min=1)
        assert torch.allclose(back(**enc).logits, want, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"reduction_factor": 64}, r"finetune\.arms\.adapter\.reduction_factor: got 64, which leaves 0"),
    ({"reduction_factor": 0}, r"finetune\.arms\.adapter\.reduction_factor: got 0"),
    ({"reduction_factor": 4, "placement": "middle"}, r"finetune\.arms\.adapter\.placement: got 'middle'"),
    ({"reduction_factor": 4, "activation": "swishy"}, r"finetune\.arms\.adapter\.activation: got 'swishy'"),
])
def test_bad_arm_values_name_the_key(llama, kwargs, match):
    model = classifier(llama)
    with pytest.raises(ConfigError, match=match):
        A.add_adapters(model, **kwargs)
    assert not any(is_adapter_param(n) for n, _ in model.named_parameters())


def test_arm_params_model():
    assert A.AdapterParams(reduction_factor=16, placement="ffn", activation="relu").placement == "ffn"
    with pytest.raises(Exception, match="placement"):
        A.AdapterParams(reduction_factor=16, placement="middle", activation="relu")
    with pytest.raises(Exception, match="activation"):
        A.AdapterParams(reduction_factor=16, placement="both")
