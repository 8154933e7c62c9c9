"""The strategy registry and the EWC / L2-SP parts of ptf/models/lm.py: what tests/test_strategies.py
leaves open, found by mutation testing (`make mutate GROUPS=strategies`). Values are worked out
by hand on modules of one or two parameters; the rest checks the registry's entries, factories
and messages directly, without training (the whole file runs in a few seconds)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from finetune_fixtures import make_pretrained, make_tokenizer
from ptf.common.config import ConfigError, StrictModel
from ptf.models import lm as L
from ptf.models import pooling as P
from ptf.models import strategies as S

LABELS = ["neg", "pos"]
KNOWN = ("full, lower_lr, linear_probe, freeze_bottom, gradual_unfreeze, lora, prompt_tuning, "
         "replay, ewc, l2sp, scratch, dora, adapter, osf")


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    tok = make_tokenizer()
    return make_pretrained(tmp_path_factory.mktemp("pre") / "pretrained", tok), tok


def _arm(cls=S.Arm, **kw):
    return cls(lrs=[1e-3], weight_decay=0.0, **kw)


class Blocks(list):
    """Rows of token ids indexed like the memory-mapped dataset: blocks[[i, j]]["input_ids"]."""
    def __getitem__(self, idx):
        return {"input_ids": [list.__getitem__(self, i) for i in idx]}


def _linear(weight: float, bias: float) -> torch.nn.Linear:
    m = torch.nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(weight)
        m.bias.fill_(bias)
    return m


# ---------------------------------------------------------------- Penalty (L2-SP, EWC)

def test_penalty_by_hand():
    # anchor: weight 1, bias 0. Moved to weight 3, bias 2: squared steps 4 and 4.
    anchor = _linear(1.0, 0.0)
    moved = _linear(3.0, 2.0)
    # L2-SP, coef 0.5: 0.5/2 * (4 + 4) = 2
    assert float(L.Penalty(anchor, 0.5)(moved)) == pytest.approx(2.0)
    # EWC, F_weight = 3, F_bias = 0.5: 0.5/2 * (3*4 + 0.5*4) = 3.5
    ewc = L.Penalty(anchor, 0.5, {"weight": torch.tensor([[3.0]]), "bias": torch.tensor([0.5])})
    assert float(ewc(moved)) == pytest.approx(3.5)
    # a parameter with no Fisher weight is left out: 0.5/2 * 3*4 = 3
    assert float(L.Penalty(anchor, 0.5, {"weight": torch.tensor([[3.0]])})(moved)) == pytest.approx(3.0)
    # coef 4: 4/2 * 8 = 16 (the coefficient multiplies, it does not divide)
    assert float(L.Penalty(anchor, 4.0)(moved)) == pytest.approx(16.0)


def test_penalty_anchor_is_a_copy_and_moves_with_to_device():
    anchor = _linear(1.0, 0.0)
    pen = L.Penalty(anchor, 1.0, {"weight": torch.ones(1, 1), "bias": torch.ones(1)})
    with torch.no_grad():
        anchor.weight.fill_(2.0)            # moving the module later does not move the anchor
    assert float(pen(anchor)) == pytest.approx(0.5)
    assert pen.to_device(torch.device("meta")) is pen
    assert {a.device.type for a in pen._anchor.values()} == {"meta"}
    assert {w.device.type for w in pen._weights.values()} == {"meta"}
    assert sorted(pen._anchor) == ["bias", "weight"] and sorted(pen._weights) == ["bias", "weight"]
    plain = L.Penalty(_linear(1.0, 0.0), 1.0).to_device(torch.device("meta"))
    assert plain._weights is None and {a.device.type for a in plain._anchor.values()} == {"meta"}


# ---------------------------------------------------------------- Fisher

def _reference_fisher(lm, blocks, block_len, n_batches, batch_size, seed):
    """mean over the stage's batches (block_batches, same seed) of the squared gradient of the
    causal-LM loss, written out here with autograd on a fresh copy of the parameters."""
    backbone = lm.model
    ref = {n: torch.zeros_like(p) for n, p in backbone.named_parameters()}
    it = L.block_batches(blocks, block_len, batch_size, seed)
    for _ in range(n_batches):
        ids = next(it)
        assert ids.shape == (batch_size, block_len)
        lm.zero_grad(set_to_none=True)
        lm(input_ids=ids, labels=ids).loss.backward()
        for n, p in backbone.named_parameters():
            ref[n] += p.grad ** 2 / n_batches
    lm.zero_grad(set_to_none=True)
    return ref


def test_fisher_is_the_mean_squared_gradient_over_ceil_blocks_over_batch_size(pre):
    path, tok = pre
    lm = L.pretrained_lm(path)
    rows = [tok("the movie was good and the plot was great")["input_ids"][:8],
            tok("a dull film with a weak plot and bad acting")["input_ids"][:8],
            tok("great acting but the story was slow")["input_ids"][:8]]
    blocks = Blocks(rows)
    # 3 blocks in batches of 2: ceil(3 / 2) = 2 batches, of the first 4 tokens of each block
    f = L.estimate_fisher(lm, blocks, 4, n_blocks=3, batch_size=2, seed=5, normalize=False)
    ref = _reference_fisher(lm, blocks, 4, 2, 2, 5)
    assert set(f) == set(ref)
    for n in ref:
        assert torch.allclose(f[n], ref[n], rtol=1e-5, atol=1e-12), n
    # one block: one batch (not 2)
    f1 = L.estimate_fisher(lm, blocks, 4, n_blocks=1, batch_size=2, seed=5, normalize=False)
    # no gradient is left behind on the LM (not even zeros), and what trained before still trains
    assert all(p.grad is None for p in lm.parameters())
    ref1 = _reference_fisher(lm, blocks, 4, 1, 2, 5)
    assert all(torch.allclose(f1[n], ref1[n], rtol=1e-5, atol=1e-12) for n in ref1)
    assert not lm.lm_head.weight.requires_grad and lm.model.embed_tokens.weight.requires_grad


def test_fisher_of_a_masked_lm_is_seeded(tmp_path):
    """The masked-LM objective draws which tokens to mask: the draw is seeded, so the same seed
    gives the same Fisher, and another seed another one."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    lm = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32,
                                    max_position_embeddings=16))
    lm.mask_token_id = 3
    g = torch.Generator().manual_seed(0)
    blocks = Blocks(torch.randint(5, 40, (4, 12), generator=g).tolist())

    def fisher(seed, global_seed):
        torch.manual_seed(global_seed)             # the global RNG must not matter
        return L.estimate_fisher(lm, blocks, 10, n_blocks=4, batch_size=2, seed=seed, normalize=False)

    a, b, c = fisher(0, 1), fisher(0, 2), fisher(1, 1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


# ---------------------------------------------------------------- TaskModel

def test_task_model_adds_the_penalty_and_logs_it(pre):
    path, tok = pre
    clf = S.build_classifier(path, LABELS, "full", _arm(), seed=0)
    tok.padding_side = "left"
    enc = tok(["the movie was good", "bad plot"], padding=True, return_tensors="pt")
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], torch.tensor([1, 0])
    task, _ = S.TaskModel(clf)(ids, mask, labels)
    bb = clf.base_model
    pen = L.Penalty(bb, 2.0)
    with torch.no_grad():
        bb.norm.weight.add_(0.5)              # 32 entries moved by 0.5: 2/2 * 32 * 0.25 = 8
    assert float(pen(bb)) == pytest.approx(8.0)
    tm = S.TaskModel(clf, S.Regulariser(penalty=pen))
    assert tm.backbone() is clf.model
    loss, logs = tm(ids, mask, labels)
    assert set(logs) == {"task_loss", "penalty"}
    assert float(logs["penalty"]) == pytest.approx(8.0)
    assert float(loss) == pytest.approx(float(logs["task_loss"]) + 8.0)
    # the task loss of the padded batch is the mean of each example's loss on its own tokens
    singles = []
    for i in range(2):
        keep = mask[i].bool()
        one, _ = S.TaskModel(clf)(ids[i:i + 1, keep], mask[i:i + 1, keep], labels[i:i + 1])
        singles.append(float(one))
    assert float(logs["task_loss"]) == pytest.approx(sum(singles) / 2, rel=1e-4)
    # replay ids without a replay regulariser are ignored
    _, logs_no_lm = S.TaskModel(clf)(ids, mask, labels, replay_ids=ids)
    assert set(logs_no_lm) == {"task_loss"}


# ---------------------------------------------------------------- regulariser factories

def _ctx(path, blocks, fisher=None):
    calls = []

    def blocks_of(block_len):
        calls.append(("blocks", block_len))
        return blocks

    def fisher_of(arm):
        calls.append(("fisher", arm))
        return fisher

    return SimpleNamespace(pretrained=path, blocks=blocks_of, fisher=fisher_of), calls


def test_replay_factory(pre):
    path, tok = pre
    clf = S.build_classifier(path, LABELS, "replay", _arm(S.ReplayArm, weight=0.25, batch_size=2,
                                                         block_len=8), seed=0)
    blocks = Blocks([list(range(10, 22)), list(range(30, 42)), list(range(50, 62))])
    arm = _arm(S.ReplayArm, weight=0.25, batch_size=2, block_len=5)
    ctx, calls = _ctx(path, blocks)
    reg = S.replay(ctx, clf.base_model, None, arm, seed=7)
    assert calls == [("blocks", 5)]
    assert reg.weight == 0.25 and reg.penalty is None
    assert getattr(reg.lm, reg.lm.base_model_prefix) is clf.base_model    # shared backbone
    assert not reg.lm.lm_head.weight.requires_grad
    want = L.block_batches(blocks, 5, 2, 7)
    for _ in range(3):
        got = next(reg.batches)
        assert got.shape == (2, 5) and torch.equal(got, next(want))


def test_l2sp_and_ewc_factories():
    anchor, moved = _linear(1.0, 0.0), _linear(3.0, 2.0)
    ctx, calls = _ctx(None, None)
    reg = S.l2sp(ctx, moved, anchor, _arm(S.L2spArm, alpha=0.5), seed=0)
    assert reg.lm is None and reg.batches is None and reg.weight == 0.0
    assert reg.penalty.coef == 0.5 and float(reg.penalty(moved)) == pytest.approx(2.0)  # anchored on `anchor`
    assert calls == []
    fisher = {"weight": torch.tensor([[3.0]]), "bias": torch.tensor([0.5])}
    ctx, calls = _ctx(None, None, fisher)
    arm = _arm(S.EwcArm, lam=0.5, fisher_blocks=2, fisher_batch_size=1, block_len=4, normalize=False)
    reg = S.ewc(ctx, moved, anchor, arm, seed=0)
    assert calls == [("fisher", arm)]
    assert reg.penalty.coef == 0.5 and float(reg.penalty(moved)) == pytest.approx(3.5)


# ---------------------------------------------------------------- names, messages, the registry

def test_unknown_names_are_refused_with_the_known_ones():
    assert S.unknown_strategy("nope") == f"unknown strategy 'nope'; known strategies: {KNOWN}"
    with pytest.raises(ConfigError) as e:
        S.check_strategy("nope")
    assert str(e.value) == f"strategy: unknown strategy 'nope'; known strategies: {KNOWN}"
    with pytest.raises(ConfigError) as e:
        S.check_strategy("nope", "finetune.sequential.strategies")
    assert str(e.value).startswith("finetune.sequential.strategies: unknown strategy 'nope';")
    assert S.check_strategy("lora") is S.REGISTRY["lora"]
    name = TypeAdapter(S.StrategyName)
    assert name.validate_python("ewc") == "ewc"
    with pytest.raises(ValidationError) as e:
        name.validate_python("nope")
    assert f"unknown strategy 'nope'; known strategies: {KNOWN}" in str(e.value)


def test_register_adds_once():
    entry = S.Strategy("_mutation_probe", S.Arm, "a test entry")
    try:
        assert S.register(entry) is entry and S.REGISTRY["_mutation_probe"] is entry
        with pytest.raises(ValueError) as e:
            S.register(S.Strategy("_mutation_probe", S.Arm, "again"))
        assert str(e.value) == "strategy '_mutation_probe' registered twice"
        assert S.REGISTRY["_mutation_probe"] is entry
    finally:
        S.REGISTRY.pop("_mutation_probe", None)


def test_arms_model_is_strict_and_typed():
    model = S.arms_model({"full": S.REGISTRY["full"], "l2sp": S.REGISTRY["l2sp"]})
    assert model.__name__ == "Arms" and issubclass(model, StrictModel)
    arms = model(full={"lrs": [1e-3], "weight_decay": 0.0},
                 l2sp={"lrs": [1e-3], "weight_decay": 0.0, "alpha": 0.1})
    assert type(arms.l2sp) is S.L2spArm and arms.l2sp.alpha == 0.1
    with pytest.raises(ValidationError, match="Arms"):
        model(full={"lrs": [1e-3], "weight_decay": 0.0})           # l2sp is required
    with pytest.raises(ValidationError):
        model(full={"lrs": [1e-3], "weight_decay": 0.0},
              l2sp={"lrs": [1e-3], "weight_decay": 0.0, "alpha": 0.1}, extra={})


# ---------------------------------------------------------------- peft configs and adapters

def test_lora_and_osf_configs_carry_the_arm(pre):
    path, _ = pre
    clf = S.new_classifier(path, LABELS)
    cfg = S.lora(clf, _arm(S.LoraArm, r=3, alpha=6.0, dropout=0.25, target_modules=["q_proj", "v_proj"]))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (3, 6.0, 0.25)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    osf = S.osf(clf, _arm(S.OsfArm, effective_rank=0.5, target_modules=["q_proj"]))
    assert set(osf.target_modules) == {"q_proj"}


def test_lora_targets_by_leaf_suffix_or_full_name_and_the_message(pre):
    path, _ = pre
    clf = S.new_classifier(path, LABELS)
    S.check_lora_targets(clf, ["q_proj"])                                  # a leaf name
    S.check_lora_targets(clf, ["self_attn.q_proj"])                        # a dotted suffix
    S.check_lora_targets(clf, ["model.layers.0.self_attn.q_proj"])         # a full name
    with pytest.raises(ConfigError) as e:
        S.check_lora_targets(clf, ["q_proj", "c_attn", "attn.q_proj"])
    assert str(e.value) == (
        "finetune.arms.lora.target_modules: ['c_attn', 'attn.q_proj'] not found in the model "
        "(llama); its linear modules are: ['down_proj', 'gate_proj', 'k_proj', 'o_proj', "
        "'q_proj', 'score', 'up_proj', 'v_proj']")


def test_adapters_on_a_backbone_that_has_them_train_on(pre):
    from ptf.models.adapter_modeling import is_adapter_param
    from ptf.models.adapters import make_spec

    path, _ = pre
    clf = S.new_classifier(path, LABELS)
    first = _arm(S.AdapterArm, reduction_factor=4, placement="both", activation="gelu")
    S.adapters(clf, first)
    assert clf.config.bottleneck_adapters == make_spec(clf, 4, "both", "gelu").to_dict()
    names = {n for n, _ in clf.named_parameters() if is_adapter_param(n)}
    assert names
    for p in clf.parameters():
        p.requires_grad_(True)
    S.adapters(clf, first)          # a later task: the same adapters, not new ones
    assert {n for n, _ in clf.named_parameters() if is_adapter_param(n)} == names
    assert clf.config.bottleneck_adapters == make_spec(clf, 4, "both", "gelu").to_dict()
    trains = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trains == names | {"score.weight"}


# ---------------------------------------------------------------- building

def test_new_classifier_defaults_and_labels(pre):
    path, _ = pre
    lm = L.pretrained_lm(path)
    clf = S.new_classifier(path, LABELS)                # pretrained, last-token pooling
    assert torch.equal(clf.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert clf.config.id2label == {0: "neg", 1: "pos"} and clf.config.label2id == {"neg": 0, "pos": 1}
    assert P.check_pooling("last", "llama").config.items() <= vars(clf.config).items()
    scratch = S.new_classifier(path, LABELS, random_init=True)
    assert not torch.equal(scratch.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert scratch.config.id2label == {0: "neg", 1: "pos"} and scratch.config.num_labels == 2


def test_unwrap_hf(pre):
    path, _ = pre
    plain = S.build_classifier(path, LABELS, "full", _arm(), seed=0)
    assert S.unwrap_hf(plain) is plain
    wrapped = S.build_classifier(path, LABELS, "lora", _arm(S.LoraArm, r=2, alpha=4.0, dropout=0.0,
                                                            target_modules=["q_proj"]), seed=0)
    base = S.unwrap_hf(wrapped)
    assert base is wrapped.get_base_model() and base is not wrapped
    assert S.TaskModel(wrapped).backbone() is base.model
