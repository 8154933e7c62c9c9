"""The results page's sections for a run that starts from a foundation model (no CLI, no I/O):
what the foundation is, and its fine-tunes beside those of another run on the same tasks.

In:  pretrain.json of a run with `pretrain.init: foundation` (`foundation`: name, revision,
     sha256, architecture, sizes; `lm_head`; `steps`: 0 = used as it is); for `section_beside`
     the forgetting.json of this run and of the other run (their `tasks`), and what names the
     other run (its label, its dvc.lock sha256, what differs in its settings).
Out: Markdown lines. Every number is a value of those files; the sentences count what the tables
     show, nothing is written by hand.
"""
from __future__ import annotations

from typing import Any

from ptf.report.fmt import is_num, num, plural, pm, table


def section_foundation(pre: dict[str, Any]) -> list[str]:
    f = pre.get("foundation") or {}
    steps = pre.get("steps") or 0
    how = ("used as it is: no pretraining step (its own files, copied)" if not steps else
           f"further pretrained on this run's corpus for {num(steps, 0)} steps ({pre.get('objective')}; "
           "domain-adaptive pretraining)")
    L = ["## The foundation model", "",
         f"Not pretrained here: the run starts from `{f.get('name')}`, {how} (`data/metrics/pretrain.json`, "
         "`foundation`). Its own tokenizer is used throughout.", ""]
    rows = [["name", f"`{f.get('name')}`"], ["revision", f"`{f.get('revision')}`"],
            ["sha256 (tree hash of its files)", f"`{f.get('sha256')}`"],
            ["architecture", f"`{f.get('architecture')}` ({f.get('model_type')})"],
            ["layers × hidden size", f"{num(f.get('layers'), 0)} × {num(f.get('hidden_size'), 0)}"],
            ["vocabulary", num(f.get("vocab_size"), 0)],
            ["parameters (total)", num(pre.get("params_total"), 0)],
            ["LM head", str(pre.get("lm_head") or "none")],
            ["validation loss (nats/token)", num(pre.get("val_loss"), 4)],
            ["unigram baseline perplexity", num(pre.get("unigram_ppl"), 2)]]
    L += table(["measure", "value"], rows)
    if not is_num(pre.get("val_loss")):
        L += ["", "No validation perplexity: the foundation ships no LM head, and a head added here "
                  "would be random."]
    return L


def _acc(fg: dict[str, Any], task: str, strategy: str) -> dict[str, Any] | None:
    arm = ((fg.get("tasks") or {}).get(task) or {}).get(strategy)
    return ((arm or {}).get("mean_std") or {}).get("test_accuracy")


def section_beside(here: dict[str, Any], other: dict[str, Any], label: str, lock_sha: str,
                   differs: str) -> list[str]:
    """Test accuracy of every task x strategy that both runs declare, this run beside `other`."""
    pairs = [(t, s) for t in sorted(here.get("tasks") or {}) for s in sorted(here["tasks"][t])
             if s != "wise_ft" and _acc(other, t, s) is not None]
    L = [f"## Beside {label}", "",
         f"The same task × strategy arms in {label} (its `data/metrics/forgetting.json`, from the "
         f"`dvc.lock` with sha256 `{lock_sha}`): test accuracy, mean ± std over seeds. What differs "
         f"besides the starting model: {differs}.", ""]
    if not pairs:
        return L + ["No task × strategy arm is in both runs."]
    rows, higher = [], 0
    for t, s in pairs:
        a, b = _acc(here, t, s), _acc(other, t, s)
        d = a["mean"] - b["mean"] if is_num(a.get("mean")) and is_num(b.get("mean")) else None
        higher += d is not None and d > 0
        rows.append([t, s, pm(a), pm(b), num(d, 3, sign=True)])
    L += table(["task", "strategy", "this run", label, "difference"], rows)
    return L + ["", f"This run's mean test accuracy is higher on {higher} of {plural(len(pairs), 'arm')} "
                    "(means only: the seeds of the two runs are not paired)."]
