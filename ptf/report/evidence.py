"""The evidence card of the results page (no CLI): the best fine-tuned model, measured now.

In:  forgetting.json (which arm is best), the pretrained model directory, the chosen fine-tuned
     model directory.
Out: `best_model(...)`, `evidence_card(...) -> dict` (model, tokenizer output, the prediction for
     an example sentence, the failure checks: too long, out of domain; CPU latency per sentence),
     `render_card(...) -> list of Markdown lines`.

Predictions go through the pipeline's own path, `ptf.models.artifacts.load_classifier` and
`classify` (its tokenizer call, truncation and pooling), so the card shows what a user of the
saved model gets.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from ptf.report import prose
from ptf.report.fmt import is_num, num
from ptf.report.workspace import ResultsError

EXAMPLE = "A gripping, beautifully acted film that stays with you long after the credits roll."
OUT_OF_DOMAIN = {
    "code": "def area(r):\n    return 3.14159 * r ** 2  # TODO: use math.pi",
    "German": "Der Zug nach Berlin fährt morgen früh um acht Uhr vom Hauptbahnhof ab.",
}


def best_model(fg: dict[str, Any]) -> tuple[str, str, str, float]:
    """(task, strategy, seed, mean test accuracy) of the arm with the highest mean test accuracy,
    and its best seed."""
    best = None
    for t in sorted(fg["tasks"]):
        for s in sorted(fg["tasks"][t]):
            if s == "wise_ft":       # no saved model: WiSE-FT is mixed in memory by its stage
                continue
            a = fg["tasks"][t][s]
            m = ((a.get("mean_std") or {}).get("test_accuracy") or {}).get("mean")
            if is_num(m) and (best is None or m > best[3]):
                seeds = a.get("seeds") or {}
                seed = max(sorted(seeds), key=lambda k: seeds[k].get("test_accuracy") or -1) if seeds else "seed0"
                best = (t, s, seed, m)
    if best is None:
        raise ResultsError("forgetting.json: no task x strategy with a test accuracy")
    return best


def count_parameters(model_dir: Path) -> int | None:
    """Parameters stored in the safetensors files of an HF directory (tied weights once)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def evidence_card(pretrained: Path, model_dir: Path, sentence: str = EXAMPLE, repeats: int = 30,
                  out_of_domain: dict[str, str] | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from ptf.models.artifacts import classify, load_classifier, read_meta

    pretrained, model_dir = Path(pretrained), Path(model_dir)
    cfg = json.loads((pretrained / "config.json").read_text(encoding="utf-8"))
    meta = read_meta(model_dir)
    tok = AutoTokenizer.from_pretrained(pretrained)
    max_pos = cfg.get("max_position_embeddings")
    max_len = int(meta.get("max_length") or min(max_pos or 512, tok.model_max_length))
    enc = tok([sentence], truncation=True, max_length=max_len, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    labels = [str(x) for x in meta.get("label_names") or []]
    card: dict[str, Any] = {
        "model": {"architecture": (cfg.get("architectures") or ["n/a"])[0],
                  "model_type": cfg.get("model_type"),
                  **{k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size", "vocab_size", "max_position_embeddings")},
                  "parameters": count_parameters(pretrained)},
        "tokenizer": {"class": type(tok).__name__, "sentence": sentence, "input_ids": ids,
                      "tokens": tok.convert_ids_to_tokens(ids),
                      "attention_mask": enc["attention_mask"][0].tolist(),
                      "batch_shape": list(enc["input_ids"].shape),
                      "decoded": tok.decode(ids), "padding_side": tok.padding_side,
                      "model_max_length": tok.model_max_length},
        "finetuned": {"dir": str(model_dir), "strategy": meta.get("strategy"), "task": meta.get("task"),
                      "pooling": meta.get("pooling"), "peft": meta.get("peft"), "max_length": max_len,
                      "label_names": labels},
    }
    ctok = AutoTokenizer.from_pretrained(model_dir) if (model_dir / "tokenizer_config.json").is_file() else tok
    model = load_classifier(model_dir, pretrained)

    def predict(text: str, max_length: int = max_len) -> dict[str, Any]:
        k = classify(model, ctok, [text], max_length=max_length)[0]
        n = min(len(ctok(text)["input_ids"]), max_length)
        return {"label": labels[k] if k < len(labels) else str(k), "tokens": n}

    card["prediction"] = predict(sentence)
    long = " ".join([sentence] * (1 + 2 * max(max_pos or 0, max_len) // max(1, len(ids))))
    n_long = len(ctok(long)["input_ids"])
    checks: dict[str, Any] = {"long": {"tokens": n_long, "max_length": max_len,
                                       "max_position_embeddings": max_pos, "truncated": predict(long)}}
    try:
        checks["long"]["untruncated"] = predict(long, max_length=n_long)
    except Exception as e:  # noqa: BLE001 - the failure itself is the evidence
        checks["long"]["untruncated_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    checks["out_of_domain"] = {k: {"text": v, **predict(v)} for k, v in (out_of_domain or OUT_OF_DOMAIN).items()}
    card["checks"] = checks

    for _ in range(3):
        classify(model, ctok, [sentence], max_length=max_len)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        classify(model, ctok, [sentence], max_length=max_len)
        times.append(time.perf_counter() - t0)
    card["latency"] = {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
                       "max_ms": 1000 * max(times), "repeats": len(times), "batch_size": 1,
                       "device": "cpu", "torch_threads": torch.get_num_threads(),
                       "includes": "`classify`: tokenization + forward pass + argmax"}
    return card


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "⏎") + "`"


def render_card(card: dict[str, Any], best: tuple[str, str, str, float]) -> list[str]:
    m, t, ft, p = card["model"], card["tokenizer"], card["finetuned"], card["prediction"]
    task, strategy, seed, acc = best
    L = ["## Evidence card", "",
         "Measured when this page was generated (not a DVC metric), through the pipeline's own "
         "prediction path (`ptf.models.artifacts.load_classifier` and `classify`).", "",
         f"- **Model**: `{m['architecture']}` ({m['model_type']}), {m['num_hidden_layers']} layers, hidden "
         f"{m['hidden_size']}, {m['num_attention_heads']} heads, MLP {m['intermediate_size']}, vocabulary "
         f"{m['vocab_size']}, {m['max_position_embeddings']} positions; "
         f"{m['parameters'] if m['parameters'] is not None else 'n/a'} parameters "
         "(stored in `data/models/pretrained/`, tied weights counted once).",
         f"- **Tokenizer** (`AutoTokenizer.from_pretrained('data/models/pretrained')`, "
         f"{t['class']}, padding side {t['padding_side']}) on the example sentence:", "",
         "```text",
         f"sentence:       {t['sentence']}",
         f"tokens:         {t['tokens']}",
         f"input_ids:      {t['input_ids']}",
         f"attention_mask: {t['attention_mask']}",
         f"batch shape:    {tuple(t['batch_shape'])}",
         f"decoded:        {t['decoded']}",
         "```", "",
         f"- **Best fine-tuned model** (highest mean test accuracy in `forgetting.json`): `{task}` / "
         f"`{strategy}`, mean test accuracy {num(acc)}; its best seed `{seed}` "
         f"(`{ft['dir']}`, pooling {ft['pooling']}, peft {ft['peft']}).",
         f"- **Task result** for the example sentence: **{p['label']}** (labels of `{ft['task']}`: "
         f"{', '.join(ft['label_names'])}).", "",
         "**Failure checks**", ""]
    lg = card["checks"]["long"]
    tr = lg["truncated"]
    L.append(f"- *Longer than the model's maximum*: {lg['tokens']} tokens against max_length "
             f"{lg['max_length']} (fine-tuning's truncation) and {lg['max_position_embeddings']} "
             f"positions. `classify` truncates it to {tr['tokens']} tokens: {tr['label']}.")
    if "untruncated" in lg:
        u = lg["untruncated"]
        beyond = lg["max_position_embeddings"] is not None and u["tokens"] > lg["max_position_embeddings"]
        L.append(f"  Untruncated ({u['tokens']} tokens) the model runs without an error"
                 + (" although the input is beyond the positions it was trained on, so this prediction "
                    "is unreliable" if beyond else "") + f": {u['label']}. "
                 "Always truncate (as `ptf.models.artifacts.classify` does by default).")
    else:
        L.append(f"  Untruncated it fails clearly: `{lg['untruncated_error']}`.")
    for k, o in card["checks"]["out_of_domain"].items():
        L.append(f"- *Out of domain ({k})*: {_code(o['text'])} "
                 + prose.out_of_domain_sentence(o["label"], ft["task"], ft["label_names"]))
    la = card["latency"]
    L += ["", f"**Latency** per sentence, batch 1, CPU ({la['torch_threads']} torch threads, "
              f"{la['includes']}): median {num(la['median_ms'], 2)} ms over {la['repeats']} repeats "
              f"(min {num(la['min_ms'], 2)}, max {num(la['max_ms'], 2)})."]
    return L
