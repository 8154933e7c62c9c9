"""Stage `download`: the pretraining corpus and the fine-tuning tasks, pinned and split.

In:  the `download` section of params.yaml: a corpus source and its format (default: the English
     Wikipedia dump excerpt shipped in the `gensim==4.4.0` wheel, `mediawiki`; see
     `ptf/data/corpus_formats.py` for plain text, text files, CSV/TSV/JSONL/Parquet and HF data
     sets) and the task tables (default: the human-rated sentences of the VADER paper, in the
     `vaderSentiment==3.3.2` sdist; see `ptf/data/task_formats.py`), every source pinned by
     sha256 (or an HF revision; see `ptf/data/fetch.py` and `ptf/data/trees.py` for the source
     kinds and the safe extraction).
Out: data/raw/<sha256>/<name>            the verified source files (a cache: kept files with the
                                         right hash are not fetched again)
     data/corpus/{train,validation}.jsonl one document per line {"id","title","text"}, split by
                                         document; with `corpus.add_task_text`, train.jsonl also
                                         holds the tasks' TRAIN texts (never validation/test)
     data/tasks/<task>/                  HF DatasetDict train/validation/test, columns
                                         id (str), text (str), label (ClassLabel)
     data/manifests/download.json        counts, label counts, hashes of sources and outputs,
                                         and (with `tasks.dedup_across_splits`) what was moved
     data/foundation/                    with `foundation`: the model's files (config, safetensors,
                                         tokenizer) and foundation.json (name, revision, sha256,
                                         architecture); without: only foundation.json {"foundation": null}
     Every output is built in a temporary sibling and renamed into place at the end, so a
     failure leaves the previous good outputs intact; the same inputs give the same bytes.
Run: python -m stages.download   (or `dvc repro download`)

Each task table is split once (seeded, by group where it has one, or as given), and every task
built from it uses that one split, so no text is in one task's train and another's test; with
`dedup_across_splits`, near-duplicate texts are then moved to one side (`ptf/data/dedup.py`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, model_validator
from tqdm import tqdm

from ptf.common import paths
from ptf.common.atomic import atomic_dir, atomic_file
from ptf.common.cli import StageError, main_guard
from ptf.common.config import StrictModel, load_section
from ptf.data.corpus_formats import CORPUS_FORMATS, CorpusFormatCfg, read_corpus
from ptf.data.dedup import dedup_splits
from ptf.data.foundation import FoundationConfig, materialise, write_none
from ptf.data.fetch import (FileSource, HfSource, PypiSource, UrlSource, fetch, load_hf,
                            read_member, sha256_file)
from ptf.data.tables import read_table, table_input
from ptf.data.task_formats import (SPLITS, Fraction, TasksConfig, build_task, describe_rows,
                                   read_rows, save_task, table_splits)
from ptf.data.trees import DirSource, fetch_dir
from ptf.models.modeling import FOUNDATION_DIR

SECTION = "download"
MANIFEST = paths.MANIFESTS / "download.json"
CorpusSource = Annotated[Union[PypiSource, UrlSource, FileSource, HfSource, DirSource],
                         Field(discriminator="kind")]
_INPUT = {"hf": "dataset", "dir": "dir"}  # what a source kind gives a reader (default: "file")


# ----------------------------------------------------------------------------- config
class CorpusConfig(StrictModel):
    source: CorpusSource
    format: CorpusFormatCfg  # how to read it (ptf/data/corpus_formats.py); never guessed
    validation_fraction: Fraction
    max_articles: Annotated[int, Field(ge=2)] | None  # the first N documents; null: all
    add_task_text: bool  # task-adaptive pretraining: append the tasks' TRAIN text to train.jsonl

    @model_validator(mode="after")
    def _format_fits_source(self) -> CorpusConfig:
        got = _INPUT.get(self.source.kind, "file")
        takes = CORPUS_FORMATS[self.format.kind].inputs
        if got not in takes:
            raise ValueError(f"format {self.format.kind!r} cannot read a source of kind "
                             f"{self.source.kind!r} (it reads: {', '.join(takes)})")
        return self


class Config(StrictModel):
    seed: Annotated[int, Field(ge=0)]
    max_bytes: Annotated[int, Field(gt=0)]  # bound on every fetched, extracted or decompressed file
    corpus: CorpusConfig
    tasks: TasksConfig
    foundation: FoundationConfig | None  # a model to start from (ptf/data/foundation.py); null: none


# ----------------------------------------------------------------------------- helpers
def split_articles(n: int, val_frac: float, seed: int) -> set[int]:
    """Seeded indices of the validation documents (at least one, never all)."""
    idx = list(range(n))
    random.Random(f"{seed}:corpus").shuffle(idx)
    n_val = min(n - 1, max(1, round(val_frac * n)))
    return set(idx[:n_val])


def write_jsonl(path: Path, docs: list[dict]) -> None:
    """One `{"id", "title", "text"}` object per line, key-sorted, streamed (a corpus of billions
    of characters is never one string)."""
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "title": d["title"], "text": d["text"]},
                               ensure_ascii=False, sort_keys=True) + "\n")


def _source_entry(src: Any, stored: Path | None, root_raw: Path) -> dict:
    entry = src.model_dump(mode="json")
    if stored is not None:
        entry["stored"] = (paths.RAW / stored.relative_to(root_raw)).as_posix()
    return entry


class _Sources:
    """Fetches each distinct source once: a stored file or directory, or an HF data set."""

    def __init__(self, raw: Path, root: Path, old_raw: Path, max_bytes: int):
        self.raw, self.root, self.max_bytes = raw, root, max_bytes
        self.kw = dict(cache=[old_raw], root=root, max_bytes=max_bytes)
        self.memo: dict[str, Any] = {}

    def get(self, src) -> Any:
        key = json.dumps(src.model_dump(mode="json"), sort_keys=True)
        if key not in self.memo:
            if isinstance(src, HfSource):
                self.memo[key] = load_hf(src)
            elif isinstance(src, DirSource):
                self.memo[key] = fetch_dir(src, self.raw, **self.kw)[0]
            else:
                self.memo[key] = fetch(src, self.raw, **self.kw)[0]
        return self.memo[key]

    def entry(self, src) -> dict:
        got = self.get(src)
        return _source_entry(src, got if isinstance(got, Path) else None, self.raw)


# ----------------------------------------------------------------------------- tasks
def read_tables(tc: TasksConfig, sources: _Sources, max_bytes: int):
    """The validated rows of every table, where each came from, and its manifest entry."""
    rows, where, entries = {}, {}, {}
    for fname, spec in tc.files.items():
        src = spec.source or tc.source
        inp = sources.get(src)
        entry: dict = {} if spec.source is None else {"source": sources.entry(src)}
        if isinstance(src, HfSource):
            w, data = src.describe(), inp
        else:
            w = f"{src.describe()} -> {src.members[-1] if src.members else inp.name}"
            if spec.member is not None:
                w = f"{w} -> {spec.member}"
                blob = read_member(inp, spec.member, max_bytes, w)
                got = hashlib.sha256(blob).hexdigest()
                if got != spec.sha256:
                    raise StageError(f"{w}: sha256 mismatch for tasks file {fname!r}: expected "
                                     f"{spec.sha256}, got {got}")
                entry.update(member=spec.member, sha256=spec.sha256)
                inp = blob
            data = table_input(spec.format, inp, max_bytes, w)
        try:
            rows[fname] = read_rows(spec, read_table(spec.format, data, w), w)
        finally:
            if not isinstance(src, HfSource):
                data.close()
        where[fname], entries[fname] = w, {**entry, "rows": len(rows[fname])}
    return rows, where, entries


def build_tasks(tc: TasksConfig, seed: int, sources: _Sources, max_bytes: int, tasks_dir: Path,
                add_task_text: bool) -> tuple[dict, dict, list[dict], dict | None]:
    """Read, split (and dedup), label and save every task; return the manifest pieces."""
    rows, where, file_entries = read_tables(tc, sources, max_bytes)
    splits = {f: table_splits(rows[f], tc, seed, f) for f in rows}
    dedup = None
    if tc.dedup_across_splits:
        splits, dedup = dedup_splits(rows, splits)
    for f, e in file_entries.items():
        e["split_rows"] = dict(sorted(Counter(splits[f]).items()))
    task_entries, task_docs, seen = {}, [], set()
    for tname, spec in tqdm(tc.tasks.items(), desc="tasks", unit=" task"):
        names, data = build_task(tname, spec, tc, seed, rows, splits, where)
        save_task(tasks_dir / tname, names, data)
        task_entries[tname] = {"files": list(spec.files), "labels": spec.labels,
                               "label_names": names, "splits": describe_rows(data, names)}
        if add_task_text:
            for rid, text in zip(data["train"]["id"], data["train"]["text"]):
                if rid not in seen:
                    seen.add(rid)
                    task_docs.append({"id": f"task:{rid}", "title": f"task:{rid.split(':')[0]}", "text": text})
    return file_entries, task_entries, task_docs, dedup


# ----------------------------------------------------------------------------- run
def run(cfg: Config, root: Path = Path(".")) -> dict:
    """Fetch, parse, split and write every output atomically; return the manifest."""
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    root = Path(root)
    old_raw = root / paths.RAW
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(atomic_dir(root / paths.RAW))
        corpus_dir = stack.enter_context(atomic_dir(root / paths.CORPUS))
        tasks_dir = stack.enter_context(atomic_dir(root / paths.TASKS))
        found_dir = stack.enter_context(atomic_dir(root / FOUNDATION_DIR))
        manifest_tmp = stack.enter_context(atomic_file(root / MANIFEST))
        stack.enter_context(_hf_cache_elsewhere())
        for d in (raw, corpus_dir, tasks_dir, found_dir):
            d.chmod(0o755)  # mkdtemp makes 0700; the outputs are ordinary shared directories
        manifest_tmp.chmod(0o644)
        sources = _Sources(raw, root, old_raw, cfg.max_bytes)
        if cfg.foundation is None:  # first: a refused foundation fails before the long parts
            write_none(found_dir)
        else:
            materialise(cfg.foundation, found_dir, raw, cache=[old_raw], root=root, max_bytes=cfg.max_bytes)

        tc, cc = cfg.tasks, cfg.corpus
        file_entries, task_entries, task_docs, dedup = build_tasks(
            tc, cfg.seed, sources, cfg.max_bytes, tasks_dir, cc.add_task_text)

        # corpus
        what = cc.source.describe()
        inp = sources.get(cc.source)
        articles, stats = read_corpus(cc.format, inp, what, cfg.max_bytes, cc.max_articles)
        if not articles:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "no pages"
            raise StageError(f"{what}: empty corpus: no articles after parsing "
                             f"{inp.name if isinstance(inp, Path) else 'the data set'} ({detail})")
        if len(articles) < 2:
            raise StageError(f"{what}: only 1 article; need at least 2 to split train/validation")
        val_idx = split_articles(len(articles), cc.validation_fraction, cfg.seed)
        train = [a for i, a in enumerate(articles) if i not in val_idx]
        val = [a for i, a in enumerate(articles) if i in val_idx]
        write_jsonl(corpus_dir / "train.jsonl", train + task_docs)
        write_jsonl(corpus_dir / "validation.jsonl", val)

        def split_entry(docs: list[dict], extra: list[dict], name: str) -> dict:
            return {"articles": len(docs), "task_docs": len(extra),
                    "chars": sum(len(d["text"]) for d in docs + extra),
                    "sha256": sha256_file(corpus_dir / name)}

        tasks_source = sources.entry(tc.source) if tc.source is not None else {}
        manifest = {
            "sources": {"corpus": sources.entry(cc.source),
                        "tasks": {**tasks_source, "files": file_entries}},
            "corpus": {"articles": len(articles), "chars": sum(len(a["text"]) for a in articles),
                       "pages": dict(sorted(stats.items())), "add_task_text": cc.add_task_text,
                       "splits": {"train": split_entry(train, task_docs, "train.jsonl"),
                                  "validation": split_entry(val, [], "validation.jsonl")}},
            "tasks": task_entries,
        }
        if dedup is not None:
            manifest["dedup"] = dedup
        manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return manifest


@contextlib.contextmanager
def _hf_cache_elsewhere():
    """Keep any HF datasets cache file out of data/ (a temporary dir, removed afterwards)."""
    import datasets.config as dc

    old = dc.HF_DATASETS_CACHE
    with tempfile.TemporaryDirectory(prefix="hf-cache-") as td:
        dc.HF_DATASETS_CACHE = Path(td)
        try:
            yield
        finally:
            dc.HF_DATASETS_CACHE = old


def main() -> None:
    cfg = load_section(SECTION, Config)
    m = run(cfg)
    c = m["corpus"]
    print(f"download: {c['articles']} articles, {c['chars']:,} chars; tasks: "
          + ", ".join(f"{t} {e['splits']['train']['rows']}/{e['splits']['validation']['rows']}/"
                      f"{e['splits']['test']['rows']}" for t, e in m["tasks"].items()))


if __name__ == "__main__":
    main_guard(main)
