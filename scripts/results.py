"""The results page of one pipeline run: docs/results.md and docs/figures/*.png.

In:  a workspace whose `dvc status` is clean (the page describes exactly the `dvc.lock` there);
     the metrics that dvc.yaml declares (the files `dvc metrics show` reads, all git-tracked):
       data/metrics/pretrain.json            validation perplexity vs the unigram baseline
       data/metrics/curves.json              accuracy per label fraction and strategy
       data/metrics/finetune/<task>/<s>.json per-seed test accuracy, trainable parameters, for
                                             exactly the arms params.yaml declares
       data/metrics/sequential.json          the accuracy matrices of the sequential runs
       data/metrics/forgetting.json          drift, gains, CL measures and the claims' verdicts
       data/metrics/frontier.json            the sweep's frontiers, claim 2 at matched accuracy
     the figures of the forgetting stage: data/plots/{tradeoff,learning_curves,accuracy_matrix}.png and the
     frontier stage's data/plots/frontier.png;
     data/models/pretrained/ and the best fine-tuned model (the evidence card);
     docs/results_notes.md: people's notes, one `## <name>` section each (`history`, always shown;
     `few_labels`, `forget_less` under a claim that is not reproduced; `general`).
Out: docs/figures/ (replaced whole, atomically), then docs/results.md (atomically), stamped with
     the sha256 of dvc.lock and the git commit (when the tree is clean).
Run: python -m scripts.results [--root .] [--repeats 30] [--sentence "..."]
         [--page docs/results.md --figures docs/figures] [--beside OTHER_WORKSPACE]
     (`make results`). Another parameter set gets its own page: e.g. the foundation run
     (configs/foundation.yaml) writes docs/results-foundation.md and docs/figures-foundation/,
     with `--beside` a clean workspace of the default run, whose arms it sits beside; its notes
     are docs/results-foundation_notes.md (a page's notes: `<page stem>_notes.md`).
     Refuses, with `error: ...` and exit 1, when `dvc status` is not clean or a
     metrics file is missing.

The pieces: `ptf.report.workspace` (checks), `ptf.report.sections` (the page, from the metrics),
`ptf.report.evidence` (the evidence card, measured now).
"""
from __future__ import annotations

import argparse
import os
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

FIGURE_FILES = {name: paths.PLOTS / f"{name}.png"
                for name in ("tradeoff", "learning_curves", "accuracy_matrix", "frontier")}


def param_differences(here: dict[str, Any], other: dict[str, Any], strategies: set[str]) -> str:
    """The fine-tuning settings in which two runs' params differ (those that the compared arms
    read: the training budget, seeds, data caps, pooling, and each compared strategy's arm)."""
    def pick(p: dict[str, Any]) -> dict[str, Any]:
        ft = p.get("finetune") or {}
        flat = {f"finetune.train.{k}": v for k, v in (ft.get("train") or {}).items()}
        flat.update({f"finetune.data.{k}": v for k, v in (ft.get("data") or {}).items()})
        flat.update({"finetune.seeds": ft.get("seeds"), "finetune.pooling": ft.get("pooling")})
        for s in sorted(strategies):
            for k, v in ((ft.get("arms") or {}).get(s) or {}).items():
                flat[f"finetune.arms.{s}.{k}"] = v
        return flat

    a, b = pick(here), pick(other)
    diff = [f"`{k}` {a.get(k)} here, {b.get(k)} there" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diff) or "none of the fine-tuning settings"


def beside_lines(root: Path, metrics: dict[str, Any], other_root: Path) -> tuple[list[str], dict[str, str]]:
    """The comparison with the run in `other_root` (a clean workspace of the same pipeline,
    e.g. the default run), and the sha256 of the files it was made from."""
    from ptf.common.config import read_params
    from ptf.report.foundation_section import section_beside

    other_root = Path(other_root)
    other = ws.load_metrics(other_root, read_matrix(other_root / "params.yaml"))["forgetting"]
    strategies = {s for arms in metrics["forgetting"]["tasks"].values() for s in arms}
    differs = param_differences(read_params(root / "params.yaml"), read_params(other_root / "params.yaml"),
                                strategies)
    lock = ws.lock_stamp(other_root)["lock_sha256"]
    label = "the default run (the pipeline's own pretrained model)"
    files = {f"{label}: {p}": ws.sha256_file(other_root / p)
             for p in ("dvc.lock", "params.yaml", ws.METRICS["forgetting"].as_posix())}
    return section_beside(metrics["forgetting"], other, label, lock, differs), files


def run(root: Path = Path("."), repeats: int = 30, sentence: str = evidence.EXAMPLE,
        status_fn: Callable[[Path], dict[str, Any]] = ws.dvc_status, page: Path = ws.PAGE,
        figures: Path = ws.FIGURES, beside: Path | None = None) -> Path:
    """Write `page` and `figures` (paths relative to `root`); `beside`: another clean workspace
    whose arms the page compares with this run's."""
    root = Path(root)
    ws.check_clean(status_fn(root))
    if beside is not None:
        ws.check_clean(status_fn(Path(beside)))
    stamp = ws.lock_stamp(root, page, figures)
    matrix = read_matrix(root / "params.yaml")
    metrics = ws.load_metrics(root, matrix)
    for f in FIGURE_FILES.values():
        if not (root / f).is_file():
            raise ws.ResultsError(f"{root / f}: missing figure; run `dvc repro`")
    reference, scratch = ws.reference_and_scratch(root)
    best = evidence.best_model(metrics["forgetting"])
    mdir = root / paths.FINETUNED / best[0] / best[1] / best[2]
    if not mdir.is_dir():
        raise ws.ResultsError(f"{mdir}: the best fine-tuned model is missing; run `dvc pull` or `dvc repro`")
    card = evidence.evidence_card(root / paths.PRETRAINED, mdir, sentence=sentence, repeats=repeats)
    card["finetuned"]["dir"] = mdir.relative_to(root).as_posix()
    sources = {f.relative_to(root).as_posix(): ws.sha256_file(f) for f in ws.source_files(root, matrix)}
    notes_path = sections.notes_file_of(page)
    if (root / notes_path).is_file():
        sources[notes_path.as_posix()] = ws.sha256_file(root / notes_path)
    sources.update({f"{figures.as_posix()}/{f.name}": ws.sha256_file(root / f) for f in FIGURE_FILES.values()})
    side = None
    if beside is not None:
        side, files = beside_lines(root, metrics, beside)
        sources.update(files)
    fig = Path(os.path.relpath(figures, page.parent)).as_posix()
    page_text = sections.render_page(metrics, stamp, sections.read_notes(root / notes_path, notes_path),
                                     evidence.render_card(card, best), sources, reference, scratch,
                                     fig=fig, beside=side)
    with atomic_dir(root / figures) as tmp:
        for f in FIGURE_FILES.values():
            shutil.copy2(root / f, tmp / f.name)
    write_text(root / page, page_text)
    return root / page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats (default 30)")
    ap.add_argument("--sentence", default=evidence.EXAMPLE, help="the evidence card's example sentence")
    ap.add_argument("--page", type=Path, default=ws.PAGE, help=f"the page, from the root (default {ws.PAGE})")
    ap.add_argument("--figures", type=Path, default=ws.FIGURES,
                    help=f"its figures' folder, from the root (default {ws.FIGURES})")
    ap.add_argument("--beside", type=Path, default=None,
                    help="another clean workspace (the default run) whose arms the page compares")
    args = ap.parse_args()

    def go():
        out = run(args.root, args.repeats, args.sentence, page=args.page, figures=args.figures,
                  beside=args.beside)
        print(f"wrote {out} and {args.root / args.figures}/")

    main_guard(go)


if __name__ == "__main__":
    main()
