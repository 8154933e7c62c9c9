"""The model card (`README.md`) of a saved fine-tuned model (no CLI).

In:  the model's `finetune_meta.json` fields, its strategy's registry entry, this seed's results
     and its training parameters, and the path the directory is published at.
Out: `model_card(...)`: Markdown with the YAML front matter the Hugging Face Hub reads
     (`base_model`, `library_name`, `pipeline_tag`, `tags`, `metrics`, `model-index` with this
     seed's results; rendered by `huggingface_hub.ModelCardData`), then the labels, results,
     training parameters and a "how to load" snippet that uses only transformers / peft.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ptf.models.pooling import POOLINGS
from ptf.models.strategies import Strategy


def hub_id(path: str) -> str | None:
    """`path` if it names a Hub repository (not a local directory), else None: the Hub reads
    `base_model` as a repository id, and a local path there is invalid metadata."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return None if Path(path).exists() else path


def _front_matter(meta: dict[str, Any], entry: Strategy, results: dict[str, Any], name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    seed = meta.get("seed")

    def result(metric: str, split: str, value: float, label: str, **args) -> EvalResult:
        return EvalResult(task_type="text-classification", task_name="Text Classification",
                          dataset_type=meta["task"], dataset_name=meta["task"],
                          dataset_split=split, metric_type=metric, metric_value=float(value),
                          metric_name=f"{label} (seed {seed})", metric_args=args or None)

    evals = [result("accuracy", "test", results["test_accuracy"], "Test accuracy"),
             result("f1", "test", results["test_macro_f1"], "Test macro-F1", average="macro"),
             result("accuracy", "validation", results["val_accuracy"], "Validation accuracy")
             ] if results else None
    tags = ["text-classification", "pretrain-finetune-forgetting", meta["strategy"], meta["task"]]
    if meta["artifact"] == "merged":
        tags.append(f"merged-{meta.get('merged_from')}")
    data = ModelCardData(
        base_model=None if entry.init == "random" else hub_id(meta["pretrained_dir"]),
        library_name="peft" if meta["peft"] else "transformers",
        pipeline_tag="text-classification", tags=tags, metrics=["accuracy", "f1"],
        model_name=name if evals else None, eval_results=evals)
    return data.to_yaml()


def _how_to_load(meta: dict[str, Any], path: str) -> str:
    if meta["artifact"] == "remote_code":
        return f'''```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

clf = pipeline("text-classification", model="{path}", truncation=True, trust_remote_code=True)
clf(["a text to classify"])          # [{{'label': ..., 'score': ...}}]

tok = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForSequenceClassification.from_pretrained("{path}", trust_remote_code=True)
model(**tok(["a text to classify"], truncation=True, return_tensors="pt")).logits.argmax(-1)
```

`trust_remote_code=True` is needed, and only for this strategy: no library carries bottleneck
adapters for transformers 5 (peft has none; the `adapters` package pins transformers 4), so the
model class ships in this directory as `modeling_bottleneck_adapters.py` (read it before you trust
it: the base architecture plus a residual down-project / nonlinearity / up-project module after
each adapted sublayer). Without the flag transformers refuses to load it. The adapter and head
tensors alone are in `bottleneck_adapters.safetensors` (+ `bottleneck_adapters.json`).'''
    if not meta["peft"]:
        return f'''```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

clf = pipeline("text-classification", model="{path}", truncation=True)
clf(["a text to classify"])          # [{{'label': ..., 'score': ...}}]

tok = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForSequenceClassification.from_pretrained("{path}")
model(**tok(["a text to classify"], truncation=True, return_tensors="pt")).logits.argmax(-1)
```'''
    snippet = f'''```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer, pipeline

model = AutoPeftModelForSequenceClassification.from_pretrained("{path}")
tok = AutoTokenizer.from_pretrained("{path}")
clf = pipeline("text-classification", model=model, tokenizer=tok, truncation=True)
clf(["a text to classify"])          # [{{'label': ..., 'score': ...}}]
```

The adapter applies to the classifier in `base/` (the pretrained backbone with this task's
labels); `adapter_config.json` names it by its path from the repository root, so run this from
there (or set `base_model_name_or_path` to where `base/` lives, e.g. a Hub repository).'''
    if meta["strategy"] in ("lora", "dora"):
        kind = "LoRA" if meta["strategy"] == "lora" else "DoRA (LoRA with `use_dora`)"
        snippet += (f'\n\ntransformers loads a {kind} adapter by itself too: '
                    f'`pipeline("text-classification", model="{path}", truncation=True)`; '
                    f'`{path}/merged` is the same model with the adapter folded into plain weights.')
    elif meta["strategy"] == "osf":
        snippet += (f"\n\nOSF saves only its trained singular factors and the head; peft recomputes "
                    f"the frozen ones from `base/` at load time. `{path}/merged` is the same model "
                    f"folded into plain weights (transformers alone, no peft).")
    else:
        snippet += ("\n\ntransformers alone cannot load a prompt-tuning adapter (its PEFT "
                    "integration has no prompt learning): use peft as above. Classify texts one "
                    "at a time (the pipeline's default `batch_size=1`): padding would move the "
                    "text away from the soft prompt (rotary positions) and change predictions.")
    return snippet


def model_card(meta: dict[str, Any], entry: Strategy, results: dict[str, Any] | None,
               train: dict[str, Any] | None, path: Path) -> str:
    """The card of one saved model (module docstring). `results`: this seed's val/test accuracy
    and macro-F1 and split sizes; `train`: the training parameters to list (either may be
    empty: "not recorded")."""
    results, train = results or {}, train or {}
    seed = meta.get("seed")
    name = f"{meta['task']}-{meta['strategy']}-seed{seed}"
    labels = "\n".join(f"| {i} | {n} |" for i, n in enumerate(meta["label_names"]))
    params = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in train.items()) or "| (not recorded) | |"
    table = (f"""| split | examples | accuracy | macro-F1 |
|---|---|---|---|
| validation | {results['n_validation']} | {results['val_accuracy']:.4f} | {results['val_macro_f1']:.4f} |
| test | {results['n_test']} | {results['test_accuracy']:.4f} | {results['test_macro_f1']:.4f} |"""
             if results else "Not recorded.")
    merged = (f" The adapter merged into the weights (from `{Path(path).parent}`)."
              if meta["artifact"] == "merged" else "")
    base_note = ("" if entry.init == "random" or hub_id(meta["pretrained_dir"]) else
                 " (a local directory: when you push this model, push that one too and set "
                 "`base_model` in the front matter to its Hub id)")
    if entry.init == "random":
        base_note = " (its architecture only: the weights start at random)"
    return f"""---
{_front_matter(meta, entry, results, name)}
---

# {name}

A `{meta['task']}` classifier fine-tuned by the pretrain → fine-tune → forgetting pipeline
(DVC stage `finetune@{meta['task']}-{meta['strategy']}`) from `{meta['pretrained_dir']}`{base_note}.
Strategy `{meta['strategy']}`: {entry.doc}.{merged}

## Labels

| id | label |
|---|---|
{labels}

## Results (seed {seed}, weights of the best validation step)

{table}

## Training

| parameter | value |
|---|---|
{params}

## How to load

{_how_to_load(meta, str(path))}

Inputs: this project's evaluation cut every text to {meta['max_length']} tokens, the tokenizer's
`model_max_length`; pass `truncation=True` as above, because the transformers text-classification
pipeline does not truncate unless asked. Pooling `{meta['pooling']}`: {POOLINGS[meta['pooling']].doc},
done by the Hugging Face head itself, so these calls give exactly the predictions recorded in
this project's metrics (`test_predictions`). The tokenizer pads on the {meta['padding_side']}.
"""
