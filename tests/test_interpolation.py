"""WiSE-FT (ptf.models.interpolation) on a tiny 2-layer Llama and BERT: at alpha 0 the backbone's
held-out LM loss under the pretrained LM head is the pretrained model's and at alpha 1 the
fine-tuned model's, exactly; the head stays fine-tuned; bad coefficients name the arm key."""
from __future__ import annotations

import pytest
import torch

from ptf.common.cli import StageError
from ptf.common.config import ConfigError
from ptf.models import interpolation as W
from ptf.models.lm import lm_loss, pretrained_lm
from tiny_models import LABELS, classifier, encode, llama, make_bert, tok  # noqa: F401 - fixtures

HELD_OUT = ["the team was so dull and the plot was awful", "a superb film and a great star"]


def finetune(path, tok, steps=3):
    """Full fine-tuning, a few large steps so that every backbone tensor moves."""
    clf = classifier(path)
    enc = encode(tok)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-2)
    for _ in range(steps):
        clf(**enc, labels=LABELS).loss.backward()
        opt.step()
        opt.zero_grad()
    return clf.eval()


def held_out_ids(tok):
    return torch.tensor([tok(t)["input_ids"][:8] for t in HELD_OUT])


def lm_loss_of(pretrained, clf, ids) -> float:
    """What the forgetting stage measures: the classifier's backbone under the pretrained LM head
    (the backbone's state loaded, strictly, into a fresh pretrained LM)."""
    lm = pretrained_lm(pretrained)
    W.backbone(lm).load_state_dict(W.backbone(clf).state_dict(), strict=True)
    with torch.no_grad():
        return float(lm_loss(lm.eval(), ids))


def test_alpha_0_and_1_reproduce_pretrained_and_finetuned_lm_loss_exactly(llama, tok):
    ft = finetune(llama, tok)
    pre_state = W.pretrained_backbone_state(llama)
    ids = held_out_ids(tok)
    with torch.no_grad():
        pretrained_loss = float(lm_loss(pretrained_lm(llama).eval(), ids))
    finetuned_loss = lm_loss_of(llama, ft, ids)
    assert pretrained_loss != finetuned_loss
    models = dict(W.wise_ft_models(pre_state, ft, [0, 0.5, 1]))
    assert lm_loss_of(llama, models[0.0], ids) == pretrained_loss
    assert lm_loss_of(llama, models[1.0], ids) == finetuned_loss
    assert lm_loss_of(llama, models[0.5], ids) not in (pretrained_loss, finetuned_loss)
    for k, t in W.backbone(models[0.0]).state_dict().items():
        assert torch.equal(t, pre_state[k]), k
    for m in models.values():                              # the head is the fine-tuned one
        assert torch.equal(m.score.weight, ft.score.weight)
    mid = W.backbone(models[0.5]).state_dict()
    ft_state = W.backbone(ft).state_dict()
    k = "layers.0.mlp.up_proj.weight"
    assert torch.allclose(mid[k], 0.5 * pre_state[k] + 0.5 * ft_state[k], atol=1e-6)
    assert torch.equal(W.backbone(ft).state_dict()[k], ft_state[k])      # input untouched


def test_bert_pooler_stays_finetuned(tmp_path, tok):
    """An MLM checkpoint has no pooler: the classifier's fresh pooler is kept like the head."""
    pre = make_bert(tmp_path / "bert", tok, layers=1)
    ft = finetune(pre, tok, steps=1)
    pre_state = W.pretrained_backbone_state(pre)
    assert not any(k.startswith("pooler.") for k in pre_state)
    mixed = W.interpolate(pre_state, ft, 0.0)
    assert torch.equal(mixed.bert.pooler.dense.weight, ft.bert.pooler.dense.weight)
    assert torch.equal(mixed.bert.encoder.layer[0].output.dense.weight,
                       pre_state["encoder.layer.0.output.dense.weight"])


@pytest.mark.parametrize("alphas,match", [
    ([], r"wise_ft\.alphas: got \[\]"),
    ([0.5, 1.5], r"wise_ft\.alphas: got 1\.5"),
    ([-0.1], r"wise_ft\.alphas: got -0\.1"),
    ([float("nan")], r"wise_ft\.alphas: got nan"),
    (["0.5"], r"wise_ft\.alphas: got '0\.5'"),
    ([0.5, 0.5], r"wise_ft\.alphas: .*repeats"),
    (0.5, r"wise_ft\.alphas: got 0\.5"),
])
def test_bad_alphas_name_the_key(alphas, match):
    with pytest.raises(ConfigError, match=match):
        W.check_alphas(alphas)


def test_mismatched_backbone_and_peft_model_refused(llama, tok):
    from peft import LoraConfig, TaskType, get_peft_model

    ft = finetune(llama, tok, steps=1)
    pre_state = W.pretrained_backbone_state(llama)
    bad = dict(pre_state)
    bad["layers.0.mlp.up_proj.weight"] = bad["layers.0.mlp.up_proj.weight"][:, :-1]
    with pytest.raises(StageError, match="does not match the pretrained"):
        W.interpolate(bad, ft, 0.5)
    lora = get_peft_model(ft, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"wise_ft: needs a full-weight"):
        W.interpolate(pre_state, lora, 0.5)
