"""Training K configurations together (ptf/training/batched.py) gives what K one-at-a-time runs
give: the packed forward equals each HF model's own logits and gradients (plain, and with peft
LoRA layers), and `fit_together` equals `ptf.training.finetuning.fit` for every strategy that
trains together (AdamW, warmup-cosine, clipping, best-validation restore, early stopping, each
run's regulariser) up to float rounding, on the tiny fixture model."""
from __future__ import annotations

import copy

import pytest
import torch

from finetune_fixtures import make_root, params, runs_of
from ptf.common.config import parse_section
from ptf.data.tasks import collate
from ptf.training.batched import Run, fit_together, regulariser, together_reason
from ptf.training.packed import Packed, PackedLlama, check_batchable

LABELS = ["negative", "positive"]


def section(**train) -> dict:
    """The fixtures' `finetune` section with this file's budget: 12 steps, an eval every 4, and
    weight decay on (so both AdamW param groups are exercised)."""
    p = params(**{"runs": runs_of("movies", ["full"]), "data.max_train": 48, "data.max_eval": 24})
    p["train"].update({"eval_batch_size": 10, "max_steps": 12, "warmup_steps": 3, "eval_every": 4,
                       **train})
    for arm in p["arms"].values():
        arm["weight_decay"] = 0.01
    return p


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("batched"))


def context(root, **train):
    from ptf.training.finetune_config import FinetuneKeys
    from ptf.training.finetuning import Context
    return Context.create(root, parse_section("finetune", section(**train), FinetuneKeys))


def models(root, strategy: str, seeds: list[int]):
    from ptf.models.strategies import build_classifier
    cfg = context(root).cfg
    return [build_classifier(root / "data/models/pretrained", LABELS, strategy,
                             getattr(cfg.arms, strategy), seed=s, pooling="last") for s in seeds]


def test_packed_logits_equal_the_models_own(root):
    """Left- and right-padded batches, texts alone, an all-pad text, a perturbed backbone."""
    (m,) = models(root, "full", [1])
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pad = m.config.pad_token_id
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(5, 200, (int(torch.randint(1, 12, (1,), generator=g)),),
                           generator=g).tolist(), 0) for _ in range(6)]
    net = PackedLlama(m)
    for pad_left in (True, False):
        b = collate(rows + [([pad], 1)], pad, pad_left)    # the last text is empty: one pad id
        got = net.logits(Packed.of(b, pad))
        for i, (x, _) in enumerate(rows):                  # each text alone, unpadded
            want = m(input_ids=torch.tensor([x])).logits[0]
            torch.testing.assert_close(got[i], want, atol=2e-5, rtol=1e-4)
        if pad_left:                                       # the left-padded batch as HF runs it
            want = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            torch.testing.assert_close(got[:-1], want[:-1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got[-1], m(input_ids=torch.tensor([[pad]])).logits[0],
                                   atol=2e-5, rtol=1e-4)
    # gradients reach the model's parameters as through the model itself
    b = collate(rows, pad, True)
    net.logits(Packed.of(b, pad)).sum().backward()
    mine = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def _reference(root, ctx, strategy, configs, arm=None):
    """Each configuration trained alone through the pipeline's own `fit`."""
    from ptf.training.finetuning import fit
    from ptf.data.tasks import load_task
    data = load_task(root, "movies", ctx.tokenizer, ctx.cfg.data)
    arm = arm or getattr(ctx.cfg.arms, strategy)
    out = []
    for lr, seed in configs:
        (clf,) = models(root, strategy, [seed])
        r = fit(ctx, clf, strategy, arm, lr, seed, data, data.train, ctx.cfg.train.max_steps,
                desc="alone")
        out.append((r, clf))
    return data, out


@pytest.mark.parametrize("strategy, train", [
    ("full", {}),
    ("full", {"patience": 1, "eval_every": 2, "max_steps": 14}),   # early stops, per run
    ("linear_probe", {"grad_accum": 2, "max_steps": 6}),   # shared frozen features
    ("freeze_bottom", {"max_steps": 6}),
    ("scratch", {"max_steps": 6}),
    ("l2sp", {"max_steps": 6}),                             # + its penalty
    ("ewc", {"max_steps": 6}),                              # + the Fisher-weighted penalty
    ("replay", {"max_steps": 6, "grad_accum": 2}),          # + LM loss of its own replay batches
    ("lora", {"max_steps": 6}),                             # peft LoRA layers in the packed forward
])
def test_fit_together_equals_one_at_a_time(root, strategy, train):
    from ptf.training.trainer import reset_accelerate
    reset_accelerate()
    ctx = context(root, **train)
    configs = [(1e-3, 0), (3e-4, 0), (1e-3, 1), (3e-3, 2)]
    arm = getattr(ctx.cfg.arms, strategy)
    if strategy in ("l2sp", "ewc"):      # strong enough that the penalty moves the weights
        arm = arm.model_copy(update={"alpha" if strategy == "l2sp" else "lam": 50.0})
        ref_arm = arm
    else:
        ref_arm = None
    data, ref = _reference(root, ctx, strategy, configs, arm=ref_arm)
    ms = models(root, strategy, [s for _, s in configs])
    tc = ctx.cfg.train
    got = fit_together([Run(m, lr, s, data.train, regulariser(ctx, m, strategy, arm, s))
                        for m, (lr, s) in zip(ms, configs)], tc,
                       tc.max_steps,
                       lambda split, seed: ctx.loader(split, tc.batch_size, True, seed),
                       data.validation, data.test, data.n_classes,
                       getattr(ctx.cfg.arms, strategy).weight_decay)
    for (want, clf), r, m in zip(ref, got, ms):
        for key in ("best_step", "steps", "stopped_early", "lr", "seed", "val_accuracy",
                    "val_macro_f1", "test_accuracy", "test_macro_f1"):
            assert r[key] == pytest.approx(want[key]), key
        if "test_predictions" in want:
            assert r["test_predictions"] == want["test_predictions"]
        for (name, a), b in zip(clf.state_dict().items(), m.state_dict().values()):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
    assert all(r["frozen_features"] == (strategy == "linear_probe") for r in got)
    assert [r["replay_blocks"] for r in got] == [w["replay_blocks"] for w, _ in ref]
    if strategy == "replay":
        assert got[0]["replay_blocks"] == tc.max_steps * tc.grad_accum * arm.batch_size
    if train.get("patience") is not None:
        assert len({r["steps"] for r in got}) > 1 or any(r["stopped_early"] for r in got)


def test_which_strategies_train_together():
    assert [s for s in ("full", "linear_probe", "freeze_bottom", "l2sp", "ewc", "replay", "scratch",
                        "lora") if together_reason(s)] == []
    assert "other than LoRA" in together_reason("dora")
    assert "other than LoRA" in together_reason("prompt_tuning")
    assert "step hook" in together_reason("gradual_unfreeze")
    assert "step hook" in together_reason("osf")


def test_packed_lora_logits_and_gradients_equal_peft(root):
    """LoRA on q/v (and, here, the MLP's down projection) with non-zero B: the packed forward
    computes what the peft model computes, and its gradients reach the same LoRA weights."""
    from ptf.models.strategies import build_classifier
    arm = context(root).cfg.arms.lora.model_copy(update={"target_modules": ["q_proj", "v_proj", "down_proj"]})
    m = build_classifier(root / "data/models/pretrained", LABELS, "lora", arm, seed=3, pooling="last")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    pad = m.config.pad_token_id
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(5, 200, (int(torch.randint(1, 12, (1,), generator=g)),),
                           generator=g).tolist(), i % 2) for i in range(5)]
    b = collate(rows, pad, True)
    net = PackedLlama(m)
    got = net.logits(Packed.of(b, pad))
    want = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    got.sum().backward()
    mine = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in mine) and any("lora_B" in n for n in mine)
    m.zero_grad()
    want.detach_()
    m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mine[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_what_cannot_be_batched(root):
    (m,) = models(root, "full", [0])
    assert check_batchable([m, copy.deepcopy(m)]) is None
    (lora,) = models(root, "lora", [0])
    assert check_batchable([lora, m]) is None          # LoRA layers run in the packed forward
    from ptf.models.strategies import build_classifier
    arms = context(root).cfg.arms
    pretrained = root / "data/models/pretrained"
    dropout = build_classifier(pretrained, LABELS, "lora", arms.lora.model_copy(update={"dropout": 0.1}),
                               seed=0, pooling="last")
    assert "dropout" in check_batchable([dropout])
    dora = build_classifier(pretrained, LABELS, "dora", arms.dora, seed=0, pooling="last")
    assert "DoRA" in check_batchable([dora])
    prompt = build_classifier(pretrained, LABELS, "prompt_tuning", arms.prompt_tuning, seed=0, pooling="last")
    assert "PROMPT_TUNING" in check_batchable([prompt])
    other = copy.deepcopy(m)
    other.config.attention_dropout = 0.1
    assert "differ" in check_batchable([m, other])
    assert "attention_dropout" in check_batchable([other])
    with pytest.raises(ValueError, match="cannot run this model packed"):
        PackedLlama(other)
