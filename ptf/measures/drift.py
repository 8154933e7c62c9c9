"""Drift of the pretraining objective (no CLI): the held-out LM loss of a fine-tuned backbone.

In:  data/shards/validation/ + manifest.json (the held-out pretraining blocks), the pretrained
     model directory and fine-tuned model directories.
Out: `EvalSet` (the selected blocks with fixed targets and the pretrained model's per-block
     loss), `measure(...)` -> per-block summed NLL of one fine-tuned model on it; a backbone
     whose weights still equal the pretrained ones bit for bit (a linear probe, prompt tuning)
     gets the pretrained sums without a forward pass (`unchanged`: the same numbers, ~1.5
     CPU-s less per model).

Protocol: the fine-tuned backbone under the PRETRAINED LM head
(`ptf.models.artifacts.load_backbone_as_lm`: an untied copy of the pretrained output layer;
LoRA merged; prompt tuning leaves the backbone as pretrained) against the pretrained LM
(`pretrained_lm`), on the same `max_blocks` validation blocks (evenly spaced over the split, in
order). clm: next-token loss at positions 1..; mlm: BERT masking (`ptf.models.lm.mask_tokens`)
drawn ONCE from a generator seeded by `mask_seed` and used for every model (paired). The
numbers per model come from `ptf.measures.cl_metrics.drift`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ptf.common import paths
from ptf.common.cli import StageError


def select_blocks(n_total: int, k: int) -> list[int]:
    """`min(k, n_total)` block indices evenly spaced over the split, increasing (deterministic)."""
    k = min(k, n_total)
    return [i * n_total // k for i in range(k)]


def load_eval_blocks(root: Path, max_blocks: int):
    """(LongTensor n x L of the selected validation blocks, their indices)."""
    import torch

    from ptf.data.shards import load_blocks

    mpath = Path(root) / paths.SHARDS / "manifest.json"
    if not mpath.is_file():
        raise StageError(f"{mpath}: missing; run `dvc repro tokenize`")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if "validation" not in manifest:
        raise StageError(f"{mpath}: no 'validation' entry")
    ds = load_blocks(Path(root) / paths.SHARDS / "validation", manifest["validation"])
    if len(ds) == 0:
        raise StageError(f"{mpath}: the validation split has no blocks")
    idx = select_blocks(len(ds), max_blocks)
    ids = torch.tensor(np.asarray(ds.select(idx)["input_ids"], dtype=np.int64))
    return ids, idx


def eval_targets(ids, objective: str, tokenizer, mask_prob: float, mask_seed: int):
    """(inputs, labels) fixed once: clm labels = inputs (shifted in `block_nll`); mlm the
    pretraining masking rule with a generator seeded by `mask_seed`."""
    import torch

    if objective == "clm":
        labels = ids.clone()
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in (
                tokenizer.eos_token_id, tokenizer.bos_token_id):
            labels[labels == tokenizer.pad_token_id] = -100
        return ids, labels
    from ptf.models.lm import mask_tokens

    if tokenizer.mask_token_id is None:
        raise StageError("masked-LM checkpoint whose tokenizer has no mask token")
    g = torch.Generator().manual_seed(mask_seed)
    return mask_tokens(ids, tokenizer.mask_token_id, len(tokenizer),
                       sorted(set(tokenizer.all_special_ids)), mask_prob, g)


def compute_device():
    """Where the held-out measure runs: Accelerate's device for this process (a GPU when there is
    one, unless Accelerate is told to use the CPU), where the training stages put their models."""
    from accelerate import PartialState

    return PartialState().device


def block_nll(lm, inputs, labels, objective: str, batch_size: int):
    """Per-block summed NLL (float64) and number of predicted tokens, in block order, as numpy
    arrays; each batch is scored on the device `lm` is on."""
    import torch
    import torch.nn.functional as F

    dev = next(lm.parameters()).device
    sums, counts = [], []
    lm.eval()
    with torch.no_grad():
        for s in range(0, inputs.shape[0], batch_size):
            x, y = inputs[s:s + batch_size].to(dev), labels[s:s + batch_size].to(dev)
            logits = lm(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
            if objective == "clm":    # position t predicts token t + 1; the last predicts nothing
                y = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], 1)
            # the logits as they are (a slice [:, :-1] would be copied: ~1/3 of the measure's time);
            # each token's loss is the same bit for bit, and the last position is dropped below
            nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1),
                                  ignore_index=-100, reduction="none").view(y.shape)
            if objective == "clm":
                nll, y = nll[:, :-1], y[:, :-1]
            sums.append(nll.double().sum(1))
            counts.append((y != -100).sum(1))
    return torch.cat(sums).cpu().numpy(), torch.cat(counts).cpu().numpy()


NO_LM_HEAD = ("not applicable: the pretrained model has no LM head (a bare encoder such as a released "
              "BertModel), and held-out LM loss needs one (a head added here would be random); its "
              "forgetting is measured by the representation stage (CKA, probe retention)")


def lm_objective(pretrained: Path) -> str | None:
    """The pretraining objective of the saved LM: `mlm` for a `...MaskedLM`, `clm` for a
    `...CausalLM` / `...LMHeadModel`; None for a body without an LM head (a released encoder
    such as a bare `BertModel` foundation): an Auto LM class would add a randomly initialised
    head, and the loss under it would be noise, not drift (`NO_LM_HEAD` says so)."""
    from transformers import AutoConfig

    arch = (AutoConfig.from_pretrained(pretrained).architectures or [""])[0]
    if arch.endswith("MaskedLM"):
        return "mlm"
    if arch.endswith(("CausalLM", "LMHeadModel")):
        return "clm"
    return None


def objective_of(pretrained: Path) -> str:
    """`lm_objective`, refusing a body without an LM head with a StageError naming its config."""
    objective = lm_objective(pretrained)
    if objective is None:
        from transformers import AutoConfig

        arch = (AutoConfig.from_pretrained(pretrained).architectures or ["(none)"])[0]
        raise StageError(f"{Path(pretrained) / 'config.json'}: architecture {arch} has no LM head, so "
                         "the held-out LM-loss drift is not applicable (a head added here would be random); "
                         "measure its forgetting with the representation stage (CKA, probe retention)")
    return objective


@dataclass
class EvalSet:
    """The held-out blocks every model is scored on, and the pretrained model's scores."""

    pretrained: Path
    objective: str
    inputs: object             # LongTensor n x L
    labels: object             # LongTensor n x L (-100: not scored)
    indices: list[int]         # the selected blocks' indices in the validation split
    base_sums: np.ndarray      # per-block summed NLL of the pretrained LM
    counts: np.ndarray         # per-block number of scored tokens
    batch_size: int
    weights: dict = field(repr=False)   # the pretrained backbone's state dict (`unchanged`)

    @classmethod
    def build(cls, root: Path, pretrained: Path, max_blocks: int, batch_size: int,
              mask_prob: float, mask_seed: int) -> EvalSet:
        import torch
        from transformers import AutoTokenizer

        from ptf.models.lm import pretrained_lm

        torch.manual_seed(0)
        objective = objective_of(pretrained)
        tok = AutoTokenizer.from_pretrained(pretrained)
        ids, idx = load_eval_blocks(root, max_blocks)
        inputs, labels = eval_targets(ids, objective, tok, mask_prob, mask_seed)
        keep = ((labels[:, 1:] if objective == "clm" else labels) != -100).any(1)
        inputs, labels = inputs[keep], labels[keep]
        if inputs.shape[0] == 0:
            raise StageError("no validation block has a target token to score")
        lm = pretrained_lm(pretrained).to(compute_device())
        base, counts = block_nll(lm, inputs, labels, objective, batch_size)
        return cls(pretrained, objective, inputs, labels, idx, base, counts, batch_size,
                   lm.base_model.state_dict())

    def for_backbone(self, pretrained: Path) -> EvalSet:
        """The same blocks and targets, scored against another pretrained backbone (a further
        pretraining seed, `ptf.models.backbones`): its own base sums."""
        from ptf.models.lm import pretrained_lm

        if Path(pretrained) == Path(self.pretrained):
            return self
        if objective_of(pretrained) != self.objective:
            raise StageError(f"{pretrained}: another objective than {self.pretrained}'s ({self.objective})")
        lm = pretrained_lm(pretrained).to(compute_device())
        base, _ = block_nll(lm, self.inputs, self.labels, self.objective, self.batch_size)
        return replace(self, pretrained=Path(pretrained), base_sums=base, weights=lm.base_model.state_dict())

    def unchanged(self, backbone) -> bool:
        """Whether `backbone` (a base model module) holds the pretrained weights bit for bit, so
        that its sums are `base_sums` (LoRA / DoRA layers add keys: never unchanged)."""
        import torch

        sd = backbone.state_dict()
        return sd.keys() == self.weights.keys() and all(torch.equal(sd[k].to(v.device), v)
                                                        for k, v in self.weights.items())

    def scores(self, lm) -> np.ndarray:
        """Per-block summed NLL of `lm` (a fine-tuned backbone under the pretrained LM head)."""
        if self.unchanged(lm.base_model):
            return self.base_sums.copy()
        sums, _ = block_nll(lm, self.inputs, self.labels, self.objective, self.batch_size)
        return sums

    def measure(self, finetuned: Path) -> np.ndarray:
        """Per-block summed NLL of a fine-tuned model's backbone under the pretrained LM head."""
        from ptf.models.artifacts import load_backbone_as_lm

        lm = load_backbone_as_lm(finetuned, self.pretrained)   # the backbone it was fine-tuned from
        return self.scores(lm.to(compute_device()))
