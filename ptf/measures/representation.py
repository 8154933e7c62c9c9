"""Forgetting that does not need an LM head (no CLI): representation drift, probe retention, bits/byte.

Many released encoders ship without their pretraining head, so the drift of the pretraining loss
cannot be measured for them. Two measures work for every model (Kornblith et al. 2019; the
probing protocol of Alain & Bengio 2016), and a unit that makes LM losses comparable across
tokenizers:

In:  a model (any `transformers` model that returns `hidden_states`) and batches of held-out
     token ids; or feature matrices (numpy, examples x dims) and integer labels.
Out:
  - `layer_features(model, batches, pooling)`: per layer (embeddings first), the hidden states
    of every example, mean-pooled over its non-pad tokens (`mean`) or every non-pad token (`tokens`).
  - `linear_cka(x, y)`: linear centred kernel alignment of two feature matrices over the same
    examples, in [0, 1], invariant to rotation and isotropic scaling (1: the same geometry);
    `cka_per_layer(a, b)` applies it layer by layer (foundation vs fine-tuned on the same text).
  - `fit_probe` / `probe_accuracy` / `probe_retention`: a multinomial logistic regression on
    frozen, standardised features (L-BFGS, L2, deterministic), trained on a task's train split
    and scored on a held-out split of it, for the model before and after fine-tuning on ANOTHER
    task: {before, after, lost = before - after, retention = after / before}. The pipeline
    scores it on the VALIDATION split (`ptf.measures.representation_arms`): the test split is
    read once, by the final evaluation.
  - `bits_per_byte(nats_per_token, n_tokens, n_bytes)` and `utf8_bytes(tokenizer, rows)`: a loss
    in nats per token as bits per UTF-8 byte of the text the tokens stand for, so that models
    with different tokenizers can be compared.
Hand-written: no maintained library offers these for HF models in a form the pipeline can pin.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch


# ----------------------------------------------------------------------------- features
@torch.no_grad()
def layer_features(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   pooling: Literal["mean", "tokens"] = "mean") -> list[np.ndarray]:
    """Hidden states of every layer (index 0: the embeddings) for `(input_ids, attention_mask)`
    batches, as float64 arrays: (examples, hidden) with `mean`, (non-pad tokens, hidden) with
    `tokens`."""
    model.eval()
    device = next(model.parameters()).device
    per_layer: list[list[np.ndarray]] = []
    for ids, mask in batches:
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        m = mask.to(device).unsqueeze(-1).to(out.hidden_states[0].dtype)
        for i, h in enumerate(out.hidden_states):
            if pooling == "mean":
                f = (h * m).sum(1) / m.sum(1).clamp(min=1)
            else:
                f = h[mask.to(device).bool()]
            if i == len(per_layer):
                per_layer.append([])
            per_layer[i].append(f.double().cpu().numpy())
    return [np.concatenate(x) for x in per_layer]


# ----------------------------------------------------------------------------- CKA
def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc column-centred.
    NaN when either side has no variance."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"linear_cka needs two (n, d) matrices over the same n >= 2 examples, "
                         f"got {x.shape} and {y.shape}")
    x, y = x - x.mean(0), y - y.mean(0)
    if len(x) < max(x.shape[1], y.shape[1]):  # fewer examples than dims: the n x n Gram form
        k, l_ = x @ x.T, y @ y.T
        num, den = (k * l_).sum(), np.linalg.norm(k) * np.linalg.norm(l_)
    else:
        num = np.linalg.norm(y.T @ x) ** 2
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else math.nan


def cka_per_layer(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[float]:
    """`linear_cka` of each layer of two models over the same examples."""
    if len(a) != len(b):
        raise ValueError(f"the models have {len(a)} and {len(b)} layers of features")
    return [linear_cka(x, y) for x, y in zip(a, b)]


# ----------------------------------------------------------------------------- probes
@dataclass
class Probe:
    mean: np.ndarray
    std: np.ndarray
    weight: torch.Tensor   # (dims, classes)
    bias: torch.Tensor     # (classes,)

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = torch.from_numpy((np.asarray(x, dtype=np.float64) - self.mean) / self.std)
        return (z @ self.weight + self.bias).argmax(-1).numpy()


def fit_probe(x: np.ndarray, y: Sequence[int], n_classes: int, l2: float = 1e-3,
              max_iter: int = 200) -> Probe:
    """Multinomial logistic regression on standardised features (float64 L-BFGS from zeros:
    deterministic); `l2` is the weight penalty per example."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    z = torch.from_numpy((x - mean) / std)
    t = torch.as_tensor(list(y), dtype=torch.long)
    w = torch.zeros(z.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, t) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(mean, std, w.detach(), b.detach())


def probe_accuracy(probe: Probe, x: np.ndarray, y: Sequence[int]) -> float:
    return float((probe.predict(x) == np.asarray(list(y))).mean())


def probe_retention(before: tuple[np.ndarray, Sequence[int], np.ndarray, Sequence[int]],
                    after: tuple[np.ndarray, Sequence[int], np.ndarray, Sequence[int]],
                    n_classes: int, l2: float = 1e-3) -> dict[str, float]:
    """A probe trained and tested on each model's frozen features of the same task:
    `(train_x, train_y, test_x, test_y)` before and after fine-tuning on another task."""
    acc = []
    for tr_x, tr_y, te_x, te_y in (before, after):
        acc.append(probe_accuracy(fit_probe(tr_x, tr_y, n_classes, l2), te_x, te_y))
    b, a = acc
    return {"before": b, "after": a, "lost": b - a, "retention": a / b if b > 0 else math.nan}


# ----------------------------------------------------------------------------- bits per byte
def utf8_bytes(tokenizer, rows: Iterable[Sequence[int]]) -> int:
    """UTF-8 bytes of the text that token-id rows decode to (special tokens left out)."""
    return sum(len(tokenizer.decode(list(r), skip_special_tokens=True).encode("utf-8")) for r in rows)


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """A mean loss in nats per token over `n_tokens` targets, as bits per byte of their text."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return nats_per_token * n_tokens / (n_bytes * math.log(2))
