"""Saved fine-tuned models (no CLI): where the pipeline's models meet other clients.

In:  a trained classifier (a transformers model, or a peft wrapper of one), its tokenizer, its
     registry entry and what the card reports; or a saved model directory.
Out: `save_classifier` (a directory that plain Hugging Face clients load and that predicts
     exactly as the pipeline's evaluation did), `check_weights`, `read_meta`, `load_classifier`,
     `predict_ids` / `classify` (the pipeline's one prediction path) and `load_backbone_as_lm`.

The layout follows the strategy's `artifact` (ptf.models.strategies):
  model            an HF directory: `AutoModelForSequenceClassification`, `pipeline(...)`
  remote_code      bottleneck adapters (ptf.models.adapters.export_hf): an HF directory whose
                   model class ships beside the weights as remote code
                   (`modeling_bottleneck_adapters.py`), so plain clients load it with
                   `trust_remote_code=True` (the one strategy that needs it: no library carries a
                   bottleneck adapter for transformers 5), plus the adapter-only tensors
  adapter          the peft adapter (`adapter_config.json`, `adapter_model.safetensors`) and, in
                   `base/`, the classifier it applies to (pretrained backbone, this task's labels):
                   `adapter_config.json` names `base/` by its path from the repository root, so
                   `AutoPeftModelForSequenceClassification` (and, for LoRA, the transformers Auto
                   class and `pipeline`) load it from there
  adapter+merged   the adapter as above, plus `merged/`: LoRA folded into plain weights (an HF
                   directory like `model`)
Every directory holds the tokenizer (its `model_max_length` is the `max_length` the pipeline
truncated to, its padding side the one it trained with), a model card `README.md` and
`finetune_meta.json` (how this pipeline reloads it).

Predictions run each text without padding (texts of equal length are batched together), which
is exactly what a client calling the model on one text computes: with padding, the rotary
distance between prompt-tuning's soft tokens and the text, or float rounding, could depend on
the other texts of the batch.
"""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ptf.common.cli import StageError
from ptf.models.card import model_card
from ptf.models.lm import pretrained_lm
from ptf.models.pooling import POOLINGS, pooled_logits
from ptf.models.strategies import REGISTRY, check_strategy, new_classifier, unwrap_hf

META_FILE = "finetune_meta.json"       # beside every saved model: how to load it
CARD_FILE = "README.md"                # the Hugging Face model card
BASE_DIR, MERGED_DIR = "base", "merged"
PRETRAINED_REMEDY = ("restore it from the DVC cache with `dvc checkout data/models/pretrained`, or "
                     "retrain it with `dvc repro -f pretrain`")


class ArtifactMeta(BaseModel):
    """`finetune_meta.json`: what this pipeline needs to reload and describe a saved model."""
    model_config = ConfigDict(extra="allow", frozen=True)

    strategy: str
    task: str
    label_names: list[str]
    pooling: str
    peft: bool
    artifact: Literal["model", "remote_code", "adapter", "merged"]
    pretrained_dir: str
    max_length: int
    padding_side: Literal["left", "right"]
    seed: int | None = None
    lr: float | None = None


def remedy(model_dir: Path) -> str:
    """How to get a good copy of `model_dir` back: the DVC output and stage that wrote it."""
    parts = Path(model_dir).parts
    if "finetuned" in parts and len(parts) > parts.index("finetuned") + 2:
        i = parts.index("finetuned")
        task, strategy = parts[i + 1], parts[i + 2]
        out = Path(*parts[:i + 3])
        return (f"restore it with `dvc checkout {out}` or rebuild it with "
                f"`dvc repro -f finetune@{task}-{strategy}`")
    return (f"restore it with `dvc checkout {model_dir}` or rebuild it with `dvc repro -f` of "
            "the stage that wrote it")


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
    """The validated `finetune_meta.json` of a saved model, as a dict. A missing meta file or
    model card, bad JSON, a missing key, or a strategy / pooling no registry knows: one
    `StageError` naming the file and the remedy."""
    model_dir = Path(model_dir)
    f = model_dir / META_FILE
    for need in (f, model_dir / CARD_FILE):
        if not need.is_file():
            raise StageError(f"{need}: missing; not a complete fine-tuned model directory; "
                             f"{remedy(model_dir)}")
    try:
        meta = ArtifactMeta.model_validate(json.loads(f.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as e:
        first = str(e).splitlines()[0] if isinstance(e, json.JSONDecodeError) else \
            "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise StageError(f"{f}: invalid ({first}); {remedy(model_dir)}") from None
    if meta.strategy not in REGISTRY:
        raise StageError(f"{f}: unknown strategy {meta.strategy!r} (known: {', '.join(REGISTRY)}); "
                         f"{remedy(model_dir)}")
    if meta.pooling not in POOLINGS:
        raise StageError(f"{f}: unknown pooling {meta.pooling!r} (known: {', '.join(POOLINGS)}); "
                         f"{remedy(model_dir)}")
    return meta.model_dump()


# --------------------------------------------------------------------------- saving

def client_tokenizer(tokenizer, max_length: int, padding_side: str):
    """A copy of `tokenizer` that a plain client uses as the pipeline did: `truncation=True`
    cuts at `max_length`, batches pad on `padding_side`."""
    tok = copy.deepcopy(tokenizer)
    # `save_pretrained` writes the init kwargs (with their current values): padding_side is
    # not one of them unless put there
    tok.init_kwargs.update(model_max_length=max_length, padding_side=padding_side)
    tok.model_max_length, tok.padding_side = max_length, padding_side
    return tok


def _describe(dest: Path, publish: Path, tokenizer, meta: dict[str, Any],
              results: dict[str, Any] | None, train: dict[str, Any] | None) -> None:
    """Tokenizer, model card and `finetune_meta.json` beside the weights in `dest`."""
    tokenizer.save_pretrained(str(dest))
    card = model_card(meta, REGISTRY[meta["strategy"]], results, train, publish)
    (dest / CARD_FILE).write_text(card, encoding="utf-8")
    (dest / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_classifier(clf, tokenizer, dest: Path, meta: dict[str, Any],
                    results: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                    publish: Path | None = None) -> None:
    """Write `clf` to `dest` in its strategy's layout (module docstring). `meta` is the
    `ArtifactMeta` of it (without `artifact`, `peft`), `results` and `train` what its card
    reports (ptf.models.card; empty: "not recorded"); `publish` is where `dest` will live once
    renamed into place (the adapter names its `base/` by that path)."""
    entry = check_strategy(meta["strategy"])
    dest, publish = Path(dest), Path(publish or dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = client_tokenizer(tokenizer, meta["max_length"], meta["padding_side"])
    kind = "adapter" if entry.peft is not None else entry.artifact
    meta = ArtifactMeta(**{**meta, "peft": entry.peft is not None,
                           "artifact": kind}).model_dump()
    if kind == "remote_code":
        from ptf.models.adapters import export_hf
        export_hf(clf, dest)
    elif entry.peft is None:
        clf.save_pretrained(str(dest))
    else:
        # the classifier the adapter applies to: the frozen pretrained backbone and a head of
        # this task's shape (its values do not matter: peft saves the trained head and puts it
        # back); seeded on a forked RNG so the file is reproducible and training unaffected
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = new_classifier(Path(meta["pretrained_dir"]), meta["label_names"],
                                  pooling=meta["pooling"])
        base.save_pretrained(str(dest / BASE_DIR))
        # transformers' pipeline(model=<adapter dir>) takes the tokenizer from the base it follows
        tok.save_pretrained(str(dest / BASE_DIR))
        # peft reads the base's config while saving: name the copy being written, then the
        # place it is published at
        clf.peft_config["default"].base_model_name_or_path = str(dest / BASE_DIR)
        clf.save_pretrained(str(dest))
        adapter_config = dest / "adapter_config.json"
        conf = json.loads(adapter_config.read_text())
        # peft writes target_modules from a set, in hash-randomised order: sorted, the file (and
        # DVC's hash of the model) is the same from run to run
        if isinstance(conf.get("target_modules"), list):
            conf["target_modules"] = sorted(conf["target_modules"])
        adapter_config.write_text(json.dumps(
            {**conf, "base_model_name_or_path": str(publish / BASE_DIR)}, indent=2, sort_keys=True) + "\n")
    _describe(dest, publish, tok, meta, results, train)
    if entry.merge is not None:
        merged = entry.merge(copy.deepcopy(clf))
        merged.save_pretrained(str(dest / MERGED_DIR))
        _describe(dest / MERGED_DIR, publish / MERGED_DIR, tok,
                  {**meta, "peft": False, "artifact": "merged", "merged_from": entry.name},
                  results, train)


# --------------------------------------------------------------------------- loading

def load_classifier(model_dir: Path, pretrained_dir: Path | None = None, merge: bool = False):
    """A saved fine-tuned classifier: `AutoModelForSequenceClassification` for full-weight
    strategies, a `PeftModel` on the saved `base/` for adapters; `merge=True` folds a mergeable
    adapter (LoRA) into plain transformers weights. `pretrained_dir` is not needed any more (the
    base is saved beside the adapter); it is accepted so existing callers keep working."""
    from transformers import AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    check_weights(model_dir, remedy(model_dir))
    if meta["artifact"] == "remote_code":
        # the model class is ptf's own adapter module (imported: registered with the Auto
        # classes), not the copy of it in the directory: nothing from disk is executed
        import ptf.models.adapter_modeling  # noqa: F401
        return AutoModelForSequenceClassification.from_pretrained(model_dir)
    if not meta["peft"]:
        return AutoModelForSequenceClassification.from_pretrained(model_dir)
    from peft import PeftModel
    check_weights(model_dir / BASE_DIR, remedy(model_dir))
    base = AutoModelForSequenceClassification.from_pretrained(model_dir / BASE_DIR)
    model = PeftModel.from_pretrained(base, model_dir)
    entry = REGISTRY[meta["strategy"]]
    if merge and entry.merge is not None:
        return entry.merge(model)
    return model


def load_backbone_as_lm(finetuned_dir: Path, pretrained_dir: Path):
    """The fine-tuned backbone under the PRETRAINED LM head (an untied copy of the pretrained
    output layer), as `AutoModelForCausalLM` (or MaskedLM): for measuring forgetting.
    LoRA, DoRA and OSF are merged first; prompt tuning leaves the backbone as pretrained (the soft
    prompt is not part of the LM input); bottleneck adapters are inserted into the pretrained LM's
    backbone with their trained weights (the backbone they adapt, under the pretrained head)."""
    if read_meta(finetuned_dir)["artifact"] == "remote_code":
        from ptf.models.adapters import load_adapters
        check_weights(finetuned_dir, remedy(Path(finetuned_dir)))
        lm = load_adapters(pretrained_lm(pretrained_dir), finetuned_dir, head=False)
        for p in lm.parameters():
            p.requires_grad_(False)
        return lm.eval()
    clf = unwrap_hf(load_classifier(finetuned_dir, pretrained_dir, merge=True))
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


# --------------------------------------------------------------------------- predicting

@torch.no_grad()
def predict_ids(model, ids: list[list[int]], batch_size: int = 64, device=None) -> list[int]:
    """Predicted class ids for tokenized texts, in input order. Each text runs unpadded (texts
    of equal length share a batch), as a client calling the model on that text alone."""
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    pred = [0] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for _, same_len in itertools.groupby(order, key=lambda i: len(ids[i])):
        same_len = list(same_len)
        for k in range(0, len(same_len), batch_size):
            chunk = same_len[k:k + batch_size]
            x = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=device)
            logits = pooled_logits(model, x, torch.ones_like(x))
            for i, p in zip(chunk, logits.argmax(-1).tolist()):
                pred[i] = p
    return pred


def classify(model, tokenizer, texts: list[str], max_length: int | None = None,
             batch_size: int = 64) -> list[int]:
    """Predicted class ids for raw texts, truncated to `max_length` tokens (default: the saved
    tokenizer's `model_max_length`, the pipeline's `finetune.data.max_length`)."""
    enc = tokenizer(list(texts), truncation=True,
                    max_length=max_length or tokenizer.model_max_length)["input_ids"]
    # a text with no tokens is one pad token, as the task loader gives it (ptf.data.tasks)
    return predict_ids(model, [x or [tokenizer.pad_token_id] for x in enc], batch_size)
