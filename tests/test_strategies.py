"""Strategy mechanics on a tiny 2-layer Llama: trainability per registry entry, gradual
unfreezing, penalties, replay mixing, pooling (native HF heads only; prompt tuning's virtual
tokens), LoRA target validation."""
from __future__ import annotations

import pytest
import torch

from finetune_fixtures import make_pretrained, make_tokenizer
from ptf.common.config import ConfigError
from ptf.models import lm as L
from ptf.models import pooling as P
from ptf.models import strategies as S
from ptf.models import trainable as T

LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    tok = make_tokenizer()
    return make_pretrained(tmp_path_factory.mktemp("pre") / "pretrained", tok), tok


def arm(cls=S.Arm, **kw):
    return cls(lrs=[1e-3], weight_decay=0.0, **kw)


ARMS = {
    "full": arm(), "lower_lr": arm(), "linear_probe": arm(), "scratch": arm(),
    "freeze_bottom": arm(S.FreezeBottomArm, layers=1),
    "gradual_unfreeze": arm(S.GradualUnfreezeArm, every=1, factor=2.6),
    "lora": arm(S.LoraArm, r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    "prompt_tuning": arm(S.PromptTuningArm, virtual_tokens=3),
    "replay": arm(S.ReplayArm, weight=1.0, batch_size=2, block_len=8),
    "ewc": arm(S.EwcArm, lam=1.0, fisher_blocks=2, fisher_batch_size=1, block_len=8, normalize=True),
    "l2sp": arm(S.L2spArm, alpha=1.0),
    "dora": arm(S.LoraArm, r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    "adapter": arm(S.AdapterArm, reduction_factor=4, placement="both", activation="relu"),
    "osf": arm(S.OsfArm, effective_rank=0.5, target_modules=None),
}


def batch(tok, texts=("the movie was good", "bad plot")):
    tok.padding_side = "left"
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


EXPECT_FROZEN = {  # (predicate on the HF parameter name) -> frozen
    "linear_probe": lambda n: not n.startswith("score"),
    "freeze_bottom": lambda n: "embed_tokens" in n or ".layers.0." in n,
    "gradual_unfreeze": lambda n: not (n.startswith("score") or n == "model.norm.weight"),
}


def test_every_registry_entry_has_a_test_arm():
    assert set(ARMS) == set(S.STRATEGIES)


@pytest.mark.parametrize("strategy", S.STRATEGIES)
def test_trainable_sets(pre, strategy):
    path, _ = pre
    m = S.build_classifier(path, LABELS, strategy, ARMS[strategy], seed=0)
    names = trainable_names(m)
    if strategy in EXPECT_FROZEN:
        for n, _ in m.named_parameters():
            assert (n not in names) == EXPECT_FROZEN[strategy](n), n
    elif strategy == "lora":
        assert names and all("lora_" in n or ".score." in n for n in names)
        assert any("lora_A" in n for n in names) and any("score" in n for n in names)
    elif strategy == "prompt_tuning":
        assert any("prompt_encoder" in n for n in names) and any("score" in n for n in names)
        assert not any(".layers." in n for n in names)
    elif strategy in ("dora", "osf", "adapter"):     # issue 14: own parameters + the head
        own = {"dora": "lora_", "osf": "osf_svd_params", "adapter": ".bottleneck_adapter."}[strategy]
        assert names and all(own in n or "score." in n for n in names), names
        assert any(own in n for n in names) and any("score" in n for n in names)
        if strategy == "dora":
            assert any("lora_magnitude_vector" in n for n in names)
    else:
        assert len(names) == len(list(m.named_parameters()))
    frac = T.count_trainable(m)["trainable_fraction"]
    assert 0 < frac <= 1


def test_scratch_is_random_init_and_the_others_pretrained(pre):
    path, _ = pre
    # seed 1: the fixture's "pretrained" weights are themselves a seed-0 random init
    emb = {s: S.build_classifier(path, LABELS, s, ARMS[s], seed=1).get_input_embeddings().weight
           for s in ("full", "scratch")}
    from safetensors.torch import load_file
    pretrained = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(emb["full"], pretrained) and not torch.equal(emb["scratch"], pretrained)


def test_gradual_unfreeze_schedule_and_lrs(pre):
    path, _ = pre
    m = S.build_classifier(path, LABELS, "gradual_unfreeze", ARMS["gradual_unfreeze"], seed=0)
    hook = S.REGISTRY["gradual_unfreeze"].step_hook(m, arm(S.GradualUnfreezeArm, every=2, factor=2.6))
    seen = []
    for step in range(8):
        hook(step)
        seen.append(sum(p.requires_grad for p in m.parameters()))
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert all(p.requires_grad for p in m.parameters())          # depth 3 reached at step 6
    lr_for = S.REGISTRY["gradual_unfreeze"].lr_for(m, 1.0, ARMS["gradual_unfreeze"])
    assert lr_for("score.weight") == 1.0
    assert lr_for("model.layers.1.mlp.up_proj.weight") == pytest.approx(1 / 2.6)
    assert lr_for("model.layers.0.mlp.up_proj.weight") == pytest.approx(1 / 2.6 ** 2)
    assert lr_for("model.embed_tokens.weight") == pytest.approx(1 / 2.6 ** 3)


@pytest.mark.parametrize("with_fisher", [False, True])
def test_penalty_zero_at_anchor_and_grows(pre, with_fisher):
    path, _ = pre
    m = S.build_classifier(path, LABELS, "full", ARMS["full"], seed=0)
    bb = m.base_model
    weights = None
    if with_fisher:
        weights = {n: torch.rand_like(p) + 0.1 for n, p in bb.named_parameters()}
    pen = L.Penalty(bb, coef=2.0, weights=weights)
    assert float(pen(bb)) == 0.0
    values = []
    for eps in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            saved = [p.clone() for p in bb.parameters()]
            for p in bb.parameters():
                p.add_(eps)
        values.append(float(pen(bb)))
        with torch.no_grad():
            for p, s in zip(bb.parameters(), saved):
                p.copy_(s)
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] / values[1] == pytest.approx(100, rel=1e-3)     # quadratic


def test_ewc_penalty_leaves_out_what_the_objective_does_not_use(pre):
    """BERT's classifier has a pooler that its masked LM lacks: no Fisher, so no EWC weight
    (it used to be a KeyError)."""
    path, _ = pre
    bb = S.build_classifier(path, LABELS, "full", ARMS["full"], seed=0).base_model
    names = [n for n, _ in bb.named_parameters()]
    weights = {n: torch.ones_like(p) for n, p in bb.named_parameters() if n != names[0]}
    pen = L.Penalty(bb, coef=2.0, weights=weights)
    with torch.no_grad():
        dict(bb.named_parameters())[names[0]].add_(1.0)        # moves only the unweighted one
    assert float(pen(bb)) == 0.0


def test_fisher_is_nonnegative_and_normalized(pre, tmp_path):
    path, tok = pre
    lm = L.pretrained_lm(path)
    ids = [tok("the movie was good and the plot was great")["input_ids"][:8]] * 4

    class Blocks(list):
        def __getitem__(self, idx):
            return {"input_ids": [list.__getitem__(self, i) for i in idx]}

    f = L.estimate_fisher(lm, Blocks(ids), 8, n_blocks=2, batch_size=1, seed=0, normalize=True)
    flat = torch.cat([v.flatten() for v in f.values()])
    assert (flat >= 0).all() and flat.mean() == pytest.approx(1.0, rel=1e-4)
    assert set(f) == {n for n, _ in lm.model.named_parameters()}


def test_replay_mixes_pretraining_loss_into_backbone_grads(pre):
    path, tok = pre
    clf = S.build_classifier(path, LABELS, "replay", ARMS["replay"], seed=0)
    lm = L.pretrained_lm(path, backbone=clf.base_model)
    assert lm.model is clf.model                                   # shared, not copied
    assert not lm.lm_head.weight.requires_grad                     # the pretrained head, frozen
    assert lm.lm_head.weight.data_ptr() != clf.model.embed_tokens.weight.data_ptr()
    ids, mask = batch(tok)
    labels = torch.tensor([1, 0])
    replay = torch.tensor([tok("the film was dull and boring so")["input_ids"][:6]] * 2)
    grads = {}
    for w in (0.0, 1.0):
        tm = S.TaskModel(clf, S.Regulariser(lm=lm, weight=w))
        clf.zero_grad()
        loss, logs = tm(ids, mask, labels, replay_ids=replay)
        assert logs["replay_lm_loss"] > 0 and logs["replay_blocks"] == 2
        if w:
            assert float(loss) == pytest.approx(float(logs["task_loss"] + logs["replay_lm_loss"]))
        loss.backward()
        grads[w] = clf.model.layers[0].mlp.up_proj.weight.grad.clone()
    assert not torch.equal(grads[0.0], grads[1.0])


# ---------------------------------------------------------------- pooling

@pytest.mark.parametrize("model_type", ["llama", "bert", "gpt2"])
def test_mean_pooling_is_refused_where_the_hf_head_cannot_do_it(model_type):
    with pytest.raises(ConfigError) as e:
        P.check_pooling("mean", model_type)
    msg = str(e.value)
    assert msg.startswith("finetune.pooling: 'mean' cannot be saved faithfully for model type "
                          f"'{model_type}'") and "use 'last'" in msg
    assert P.check_pooling("last", model_type) is P.POOLINGS["last"]


def test_mean_pooling_is_set_in_the_config_of_heads_that_implement_it():
    from transformers import ModernBertConfig
    cfg = ModernBertConfig()
    P.apply_pooling(cfg, "mean")
    assert cfg.classifier_pooling == "mean"


def test_build_refuses_mean_on_llama(pre):
    path, _ = pre
    with pytest.raises(ConfigError, match="finetune.pooling: 'mean'.*'llama'"):
        S.build_classifier(path, LABELS, "full", ARMS["full"], seed=0, pooling="mean")


def test_prompt_tuning_pooled_token_sees_the_virtual_tokens(pre):
    """Issue 17 item 2 for `last` pooling: the logits are the head on the LAST position of
    [soft prompt; text], whose causal attention covers the virtual tokens; without them (or
    with the prompt changed) the logits change."""
    path, tok = pre
    m = S.build_classifier(path, LABELS, "prompt_tuning", ARMS["prompt_tuning"], seed=0).eval()
    ids = torch.tensor([tok("the movie was good")["input_ids"]])
    base = m.get_base_model()
    with torch.no_grad():
        got = P.pooled_logits(m, ids, torch.ones_like(ids))
        prompt = m.get_prompt(batch_size=1)
        text = base.get_input_embeddings()(ids)
        h = base.model(inputs_embeds=torch.cat([prompt, text], 1)).last_hidden_state
        want = base.score(h[:, -1])
        no_prompt = base.score(base.model(inputs_embeds=text).last_hidden_state[:, -1])
        m.prompt_encoder["default"].embedding.weight.add_(1.0)
        moved = P.pooled_logits(m, ids, torch.ones_like(ids))
    assert prompt.shape[1] == 3
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, no_prompt, atol=1e-4)
    assert not torch.allclose(got, moved, atol=1e-4)


def test_bad_lora_target_and_layers(pre):
    path, _ = pre
    bad = arm(S.LoraArm, r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "c_attn"])
    with pytest.raises(ConfigError, match="c_attn"):
        S.build_classifier(path, LABELS, "lora", bad, seed=0)
    with pytest.raises(ConfigError, match="layers"):
        S.build_classifier(path, LABELS, "freeze_bottom", arm(S.FreezeBottomArm, layers=5), seed=0)
    with pytest.raises(Exception, match="lr"):
        S.Arm(lrs=[0.0], weight_decay=0.0)
