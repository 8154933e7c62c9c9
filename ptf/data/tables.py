"""Rows of a table, whatever its format (no CLI): CSV, TSV, JSONL, Parquet, or a Hugging Face data set.

In:  a table format config (a pydantic model discriminated on `kind`, one entry of the registry
     `TABLE_FORMATS`: typed config + reader), and the table itself: a binary stream (csv, tsv,
     jsonl, parquet) or a `datasets.Dataset` (hf); `where` names the source for error messages.
Out: `(loc, row)` pairs in table order, `loc` being "line N" (text formats, N counts physical
     lines from 1) or "row N" (parquet, hf; N from 1), `row` a dict column -> value. String
     cells of csv/tsv are stripped of surrounding whitespace. Any malformed input is one
     `StageError`: "<where>: line N: <what is wrong>; expected <what>".

Formats:
  csv      RFC 4180 (quotes, embedded newlines) through the stdlib `csv` module; `delimiter`
           (default ","), `columns` (null: the first line is the header).
  tsv      IANA text/tab-separated-values: no quoting, a cell never holds a tab or a newline;
           CRLF or LF; `columns` (null: the first line is the header). Every row has exactly
           as many cells as there are columns.
  jsonl    one JSON object per line (blank lines skipped).
  parquet  a Parquet file, read batch by batch with pyarrow.
  hf       a Hugging Face data set (the source must be of kind `hf`).

Helpers shared with the corpus formats: `open_stream` (bz2/gzip/plain by magic bytes, reads
bounded by `max_bytes`), `decoded_lines` (UTF-8 lines with the line number), `column`.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, Union

from pydantic import Field, model_validator

from ptf.common.cli import StageError
from ptf.common.config import StrictModel

ColumnName = Annotated[str, Field(min_length=1)]
Row = dict[str, Any]


# ----------------------------------------------------------------------------- bounded input
class _BoundedRaw(io.RawIOBase):
    """A read-only raw stream that fails once more than `limit` bytes were read (bombs)."""

    def __init__(self, f: BinaryIO, limit: int, what: str):
        self.f, self.limit, self.what, self.n = f, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.n += len(data)
        if self.n > self.limit:
            raise StageError(f"{self.what}: decompressed size exceeds max_bytes={self.limit}")
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def open_stream(path: Path, max_bytes: int, what: str) -> BinaryIO:
    """`path` opened for reading, decompressed if it is bz2 or gzip (by its magic bytes), every
    read bounded by `max_bytes` decompressed bytes."""
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        raw: BinaryIO = bz2.open(path, "rb")
    elif magic[:2] == b"\x1f\x8b":
        raw = gzip.open(path, "rb")
    else:
        raw = open(path, "rb")
    return io.BufferedReader(_BoundedRaw(raw, max_bytes, what), buffer_size=1 << 20)


def decoded_lines(stream: BinaryIO, where: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its CRLF/LF) of a UTF-8 stream, streaming."""
    offset = 0
    for n, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StageError(f"{where}: line {n}: not valid UTF-8 at byte {offset + e.start} "
                             f"({raw[e.start:e.start + 4]!r}); expected UTF-8 text") from None
        offset += len(raw)
        yield n, line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line


def column(row: Row, name: str, loc: str, where: str, have: list[str] | None = None) -> Any:
    """`row[name]`, or a `StageError` naming the place and the columns the row has."""
    if name not in row:
        cols = have if have is not None else list(row)
        raise StageError(f"{where}: {loc}: no column {name!r}; expected a column {name!r} "
                         f"(the row has {cols})")
    return row[name]


# ----------------------------------------------------------------------------- formats
class _Headed(StrictModel):
    columns: Annotated[list[ColumnName], Field(min_length=1)] | None = None  # null: a header line

    @model_validator(mode="after")
    def _distinct(self):
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError(f"columns must be distinct, got {self.columns}")
        return self


class CsvFormat(_Headed):
    kind: Literal["csv"]
    delimiter: Annotated[str, Field(min_length=1, max_length=1)] = ","


class TsvFormat(_Headed):
    kind: Literal["tsv"]


class JsonlFormat(StrictModel):
    kind: Literal["jsonl"]


class ParquetFormat(StrictModel):
    kind: Literal["parquet"]


class HfFormat(StrictModel):
    kind: Literal["hf"]


def _header(fmt: _Headed, cells: list[str] | None, where: str) -> list[str]:
    if fmt.columns is not None:
        return list(fmt.columns)
    if cells is None:
        raise StageError(f"{where}: empty file; expected a header line naming the columns")
    names = [c.strip() for c in cells]
    if any(not c for c in names) or len(set(names)) != len(names):
        raise StageError(f"{where}: line 1: header {names} has an empty or repeated column name; "
                         "expected distinct column names")
    return names


def _cells_to_row(cols: list[str], cells: list[str], loc: str, where: str, raw: str, sep: str) -> Row:
    if len(cells) != len(cols):
        raise StageError(f"{where}: {loc}: malformed row {raw[:80]!r}: {len(cells)} cells; "
                         f"expected {len(cols)} {sep}-separated cells ({', '.join(cols)})")
    return {c: v.strip() for c, v in zip(cols, cells)}


def read_tsv(fmt: TsvFormat, data: BinaryIO, where: str) -> Iterator[tuple[str, Row]]:
    cols = list(fmt.columns) if fmt.columns is not None else None
    for n, line in decoded_lines(data, where):
        if cols is None:
            cols = _header(fmt, line.split("\t"), where)
            continue
        yield f"line {n}", _cells_to_row(cols, line.split("\t"), f"line {n}", where, line, "tab")
    if cols is None:
        _header(fmt, None, where)


def read_csv(fmt: CsvFormat, data: BinaryIO, where: str) -> Iterator[tuple[str, Row]]:
    lines = (line + "\n" for _, line in decoded_lines(data, where))
    reader = csv.reader(lines, delimiter=fmt.delimiter, strict=True)
    cols = list(fmt.columns) if fmt.columns is not None else None
    start = 1
    try:
        for cells in reader:
            loc = f"line {start}"
            start = reader.line_num + 1
            if cols is None:
                cols = _header(fmt, cells, where)
                continue
            if not cells:
                continue  # a blank line
            yield loc, _cells_to_row(cols, cells, loc, where, fmt.delimiter.join(cells), repr(fmt.delimiter))
    except csv.Error as e:
        raise StageError(f"{where}: line {reader.line_num}: malformed CSV ({e}); expected RFC 4180 "
                         f"rows separated by {fmt.delimiter!r}") from None
    if cols is None:
        _header(fmt, None, where)


def read_jsonl(fmt: JsonlFormat, data: BinaryIO, where: str) -> Iterator[tuple[str, Row]]:
    for n, line in decoded_lines(data, where):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{where}: line {n}: malformed JSON ({e.msg} at column {e.colno}); "
                             "expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise StageError(f"{where}: line {n}: a JSON {type(obj).__name__}, not an object; "
                             "expected one JSON object per line")
        yield f"line {n}", obj


def read_parquet(fmt: ParquetFormat, data: BinaryIO, where: str) -> Iterator[tuple[str, Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(data)
        n = 0
        for batch in pf.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except (pa.ArrowException, OSError) as e:
        raise StageError(f"{where}: not a readable Parquet file ({type(e).__name__}: {e}); "
                         "expected Parquet") from None


def read_hf(fmt: HfFormat, data: Any, where: str) -> Iterator[tuple[str, Row]]:
    for n, row in enumerate(data, 1):
        yield f"row {n}", dict(row)


@dataclass(frozen=True)
class TableFormat:
    """One registry entry: the typed config and the reader; `input` says what the reader takes."""

    config: type[StrictModel]
    read: Callable[..., Iterator[tuple[str, Row]]]
    input: Literal["stream", "dataset"]


TABLE_FORMATS: dict[str, TableFormat] = {
    "csv": TableFormat(CsvFormat, read_csv, "stream"),
    "tsv": TableFormat(TsvFormat, read_tsv, "stream"),
    "jsonl": TableFormat(JsonlFormat, read_jsonl, "stream"),
    "parquet": TableFormat(ParquetFormat, read_parquet, "stream"),
    "hf": TableFormat(HfFormat, read_hf, "dataset"),
}
TableFormatCfg = Annotated[Union[tuple(f.config for f in TABLE_FORMATS.values())],
                           Field(discriminator="kind")]


def table_input(fmt: StrictModel, src: Path | bytes, max_bytes: int, what: str) -> BinaryIO:
    """The stream a reader of `fmt` takes from a file or bytes: Parquet needs a seekable plain
    file; the text formats are decompressed (bz2, gzip) and bounded (`open_stream`)."""
    if isinstance(src, bytes):
        return io.BytesIO(src)
    if fmt.kind == "parquet":
        return open(src, "rb")
    return open_stream(src, max_bytes, what)


def read_table(fmt: StrictModel, data: Any, where: str) -> Iterator[tuple[str, Row]]:
    """The rows of `data` (a stream from `table_input`, or a Dataset for `hf`) read as `fmt`."""
    return TABLE_FORMATS[fmt.kind].read(fmt, data, where)
