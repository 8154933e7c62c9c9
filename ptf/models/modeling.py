"""Model construction from params, by objective, or from a foundation (no CLI; used by pretrain,
the tokenizer stage and the benchmark).

In:  a `ModelConfig` (sizes from the `pretrain.model` params section), the objective and a
     tokenizer (vocab size and special-token ids come from it, never from params); or the
     foundation laid out by the download stage in data/foundation (ptf/data/foundation.py).
Out: `read_foundation`, `open_foundation` (record + config after the checks that refuse a
     foundation before training, naming both sides), `foundation_model` / `load_foundation`
     (the foundation under the objective's LM head, a fresh seeded head where it has none), and
     a freshly initialised `transformers` model:
     - `clm` -> `LlamaForCausalLM` (RMSNorm, SwiGLU, rotary positions, tied input/output
       embeddings, sdpa attention);
     - `mlm` -> `BertForMaskedLM` (post-LN, learned positions, GELU; HF BERT has no pre-LN
       variant, and post-LN BERT stalls at high learning rates: keep lr <= ~5e-4 with warmup).
     `config.pad_token_id` is set, so `AutoModelForSequenceClassification.from_pretrained` works
     on the saved directory.

Why was GPT2LMHeadModel "2.5x slower" than BertForMaskedLM of the same size? Measured with
`bench/pretrain_speed.py --arch-compare` (batch 16x128, hidden 256, 4 layers, vocab 8192, forward +
backward + AdamW, 1 thread, tokens per CPU-second of the process, median of 3 interleaved
repeats; the 2-core machine was shared with other jobs, load average ~10, so CPU time is the
fair measure and wall-clock tokens/s swung up to 2x between repeats of the same model):

    GPT-2, sdpa, gelu_new (default)   1,628 tokens/CPU-s   ~54 GFLOP/CPU-s
    GPT-2, eager attention            1,712                (+5%: sdpa is no win at T=128)
    GPT-2, sdpa, fused "gelu"         1,938                (+19%)
    GPT-2, untied head                1,618                (same: tying changes no FLOPs)
    BERT (post-LN, fused gelu)        1,895                ~63 GFLOP/CPU-s
    Llama (SwiGLU 4H, RMSNorm, tied)  1,434 (more FLOPs per token: ~56 GFLOP/CPU-s)

So the real per-token gap GPT-2 vs BERT is ~1.16x, not 2.5x, and it is the activation:
GPT-2's default `gelu_new` is the tanh approximation written as separate elementwise ops
(pow, mul, add, tanh, ...), each a memory-bound pass over a B x T x 4d tensor that is also kept
for backward; the profiler shows `aten::mul` at 9.5% of GPT-2's step against 6.3% for Llama.
`activation_function="gelu"` (one fused kernel) closes the gap. Neither sdpa vs eager nor the
tied 8192-vocab head explains it. The 2.5x (and the notes' 1,300 vs 2,700 tokens/s for the same
GPT-2) are wall-clock measurements on a shared 2-core CPU: noise of the machine, not the model.
Llama is kept for `clm`: bias-free, RMSNorm, fused SiLU, rotary positions: the usual modern decoder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ptf.common import paths
from ptf.common.cli import StageError
from ptf.common.config import StrictModel

Objective = Literal["clm", "mlm"]


class ModelConfig(StrictModel):
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    max_positions: int = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        return self


def special_ids(tokenizer) -> dict[str, int | None]:
    """pad/bos/eos/mask ids of a tokenizer (None where it has none)."""
    def get(attr: str) -> int | None:
        v = getattr(tokenizer, attr, None)
        return int(v) if v is not None else None
    ids = {k: get(f"{k}_token_id") for k in ("pad", "bos", "eos", "mask", "cls", "sep", "unk")}
    if ids["pad"] is None:
        ids["pad"] = ids["eos"] if ids["eos"] is not None else 0
    return ids


def build_config(cfg: ModelConfig, objective: Objective, tokenizer):
    """The `transformers` config for `objective`, sized by `cfg`, ids from `tokenizer`."""
    ids = special_ids(tokenizer)
    vocab = len(tokenizer)
    if objective == "clm":
        from transformers import LlamaConfig
        return LlamaConfig(
            vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
            attention_dropout=cfg.dropout, tie_word_embeddings=True,
            pad_token_id=ids["pad"], bos_token_id=ids["bos"] if ids["bos"] is not None else ids["cls"],
            eos_token_id=ids["eos"] if ids["eos"] is not None else ids["sep"],
            attn_implementation="sdpa")
    if objective == "mlm":
        if ids["mask"] is None:
            raise ValueError("objective mlm needs a tokenizer with a mask token")
        from transformers import BertConfig
        return BertConfig(
            vocab_size=vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
            max_position_embeddings=cfg.max_positions, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, pad_token_id=ids["pad"],
            attn_implementation="sdpa")
    raise ValueError(f"unknown objective {objective!r}; expected 'clm' or 'mlm'")


def build_model(cfg: ModelConfig, objective: Objective, tokenizer):
    """A freshly initialised model (weights drawn from torch's global RNG: seed it first)."""
    config = build_config(cfg, objective, tokenizer)
    if objective == "clm":
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM(config)
    from transformers import BertForMaskedLM
    return BertForMaskedLM(config)


def param_counts(model) -> dict[str, int]:
    """total, embedding (token + position + type tables), output layer (the LM head projection,
    counted even when tied to the input embedding) and non-embedding parameter counts."""
    seen: set[int] = set()
    total = emb = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if "embed" in name and p.ndim == 2:  # embed_tokens, word/position/token_type_embeddings
            emb += p.numel()
    out = model.get_output_embeddings()
    output = out.weight.numel() if out is not None else 0
    return {"total": total, "embedding": emb, "output": output, "non_embedding": total - emb}


def flops_per_token(model, seq_len: int) -> dict[str, Any]:
    """Training FLOPs per token (PaLM appendix): 6 x (non-embedding + output-layer params)
    + 12 x layers x seq_len x hidden (attention scores and values)."""
    c = param_counts(model)
    cfg = model.config
    attn = 12 * cfg.num_hidden_layers * seq_len * cfg.hidden_size
    dense = 6 * (c["non_embedding"] + c["output"])
    return {"flops_per_token": dense + attn, "formula":
            f"6 x (non_embedding {c['non_embedding']:,} + output {c['output']:,}) "
            f"+ 12 x layers {cfg.num_hidden_layers} x seq_len {seq_len} x hidden {cfg.hidden_size}"
            f" = {dense + attn:,}"}


# --------------------------------------------------------------------------- a foundation
# The download stage lays a foundation out under data/foundation (ptf/data/foundation.py); the
# tokenizer, tokenize and pretrain stages read it through these helpers.
FOUNDATION_DIR = paths.DATA / "foundation"
FOUNDATION_RECORD = "foundation.json"


def read_foundation(d: Path) -> dict[str, Any] | None:
    """The record of data/foundation (name, source, revision, sha256, architecture, sizes), or
    None when the run has no foundation; `StageError` if the download stage has not run."""
    f = Path(d) / FOUNDATION_RECORD
    if not f.is_file():
        raise StageError(f"{f}: missing; run `dvc repro download` (data/foundation is its output)")
    return json.loads(f.read_text(encoding="utf-8"))["foundation"]


def is_encoder(config) -> bool:
    """A bidirectional encoder (BERT, RoBERTa, ...): a masked-LM architecture not set up as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def check_objective(config, objective: Objective, where: str) -> None:
    """The objective must fit the foundation's architecture (refused naming both sides)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    arch = (config.architectures or [config.model_type])[0]
    if objective == "clm" and (is_encoder(config) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise StageError(f"pretrain.objective=clm needs a causal decoder, but the foundation "
                         f"{where} is an encoder ({arch}, model_type {config.model_type!r}); "
                         "use objective mlm")
    if objective == "mlm" and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise StageError(f"pretrain.objective=mlm needs a masked-LM architecture, but the foundation "
                         f"{where} is {arch} (model_type {config.model_type!r}); use objective clm")


def check_tokenizer(tok, tok_dir: Path, foundation_tok, foundation_dir: Path, vocab_size: int) -> None:
    """The pipeline's tokenizer must be the foundation's own, and fit its embedding table."""
    if tok.get_vocab() != foundation_tok.get_vocab():
        raise StageError(f"{tok_dir} ({len(tok)} tokens) is not the tokenizer of the foundation "
                         f"{foundation_dir} ({len(foundation_tok)} tokens): set tokenizer.kind: "
                         "foundation and rerun the tokenizer stage")
    if len(tok) > vocab_size:
        raise StageError(f"{tok_dir} has {len(tok)} tokens but the foundation {foundation_dir}/config.json "
                         f"has vocab_size {vocab_size}: ids without an embedding row")


def load_foundation(d: Path, objective: Objective, seed: int):
    """The foundation under the LM head of `objective`, and "pretrained" or "fresh": a checkpoint
    without that head (e.g. a bare `BertModel` sentence encoder) gets a newly initialised one,
    drawn after `torch.manual_seed(seed)` (BERT's MLM head: dense + LayerNorm + decoder tied to
    the input embeddings + bias), so continued pretraining starts from the foundation's encoder
    and a reproducible head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    torch.manual_seed(seed)
    model, info = cls.from_pretrained(str(d), output_loading_info=True)
    head = "fresh" if any(not k.startswith(model.base_model_prefix + ".") for k in info["missing_keys"]) \
        else "pretrained"
    missing_body = [k for k in info["missing_keys"] if k.startswith(model.base_model_prefix + ".")]
    if missing_body:
        raise StageError(f"{d}: the foundation's weights lack {missing_body[:5]} of {type(model).__name__}")
    return model, head


def has_lm_head(config, objective: Objective) -> bool:
    """Whether the saved architecture carries the LM head of `objective` (e.g. BertForMaskedLM)."""
    arch = (config.architectures or [""])[0]
    return arch.endswith("MaskedLM" if objective == "mlm" else ("CausalLM", "LMHeadModel"))


def open_foundation(d: Path, objective: Objective, tok, tok_dir: Path):
    """(record, transformers config) of the foundation in `d`, after the checks that refuse it
    before any training: none fetched, an objective its architecture cannot serve, a tokenizer
    (`tok`, from `tok_dir`) that is not its own."""
    from transformers import AutoConfig, AutoTokenizer

    found = read_foundation(d)
    if found is None:
        raise StageError(f"{d}: pretrain.init is 'foundation' but the download stage fetched none "
                         "(download.foundation is null)")
    fconfig = AutoConfig.from_pretrained(str(d))
    check_objective(fconfig, objective, f"{found['name']} ({d}/config.json)")
    check_tokenizer(tok, tok_dir, AutoTokenizer.from_pretrained(str(d)), d, fconfig.vocab_size)
    return found, fconfig


def foundation_model(d: Path, objective: Objective, seed: int, fconfig, train: bool):
    """The foundation to train (under the objective's LM head: "pretrained" or "fresh") or to use
    as it is ("none" when it has no such head: then the bare `AutoModel`)."""
    if train or has_lm_head(fconfig, objective):
        return load_foundation(d, objective, seed)
    from transformers import AutoModel
    return AutoModel.from_pretrained(str(d)), "none"


def foundation_entry(found: dict) -> dict:
    """What the pretrain metrics record of the foundation."""
    keys = ("name", "revision", "sha256", "source", "subdir", "architecture", "model_type",
            "vocab_size", "hidden_size", "layers")
    return {k: found.get(k) for k in keys}


def foundation_tags(found: dict | None, head: str | None) -> dict[str, Any]:
    """MLflow tags: the init, and the foundation's name, revision and sha256."""
    if found is None:
        return {"init": "scratch"}
    return {"init": "foundation", "foundation.name": found["name"], "lm_head": head,
            "foundation.revision": found["revision"], "foundation.sha256": found["sha256"]}
