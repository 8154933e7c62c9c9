"""Saved fine-tuned models (no CLI): where the pipeline's models meet other clients.

In:  a model directory written by `ptf.training.finetuning.save_model` (an HF directory, or a
     peft adapter beside the pretrained base) with its `finetune_meta.json`.
Out: `check_weights` (safetensors that open whole, else a `StageError` naming the file and the
     remedy), `read_meta`, `load_classifier`, `classify` (predicted class ids for raw texts),
     and `load_backbone_as_lm` (the fine-tuned backbone under the pretrained LM head, for
     measuring forgetting).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ptf.common.cli import StageError
from ptf.models.lm import pretrained_lm
from ptf.models.strategies import labels_kwargs, pooled_logits, unwrap_hf

META_FILE = "finetune_meta.json"       # beside every saved model: how to load it
PRETRAINED_REMEDY = ("restore it from the DVC cache with `dvc checkout data/models/pretrained`, or "
                     "retrain it with `dvc repro -f pretrain`")


def check_weights(model_dir: Path, remedy: str) -> None:
    """A model directory must hold safetensors weights that open whole (header and every byte it
    declares): a truncated or corrupt file is a `StageError` naming the file and `remedy`, not a
    deserialisation error deep in `from_pretrained`."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise StageError(f"{model_dir}: no *.safetensors weights; {remedy}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: all mean "bad file"
            raise StageError(f"{f}: truncated or corrupt safetensors file ({e}); {remedy}") from None


def read_meta(model_dir: Path) -> dict[str, Any]:
    f = Path(model_dir) / META_FILE
    if not f.is_file():
        raise StageError(f"{f}: missing; not a fine-tuned model directory")
    return json.loads(f.read_text())


def load_classifier(model_dir: Path, pretrained_dir: Path | None = None, merge: bool = False):
    """A saved fine-tuned classifier: `AutoModelForSequenceClassification` for full-weight
    strategies, `PeftModel` (on the pretrained base) for lora/prompt_tuning; `merge=True` merges
    LoRA into the weights and returns the plain transformers model."""
    from transformers import AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    check_weights(model_dir, f"restore it with `dvc checkout {model_dir}` or rebuild it with "
                             "`dvc repro -f` of the stage that wrote it")
    if not meta["peft"]:
        return AutoModelForSequenceClassification.from_pretrained(model_dir)
    from peft import PeftModel
    base_dir = Path(pretrained_dir or meta["pretrained_dir"])
    base = AutoModelForSequenceClassification.from_pretrained(
        base_dir, **labels_kwargs(meta["label_names"]))
    base.config.classifier_pooling = meta["pooling"]
    model = PeftModel.from_pretrained(base, model_dir)
    if merge and meta["strategy"] == "lora":
        return model.merge_and_unload()
    return model


def load_backbone_as_lm(finetuned_dir: Path, pretrained_dir: Path):
    """The fine-tuned backbone under the PRETRAINED LM head (an untied copy of the pretrained
    output layer), as `AutoModelForCausalLM` (or MaskedLM): for measuring forgetting.
    LoRA is merged first; prompt tuning leaves the backbone as pretrained (the soft prompt is not
    part of the LM input)."""
    clf = load_classifier(finetuned_dir, pretrained_dir, merge=True)
    clf = unwrap_hf(clf)
    lm = pretrained_lm(pretrained_dir)
    target = getattr(lm, lm.base_model_prefix)
    missing, unexpected = target.load_state_dict(clf.base_model.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise StageError(f"{finetuned_dir}: backbone does not match the pretrained LM "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.eval()


@torch.no_grad()
def classify(model, tokenizer, texts: list[str], max_length: int = 128) -> list[int]:
    """Predicted class ids for raw texts (the pooling recorded in the model's config)."""
    model.eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return pooled_logits(model, enc["input_ids"], enc["attention_mask"]).argmax(-1).tolist()

