"""The results page's section on the learning-forgetting frontiers (no CLI, no I/O).

In:  data/metrics/frontier.json (the frontier stage: per task and strategy its points, frontier
     and validation-best configuration; claim 2 at matched accuracy and at the validation-best
     points), the figures' folder relative to the page.
Out: Markdown lines. Every sentence that states a finding is built from the numbers it is
     about (tests/test_frontier.py feeds contradicting numbers and checks each one follows).
"""
from __future__ import annotations

from typing import Any

from ptf.measures.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, overall
from ptf.report import prose
from ptf.report.fmt import names, num, plural, table


def _span(values: list[float]) -> str:
    return f"{max(values) / min(values):.3g}×" if values and min(values) > 0 else "n/a"


def grid_sentence(strategy: str, pts: list[dict[str, Any]], seeds: int) -> str:
    """What a strategy's sweep covered, from its points."""
    lrs = sorted({p["lr"] for p in pts})
    steps = sorted({p["steps"] for p in pts})
    knob = next((p["knob"] for p in pts if p["knob"]), None)
    vals = sorted({p["value"] for p in pts if p["knob"]})
    k = (f" × `{knob}` ∈ {{{', '.join(f'{v:g}' for v in vals)}}} (span {_span(vals)})" if knob else "")
    return (f"`{strategy}`: {plural(len(pts), 'configuration')} × {plural(seeds, 'seed')}: "
            f"{plural(len(lrs), 'learning rate')} from {min(lrs):g} to {max(lrs):g} (span {_span(lrs)}) × "
            f"{plural(len(steps), 'length')} ({', '.join(map(str, steps))} steps){k}")


def tasks_table(task: str, block: dict[str, Any], majority: float) -> list[str]:
    rows = []
    for s, f in sorted(block.items()):
        best = next(p for p in f["points"] if p["key"] == f["val_best"])
        rows.append([f"`{s}`", str(len(f["points"])), str(len(f["frontier"])), f"`{best['key']}`",
                     num(best["val_accuracy"]), num(best["val_accuracy"] - majority, sign=True),
                     num(best["test_accuracy"]), num(best["delta_report"], 4)])
    return table(["strategy", "configurations", "on its frontier", "validation-best configuration",
                  "val accuracy", "gain over majority (val)", "test accuracy", "Δ LM loss (report half)"], rows)


def comparison_line(key: str, c: dict[str, Any], reference: str) -> str:
    cost = c.get("accuracy_cost") or {}
    at = (f"accuracy level {num(c['level'])} (validation)" if c.get("level") is not None
          else "validation-best configurations")
    return (f"`{key}` at {at}: `{c['config']}` (val {num(c['val_accuracy'])}) Δ LM loss "
            f"{num(c['delta_loss'], 4)} against `{c['reference_config']}` (val "
            f"{num(c['reference_val_accuracy'])}) {num(c['reference_delta_loss'], 4)} for `{reference}`; "
            f"{prose.interval(c, 4)} → {prose.verdict_phrase(c)}. Test accuracy "
            f"{num(c['test_accuracy'])} against {num(c['reference_test_accuracy'])}: {prose.interval(cost)} "
            f"→ lower accuracy {prose.verdict_phrase(cost, 'verdict_lower_accuracy')}")


def strategy_verdicts(claim: dict[str, Any]) -> list[str]:
    """One sentence per task x strategy: its verdict over its comparisons (the levels)."""
    comps = claim.get("comparisons") or {}
    out = []
    for t, s in sorted({(c["task"], c["strategy"]) for c in comps.values()}):
        vs = [c["verdict"] for c in comps.values() if (c["task"], c["strategy"]) == (t, s)]
        o = overall(vs)
        n = o["counts"]
        out.append(f"`{t}/{s}`: {o['verdict']} ({n[REPRODUCED]} of {plural(len(vs), 'comparison')} reproduced, "
                   f"{n[NOT_REPRODUCED]} not reproduced, {n[INCONCLUSIVE]} inconclusive)")
    return out


def construction_sentence(claim: dict[str, Any], reference: str) -> str | None:
    """Which strategies forget nothing by construction (their backbone never changed)."""
    same = sorted({c["strategy"] for c in (claim.get("comparisons") or {}).values() if c.get("unchanged_backbone")})
    if not same:
        return None
    return (f"{names(same)} left every backbone weight as pretrained in every compared configuration (its "
            f"held-out loss equals the pretrained model's on every block): its Δ is 0 by construction, so "
            f"a verdict for it says only whether `{reference}` forgets at all.")


def objective_sentence(claim: dict[str, Any]) -> str | None:
    """Replay optimises the measured quantity itself: say so where it is compared."""
    if not any(c["strategy"] == "replay" for c in (claim.get("comparisons") or {}).values()):
        return None
    return ("`replay` trains on the pretraining loss itself (on training blocks of the same corpus), so a "
            "lower held-out LM loss is what it is built to give; compare its accuracy cost with the others'.")


def section(fr: dict[str, Any] | None, fig: str = "figures") -> list[str]:
    if not fr:
        return []
    ref = fr["reference"]
    if fr.get("applicable") is False:
        return ["## Learning vs forgetting: the frontiers of the sweep", "",
                f"**Not measured on LM drift**: {fr.get('missing')}."]
    L = ["## Learning vs forgetting: the frontiers of the sweep", "",
         "Every configuration of every strategy's grid was trained for every seed, and each model's "
         "validation accuracy and held-out LM loss were measured before it was let go (stages "
         "`sweep@<task>-<strategy>`, `frontier`; `data/metrics/sweep/`, `data/metrics/frontier.json`). "
         "Every choice below is made on validation accuracy and on the selection half of the held-out "
         f"blocks ({fr['halves']['select']}); the Δ LM loss reported and its interval use the other "
         f"half ({fr['halves']['report']}), so picking the least-forgetting of many configurations does "
         "not bias the reported number. A configuration's numbers are means over its seeds.", ""]
    for t, block in sorted(fr["tasks"].items()):
        L += [f"### `{t}`", "", "Swept:", ""]
        L += [f"- {grid_sentence(s, f['points'], len(fr['seeds']))}." for s, f in sorted(block.items())]
        L += ["", *tasks_table(t, block, fr["majority_val"][t]), ""]
    L += [f"![frontier]({fig}/frontier.png)", "",
          "*Each dot is a configuration; each line joins a strategy's Pareto frontier (no other of its "
          "configurations has both a higher validation accuracy and a lower Δ); the dotted horizontal "
          "lines are the matched accuracy levels.*", ""]
    matched, best = fr["claims"]["matched"], fr["claims"]["val_best"]
    qs = ", ".join(f"{q:g}" for q in fr["levels"])
    L += [f"### Forgetting at matched accuracy: does a strategy forget less than `{ref}` for the same accuracy?", "",
          f"**Verdict: {matched['verdict']}.** {prose.counts_sentence(matched)} The levels are {qs} of the "
          f"way from the majority rate to the lower of the two strategies' best validation accuracies; at "
          f"each, each strategy contributes its least-forgetting configuration that reaches the level. "
          f"Rule: {matched['rule']}", ""]
    comps = matched.get("comparisons") or {}
    L += [f"- {comparison_line(k, comps[k], ref)}." for k in sorted(comps)]
    L += ["", "By strategy: " + "; ".join(strategy_verdicts(matched)) + "." if comps else ""]
    for why in (construction_sentence(matched, ref), objective_sentence(matched)):
        L += ["", why] if why else []
    L += ["", "### Forgetting at each strategy's validation-best configuration", "",
          f"**Verdict: {best['verdict']}.** {prose.counts_sentence(best)}", ""]
    comps = best.get("comparisons") or {}
    L += [f"- {comparison_line(k, comps[k], ref)}." for k in sorted(comps)]
    return L
