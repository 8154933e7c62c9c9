"""DoRA and OSF through peft (ptf.models.peft_variants) on a tiny 2-layer Llama: each builds,
trains a step, saves, and reloads with peft's AutoPeftModelForSequenceClassification to identical
predictions; the merged model matches to float precision; bad targets / ranks / models name the
arm key before training."""
from __future__ import annotations

import pytest
import torch

from ptf.common.cli import StageError
from ptf.common.config import ConfigError
from ptf.models import peft_variants as P
from tiny_models import LABELS, classifier, encode, llama, tok  # noqa: F401 - fixtures

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(kind, path):
    model = classifier(path)
    if kind == "dora":
        cfg = P.dora_config(model, r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
        return P.wrap(model, cfg, P.DORA_ARM)
    cfg = P.osf_config(model, effective_rank=0.5)
    return P.wrap(model, cfg, P.OSF_ARM)


@pytest.mark.parametrize("kind", ["dora", "osf"])
def test_train_save_reload_with_peft_auto_class(llama, tok, tmp_path, kind):
    from peft import AutoPeftModelForSequenceClassification

    model = build(kind, llama)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    marker = "lora_magnitude_vector" if kind == "dora" else "osf_svd_params"
    assert any(marker in n for n in trainable)
    assert any("score" in n for n in trainable)                  # the head trains (SEQ_CLS)
    assert not any("embed_tokens" in n or "norm" in n for n in trainable)
    if kind == "osf":
        assert set(model.peft_config["default"].target_modules) == set(TARGETS)
    enc = encode(tok)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**enc, labels=LABELS).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(**enc).logits
    model.save_pretrained(tmp_path / kind)
    back = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / kind).eval()
    with torch.no_grad():
        assert torch.equal(back(**enc).logits, want)                # bit for bit
        merged = back.merge_and_unload()
        got = merged(**enc).logits
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    assert torch.allclose(got, want, atol=1e-5)                     # one rounding of W + delta
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_osf_init_is_identity_to_float_precision(llama, tok):
    """OSF adds (U S V - U0 S0 V0) x computed as one rank-2r product: zero up to rounding."""
    base = classifier(llama).eval()
    enc = encode(tok)
    with torch.no_grad():
        before = base(**enc).logits
        after = build("osf", llama).eval()(**enc).logits
    assert torch.allclose(after, before, atol=1e-6)


def _leak(peft_model) -> float:
    """|U_high^T (U_low - U_low_init)| / |U_low - U_low_init| of the first q_proj: how much of
    the update went into the frozen subspace (U_high from a fresh SVD of the base weight)."""
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    du = layer.osf_svd_params["default"]["U_low"] - layer._osf_U_low_init["default"]
    u, _, _ = torch.linalg.svd(layer.get_base_layer().weight, full_matrices=False)
    return float((u[:, :layer.effective_rank["default"]].T @ du).norm() / du.norm())


@pytest.mark.parametrize("project", [False, True])
def test_osf_projection_keeps_adamw_updates_out_of_the_frozen_subspace(llama, tok, project):
    model = build("osf", llama)
    enc = encode(tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if project:
        opt.register_step_post_hook(P.osf_projection_hook(model))
    first = None
    for _ in range(5):
        loss = model(**enc, labels=LABELS).loss
        first = float(loss) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    if project:
        assert _leak(model) < 1e-5
        assert float(model(**enc, labels=LABELS).loss) < first        # it still learns
    else:
        assert _leak(model) > 0.1                                     # peft alone, with AdamW


@pytest.mark.parametrize("targets,match", [
    (["q_proj", "c_attn"], r"finetune\.arms\.dora\.target_modules: 'c_attn' not found"),
    (["input_layernorm"], r"finetune\.arms\.dora\.target_modules: 'input_layernorm' selects \['LlamaRMSNorm'\]"),
])
def test_dora_bad_targets_name_the_key(llama, targets, match):
    with pytest.raises(ConfigError, match=match):
        P.dora_config(classifier(llama), r=2, alpha=4.0, dropout=0.0, target_modules=targets)


@pytest.mark.parametrize("rank,targets,match", [
    (1.0, None, r"finetune\.arms\.osf\.effective_rank: got 1\.0"),
    (0.01, None, r"finetune\.arms\.osf\.effective_rank: 0\.01 keeps 0 of 32"),
    (0.5, ["wq"], r"finetune\.arms\.osf\.target_modules: 'wq' not found"),
    (0.5, ["post_attention_layernorm"], r"finetune\.arms\.osf\.target_modules: .*only torch\.nn\.Linear"),
])
def test_osf_bad_values_name_the_key(llama, rank, targets, match):
    with pytest.raises(ConfigError, match=match):
        P.osf_config(classifier(llama), effective_rank=rank, target_modules=targets)


def test_osf_refuses_a_model_peft_cannot_wrap(tok):
    """GPT-2's projections are transformers Conv1D: peft's OSF would wrap none of them and
    train only the head, without a word. Refused before training, naming the arm."""
    from peft import OSFConfig, TaskType, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, pad_token_id=0,
                     bos_token_id=0, eos_token_id=0)
    silent = get_peft_model(GPT2ForSequenceClassification(cfg), OSFConfig(task_type=TaskType.SEQ_CLS))
    assert not any("osf_svd_params" in n for n, _ in silent.named_parameters())   # peft's behaviour
    with pytest.raises(ConfigError, match=r"finetune\.arms\.osf \(peft's default targets for gpt2\)"
                                          r".*Conv1D.*cannot wrap this gpt2 model"):
        P.osf_config(GPT2ForSequenceClassification(cfg), effective_rank=0.5)
    with pytest.raises(StageError, match=r"finetune\.arms\.osf: peft \(OSF\) left .*unwrapped"):
        P.wrap(GPT2ForSequenceClassification(cfg),                    # a config built by hand
               OSFConfig(task_type=TaskType.SEQ_CLS, target_modules=["c_attn"]), P.OSF_ARM)


def test_osf_arm_params():
    assert P.OsfParams(effective_rank=0.5, target_modules=None).target_modules is None
    with pytest.raises(Exception, match="effective_rank"):
        P.OsfParams(effective_rank=1.0, target_modules=None)
    with pytest.raises(Exception, match="target_modules"):
        P.OsfParams(effective_rank=0.5)
