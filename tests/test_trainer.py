"""The shared training loop on a tiny Llama: accumulation, hooks, early stopping, checkpoints
(atomic, keep-last-N, fingerprint check) and bit-exact in-process resume."""
from __future__ import annotations

import json

import pytest
import torch

from ptf.common.cli import StageError
from ptf.training.trainer import (COMPLETE, LoopConfig, Trainer, adamw, complete_checkpoints,
                            make_accelerator, param_groups, warmup_cosine)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from ptf.training.trainer import reset_accelerate
    reset_accelerate()
    yield
    reset_accelerate()


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=16,
                                        tie_word_embeddings=True, pad_token_id=0))


def _data(n=40, t=12):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 40, (t,), generator=g)} for _ in range(n)]


def _loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {"aux": 1.0}


def _trainer(cfg: LoopConfig, grad_accum=1, batch=4, seed=0, **kw):
    acc = make_accelerator("no", grad_accum, seed, cpu=True)
    model = _model()
    opt = adamw(param_groups(model, 1e-2, 0.01), lr=1e-2)
    sched = warmup_cosine(opt, 2, cfg.max_steps, acc.num_processes)
    loader = torch.utils.data.DataLoader(_data(), batch_size=batch, shuffle=True, drop_last=True,
                                         collate_fn=lambda r: {"input_ids": torch.stack([x["input_ids"] for x in r])})
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    return Trainer(acc, model, opt, loader, sched, _loss, cfg, **kw)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_steps_accumulation_logs_and_hook():
    logged, hooked = [], []
    t = _trainer(LoopConfig(max_steps=6, log_every=2), grad_accum=3,
                 log_fn=lambda m, s: logged.append((s, m)), step_hook=lambda s, m: hooked.append(s))
    r = t.fit()
    assert r.steps == 6 and t.state.micro_step == 18  # 3 micro-batches per optimizer step
    assert r.tokens == 18 * 4 * 12 and r.tokens_per_s > 0
    assert hooked == list(range(6))
    assert [s for s, _ in logged] == [2, 4, 6]
    assert {"train_loss", "lr", "tokens_per_s", "grad_norm", "aux"} <= set(logged[0][1])
    assert logged[-1][1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at 0
    # the loss goes down on this memorisable data
    assert logged[-1][1]["train_loss"] < logged[0][1]["train_loss"]


def test_eval_best_and_early_stopping():
    vals = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 1.0])
    best = []
    t = _trainer(LoopConfig(max_steps=20, eval_every=1, patience=2, metric="val_loss"),
                 eval_fn=lambda: {"val_loss": next(vals)}, on_best=lambda s, m: best.append(s))
    r = t.fit()
    assert r.stopped_early and r.steps == 4  # best at step 2, then two worse evals
    assert r.best == 2.0 and r.best_step == 2 and best == [1, 2]
    assert [h["val_loss"] for h in r.history] == [3.0, 2.0, 2.5, 2.6]


def test_exact_resume_from_checkpoint(tmp_path):
    cfg = LoopConfig(max_steps=8, checkpoint_dir=tmp_path / "ck", checkpoint_every=3,
                     keep_checkpoints=2, log_every=1)
    full = _trainer(cfg, fingerprint={"a": 1})
    full.fit()
    want = _weights(full)
    ck = complete_checkpoints(tmp_path / "ck")
    assert [p.name for p in ck] == ["step-00000006", "step-00000008"]  # keep last 2
    # pretend the run was killed after step 6, during the save of step 8
    (ck[-1] / COMPLETE).unlink()
    assert [p.name for p in complete_checkpoints(tmp_path / "ck")] == ["step-00000006"]
    resumed = _trainer(cfg, fingerprint={"a": 1})
    r = resumed.fit()
    assert r.resumed_from == 6 and r.steps == 8
    got = _weights(resumed)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert json.loads((tmp_path / "ck" / "step-00000008" / "trainer_state.json").read_text())["step"] == 8


def test_checkpoint_from_other_config_is_refused(tmp_path):
    cfg = LoopConfig(max_steps=2, checkpoint_dir=tmp_path, checkpoint_every=2)
    _trainer(cfg, fingerprint={"model": {"hidden": 16}}).fit()
    with pytest.raises(StageError, match=r"model\.hidden: checkpoint 16 != now 32"):
        _trainer(cfg, fingerprint={"model": {"hidden": 32}}).fit()


def test_incomplete_checkpoint_is_ignored(tmp_path):
    (tmp_path / ".step-00000004.tmp").mkdir()
    (tmp_path / "step-00000002").mkdir()  # no COMPLETE marker: half-written
    assert complete_checkpoints(tmp_path) == []
    r = _trainer(LoopConfig(max_steps=1, checkpoint_dir=tmp_path, checkpoint_every=1)).fit()
    assert r.resumed_from is None


def test_param_groups_decay_and_discriminative_lr():
    m = _model()
    groups = param_groups(m, 1e-3, 0.1, lr_for=lambda n: 1e-4 if "layers.0." in n else 1e-3)
    by = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert (1e-4, 0.1) in by and (1e-3, 0.0) in by  # norms (1-d) get no weight decay
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(m.parameters()))
