"""The results page of one pipeline run: docs/results.md and docs/figures/*.png.

In:  a workspace whose `dvc status` is clean (the page describes exactly the `dvc.lock` there);
     the metrics that dvc.yaml declares (the files `dvc metrics show` reads, all git-tracked):
       data/metrics/pretrain.json            validation perplexity vs the unigram baseline
       data/metrics/curves.json              accuracy per label fraction and strategy
       data/metrics/finetune/<task>/<s>.json per-seed test accuracy, trainable parameters, for
                                             exactly the arms params.yaml declares
       data/metrics/sequential.json          the accuracy matrix of the sequential run
       data/metrics/forgetting.json          drift, gains, CL measures and the claims' verdicts
     the figures of the forgetting stage: data/plots/{tradeoff,learning_curves,accuracy_matrix}.png;
     data/models/pretrained/ and the best fine-tuned model (the evidence card);
     docs/results_notes.md: people's notes, one `## <name>` section each (`history`, always shown;
     `few_labels`, `forget_less` under a claim that is not reproduced; `general`).
Out: docs/figures/ (replaced whole, atomically), then docs/results.md (atomically), stamped with
     the sha256 of dvc.lock and the git commit (when the tree is clean).
Run: python -m scripts.results [--root .] [--repeats 30] [--sentence "..."]
     (`make results`). Refuses, with `error: ...` and exit 1, when `dvc status` is not clean or a
     metrics file is missing.

The pieces: `ptf.report.workspace` (checks), `ptf.report.sections` (the page, from the metrics),
`ptf.report.evidence` (the evidence card, measured now).
"""
from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.atomic import atomic_dir, write_text
from ptf.common.cli import main_guard
from ptf.measures.outputs import read_matrix
from ptf.report import evidence, sections
from ptf.report import workspace as ws

FIGURE_FILES = {name: paths.PLOTS / f"{name}.png" for name in ("tradeoff", "learning_curves", "accuracy_matrix")}


def run(root: Path = Path("."), repeats: int = 30, sentence: str = evidence.EXAMPLE,
        status_fn: Callable[[Path], dict[str, Any]] = ws.dvc_status) -> Path:
    root = Path(root)
    ws.check_clean(status_fn(root))
    stamp = ws.lock_stamp(root)
    matrix = read_matrix(root / "params.yaml")
    metrics = ws.load_metrics(root, matrix)
    for f in FIGURE_FILES.values():
        if not (root / f).is_file():
            raise ws.ResultsError(f"{root / f}: missing figure; run `dvc repro forgetting`")
    reference, scratch = ws.reference_and_scratch(root)
    best = evidence.best_model(metrics["forgetting"])
    mdir = root / paths.FINETUNED / best[0] / best[1] / best[2]
    if not mdir.is_dir():
        raise ws.ResultsError(f"{mdir}: the best fine-tuned model is missing; run `dvc pull` or `dvc repro`")
    card = evidence.evidence_card(root / paths.PRETRAINED, mdir, sentence=sentence, repeats=repeats)
    card["finetuned"]["dir"] = mdir.relative_to(root).as_posix()
    sources = {f.relative_to(root).as_posix(): ws.sha256_file(f) for f in ws.source_files(root, matrix)}
    if (root / sections.NOTES).is_file():
        sources[sections.NOTES.as_posix()] = ws.sha256_file(root / sections.NOTES)
    sources.update({f"{ws.FIGURES.as_posix()}/{f.name}": ws.sha256_file(root / f) for f in FIGURE_FILES.values()})
    page = sections.render_page(metrics, stamp, sections.read_notes(root / sections.NOTES),
                                evidence.render_card(card, best), sources, reference, scratch)
    with atomic_dir(root / ws.FIGURES) as tmp:
        for f in FIGURE_FILES.values():
            shutil.copy2(root / f, tmp / f.name)
    write_text(root / ws.PAGE, page)
    return root / ws.PAGE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats (default 30)")
    ap.add_argument("--sentence", default=evidence.EXAMPLE, help="the evidence card's example sentence")
    args = ap.parse_args()

    def go():
        out = run(args.root, args.repeats, args.sentence)
        print(f"wrote {out} and {args.root / ws.FIGURES}/")

    main_guard(go)


if __name__ == "__main__":
    main()
