"""Tables and figures of the `forgetting` stage (no CLI): Markdown summary and PNG plots.

In:  the stage's result dict (see `stages/forgetting.py`), the plot rows it wrote as CSV, its
     `Config`.
Out: `render_summary(...) -> str` (Markdown, deterministic); `write_figures(...)` writes the
     trade-off scatter with error bars, the learning curves and the accuracy matrices (one
     panel per strategy x order, mean over seeds) as PNG
     (matplotlib Agg, fixed size and dpi, no timestamp in the file), each written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ptf.common.atomic import write_bytes
from ptf.report import prose
from ptf.report import sequential_section as sq
from ptf.report.fmt import pm, table


def render_summary(result: dict[str, Any], cfg) -> str:
    ev = result["eval"]
    L: list[str] = []
    L.append("# Forgetting: what fine-tuning bought and what it cost")
    L.append("")
    if ev.get("applicable", True):
        L.append(f"Held-out pretraining objective ({ev['objective']}): {ev['blocks']} validation blocks, "
                 f"{ev['tokens']} scored tokens; pretrained loss {ev['loss_pretrained']:.4f} "
                 f"(perplexity {ev['ppl_pretrained']:.2f}). Δ LM loss = the fine-tuned backbone under the "
                 "pretrained LM head minus the pretrained model, same blocks (> 0: forgot). "
                 "Values are mean ± sample std over seeds.")
    else:
        L.append(f"Held-out LM loss: {ev['note']}. Values are mean ± sample std over seeds.")
    L.append("")
    L.append("## Per task and strategy")
    L.append("")
    rows = []
    for task in sorted(result["tasks"]):
        for s in sorted(result["tasks"][task]):
            a = result["tasks"][task][s]
            ms = a["mean_std"]
            drift = a["drift_applicable"]
            rows.append([
                task, s, str(ms["test_accuracy"]["n"]), pm(ms["test_accuracy"]), pm(ms["macro_f1"]),
                pm(ms["gain_over_chance"], sign=True), pm(ms["gain_over_scratch"], sign=True),
                pm(ms["delta_loss"], 4, sign=True) if drift else
                ("n/a (no pretrained backbone)" if s == cfg.scratch_strategy else "n/a (no LM head)"),
                pm(ms["rel_delta_pct"], 2, sign=True) if drift else "n/a",
                pm(ms["share_worse"], 1, scale=100) + "%" if drift else "n/a",
                pm(ms["trainable_fraction"], 2, scale=100)])
    L += table(["task", "strategy", "seeds", "test acc", "macro-F1", "gain vs chance", "gain vs scratch",
                "Δ LM loss", "Δ %", "blocks worse", "trainable %"], rows)
    L.append("")
    L.append("## Does the run reproduce the paradigm's claims?")
    L.append("")
    c1 = result["claims"]["few_labels"]
    L.append(f"1. **{c1['claim']}**: **{c1['verdict']}**. {prose.counts_sentence(c1)}")
    for key in sorted(c1["comparisons"]):
        L.append(f"   - {prose.few_labels_line(key, c1['comparisons'][key], cfg.scratch_strategy)}.")
    c2 = result["claims"]["forget_less"]
    L.append(f"2. **{c2['claim']}**: " + (f"**{c2['verdict']}**. {prose.counts_sentence(c2)}"
                                         if c2.get("applicable", True) else f"{c2['missing']}."))
    for key in sorted(c2["comparisons"]):
        L.append(f"   - {prose.forget_less_line(key, c2['comparisons'][key], cfg.reference_strategy)}.")
    if c2["comparisons"]:
        L.append(f"   {prose.cost_sentence(c2, cfg.reference_strategy)}")
    L.append("")
    L.append("Per task (each claim's comparisons of that task; Holm over the whole claim):")
    L.append("")
    L += table(["task", "claim 1", "claim 2"],
               [[t, *[(c["by_task"].get(t) or {}).get("verdict", "not measured") for c in (c1, c2)]]
                for t in sorted(result["tasks"])])
    w = result.get("wise_ft")
    if w:
        L += ["", f"WiSE-FT of `{w['task']}`/`{w['source']}` (α chosen on validation: "
              f"{w['chosen_alpha']['alpha']:g}):", ""]
        L += table(["α", "val acc", "test acc", "Δ LM loss"],
                   [[f"{p['alpha']:g}", pm(p["mean_std"]["val_accuracy"]), pm(p["mean_std"]["test_accuracy"]),
                     pm(p["mean_std"]["delta_loss"], 4, sign=True)] for p in w["points"].values()])
    L.append("")
    L.append(f"Rule: {c1['rule']}")
    seq = result["sequential"]
    if seq:
        L += ["", "## Sequential fine-tuning (GEM ACC/BWT/FWT, Chaudhry forgetting, Toneva events)", "",
              sq.DEFINITIONS, ""]
        L += sq.measures_table(seq) + ["", " ".join(sq.sentences(seq, cfg.reference_strategy)), ""]
        L += sq.events_table(seq)
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- figures

def _save(fig, dest: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(dest, buf.getvalue())


def write_figures(root: Path, trade: list[dict[str, Any]], curves: list[dict[str, Any]],
                  sequential: dict[str, Any], cfg, dests: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "forgetting", "font.size": 9})
    # trade-off: Biderman et al. 2024, one point per task x strategy, error bars = std over seeds
    fig, ax = plt.subplots(figsize=(7, 5))
    strategies = sorted({r["strategy"] for r in trade})
    tasks = sorted({r["task"] for r in trade})
    markers = "osD^v<>ph*"
    cmap = plt.get_cmap("tab20")
    for r in trade:
        i, j = strategies.index(r["strategy"]), tasks.index(r["task"])
        ax.errorbar(r["delta_loss"], r["gain"], xerr=r["delta_loss_std"] or 0, yerr=r["gain_std"] or 0,
                    fmt=markers[j % len(markers)], color=cmap(i % 20), capsize=3,
                    label=f"{r['strategy']} ({r['task']})")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("forgetting: Δ held-out LM loss (nats/token, fine-tuned − pretrained)")
    ax.set_ylabel(f"learning: test-accuracy gain over {cfg.tradeoff_gain}")
    ax.set_title("Learning vs forgetting (mean ± std over seeds)")
    if trade:
        ax.legend(fontsize=7, ncol=2, loc="best")
    else:  # e.g. a foundation without an LM head: no drift to plot, said on the figure
        ax.text(0.5, 0.5, "no Δ LM loss measured\n(the pretrained model has no LM head)",
                ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, dests["tradeoff"])
    plt.close(fig)

    # learning curves: accuracy vs number of labels, per task
    ctasks = sorted({r["task"] for r in curves}) or [""]
    fig, axes = plt.subplots(1, len(ctasks), figsize=(6 * len(ctasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], ctasks):
        rows = [r for r in curves if r["task"] == task]
        for k, s in enumerate(sorted({r["strategy"] for r in rows})):
            pts = sorted((r for r in rows if r["strategy"] == s), key=lambda r: r["n_labels"])
            xs = [p["n_labels"] for p in pts]
            ys = [p["test_accuracy"] for p in pts]
            es = [p["std"] or 0 for p in pts]
            ls = "--" if s == cfg.scratch_strategy else "-"
            ax.errorbar(xs, ys, yerr=es, ls=ls, marker="o", capsize=3, color=cmap(k % 20), label=s)
        if rows:
            ax.set_xscale("log")
            ticks = sorted({r["n_labels"] for r in rows})
            ax.minorticks_off()
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.legend(fontsize=7)
        ax.set_xlabel("labelled training examples")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Data efficiency{' — ' + task if task else ''}: pretrained vs scratch")
    fig.tight_layout()
    _save(fig, dests["learning_curves"])
    plt.close(fig)

    # accuracy matrices: one panel per strategy x order, the mean over its seeds
    groups = list((sequential.get("groups") or {}).values()) or [None]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.5), squeeze=False)
    for ax, g in zip(axes[0], groups):
        if g is None:
            ax.set_axis_off()
            ax.set_title("no sequential run")
            continue
        M, order = g["matrix"], [str(o) for o in g["order"]]
        T = len(order)
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(M):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                        color="white" if v < 0.5 else "black", fontsize=8)
        ax.set_xticks(range(T), order)
        ax.set_yticks(range(T + 1), ["before"] + [f"after {o}" for o in order])
        ax.set_xlabel("evaluated on task")
        ax.set_title(f"{g['strategy']}: mean over {len(g['seeds'])} seeds", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, dests["accuracy_matrix"])
    plt.close(fig)
