"""Tables and figures of the `forgetting` stage (no CLI): Markdown summary and PNG plots.

In:  the stage's result dict (see `stages/forgetting.py`), the plot rows it wrote as CSV, its
     `Config`.
Out: `render_summary(...) -> str` (Markdown, deterministic); `write_figures(...)` writes the
     trade-off scatter with error bars, the learning curves and the accuracy matrices as PNG
     (matplotlib Agg, fixed size and dpi, no timestamp in the file), each written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ptf.common.atomic import write_bytes


def _f(stats: dict[str, Any] | None, scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    m = f.format(stats["mean"] * scale)
    return m if stats.get("n", 0) < 2 else f"{m} ± {stats['std'] * scale:.{digits}f}"


def _n(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:{'+' if sign else ''}.{digits}f}"


def render_summary(result: dict[str, Any], cfg) -> str:
    ev = result["eval"]
    L: list[str] = []
    L.append("# Forgetting: what fine-tuning bought and what it cost")
    L.append("")
    L.append(f"Held-out pretraining objective ({ev['objective']}): {ev['blocks']} validation blocks, "
             f"{ev['tokens']} scored tokens; pretrained loss {ev['loss_pretrained']:.4f} "
             f"(perplexity {ev['ppl_pretrained']:.2f}). Δ LM loss = the fine-tuned backbone under the "
             "pretrained LM head minus the pretrained model, same blocks (> 0: forgot). "
             "Values are mean ± sample std over seeds.")
    L.append("")
    L.append("## Per task and strategy")
    L.append("")
    L.append("| task | strategy | seeds | test acc | macro-F1 | gain vs chance | gain vs scratch "
             "| Δ LM loss | Δ % | blocks worse | trainable % |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for task in sorted(result["tasks"]):
        for s in sorted(result["tasks"][task]):
            a = result["tasks"][task][s]
            ms = a["mean_std"]
            drift = a["drift_applicable"]
            na = "n/a (no pretrained backbone)"
            L.append("| " + " | ".join([
                task, s, str(ms["test_accuracy"]["n"]), _f(ms["test_accuracy"]), _f(ms["macro_f1"]),
                _f(ms["gain_over_chance"], sign=True), _f(ms["gain_over_scratch"], sign=True),
                _f(ms["delta_loss"], digits=4, sign=True) if drift else na,
                _f(ms["rel_delta_pct"], digits=2, sign=True) if drift else "n/a",
                _f(ms["share_worse"], scale=100, digits=1) + ("%" if drift else "") if drift else "n/a",
                _f(ms["trainable_fraction"], scale=100, digits=2),
            ]) + " |")
    L.append("")
    L.append("## Does the default run reproduce the paradigm's claims?")
    L.append("")
    c1 = result["claims"]["few_labels"]
    L.append(f"1. **{c1.get('claim', 'few labels')}**: **{c1['verdict']}**.")
    for key in sorted(c1.get("comparisons", {})):
        c = c1["comparisons"][key]
        L.append(f"   - {key}: fraction {c['fraction']:g} ({', '.join(map(str, c['n_labels']))} labels): "
                 f"accuracy {_f(c['accuracy'])} vs {cfg.scratch_strategy} {_f(c['scratch_accuracy'])}; "
                 f"difference {_n(c['diff'], sign=True)}, spread {_n(c['spread'])} -> {c['verdict']}")
    c2 = result["claims"]["forget_less"]
    L.append(f"2. **{c2.get('claim', 'forget less')}**: **{c2['verdict']}**.")
    for key in sorted(c2.get("comparisons", {})):
        c = c2["comparisons"][key]
        cost = c["accuracy_cost"]
        L.append(f"   - {key}: Δ LM loss {_f(c['delta_loss'], digits=4)} vs {cfg.reference_strategy} "
                 f"{_f(c['reference_delta_loss'], digits=4)}; difference {_n(c['diff'], 4, sign=True)}, "
                 f"spread {_n(c['spread'], 4)} -> {c['verdict']}; accuracy cost "
                 f"{_n(cost['diff'], sign=True)} (spread {_n(cost['spread'])})")
    L.append("")
    L.append("Rule: a claim is *reproduced* when the difference of the seed means is on the claimed side "
             "and larger than sqrt(std_a² + std_b²); *not reproduced* when it is that large on the other "
             "side; otherwise inconclusive (within 1 std, or fewer than 2 seeds).")
    if result["sequential"]:
        L.append("")
        L.append("## Sequential fine-tuning (GEM ACC/BWT/FWT, Chaudhry forgetting)")
        L.append("")
        L.append("FWT is relative to row 0 of the matrix (accuracy before any training of the sequence). "
                 "Chance-adjusted: accuracies rescaled to (a - chance) / (1 - chance) first.")
        L.append("")
        L.append("| run | order | ACC | BWT | FWT | avg forgetting | ACC adj | BWT adj | FWT adj | forgetting adj |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for name in sorted(result["sequential"]):
            q = result["sequential"][name]
            r, a = q["raw"], q.get("chance_adjusted", {})
            order = " → ".join(map(str, q.get("order") or []))
            L.append("| " + " | ".join([name, order, _n(r["acc"]), _n(r["bwt"], sign=True),
                                        _n(r["fwt"], sign=True), _n(r["avg_forgetting"]),
                                        _n(a.get("acc")), _n(a.get("bwt"), sign=True),
                                        _n(a.get("fwt"), sign=True), _n(a.get("avg_forgetting"))]) + " |")
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

    # accuracy matrices
    names = sorted(sequential) or [""]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        if not name:
            ax.set_axis_off()
            ax.set_title("no sequential run")
            continue
        seq = sequential[name]
        M = seq["raw"]["matrix"]
        T = len(M[0])
        order = seq.get("order") or [f"task{j}" for j in range(T)]
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(M):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                        color="white" if v < 0.5 else "black", fontsize=8)
        ax.set_xticks(range(T), [str(o) for o in order])
        ax.set_yticks(range(T + 1), ["before"] + [f"after {o}" for o in order])
        ax.set_xlabel("evaluated on task")
        ax.set_title(f"Accuracy matrix ({name})")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, dests["accuracy_matrix"])
    plt.close(fig)
