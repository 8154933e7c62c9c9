"""The class logits of an HF Llama sequence classifier computed from its own parameters on a
packed batch, with less work than its HF forward and the same function (no CLI): what
`ptf.training.batched` trains and evaluates a sweep's configurations with.

In:  a `LlamaForSequenceClassification` (`check_batchable` says which qualify), `Packed`
     batches (`Packed.of(padded batch)`, `pack_split(split)`).
Out: `PackedLlama(model).logits(p)` (S, n_labels) and `.pooled(p)` (S, hidden): the model's own
     `.logits` / final-norm hidden state at the pooled token, up to float rounding, gradients
     reaching its parameters as through the model; `predict` on a packed split;
     `FrozenFeatures`, a frozen backbone's features computed once per text.

Less work: padding (the batch is packed to its real tokens; attention runs per sequence on a
right-padded view with a causal mask; rotary positions are each token's column in its padded
batch, HF's positions), the top layer's work for tokens other than the pooled one (keys and
values of every token are needed; the query, attention output and MLP only at the pooled
token), and HF's per-call mask building and wrappers.

Measured and not taken: stacking K models' weights into batched products (`torch.bmm`, one
pass for the runs that share a batch) ran 9 % faster per forward-backward at K = 4 but no faster
over a whole `fit_together` (1.77 against 1.70 CPU-s a configuration, interleaved); the GEMMs
already run at ~80 GFLOP/s a core here, and stacking adds weight copies. `torch.func.vmap` has
no batching rule for CPU attention.

Scope: float32, no dropout, no biases, SiLU MLP, pooling at the last non-pad token (the HF
head's). A text made of pad ids only is pooled at its first token, as an unpadded HF call
pools it. peft LoRA on the projections (no dropout, no DoRA, no LoRA bias) runs as peft runs it
(`base(x) + B(A(x)) * scaling`); other peft wrappers (prompt tuning, OSF, DoRA) are refused.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptf.data.tasks import Split, collate
from ptf.models.strategies import unwrap_hf


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft_reason(model) -> str | None:
    """None unless `model` is a peft wrapper this forward does not compute: only LoRA on the
    attention / MLP projections, without dropout, DoRA or LoRA bias."""
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(model, PeftModel):
        return None
    for name, cfg in model.peft_config.items():
        kind = getattr(cfg.peft_type, "value", cfg.peft_type)
        if kind != "LORA":
            return f"peft {kind} (adapter {name!r}) is not computed by the packed forward"
        if cfg.use_dora or cfg.lora_dropout or getattr(cfg, "lora_bias", False) or cfg.bias != "none":
            return f"peft LoRA with DoRA, dropout or biases (adapter {name!r})"
    for name, mod in model.get_base_model().named_modules():
        if hasattr(mod, "lora_A") and not (isinstance(mod, LoraLinear)
                                           and name.rsplit(".", 1)[-1] in PROJECTIONS):
            return f"a LoRA layer outside the projections ({name})"
    return None


def _linear(x: torch.Tensor, mod) -> torch.Tensor:
    """`mod(x)` for a bias-free nn.Linear, or a peft LoRA layer as peft computes it (its base
    layer, + B(A(x)) * scaling for each active adapter)."""
    base = getattr(mod, "base_layer", None)
    if base is None:
        return F.linear(x, mod.weight)
    out = F.linear(x, base.weight)
    for name in mod.active_adapters:
        if name in mod.lora_A:
            lora = F.linear(F.linear(x, mod.lora_A[name].weight), mod.lora_B[name].weight)
            out = out + lora * mod.scaling[name]
    return out


def check_batchable(models: list) -> str | None:
    """None if `models` can share a pass, else the reason (one line)."""
    if not models:
        return "no models"
    for m in models:
        reason = _peft_reason(m)
        if reason:
            return reason
    models = [unwrap_hf(m) for m in models]

    def arch(m) -> dict:    # where the weights came from (one backbone or another) does not matter
        return {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}

    c0, a0 = models[0].config, arch(models[0])
    for m in models:
        if type(m).__name__ != "LlamaForSequenceClassification":
            return f"{type(m).__name__} is not a plain LlamaForSequenceClassification"
        if arch(m) != a0:
            return "the models' configs differ"
    bad = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
           "attention_dropout": 0.0}
    for key, want in bad.items():
        if getattr(c0, key, want) != want:
            return f"config.{key}={getattr(c0, key)!r} (needs {want!r})"
    if getattr(c0, "pretraining_tp", 1) != 1 or c0.pad_token_id is None:
        return "pretraining_tp != 1 or no pad token id"
    if any(p.dtype != torch.float32 for m in models for p in m.parameters()):
        return "parameters are not float32"
    return None


# --------------------------------------------------------------------------- packing

@dataclass
class Packed:
    """One padded batch as its real tokens only (N rows, sequence after sequence), and the
    index maps between those rows and a right-padded attention view (S sequences x T)."""
    ids: torch.Tensor        # (N,) token ids
    pos: torch.Tensor        # (N,) rotary position: the token's column in its padded batch
    to_view: torch.Tensor    # (S*T,) row of each attention slot (past a sequence's end: its last)
    to_rows: torch.Tensor    # (N,) attention slot of each row
    last: torch.Tensor       # (S,) row of each sequence's pooled token
    last_t: torch.Tensor     # (S,) that token's index in its sequence
    labels: torch.Tensor     # (S,)
    S: int
    T: int

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor], pad_id: int) -> "Packed":
        """`batch`: input_ids, attention_mask (S x T_pad, either padding side), labels."""
        m = batch["attention_mask"].bool()
        n = m.sum(1)
        S, T = m.shape[0], int(n.max())
        rows, cols = m.nonzero(as_tuple=True)                # row-major: sequence after sequence
        ids = batch["input_ids"][rows, cols]
        start = torch.cumsum(n, 0) - n                       # row of each sequence's first token
        t = cols - m.long().argmax(1)[rows]                  # index within the sequence
        # slots past a sequence's end repeat its last token: no real query sees them (causal)
        upto = torch.minimum(torch.arange(T)[None, :], (n - 1).clamp(min=0)[:, None])
        to_view = start[:, None] + upto
        # HF's pooled token: the last one that is not the pad id (a text of pad ids: its first)
        nonpad = torch.where(ids != pad_id, torch.arange(len(ids)), -1)
        last = torch.full((S,), -1, dtype=torch.long).scatter_reduce(0, rows, nonpad, "amax")
        last = torch.where(last >= 0, last, start)
        return cls(ids, cols, to_view.flatten(), rows * T + t, last, last - start,
                   batch["labels"], S, T)


# --------------------------------------------------------------------------- the lean forward

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm (float32 models)."""
    return w * F.rms_norm(x, (x.shape[-1],), None, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb on (..., heads, head_dim) with cos/sin (..., 1, head_dim)."""
    h = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((-x[..., h:], x[..., :h]), dim=-1), sin)


class PackedLlama:
    """The class logits of an HF `LlamaForSequenceClassification`, computed from its own
    parameters on a `Packed` batch: real tokens only, and in the top layer only what the pooled
    token needs (keys and values of every token; query, attention output and MLP of the pooled
    token alone). Equal to the model's `.logits` up to float rounding; gradients reach its
    parameters as through the model."""

    def __init__(self, model):
        reason = check_batchable([model])
        if reason:
            raise ValueError(f"cannot run this model packed: {reason}")
        self.model = model = unwrap_hf(model)   # its LoRA layers injected
        c = model.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def _rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (len(pos), 1, head_dim) from the model's own rotary module (tables cached)."""
        n = int(pos.max()) + 1
        if self._rope is None or self._rope[0].shape[0] < n:
            base = self.model.model
            x = base.embed_tokens.weight[:1]
            cos, sin = base.rotary_emb(x, position_ids=torch.arange(n, device=x.device)[None])
            self._rope = (cos[0], sin[0])
        return tuple(t.index_select(0, pos)[:, None, :] for t in self._rope)

    def _view(self, x: torch.Tensor, p: Packed) -> torch.Tensor:
        """(N, heads*hd) rows -> (S, heads, T, hd) attention view."""
        return x.index_select(0, p.to_view).view(p.S, p.T, -1, self.head_dim).transpose(1, 2)

    def logits(self, p: Packed) -> torch.Tensor:
        """(S, n_labels): the HF head's `.logits`."""
        return F.linear(self.pooled(p), self.model.score.weight)

    def pooled(self, p: Packed) -> torch.Tensor:
        """(S, hidden): the final-norm hidden state at each sequence's pooled token."""
        base, hd = self.model.model, self.head_dim
        H, Hkv = self.heads, self.kv_heads
        x = F.embedding(p.ids, base.embed_tokens.weight, base.embed_tokens.padding_idx)
        cos, sin = self._rotary(p.pos)
        layers = list(base.layers)
        for i, layer in enumerate(layers):
            a = layer.self_attn
            h = _rms(x, layer.input_layernorm.weight, self.eps)
            k = self._view(_rotate(_linear(h, a.k_proj).view(-1, Hkv, hd), cos, sin)
                           .flatten(1), p)
            v = self._view(_linear(h, a.v_proj), p)
            if Hkv != H:
                k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
            if i < len(layers) - 1:
                q = _rotate(_linear(h, a.q_proj).view(-1, H, hd), cos, sin).flatten(1)
                o = F.scaled_dot_product_attention(self._view(q, p), k, v, is_causal=True)
                o = o.transpose(1, 2).reshape(p.S * p.T, H * hd).index_select(0, p.to_rows)
            else:        # top layer: the pooled token's query only, over the keys up to it
                q = _rotate(_linear(h.index_select(0, p.last), a.q_proj).view(-1, H, hd),
                            cos.index_select(0, p.last), sin.index_select(0, p.last))
                seen = (torch.arange(p.T)[None, :] <= p.last_t[:, None])[:, None, None, :]
                o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=seen)
                o, x = o.reshape(p.S, H * hd), x.index_select(0, p.last)
            x = x + _linear(o, a.o_proj)
            h = _rms(x, layer.post_attention_layernorm.weight, self.eps)
            f = layer.mlp
            gated = F.silu(_linear(h, f.gate_proj)) * _linear(h, f.up_proj)
            x = x + _linear(gated, f.down_proj)
        return _rms(x, base.norm.weight, self.eps)


# --------------------------------------------------------------------------- whole splits

EVAL_CHUNK = 32     # texts per evaluation chunk: on CPU, 16-32 ran 1.4x faster than 100 (cache)


@dataclass
class PackedSplit:
    """A split as packed chunks of texts of similar length (little attention padding)."""
    chunks: list[Packed]
    order: list[int]                  # split index of each text, chunk after chunk


def pack_split(split: Split, batch_size: int, pad_id: int) -> PackedSplit:
    """`split` sorted by length, `batch_size` texts a chunk, each text at positions 0..L-1
    (unpadded, as `ptf.models.artifacts.predict_ids` runs it)."""
    order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
    chunks = []
    for i in range(0, len(order), batch_size):
        rows = [(split.ids[j], split.labels[j]) for j in order[i:i + batch_size]]
        chunks.append(Packed.of(collate(rows, pad_id, pad_left=False), pad_id))
    return PackedSplit(chunks, order)


@torch.no_grad()
def split_outputs(fn: Callable[[Packed], torch.Tensor], split: PackedSplit) -> torch.Tensor:
    """`fn` of every chunk, rows back in the split's order."""
    out = torch.cat([fn(p) for p in split.chunks])
    return out[torch.argsort(torch.tensor(split.order))]


def predict(net: PackedLlama, split: PackedSplit) -> list[int]:
    """Predicted class ids of `net` on a packed split, in the split's order."""
    net.model.eval()
    return split_outputs(net.logits, split).argmax(-1).tolist()


class FrozenFeatures:
    """The pooled features of a frozen backbone that every run shares (linear probing): each
    text goes through the backbone once, for every run and every step; only heads train."""

    def __init__(self, net: PackedLlama, pad_id: int):
        self.net, self.pad_id = net, pad_id
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    @staticmethod
    def applies(models: list) -> bool:
        """Only the heads train, and every model has the same backbone weights."""
        for m in models:
            if {n for n, p in m.named_parameters() if p.requires_grad} != {"score.weight"}:
                return False
        ref = models[0].model.state_dict()
        return all(torch.equal(v, m.model.state_dict()[k])
                   for m in models[1:] for k, v in ref.items())

    @torch.no_grad()
    def of_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(S, hidden) features of a padded batch, computed for the texts not seen before."""
        keys = [tuple(x[m].tolist())
                for x, m in zip(batch["input_ids"], batch["attention_mask"].bool())]
        new = [i for i, k in enumerate(keys) if k not in self.cache]
        if new:
            sub = {k: v[new] for k, v in batch.items()}
            self.net.model.eval()
            for i, f in zip(new, self.net.pooled(Packed.of(sub, self.pad_id))):
                self.cache[keys[i]] = f
        return torch.stack([self.cache[k] for k in keys])
