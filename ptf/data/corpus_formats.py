"""Pretraining corpus formats (no CLI): one registry entry per format, typed config + reader.

In:  the `download.corpus.format` params (discriminated on `kind`; the format is always stated,
     never guessed) and the fetched source: a file (pypi/url/file sources; bz2 and gzip are
     decompressed by their magic bytes), a directory (`dir` source) or a Hugging Face data set
     (`hf` source); `max_bytes` bounds every decompressed or extracted stream.
Out: `read_corpus(fmt, input, what, max_bytes, max_docs)` -> (documents `{"id", "title",
     "text"}` in source order, stats Counter). Every format gets the same cleaning (`tidy`:
     whitespace, see `ptf.data.wikitext`; MediaWiki markup is first turned into prose);
     documents left empty are skipped and counted (`skipped_empty`); `max_docs` keeps the first
     N documents. Malformed input is one `StageError` naming the source, the line or row, and
     what was expected.

Formats:
  mediawiki   a MediaWiki XML export: namespace-0 pages that are not redirects
              (stats: pages, skipped_namespace, skipped_redirect, skipped_empty)
  text        plain UTF-8 text, `documents: line` (one per line) or `paragraph` (separated by
              blank lines); id = the number of the document's first line
  text_files  one document per file: the regular files of an archive (zip/wheel/tar[.gz|.bz2|.xz])
              or of a `dir` source whose path matches `pattern`; id = the path, title = the stem
  csv, tsv, jsonl, parquet, hf
              a table (see `ptf.data.tables`) with a named `text_column` and optional
              `id_column` (default: the line/row number) and `title_column` (default: "")
"""
from __future__ import annotations

import fnmatch
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import Field
from tqdm import tqdm

from ptf.common.cli import StageError
from ptf.common.config import StrictModel
from ptf.data.tables import (ColumnName, CsvFormat, HfFormat, JsonlFormat, ParquetFormat,
                             TsvFormat, column, decoded_lines, open_stream, read_table, table_input)
from ptf.data.trees import archive_files, dir_files
from ptf.data.wikitext import is_redirect, iter_pages, tidy, to_plain_text

Docs = list[dict]


# ----------------------------------------------------------------------------- configs
class MediawikiFormat(StrictModel):
    kind: Literal["mediawiki"]


class TextFormat(StrictModel):
    kind: Literal["text"]
    documents: Literal["line", "paragraph"]


class TextFilesFormat(StrictModel):
    kind: Literal["text_files"]
    pattern: Annotated[str, Field(min_length=1)] = "*.txt"  # fnmatch on the path inside


class _Columns(StrictModel):
    text_column: ColumnName
    id_column: ColumnName | None = None
    title_column: ColumnName | None = None


class CsvCorpus(CsvFormat, _Columns):
    pass


class TsvCorpus(TsvFormat, _Columns):
    pass


class JsonlCorpus(JsonlFormat, _Columns):
    pass


class ParquetCorpus(ParquetFormat, _Columns):
    pass


class HfCorpus(HfFormat, _Columns):
    pass


# ----------------------------------------------------------------------------- readers
class _Collector:
    """Cleans, counts and caps documents (shared by every reader)."""

    def __init__(self, max_docs: int | None, desc: str):
        self.docs: Docs = []
        self.stats: Counter = Counter()
        self.max_docs = max_docs
        self.bar = tqdm(desc=desc, unit=" docs", mininterval=1.0)

    def add(self, did: str, title: str, text: str, clean: bool = True) -> bool:
        """Add one document; False once `max_docs` are in (the reader stops)."""
        self.bar.update(1)
        text = tidy(text) if clean else text
        if not text:
            self.stats["skipped_empty"] += 1
        else:
            self.docs.append({"id": did, "title": title, "text": text})
        return self.max_docs is None or len(self.docs) < self.max_docs

    def done(self) -> tuple[Docs, Counter]:
        self.bar.close()
        return self.docs, self.stats


def read_mediawiki(fmt: MediawikiFormat, path: Path, what: str, max_bytes: int,
                   max_docs: int | None) -> tuple[Docs, Counter]:
    c = _Collector(max_docs, "parse dump")
    try:
        with open_stream(path, max_bytes, what) as stream:
            for page in iter_pages(stream):
                c.stats["pages"] += 1
                if page.ns != "0":
                    c.stats["skipped_namespace"] += 1
                elif is_redirect(page):
                    c.stats["skipped_redirect"] += 1
                elif not c.add(page.id, page.title, to_plain_text(page.text), clean=False):
                    break
    except ET.ParseError as e:
        raise StageError(f"{what}: {path.name} is not well-formed MediaWiki XML ({e})") from None
    except (EOFError, OSError, zlib.error) as e:
        raise StageError(f"{what}: {path.name} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return c.done()


def _paragraphs(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    start, buf = 0, []
    for n, line in lines:
        if line.strip():
            start = start or n
            buf.append(line)
        elif buf:
            yield start, "\n".join(buf)
            start, buf = 0, []
    if buf:
        yield start, "\n".join(buf)


def read_text(fmt: TextFormat, path: Path, what: str, max_bytes: int,
              max_docs: int | None) -> tuple[Docs, Counter]:
    c = _Collector(max_docs, "read text")
    with open_stream(path, max_bytes, what) as stream:
        lines = decoded_lines(stream, f"{what}: {path.name}")
        if fmt.documents == "paragraph":
            lines = _paragraphs(lines)
        for n, text in lines:
            c.stats["records"] += 1
            if not c.add(str(n), "", text):
                break
    return c.done()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StageError(f"{where}: not valid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); "
                         "expected UTF-8 text") from None


def read_text_files(fmt: TextFilesFormat, inp: Path, what: str, max_bytes: int,
                    max_docs: int | None) -> tuple[Docs, Counter]:
    c = _Collector(max_docs, "read files")
    try:
        files = (dir_files(inp, fmt.pattern, max_bytes, what) if inp.is_dir() else
                 ((n, f) for n, f in archive_files(inp, "", max_bytes, what)
                  if fnmatch.fnmatchcase(n, fmt.pattern)))
        for name, f in files:
            c.stats["records"] += 1
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise StageError(f"{what}: {name} is larger than max_bytes={max_bytes}")
            if not c.add(name, PurePosixPath(name).stem, _decode(data, f"{what}: {name}")):
                break
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise StageError(f"{what}: {inp.name} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if not c.stats["records"]:
        raise StageError(f"{what}: no file matches pattern {fmt.pattern!r}; expected at least one "
                         "text file")
    return c.done()


def read_rows(fmt: _Columns, inp: Any, what: str, max_bytes: int,
              max_docs: int | None) -> tuple[Docs, Counter]:
    """Documents from a table: the text, id and title columns of every row."""
    c = _Collector(max_docs, f"read {fmt.kind}")
    where = what if fmt.kind == "hf" else f"{what}: {inp.name}"
    data = inp if fmt.kind == "hf" else table_input(fmt, inp, max_bytes, where)
    try:
        for loc, row in read_table(fmt, data, where):
            c.stats["records"] += 1
            text = column(row, fmt.text_column, loc, where)
            if not isinstance(text, str):
                raise StageError(f"{where}: {loc}: column {fmt.text_column!r} holds "
                                 f"{type(text).__name__} {text!r}; expected a string")
            did = str(column(row, fmt.id_column, loc, where)) if fmt.id_column else loc.split()[-1]
            title = str(column(row, fmt.title_column, loc, where)) if fmt.title_column else ""
            if not c.add(did, title, text):
                break
    finally:
        if fmt.kind != "hf":
            data.close()
    return c.done()


@dataclass(frozen=True)
class CorpusFormat:
    """One registry entry: typed config, reader, and what the reader takes (`file`: a fetched
    file; `dir`: a `dir` source; `dataset`: an `hf` source)."""

    config: type[StrictModel]
    read: Callable[..., tuple[Docs, Counter]]
    inputs: tuple[str, ...] = ("file",)


CORPUS_FORMATS: dict[str, CorpusFormat] = {
    "mediawiki": CorpusFormat(MediawikiFormat, read_mediawiki),
    "text": CorpusFormat(TextFormat, read_text),
    "text_files": CorpusFormat(TextFilesFormat, read_text_files, ("file", "dir")),
    "csv": CorpusFormat(CsvCorpus, read_rows),
    "tsv": CorpusFormat(TsvCorpus, read_rows),
    "jsonl": CorpusFormat(JsonlCorpus, read_rows),
    "parquet": CorpusFormat(ParquetCorpus, read_rows),
    "hf": CorpusFormat(HfCorpus, read_rows, ("dataset",)),
}
CorpusFormatCfg = Annotated[Union[tuple(f.config for f in CORPUS_FORMATS.values())],
                            Field(discriminator="kind")]


def read_corpus(fmt: StrictModel, inp: Any, what: str, max_bytes: int,
                max_docs: int | None) -> tuple[Docs, Counter]:
    """The cleaned documents of `inp` read as `fmt`, and what reading counted."""
    return CORPUS_FORMATS[fmt.kind].read(fmt, inp, what, max_bytes, max_docs)
