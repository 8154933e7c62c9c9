"""The results page's section on forgetting without an LM head (no CLI): from
data/metrics/representation.json (stage `representation`) to Markdown lines.

In:  the loaded representation.json (`stages.representation`: held_out, probe, lm, tasks).
Out: `section_representation(rep)` -> list of Markdown lines: what was measured (sizes from the
     file), one table per arm (CKA of the last layer and the lowest CKA of any layer, probe accuracy lost,
     LM loss drift in nats/token and bits/byte or why it does not apply), CKA per layer, the
     probes' accuracies before fine-tuning, and sentences that name the extremes. Every number and
     every name in a sentence comes from the file; nothing is written by hand.
"""
from __future__ import annotations

from typing import Any

from ptf.report.fmt import is_num, names, num, plural, pm, table

COLUMNS = ["task", "strategy", "seeds", "CKA, last layer", "CKA, lowest of the layers", "probe accuracy lost",
           "probe accuracy after", "Δ LM loss (nats/token)", "Δ LM loss (bits/byte)"]


def _rows(rep: dict[str, Any]):
    """(task, strategy, arm) of every arm, sorted."""
    for t in sorted(rep.get("tasks") or {}):
        for s in sorted(rep["tasks"][t]):
            yield t, s, rep["tasks"][t][s]


def _mean(arm: dict[str, Any], key: str) -> float | None:
    v = ((arm.get("mean_std") or {}).get(key) or {}).get("mean")
    return v if is_num(v) else None


def _extreme(rep: dict[str, Any], key: str, pick) -> tuple[str, float] | None:
    vals = [(f"{t}/{s}", _mean(a, key)) for t, s, a in _rows(rep) if a.get("applicable")]
    vals = [(n, v) for n, v in vals if v is not None]
    return pick(vals, key=lambda x: (x[1], x[0])) if vals else None


def probe_change(worst: tuple[str, float], best: tuple[str, float]) -> str:
    """What the extremes of "probe accuracy lost" say, with the verb its sign gives: a negative
    loss is a gain ("rose"), never "fell least"."""
    parts = [f"fell most under `{worst[0]}` (by {num(worst[1])})" if worst[1] > 0 else "fell under no arm"]
    if best[1] < 0:
        parts.append(f"rose most under `{best[0]}` (by {num(-best[1])})")
    elif best[1] == 0:
        parts.append(f"did not change under `{best[0]}`")
    else:
        parts.append(f"fell least under `{best[0]}` (by {num(best[1])})")
    return ", and ".join(parts)


def section_representation(rep: dict[str, Any]) -> list[str]:
    ho, pr, lm = rep.get("held_out") or {}, rep.get("probe") or {}, rep.get("lm") or {}
    n_states = ho.get("hidden_states")
    unit = "tokens" if ho.get("pooling") == "tokens" else "blocks (mean over their tokens)"
    L = ["## Forgetting without an LM head: representation drift and probe retention", "",
         f"Representation drift: linear CKA (1 = the same geometry) between the pretrained and each "
         f"fine-tuned backbone's hidden states on {ho.get('blocks', 'n/a')} held-out {ho.get('split', 'validation')} "
         f"blocks of {ho.get('block_len', 'n/a')} tokens, over {ho.get('examples', 'n/a')} {unit}, per layer "
         f"({plural(n_states, 'hidden state') if is_num(n_states) else 'n/a'}: 0 = embeddings).", ""]
    tasks = list(pr.get("tasks") or [])
    ntr, nva = pr.get("n_train") or {}, pr.get("n_validation") or {}
    before = pr.get("before") or {}
    L += [f"Probe retention: for each of {names(tasks)} other than the model's own task, a linear probe "
          f"on the frozen mean-pooled features of hidden state {pr.get('layer', 'n/a')}, trained on the "
          f"task's {pr.get('train_split', 'train')} split and scored on its {pr.get('score_split', 'validation')} "
          "split (the test split is left to the final evaluation); lost = accuracy on the pretrained "
          "backbone minus accuracy on the fine-tuned one. Before fine-tuning: "
          + "; ".join(f"`{t}` {num(before.get(t))} ({ntr.get(t, 'n/a')} train, {nva.get(t, 'n/a')} validation)"
                      for t in tasks) + ".", ""]
    if lm.get("applicable"):
        L += [f"LM loss drift in bits per byte beside nats per token: the forgetting stage's held-out loss "
              f"on {lm.get('blocks', 'n/a')} blocks ({lm.get('text_tokens', 'n/a')} text tokens, "
              f"{lm.get('text_bytes', 'n/a')} bytes: {num(lm.get('tokens_per_byte'), 4)} tokens per byte); "
              f"the pretrained model scores {num(lm.get('loss_pretrained'), 4)} nats/token = "
              f"{num(lm.get('bpb_pretrained'), 4)} bits/byte.", ""]
    else:
        L += [f"LM loss drift: {lm.get('note', 'not applicable')}.", ""]
    rows = []
    for t, s, a in _rows(rep):
        ms = a.get("mean_std") or {}
        n = len(a.get("seeds") or {})
        if not a.get("applicable"):
            rows.append([t, s, str(n)] + ["n/a (random init)"] * 4 + ["n/a"] * 2)
            continue
        rows.append([t, s, str(n), pm(ms.get("cka_last")), pm(ms.get("cka_min")),
                     pm(ms.get("probe_lost_mean"), sign=True), pm(ms.get("probe_after_mean")),
                     pm(ms.get("lm.delta_loss"), 4, sign=True) if lm.get("applicable") else "n/a (no LM head)",
                     pm(ms.get("lm.delta_bpb"), 4, sign=True) if lm.get("applicable") else "n/a (no LM head)"])
    L += table(COLUMNS, rows) + ["", "Mean ± std over seeds (`data/metrics/representation.json`).", ""]
    if is_num(n_states):
        layers = [f"layer {i}" for i in range(int(n_states))]
        per = [[f"{t}/{s}"] + [pm(((a.get("mean_std") or {}).get(f"cka.layer{i}")))
                               for i in range(int(n_states))]
               for t, s, a in _rows(rep) if a.get("applicable")]
        if per:
            L += ["CKA per hidden state (0 = embeddings):", ""] + table(["arm", *layers], per) + [""]
    lo, hi = _extreme(rep, "cka_last", min), _extreme(rep, "cka_last", max)
    if lo and hi and lo[0] != hi[0]:
        L += [f"The last layer moved most under `{lo[0]}` (CKA {num(lo[1])}) and least under "
              f"`{hi[0]}` (CKA {num(hi[1])})."]
    worst, best = _extreme(rep, "probe_lost_mean", max), _extreme(rep, "probe_lost_mean", min)
    if worst and best and worst[0] != best[0]:
        L += [f"Probe accuracy on the other tasks {probe_change(worst, best)}."]
    elif worst:
        L += [f"Probe accuracy on the other tasks: `{worst[0]}` lost {num(worst[1], sign=True)}."]
    na = [f"{t}/{s}" for t, s, a in _rows(rep) if not a.get("applicable")]
    if na:
        L += [f"Not applicable (random init: no pretrained backbone to drift from): {names(na)}."]
    return L
