"""Clean splits (no CLI): near-duplicate texts kept on one side of every split.

In:  the rows of every task table (`TaskRow`s), the split of every row, and the unit each row is
     split with (its group, e.g. a review, or the row itself).
Out: `dedup_splits(...)` -> (new splits, report). Two texts are near-duplicates when their
     `normalise`d forms are equal: Unicode NFKC, case-folded, every run of characters that are
     not letters or digits (punctuation, symbols, spaces) turned into one space, stripped; texts
     that normalise to nothing (only punctuation or emoji) are never matched. Units connected by
     a shared normalised text (across tables too: a task may combine tables, and the train text
     of one table may enter the pretraining corpus) form a component; a component whose rows sit
     in more than one split is moved whole to the split that already holds most of its rows (ties:
     train, then validation), which moves the fewest rows and keeps a group (document) on one side.
     The report counts the rows moved, from which split to which, and per table.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict

from ptf.data.task_formats import SPLITS, TaskRow, split_keys

_NON_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lower-cased, NFKC, punctuation/space runs as one space: 'Great!!  movie' -> 'great movie'."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def dedup_splits(rows: dict[str, list[TaskRow]],
                 splits: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict]:
    """Splits where no normalised text appears on two sides; and what was moved."""
    uf = _UnionFind()
    by_text: dict[str, tuple] = {}
    units = {f: [(f, k) for k in split_keys(rs)] for f, rs in rows.items()}
    for f, rs in rows.items():
        for unit, r in zip(units[f], rs):
            uf.find(unit)
            key = normalise(r.text)
            if key:
                if key in by_text:
                    uf.union(unit, by_text[key])
                else:
                    by_text[key] = unit
    counts: dict = defaultdict(Counter)
    for f in rows:
        for unit, s in zip(units[f], splits[f]):
            counts[uf.find(unit)][s] += 1
    order = {s: i for i, s in enumerate(SPLITS)}
    target = {c: min(n, key=lambda s: (-n[s], order[s])) for c, n in counts.items() if len(n) > 1}
    new, moved, by_file = {}, Counter(), Counter()
    for f in rows:
        out = []
        for unit, s in zip(units[f], splits[f]):
            t = target.get(uf.find(unit), s)
            if t != s:
                moved[f"{s}->{t}"] += 1
                by_file[f] += 1
            out.append(t)
        new[f] = out
    report = {"normalisation": "NFKC, casefold, non-alphanumeric runs -> one space",
              "components_across_splits": len(target), "moved_rows": sum(moved.values()),
              "moved": dict(sorted(moved.items())), "by_file": dict(sorted(by_file.items()))}
    return new, report
