"""Sentences generated from the numbers (no CLI), for the forgetting summary and the results page.

Every sentence that states a finding is built here from the values it is about, so it cannot
say the opposite of them: the direction of BWT, which tasks barely rose above their
majority-class rate, how many comparisons of a claim reproduced, which arms were compared, the
interval and the reason behind each verdict. `tests/test_report_prose.py` feeds contradicting
numbers and checks each sentence follows.
"""
from __future__ import annotations

from typing import Any

from ptf.measures.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from ptf.report.fmt import is_num, names, num, plural, pm

# A task whose accuracy just after learning it is within this of its majority-class rate had
# little to forget: the sequential measures say little about it.
LEARNED_MARGIN = 0.05


def counts_sentence(claim: dict[str, Any]) -> str:
    """"Of 4 comparisons, 3 are reproduced, 0 not reproduced and 1 inconclusive." """
    c = claim.get("counts") or {}
    n = c.get("total", 0)
    if not n:
        return f"No comparison could be made ({claim.get('missing', 'no data')})."
    return (f"Of {plural(n, 'comparison')}, {c.get(REPRODUCED, 0)} "
            f"{'is' if c.get(REPRODUCED, 0) == 1 else 'are'} reproduced, "
            f"{c.get(NOT_REPRODUCED, 0)} not reproduced and {c.get(INCONCLUSIVE, 0)} inconclusive.")


def interval(c: dict[str, Any], digits: int = 3) -> str:
    """"difference +0.262, 97.5 % interval [+0.101, +0.423]" (or why there is none)."""
    d = f"difference {num(c.get('diff'), digits, sign=True)}"
    ci = c.get("ci")
    if not ci:
        return f"{d}, no interval ({c.get('reason') or 'no data'})"
    return (f"{d}, Holm-corrected {100 * c['ci_level']:.4g} % interval "
            f"[{num(ci[0], digits, sign=True)}, {num(ci[1], digits, sign=True)}]")


def verdict_phrase(c: dict[str, Any], field: str = "verdict") -> str:
    """The verdict with its reason when it is inconclusive, and what was resampled."""
    v = c.get(field) or INCONCLUSIVE
    why = f": {c['reason']}" if v == INCONCLUSIVE and c.get("reason") and field == "verdict" else ""
    res = f"; resampled: {c['resampled']}" if c.get("resampled") else ""
    return f"{v}{why}{res}"


def few_labels_line(key: str, c: dict[str, Any], scratch: str) -> str:
    labels = ", ".join(map(str, c.get("n_labels") or []))
    return (f"`{key}` with {labels} labels (fraction {c.get('fraction'):g}): accuracy "
            f"{pm(c.get('accuracy'))} against {pm(c.get('scratch_accuracy'))} for `{scratch}`; "
            f"{interval(c)} → {verdict_phrase(c)}")


def forget_less_line(key: str, c: dict[str, Any], reference: str) -> str:
    cost = c.get("accuracy_cost") or {}
    return (f"`{key}`: Δ LM loss {pm(c.get('delta_loss'), 4)} against {pm(c.get('reference_delta_loss'), 4)} "
            f"for `{reference}`; {interval(c, 4)} → {verdict_phrase(c)}. Accuracy against "
            f"`{reference}`: {interval(cost)} → lower accuracy "
            f"{verdict_phrase(cost, 'verdict_lower_accuracy')}")


def cost_sentence(claim: dict[str, Any], reference: str) -> str:
    comps = claim.get("comparisons") or {}
    paid = sorted(k for k, c in comps.items()
                  if (c.get("accuracy_cost") or {}).get("verdict_lower_accuracy") == REPRODUCED)
    return (f"Accuracy paid for it: test accuracy decisively lower than `{reference}` (Holm-corrected, "
            f"as a family of its own) in {len(paid)} of {len(comps)} comparisons"
            + (f" ({names(paid)})." if paid else "."))


def forget_less_heading(claim: dict[str, Any], reference: str) -> str:
    compared = sorted({c["strategy"] for c in (claim.get("comparisons") or {}).values()})
    than = names(compared) if compared else "the other strategies (none of them ran beside it)"
    return (f"`{reference}` fine-tuning forgets more of the pretraining objective than {than}, "
            "and they pay for that in some task accuracy")


def pretrain_sentence(val_ppl: Any, unigram_ppl: Any) -> str | None:
    if not (is_num(val_ppl) and is_num(unigram_ppl)):
        return None
    below = val_ppl < unigram_ppl
    return (f"The pretrained model's validation perplexity is {'below' if below else 'NOT below'} the "
            f"unigram baseline ({num(val_ppl, 2)} vs {num(unigram_ppl, 2)}): it "
            f"{'learned more' if below else 'did not learn more'} than token frequencies.")


def _direction(x: float, digits: int, neg: str, pos: str, zero: str) -> str:
    """The word for the sign of `x` as printed with `digits` decimals."""
    shown = round(x, digits)
    return neg if shown < 0 else pos if shown > 0 else zero


def bwt_sentences(group: dict[str, Any]) -> list[str]:
    """What one strategy x order's BWT says (mean over seeds), and where the tasks were barely
    learned (just-learned accuracy minus the majority rate, mean over seeds)."""
    ms = group.get("mean_std") or {}
    bwt = ms.get("bwt") or {}
    out = []
    if is_num(bwt.get("mean")):
        what = _direction(bwt["mean"], 3, "lost accuracy", "gained accuracy",
                          "neither lost nor gained accuracy (to 3 decimals)")
        out.append(f"BWT {pm(bwt, sign=True)} ({plural(bwt['n'], 'seed')}): on average, earlier tasks "
                   f"{what} from just after learning them to the end of the sequence.")
    order = [str(t) for t in group.get("order") or []]
    margins = [(ms.get(f"learned_above_majority.{t}") or {}).get("mean") for t in order]
    if order and all(is_num(d) for d in margins):
        out.append("Just after learning it, each task's test accuracy minus its majority-class rate "
                   "(mean over seeds): " + ", ".join(f"{t} {num(d, sign=True)}" for t, d in zip(order, margins)) + ".")
        weak = [t for t, d in zip(order, margins) if d <= LEARNED_MARGIN]
        if weak:
            out.append(f"{names(weak)} rose at most {LEARNED_MARGIN:g} above {'its' if len(weak) == 1 else 'their'} "
                       "majority-class rate: there was little to forget, so BWT and forgetting say little "
                       f"about {'it' if len(weak) == 1 else 'them'}.")
    return out


def strategy_sentences(strategies: dict[str, Any], reference: str) -> list[str]:
    """Each strategy's BWT pooled over the orders against `reference`'s (mean ± std over seeds),
    the verb from the sign of the difference as printed; no test of the difference is claimed."""
    ref = (strategies.get(reference) or {}).get("mean_std", {}).get("bwt") or {}
    out = []
    for s in sorted(k for k in strategies if k != reference):
        b = strategies[s]["mean_std"].get("bwt") or {}
        if not (is_num(b.get("mean")) and is_num(ref.get("mean"))):
            continue
        d = b["mean"] - ref["mean"]
        what = _direction(d, 3, "lost more of the earlier tasks than", "lost less of the earlier tasks than",
                          "lost as much of the earlier tasks (to 3 decimals) as")
        out.append(f"Pooled over the orders, `{s}`'s BWT is {pm(b, sign=True)} against {pm(ref, sign=True)} for "
                   f"`{reference}` ({num(d, sign=True)}): it {what} `{reference}` on average over "
                   f"{plural(b['n'], 'seed')}; no test of the difference.")
    return out


def out_of_domain_sentence(label: str, task: str | None, label_names: list[str]) -> str:
    return (f"→ {label}: the `{task or 'task'}` classifier must answer one of its "
            f"{plural(len(label_names), 'label')} ({', '.join(label_names)}), with no 'none of these', "
            "so this answer is no evidence that the input belongs to the task.")


def baseline_sentence(beaten: list[str], tasks: list[str]) -> str:
    """Which tasks' bag-of-tokens baseline no fine-tuned arm reached."""
    if not beaten:
        return "On every task at least one fine-tuned arm beats the bag-of-tokens baseline in mean test accuracy."
    return (f"On {len(beaten)} of {plural(len(tasks), 'task')} ({names(beaten)}) no fine-tuned arm reaches "
            "the bag-of-tokens baseline's test accuracy.")


def task_verdict(v: dict[str, Any] | None, claim: str, curves_task: str | None) -> str:
    """A task's verdict on one claim, with its counts, or why it was not measured."""
    if not v or not (v.get("counts") or {}).get("total"):
        if claim == "few_labels":
            return f"not measured (the curves run on `{curves_task}` only: finetune.curves.task)"
        return "not measured (no compared arm beside the reference on this task)"
    c = v["counts"]
    return (f"{v['verdict']} ({c.get(REPRODUCED, 0)} of {c['total']} reproduced, "
            f"{c.get(NOT_REPRODUCED, 0)} not, {c.get(INCONCLUSIVE, 0)} inconclusive)")


def wise_ft_sentence(w: dict[str, Any]) -> str:
    """The alpha chosen on validation and what it traded, from the points."""
    pts = {p["alpha"]: p["mean_std"] for p in w["points"].values()}
    a = w["chosen_alpha"]["alpha"]
    s = (f"The α chosen on validation is {a:g} ({w['chosen_alpha']['rule']}): test accuracy "
         f"{pm(pts[a]['test_accuracy'])}, Δ LM loss {pm(pts[a]['delta_loss'], 4, sign=True)}.")
    if 1.0 in pts and a != 1.0:
        da = pts[a]["test_accuracy"]["mean"] - pts[1.0]["test_accuracy"]["mean"]
        dl = pts[a]["delta_loss"]["mean"] - pts[1.0]["delta_loss"]["mean"]
        s += (f" Against α = 1 (`{w['source']}` itself) that is {num(da, 3, sign=True)} test accuracy and "
              f"{num(dl, 4, sign=True)} nats/token of Δ LM loss "
              f"({'less' if dl < 0 else 'more' if dl > 0 else 'no change in'} forgetting).")
    return s
