"""Reading the pretraining corpus (no CLI): `data/corpus/*.jsonl`, one document per line.

In:  a jsonl file of objects with a string `text` (the download stage's output).
Out: the documents' texts, streamed (`iter_texts`), or in lists (`iter_batches`); `StageError`
     naming the file and line for anything malformed. Used by the tokenizer and tokenize stages.
"""
from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path

from ptf.common.cli import StageError
from ptf.data.tables import JsonlFormat, read_jsonl


def _counted(lines: Iterable[bytes], on_bytes: Callable[[int], object]) -> Iterator[bytes]:
    for raw in lines:
        on_bytes(len(raw))
        yield raw


def iter_texts(path: Path, on_bytes: Callable[[int], object] | None = None) -> Iterator[str]:
    """Yield the `text` of each document of a jsonl corpus file, streaming.

    `on_bytes(n)` (a progress bar's `update`) is called with each line's size in bytes.
    Blank lines are skipped, and so are documents whose text is empty. Raises `StageError`
    naming the file (and the line) for a missing file, a non-UTF-8 or malformed line, and a
    file without any non-empty document.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: corpus file not found (run the `download` stage first)")
    n = 0
    with open(path, "rb") as f:
        lines = f if on_bytes is None else _counted(f, on_bytes)
        for loc, doc in read_jsonl(JsonlFormat(kind="jsonl"), lines, str(path)):
            if not isinstance(doc.get("text"), str):
                raise StageError(f"{path}: {loc}: expected a JSON object with a string \"text\" field")
            if doc["text"]:
                n += 1
                yield doc["text"]
    if n == 0:
        raise StageError(f"{path}: empty corpus (no document with non-empty text)")


def iter_batches(path: Path, batch_docs: int, keep: Container[int] | None = None) -> Iterator[list[str]]:
    """`iter_texts` grouped into lists of at most `batch_docs` texts; with `keep`, only the
    documents whose index (from 0, among the non-empty ones) is in it."""
    batch: list[str] = []
    for i, text in enumerate(iter_texts(path)):
        if keep is not None and i not in keep:
            continue
        batch.append(text)
        if len(batch) >= batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch
