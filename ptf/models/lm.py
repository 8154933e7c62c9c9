"""Pretraining objectives and the pretrained LM as a fine-tuning regulariser (no CLI).

In:  a pretrained HF directory (causal or masked LM), packed token blocks (`data/shards`).
Out: `mask_tokens` (BERT's masking rule with an explicit generator: pretraining and the
     forgetting stage draw the same way), `pretrained_lm` (the LM with an untied, frozen copy of
     its output layer, optionally on a shared backbone), `lm_loss` (the pretraining objective on
     blocks), seeded block batches, the diagonal Fisher of the objective, and `Penalty`
     (L2-SP / EWC: coef/2 * sum w (theta - theta*)^2 over the backbone).
Hand-written because no maintained library provides replay mixing or EWC/L2-SP penalties for HF
models.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ptf.common import paths
from ptf.common.cli import StageError
from ptf.data.shards import load_blocks

def mask_tokens(input_ids: torch.Tensor, mask_id: int, vocab_size: int, special: list[int],
                prob: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (same rule as DataCollatorForLanguageModeling, with an explicit generator):
    returns (inputs, labels) with labels -100 except at the chosen positions."""
    labels = input_ids.clone()
    p = torch.full(labels.shape, prob)
    if special:
        p.masked_fill_(torch.isin(labels, torch.tensor(special, dtype=labels.dtype)), 0.0)
    chosen = torch.bernoulli(p, generator=generator).bool()
    labels[~chosen] = -100
    inputs = input_ids.clone()
    replaced = torch.bernoulli(torch.full(labels.shape, 0.8), generator=generator).bool() & chosen
    inputs[replaced] = mask_id
    rand = (torch.bernoulli(torch.full(labels.shape, 0.5), generator=generator).bool()
            & chosen & ~replaced)
    inputs[rand] = torch.randint(vocab_size, labels.shape, generator=generator, dtype=labels.dtype)[rand]
    return inputs, labels



def pretrained_lm(pretrained_dir: Path, backbone=None):
    """The pretrained LM (`AutoModelForCausalLM`, or `AutoModelForMaskedLM` for an MLM
    checkpoint) with its output layer untied and frozen (a copy of the pretrained LM head); if
    `backbone` is given it replaces the LM's own backbone module (shared, not copied)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = AutoConfig.from_pretrained(pretrained_dir)
    arch = (cfg.architectures or [""])[0]
    cls = AutoModelForMaskedLM if arch.endswith("MaskedLM") else AutoModelForCausalLM
    lm = cls.from_pretrained(pretrained_dir)
    out = lm.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone())
    lm.config.tie_word_embeddings = False
    if is_masked_lm(lm):
        from transformers import AutoTokenizer
        lm.mask_token_id = AutoTokenizer.from_pretrained(pretrained_dir).mask_token_id
    if backbone is not None:
        setattr(lm, lm.base_model_prefix, backbone)
    for name, p in lm.named_parameters():
        if not name.startswith(lm.base_model_prefix + "."):
            p.requires_grad_(False)
    return lm


def is_masked_lm(lm) -> bool:
    return type(lm).__name__.endswith("MaskedLM")


def lm_loss(lm, input_ids: torch.Tensor, generator: torch.Generator | None = None,
            mask_prob: float = 0.15) -> torch.Tensor:
    """The pretraining objective on packed blocks: next-token loss, or for a masked LM the
    loss on `mask_prob` of the tokens replaced by [MASK] (seeded by `generator`)."""
    if not is_masked_lm(lm):
        return lm(input_ids=input_ids, labels=input_ids).loss
    mask_id = getattr(lm, "mask_token_id", None)
    if mask_id is None:
        raise StageError("masked-LM replay/EWC needs a mask token in the pretrained tokenizer")
    pick = torch.rand(input_ids.shape, generator=generator).to(input_ids.device) < mask_prob
    labels = torch.where(pick, input_ids, torch.full_like(input_ids, -100))
    return lm(input_ids=torch.where(pick, torch.full_like(input_ids, mask_id), input_ids),
              labels=labels).loss


def load_pretraining_blocks(root: Path, block_len: int):
    """The pretraining train blocks (memory-mapped), cut to their first `block_len` tokens."""
    manifest = root / paths.SHARDS / "manifest.json"
    if not manifest.is_file():
        raise StageError(f"{manifest}: missing; replay and ewc need the pretraining shards "
                         "(run `dvc repro tokenize`)")
    entry = json.loads(manifest.read_text())["train"]
    return load_blocks(root / paths.SHARDS / "train", entry, verify=False), block_len


def block_batches(blocks, block_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded random batches of pretraining blocks (LongTensor batch x block_len)."""
    g = torch.Generator().manual_seed(seed)
    n = len(blocks)
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=g).tolist()
        rows = blocks[idx]["input_ids"]
        yield torch.tensor([r[:block_len] for r in rows], dtype=torch.long)


def estimate_fisher(lm, blocks, block_len: int, n_blocks: int, batch_size: int, seed: int,
                    normalize: bool) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the pretraining objective over the backbone parameters
    (keys relative to the backbone): mean over batches of the squared gradient."""
    backbone = getattr(lm, lm.base_model_prefix)
    params = {n: p for n, p in backbone.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(lm.parameters()).device
    it = block_batches(blocks, block_len, batch_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n_batches = max(1, -(-n_blocks // batch_size))
    lm.eval()
    req = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for _ in range(n_batches):
        lm.zero_grad(set_to_none=True)
        lm_loss(lm, next(it).to(device), g).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 / n_batches
    lm.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(req[n])
    if normalize:
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp(min=1e-30)
        fisher = {n: f / mean for n, f in fisher.items()}
    return fisher


class Penalty(torch.nn.Module):
    """coef/2 * sum_i w_i (theta_i - anchor_i)^2 over the backbone (w = 1: L2-SP; w = F: EWC)."""

    def __init__(self, backbone, coef: float, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.coef = coef
        self.names = [n for n, _ in backbone.named_parameters()]
        self._anchor = {n: p.detach().clone() for n, p in backbone.named_parameters()}
        self._weights = weights

    def to_device(self, device) -> "Penalty":
        self._anchor = {n: a.to(device) for n, a in self._anchor.items()}
        if self._weights is not None:
            self._weights = {n: w.to(device) for n, w in self._weights.items()}
        return self

    def forward(self, backbone) -> torch.Tensor:
        total = None
        for n, p in backbone.named_parameters():
            if self._weights is not None and n not in self._weights:
                # no Fisher: the pretraining objective does not use it (BERT's pooler, which a
                # masked LM lacks), so its weight is zero
                continue
            d = (p - self._anchor[n]) ** 2
            if self._weights is not None:
                d = d * self._weights[n]
            s = d.sum()
            total = s if total is None else total + s
        return 0.5 * self.coef * total

