"""The sections of the results page (no CLI, no I/O but `read_notes`): Markdown from the metrics.

Every number in a table is a value of the metrics files (scaled by 100 for the % columns); every
sentence that states a finding comes from `ptf.report.prose`; the verdicts are the `claims` of
forgetting.json, never decided here. People's notes (docs/results_notes.md) are copied verbatim
between markers: `history` always, the claim sections under a claim that is not reproduced,
`general` after the claims.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ptf.measures.claims import REPRODUCED
from ptf.report import frontier_section, prose, sequential_section
from ptf.report.fmt import is_num, num, pct_digits, pm, table
from ptf.report.foundation_section import section_foundation
from ptf.report.representation_section import section_representation

NOTES = Path("docs/results_notes.md")


class Notes(dict):
    """People's notes, {section name: text}, and the file they come from (`path`)."""

    def __init__(self, sections: dict[str, str], path: Path = NOTES):
        super().__init__(sections)
        self.path = Path(path)


def notes_file_of(page: Path) -> Path:
    """The notes of a page: docs/results.md -> docs/results_notes.md,
    docs/results-foundation.md -> docs/results-foundation_notes.md."""
    return Path(page).with_name(Path(page).stem + "_notes.md")


def read_notes(path: Path, shown_as: Path = NOTES) -> Notes:
    """`## <name>` sections of a notes file (docs/results_notes.md), verbatim (HTML comments kept;
    a section holding only comments or blanks counts as empty and is left out); `shown_as`: its
    path from the repository root, as the page names it."""
    if not path.is_file():
        return Notes({}, shown_as)
    found: dict[str, str] = {}
    name, buf = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^##\s+(\S+)\s*$", line)
        if m:
            if name is not None:
                found[name] = "\n".join(buf).strip("\n")
            name, buf = m.group(1), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        found[name] = "\n".join(buf).strip("\n")
    return Notes({k: v for k, v in found.items() if re.sub(r"<!--.*?-->", "", v, flags=re.S).strip()}, shown_as)


def quote_notes(name: str, notes: dict[str, str], missing: str) -> list[str]:
    where = getattr(notes, "path", NOTES).as_posix()
    L = [f"<!-- BEGIN notes: {where}, section `## {name}` (written by people) -->"]
    L += [notes[name]] if name in notes else [f"*{missing} Add it under `## {name}` in `{where}`.*"]
    return L + [f"<!-- END notes `## {name}` -->"]


def section_history(notes: dict[str, str]) -> list[str]:
    return (["## How this run's task and settings were chosen", ""]
            + quote_notes("history", notes, "No history of the task and settings written yet."))


def section_pretrain(pre: dict[str, Any]) -> list[str]:
    if pre.get("init") == "foundation":
        return section_foundation(pre)
    L = ["## Pretraining", "",
         f"Objective `{pre.get('objective', 'n/a')}`; the unigram baseline is the perplexity of the "
         "same held-out targets under add-one-smoothed token frequencies of the training shards: a "
         "floor any language model must beat (`data/metrics/pretrain.json`).", ""]
    rows = [["validation loss (nats/token)", num(pre.get("val_loss"), 4)],
            ["validation perplexity", num(pre.get("val_ppl"), 2)],
            ["unigram baseline perplexity", num(pre.get("unigram_ppl"), 2)],
            ["optimizer steps", num(pre.get("steps"), 0)],
            ["tokens seen", num(pre.get("tokens_seen"), 0)],
            ["parameters (total)", num(pre.get("params_total"), 0)],
            ["parameters (non-embedding)", num(pre.get("params_non_embedding"), 0)],
            ["train time (s)", num(pre.get("train_time_s"), 1)]]
    L += table(["measure", "value"], rows)
    sentence = prose.pretrain_sentence(pre.get("val_ppl"), pre.get("unigram_ppl"))
    L += ["", sentence] if sentence else []
    backbones = pre.get("backbones") or []
    if len(backbones) > 1:   # the table is the first backbone's; fine-tune seed s starts from backbone s mod N
        L += ["", f"{len(backbones)} pretrained backbones, the same training from pretraining seeds "
              f"{', '.join(str(b['seed']) for b in backbones)}; fine-tune seed s starts from backbone s mod "
              f"{len(backbones)} (the table above is the first's):", ""]
        L += table(["pretraining seed", "validation loss (nats/token)", "validation perplexity", "optimizer steps"],
                   [[str(b["seed"]), num(b.get("val_loss"), 4), num(b.get("val_ppl"), 2), num(b.get("steps"), 0)]
                    for b in backbones])
    return L


def _frac_key(k: str) -> float:
    try:
        return float(k)
    except ValueError:
        return math.inf


def section_curves(curves: dict[str, Any], scratch: str, fig: str = "figures") -> list[str]:
    res = curves.get("results") or {}
    n_seeds = len(curves.get("seeds") or []) or None
    strategies = list(res)
    fracs = sorted({k for by_f in res.values() for k in by_f}, key=_frac_key)
    epochs = curves.get("epochs")
    L = ["## Data efficiency", "",
         f"Task `{curves.get('task', 'n/a')}`: test accuracy (mean ± std over seeds "
         f"{curves.get('seeds', 'n/a')}) for each fraction of the training labels, pretrained "
         f"backbone against `{scratch}` (random init, same architecture and budget). The budget "
         f"grows with the labels: ceil({f'{epochs:g}' if is_num(epochs) else 'n/a'} epochs × labels / "
         f"{curves.get('examples_per_step', 'n/a')} examples per step) optimizer steps, at least "
         f"{curves.get('min_steps', 'n/a')} (`data/metrics/curves.json`).", ""]
    rows = []
    for f in fracs:
        cells = [res[s][f] for s in strategies if f in res[s]]
        labels = sorted({c["n_labels"] for c in cells if is_num(c.get("n_labels"))})
        steps = sorted({c["steps"] for c in cells if is_num(c.get("steps"))})
        rows.append([f, " / ".join(str(int(n)) for n in labels) or "n/a",
                     " / ".join(str(int(n)) for n in steps) or "n/a"]
                    + [pm({"n": n_seeds, **res[s][f]}) if f in res[s] else "n/a" for s in strategies])
    L += table(["fraction", "labels", "steps", *strategies], rows)
    L += ["", *plateau_sentence(res, scratch, fracs)]
    return L + ["", f"![Learning curves: test accuracy against the number of labels]({fig}/learning_curves.png)"]


def plateau_sentence(res: dict[str, Any], scratch: str, fracs: list[str]) -> list[str]:
    """Whether `scratch` was still improving on validation when its budget ran out, at the
    largest fraction: its best-validation step of each seed against the budget."""
    cell = (res.get(scratch) or {}).get(fracs[-1]) if fracs else None
    best = [b for b in (cell or {}).get("best_steps") or [] if is_num(b)]
    if not best or not is_num(cell.get("steps")):
        return [f"No best-validation steps of `{scratch}` at the largest fraction in curves.json."]
    steps = int(cell["steps"])
    at_end = sum(b >= steps for b in best)
    verdict = (f"in {at_end} of {len(best)} seeds its best was its last step: it may still have "
               "been improving" if at_end else
               f"in every seed it stopped improving before its {steps} steps ran out")
    return [f"At the largest fraction ({fracs[-1]}), `{scratch}`'s best validation accuracy came at "
            f"step {', '.join(str(int(b)) for b in best)} of {steps} (per seed): {verdict}."]


TASK_COLUMNS = ["task", "strategy", "seeds", "test accuracy", "gain vs chance", "gain vs scratch",
                "Δ LM loss (nats/token)", "Δ LM loss %", "blocks worse %", "trainable %"]


def section_tasks(fg: dict[str, Any], fig: str = "figures") -> list[str]:
    ev = fg.get("eval") or {}
    lm = ev.get("applicable", True)
    forgetting = ("Forgetting = Δ held-out LM loss: the fine-tuned backbone under the pretrained LM head "
                  f"minus the pretrained model, on the same {ev.get('blocks', 'n/a')} held-out blocks "
                  f"({ev.get('tokens', 'n/a')} tokens; pretrained loss {num(ev.get('loss_pretrained'), 4)}); "
                  "> 0 means the pretraining objective got worse." if lm else
                  f"Δ held-out LM loss: {ev.get('note', 'not measured')} (below).")
    L = ["## Per task and strategy: what fine-tuning bought and what it cost", "",
         "Gain = test accuracy minus chance (1 / classes) or minus the mean `scratch` accuracy of the "
         f"task. {forgetting} Mean ± std over seeds "
         "(`data/metrics/forgetting.json`, from `data/metrics/finetune/<task>/<strategy>.json`).", ""]
    no_drift = "n/a (no pretrained backbone)" if lm else "n/a (no LM head)"
    rows = []
    for task in sorted(fg["tasks"]):
        for s in sorted(fg["tasks"][task]):
            a = fg["tasks"][task][s]
            ms = a.get("mean_std") or {}
            drift = a.get("drift_applicable", True)
            tf = (ms.get("trainable_fraction") or {}).get("mean")
            label = f"{s} (α = {a['alpha']:g}, chosen on validation)" if "alpha" in a else s
            rows.append([task, label, num((ms.get("test_accuracy") or {}).get("n"), 0),
                         pm(ms.get("test_accuracy")),
                         pm(ms.get("gain_over_chance"), sign=True),
                         pm(ms.get("gain_over_scratch"), sign=True),
                         pm(ms.get("delta_loss"), 4, sign=True) if drift else
                         ("n/a (no pretrained backbone)" if s == "scratch" else no_drift),
                         pm(ms.get("rel_delta_pct"), 2, sign=True) if drift else "n/a",
                         pm(ms.get("share_worse"), 1, scale=100) if drift else "n/a",
                         num(tf, pct_digits(tf), scale=100)])
    L += table(TASK_COLUMNS, rows)
    return L + ["", f"![Learning vs forgetting: gain against Δ held-out LM loss]({fig}/tradeoff.png)"]


def section_baselines(base: dict[str, Any], fg: dict[str, Any]) -> list[str]:
    """Every task: the two trivial baselines beside each fine-tuned arm's test accuracy."""
    tasks = sorted(fg["tasks"])
    arms = sorted({s for t in tasks for s in fg["tasks"][t]})
    L = ["## Every task beside two baselines", "",
         "Test accuracy of the majority class of the training subset and of a logistic regression on "
         "bag-of-token counts (its L2 strength chosen on validation) (`data/metrics/baselines.json`, "
         "the same train/validation/test subsets as the fine-tunes), beside each declared arm's mean ± "
         "std over seeds (`data/metrics/forgetting.json`); an arm not declared for a task is blank.", ""]
    rows = []
    for t in tasks:
        b = (base.get("tasks") or {}).get(t) or {}
        row = [t, num(b.get("n_classes"), 0), num((b.get("majority") or {}).get("test_accuracy")),
               num((b.get("bag_of_tokens") or {}).get("test_accuracy"))]
        row += [pm((fg["tasks"][t][s].get("mean_std") or {}).get("test_accuracy")) if s in fg["tasks"][t] else ""
                for s in arms]
        rows.append(row)
    L += table(["task", "classes", "majority", "bag-of-tokens", *arms], rows)
    beaten = [t for t in tasks if is_num(((base.get("tasks") or {}).get(t, {}).get("bag_of_tokens") or {})
                                         .get("test_accuracy"))
              and all(not is_num(((a.get("mean_std") or {}).get("test_accuracy") or {}).get("mean"))
                      or a["mean_std"]["test_accuracy"]["mean"] < base["tasks"][t]["bag_of_tokens"]["test_accuracy"]
                      for a in fg["tasks"][t].values())]
    return L + ["", prose.baseline_sentence(beaten, tasks)]


def section_verdicts_by_task(fg: dict[str, Any], curves_task: str | None) -> list[str]:
    """Every task's verdict on every claim, including "not measured" where no comparison ran."""
    claims = fg.get("claims") or {}
    L = ["## Every task's verdict on every claim", "",
         "The verdict of each claim restricted to one task's comparisons (their Holm-corrected "
         "intervals; the correction runs over the whole claim) (`by_task` of each claim in "
         "`data/metrics/forgetting.json`).", ""]
    rows = []
    for t in sorted(fg["tasks"]):
        row = [t]
        for name in ("few_labels", "forget_less"):
            v = ((claims.get(name) or {}).get("by_task") or {}).get(t)
            row.append(prose.task_verdict(v, name, curves_task))
        rows.append(row)
    return L + table(["task", "claim 1: few labels", "claim 2: forgets less than the reference"], rows)


def section_wise_ft(fg: dict[str, Any]) -> list[str]:
    w = fg.get("wise_ft")
    if not w:
        return []
    c = w["chosen_alpha"]
    L = [f"## WiSE-FT: weight-space ensembles of `{w['source']}` and the pretrained backbone", "",
         f"Task `{w['task']}`: backbone (1 − α) × pretrained + α × fine-tuned (`{w['source']}`, each "
         "seed), head fine-tuned, no further training (Wortsman et al. 2022). α = 0 is the pretrained "
         f"backbone, α = 1 the `{w['source']}` model. Mean ± std over seeds (`data/metrics/wise_ft.json`, "
         "`wise_ft` in `data/metrics/forgetting.json`); Δ LM loss on the same held-out blocks as every arm.", ""]
    rows = [[f"{p['alpha']:g}" + (" (chosen)" if p["chosen"] else ""), pm(p["mean_std"].get("val_accuracy")),
             pm(p["mean_std"]["test_accuracy"]), pm(p["mean_std"]["gain_over_chance"], sign=True),
             pm(p["mean_std"]["delta_loss"], 4, sign=True), pm(p["mean_std"]["share_worse"], 1, scale=100)]
            for p in w["points"].values()]
    L += table(["α", "validation accuracy", "test accuracy", "gain vs chance", "Δ LM loss (nats/token)",
                "blocks worse %"], rows)
    if all(not is_num(p["mean_std"]["delta_loss"]["mean"]) for p in w["points"].values()):
        c = w["chosen_alpha"]   # no LM head: accuracy only (prose.wise_ft_sentence compares drift)
        best = next(p for p in w["points"].values() if p["chosen"])
        return L + ["", f"The α chosen on validation is {c['alpha']:g} ({c['rule']}): test accuracy "
                        f"{pm(best['mean_std']['test_accuracy'])}. No Δ LM loss: the pretrained model "
                        "has no LM head."]
    return L + ["", prose.wise_ft_sentence(w)]


def _not_reproduced(claim_name: str, claim: dict[str, Any], notes: dict[str, str]) -> list[str]:
    comps = claim.get("comparisons") or {}
    bad = {k: c for k, c in comps.items() if c.get("verdict") != REPRODUCED}
    L = [f"**Where it does not reproduce.** {prose.counts_sentence(claim)}"]
    if bad:
        L += ["", *[f"- `{k}`: {prose.verdict_phrase(c)}." for k, c in sorted(bad.items())]]
    return L + [""] + quote_notes(claim_name, notes, "No explanation written yet.")


def section_claims(fg: dict[str, Any], notes: dict[str, str], reference: str, scratch: str) -> list[str]:
    claims = fg.get("claims") or {}
    c1, c2 = claims.get("few_labels") or {}, claims.get("forget_less") or {}
    L = ["## Does the run reproduce the paradigm's claims?", "",
         "The verdicts are computed by the forgetting stage (`claims` in "
         f"`data/metrics/forgetting.json`). Rule: {c1.get('rule') or c2.get('rule') or 'n/a'}", "",
         "### Claim 1 (data efficiency): a pretrained backbone beats scratch when labels are few", "",
         f"**Verdict: {c1.get('verdict', 'n/a')}.** Tested: {c1.get('claim', 'n/a')}. "
         + prose.counts_sentence(c1)]
    comps1 = c1.get("comparisons") or {}
    L += ([""] + [f"- {prose.few_labels_line(k, comps1[k], scratch)}." for k in sorted(comps1)]
          if comps1 else [])
    if c1.get("verdict") != REPRODUCED:
        L += [""] + _not_reproduced("few_labels", c1, notes)
    comps2 = c2.get("comparisons") or {}
    if c2.get("applicable") is False:     # no LM head: nothing to compare, and no "not reproduced"
        why = str(c2.get("missing", "")).removeprefix("not measured on LM drift: ").removeprefix("not applicable: ")
        L += ["", "### Claim 2 (forgetting): fine-tuning strategies that forget less than "
                  f"`{reference}`", "", f"**Not measured on LM drift**: {why}."]
        return L + (["", "### Notes", ""] + quote_notes("general", notes, "") if "general" in notes else [])
    L += ["", f"### Claim 2 (forgetting): {prose.forget_less_heading(c2, reference)}", "",
          f"**Verdict: {c2.get('verdict', 'n/a')}.** Tested: {c2.get('claim', 'n/a')}. "
          + prose.counts_sentence(c2)]
    if comps2:
        L += [""] + [f"- {prose.forget_less_line(k, comps2[k], reference)}." for k in sorted(comps2)]
        L += ["", prose.cost_sentence(c2, reference)]
    if c2.get("verdict") != REPRODUCED:
        L += [""] + _not_reproduced("forget_less", c2, notes)
    if "general" in notes:
        L += ["", "### Notes", ""] + quote_notes("general", notes, "")
    return L


def render_page(metrics: dict[str, Any], stamp: dict[str, Any], notes: dict[str, str],
                card_lines: list[str], sources: dict[str, str], reference: str, scratch: str,
                fig: str = "figures", beside: list[str] | None = None) -> str:
    """The page; `fig`: the figures' folder relative to the page; `beside`: the lines of a
    comparison with another run (`ptf.report.foundation_section.section_beside`)."""
    commit = stamp.get("git_commit")
    git = (f"git commit `{commit}` (clean tree)" if stamp.get("git_clean")
           else f"git commit `{commit}` **plus uncommitted changes**" if commit else "no git commit")
    found = metrics["pretrain"].get("foundation") or {}
    # the run's name from its page's notes: docs/results-thorough_notes.md -> "thorough"
    name = Path(getattr(notes, "path", NOTES)).stem.removesuffix("_notes").removeprefix("results").lstrip("-") or "default"
    title = (f"# Results of the foundation run (`{found.get('name')}`)" if metrics["pretrain"].get("init") == "foundation"
             else f"# Results of the {name} run")
    L = [title, "",
         "<!-- Generated by `python -m scripts.results` (make results). Do not edit: edit "
         f"{getattr(notes, 'path', NOTES).as_posix()} and regenerate. -->", "",
         f"Generated from `dvc.lock` sha256 `{stamp['lock_sha256']}` with `dvc status` clean; "
         f"{git}. Every number in the tables below is a value of the metrics files that `dvc.yaml` "
         "declares (`dvc metrics show`, git-tracked); the verdicts are those computed by the "
         "forgetting stage.", ""]
    L += section_history(notes) + [""]
    L += section_pretrain(metrics["pretrain"]) + [""]
    L += section_curves(metrics["curves"], scratch, fig) + [""]
    L += section_tasks(metrics["forgetting"], fig) + [""]
    L += section_baselines(metrics["baselines"], metrics["forgetting"]) + [""]
    L += section_representation(metrics["representation"]) + [""]
    L += beside + [""] if beside else []
    wise = section_wise_ft(metrics["forgetting"])
    L += wise + ([""] if wise else [])
    front = frontier_section.section(metrics.get("frontier"), fig)
    L += front + ([""] if front else [])
    L += sequential_section.section(metrics["forgetting"].get("sequential"), reference, fig) + [""]
    L += section_claims(metrics["forgetting"], notes, reference, scratch) + [""]
    L += section_verdicts_by_task(metrics["forgetting"], metrics["curves"].get("task")) + [""]
    L += card_lines + [""]
    L += ["## Sources", "", "sha256 of every file this page was made from:", ""]
    L += [f"- `{k}`: `{v}`" for k, v in sorted(sources.items())]
    L.append("")
    return "\n".join(L)
