"""How a classifier pools its tokens, limited to what the architecture's own HF head does (no CLI).

In:  the `finetune.pooling` value and the backbone's `config.model_type`.
Out: `check_pooling` (a `ConfigError` for a pooling the architecture's Hugging Face head cannot
     do), `apply_pooling` (the config change that makes the HF head pool that way) and
     `pooled_logits` (the class logits, which are the HF model's own `.logits`).

Why only native poolings: a saved model is used by clients that know nothing of this project
(`AutoModelForSequenceClassification`, `pipeline("text-classification")`). They run the HF
head, so a pooling the head does not implement would make them predict differently from the
pipeline's own evaluation, silently. `LlamaForSequenceClassification` (transformers 5: the
generic head) always scores the last non-pad token and `BertForSequenceClassification` the
[CLS] pooler; neither reads any pooling option from its config, so `mean` cannot be saved
faithfully for them without `trust_remote_code` and is refused. ModernBERT and EuroBERT heads
read `config.classifier_pooling`, so `mean` is native there.

  last   the architecture's own head, untouched (Llama: last non-pad token; BERT: [CLS] pooler;
         ModernBERT: its default, [CLS])
  mean   masked mean of the final hidden states, where the head implements it
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ptf.common.config import ConfigError

PoolingName = Literal["last", "mean"]


@dataclass(frozen=True)
class Pooling:
    doc: str
    config: dict[str, Any] = field(default_factory=dict)   # set on the HF config at build time
    model_types: frozenset[str] | None = None               # None: every architecture


POOLINGS: dict[str, Pooling] = {
    "last": Pooling("the architecture's own Hugging Face head (Llama: last non-pad token; "
                    "BERT: [CLS] pooler)"),
    "mean": Pooling("masked mean of the final hidden states",
                    config={"classifier_pooling": "mean"},
                    model_types=frozenset({"modernbert", "eurobert"})),
}


def check_pooling(pooling: str, model_type: str) -> Pooling:
    """The pooling entry, or a `ConfigError` naming `finetune.pooling`, the value and the model
    type when that architecture's HF head cannot pool that way (never a silent difference)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"finetune.pooling: unknown pooling {pooling!r}; known: "
                          f"{', '.join(POOLINGS)}")
    entry = POOLINGS[pooling]
    if entry.model_types is not None and model_type not in entry.model_types:
        raise ConfigError(
            f"finetune.pooling: {pooling!r} cannot be saved faithfully for model type "
            f"{model_type!r}: its Hugging Face sequence-classification head has no {pooling} "
            f"pooling, so AutoModelForSequenceClassification and pipeline() would predict "
            f"differently from the pipeline's evaluation; use 'last' ({pooling!r} is native "
            f"only for: {', '.join(sorted(entry.model_types))})")
    return entry


def apply_pooling(hf_config, pooling: str) -> None:
    """Make the HF head pool as `pooling` (checked for `hf_config.model_type` first)."""
    for key, value in check_pooling(pooling, hf_config.model_type).config.items():
        setattr(hf_config, key, value)


def pooled_logits(model, input_ids, attention_mask, pooling: str | None = None):
    """Class logits (batch, n_labels): the model's own `.logits`, which is what every HF client
    computes (the pooling lives in the head; `pooling` is accepted for callers of the old API)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits
