"""Corpus formats (ptf/data/corpus_formats.py, tables.py, trees.py): every format on small files
made here, through the download stage where pinning/cleaning/splitting matter, and every bad
input as one error naming the source, the line or row and what was expected."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from ptf.common.cli import StageError
from ptf.data import corpus_formats as cf
from ptf.data.trees import tree_sha256
from stages import download
from tests.download_fixtures import make_sources, make_tar, sha, with_
from tests.test_download import cfg_of, read_jsonl, snapshot

MB = 10_000_000


def fmt(kind: str, **kw):
    return cf.CORPUS_FORMATS[kind].config.model_validate({"kind": kind, **kw})


def read(path_or_ds, kind: str, max_docs=None, **kw):
    return cf.read_corpus(fmt(kind, **kw), path_or_ds, "src", MB, max_docs)


# ----------------------------------------------------------------------------- readers
def test_text_one_document_per_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes("First  doc\there.\r\n\n   \nSecond doc ,  ok\nThird\u00a0one\n".encode())
    docs, stats = read(p, "text", documents="line")
    assert [(d["id"], d["text"]) for d in docs] == [("1", "First doc here."), ("4", "Second doc , ok"),
                                                     ("5", "Third one")]
    assert stats == {"records": 5, "skipped_empty": 2}


def test_text_paragraphs_and_gzip(tmp_path):
    p = tmp_path / "c.txt.gz"
    p.write_bytes(gzip.compress(b"Para one\nstill one\n\n\n  \nPara two\n\nPara three"))
    docs, stats = read(p, "text", documents="paragraph")
    assert [(d["id"], d["text"]) for d in docs] == [("1", "Para one\nstill one"), ("6", "Para two"),
                                                     ("8", "Para three")]
    assert stats["records"] == 3
    docs, _ = read(p, "text", max_docs=2, documents="paragraph")
    assert len(docs) == 2


def _archive(path: Path, files: dict[str, bytes]) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for n, b in files.items():
                zf.writestr(n, b)
        return path
    return make_tar(path, files)


@pytest.mark.parametrize("name", ["docs.tar.gz", "docs.zip"])
def test_text_files_from_an_archive(tmp_path, name):
    a = _archive(tmp_path / name, {"d/b.txt": b"Bee  text", "d/a.txt": b"Ay text\n\n\n\nmore",
                                  "d/skip.md": b"not matched", "d/empty.txt": b"  \n"})
    docs, stats = read(a, "text_files")
    assert [(d["id"], d["title"], d["text"]) for d in docs] == [
        ("d/a.txt", "a", "Ay text\n\nmore"), ("d/b.txt", "b", "Bee text")]
    assert stats == {"records": 3, "skipped_empty": 1}
    docs, _ = read(a, "text_files", pattern="*.md")
    assert [d["text"] for d in docs] == ["not matched"]


def test_text_files_from_a_pinned_directory_through_the_stage(tmp_path):
    d = tmp_path / "src"
    params = make_sources(d)
    corpus = tmp_path / "mycorpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(5):
        (corpus / "sub" / f"doc{i}.txt").write_text(f"Document number {i}.  Some   words.", encoding="utf-8")
    (corpus / "notes.md").write_text("ignored")
    src = {"kind": "dir", "path": str(corpus), "sha256": tree_sha256(corpus)}
    p = with_(with_(params, "corpus.source", src), "corpus.format", {"kind": "text_files", "pattern": "*.txt"})
    root = tmp_path / "repo"
    m = download.run(cfg_of(p), root)
    docs = read_jsonl(root / "data/corpus/train.jsonl") + read_jsonl(root / "data/corpus/validation.jsonl")
    assert sorted(x["id"] for x in docs) == [f"sub/doc{i}.txt" for i in range(5)]
    assert all(x["text"].endswith("Some words.") for x in docs)
    stored = root / m["sources"]["corpus"]["stored"]
    assert stored.is_dir() and tree_sha256(stored) == src["sha256"]
    # cached: the directory may be gone on the second run
    corpus.rename(tmp_path / "gone")
    before = snapshot(root)
    download.run(cfg_of(p), root)
    assert snapshot(root) == before


def test_dir_source_refuses_a_wrong_hash_and_symlinks(tmp_path):
    params = make_sources(tmp_path / "src")
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text a")
    p = with_(with_(params, "corpus.source", {"kind": "dir", "path": str(corpus), "sha256": "0" * 64}),
              "corpus.format", {"kind": "text_files"})
    with pytest.raises(StageError, match=r"dir .*/c: sha256 mismatch for the tree .* expected 0{64}"):
        download.run(cfg_of(p), tmp_path / "r1")
    os.symlink("/etc/passwd", corpus / "b.txt")
    p = with_(p, "corpus.source.sha256", "1" * 64)
    with pytest.raises(StageError, match=r"b.txt is a symlink; refusing to follow it"):
        download.run(cfg_of(p), tmp_path / "r2")


@pytest.mark.parametrize("kind, data, extra", [
    ("jsonl", b'{"t": "Alpha  text", "k": 7, "h": "A"}\n\n{"t": "Beta", "k": 8, "h": "B"}\n', {}),
    ("csv", b'k,h,t\n7,A,"Alpha  text"\n8,B,Beta\n', {}),
    ("csv", b'7;A;"Alpha  text"\n8;B;Beta\n', {"delimiter": ";", "columns": ["k", "h", "t"]}),
    ("tsv", b"k\th\tt\r\n7\tA\tAlpha  text\r\n8\tB\tBeta\r\n", {}),
])
def test_text_column_tables(tmp_path, kind, data, extra):
    p = tmp_path / f"c.{kind}"
    p.write_bytes(data)
    docs, stats = read(p, kind, text_column="t", id_column="k", title_column="h", **extra)
    assert docs == [{"id": "7", "title": "A", "text": "Alpha text"}, {"id": "8", "title": "B", "text": "Beta"}]
    docs, _ = read(p, kind, text_column="t", **extra)
    assert [d["title"] for d in docs] == ["", ""] and docs[1]["id"] in ("2", "3", "4")


def test_parquet_and_hf_tables(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"body": ["One  doc", "", "Two doc"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "c.parquet")
    docs, stats = read(tmp_path / "c.parquet", "parquet", text_column="body", id_column="n")
    assert [(d["id"], d["text"]) for d in docs] == [("1", "One doc"), ("3", "Two doc")]
    assert stats == {"records": 3, "skipped_empty": 1}
    ds = datasets.Dataset.from_dict({"body": ["x  y", "z"]})
    docs, _ = read(ds, "hf", text_column="body")
    assert [(d["id"], d["text"]) for d in docs] == [("1", "x y"), ("2", "z")]


def test_hf_source_reads_a_local_dataset(tmp_path):
    """`load_hf` (datasets.load_dataset, pinned revision) on a data set directory made here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ptf.data.fetch import HfSource, load_hf

    d = tmp_path / "wiki_sample" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["1", "2", "3"], "title": ["A", "B", "C"],
                             "text": ["Alpha text.", "Beta  text.", "Gamma text."]}), d / "train-00000-of-00001.parquet")
    src = HfSource(kind="hf", name=str(tmp_path / "wiki_sample"), config=None, split="train", revision="0" * 40)
    docs, stats = read(load_hf(src), "hf", text_column="text", id_column="id", title_column="title")
    assert [(x["id"], x["title"], x["text"]) for x in docs] == [
        ("1", "A", "Alpha text."), ("2", "B", "Beta text."), ("3", "C", "Gamma text.")]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind, data, extra, match", [
    ("jsonl", b'{"t": "ok"}\n[1, 2]\n', {}, r"c.jsonl: line 2: a JSON list, not an object; expected one JSON object"),
    ("jsonl", b'{"t": "ok"}\n{"t": \n', {}, r"c.jsonl: line 2: malformed JSON"),
    ("jsonl", b'{"t": "ok"}\n{"x": "no t"}\n', {}, r"c.jsonl: line 2: no column 't'; expected a column 't' \(the row has \['x'\]\)"),
    ("jsonl", b'{"t": 5}\n', {}, r"c.jsonl: line 1: column 't' holds int 5; expected a string"),
    ("csv", b'a,b\n1,2\n', {}, r"c.csv: line 2: no column 't'"),
    ("csv", b't,b\n"x,1\n', {}, r"c.csv: line \d: malformed CSV"),
    ("csv", b't,b\nx,1,2\n', {}, r"c.csv: line 2: malformed row .*3 cells; expected 2 ','-separated cells \(t, b\)"),
    ("tsv", b't\tb\nx\n', {}, r"c.tsv: line 2: malformed row 'x': 1 cells; expected 2 tab-separated"),
    ("tsv", b't\tt\nx\ty\n', {}, r"c.tsv: line 1: header \['t', 't'\] has an empty or repeated column name"),
    ("tsv", b'', {}, r"c.tsv: empty file; expected a header line"),
    ("csv", b't\ncaf\xe9\n', {}, r"c.csv: line 2: not valid UTF-8 at byte 5"),
])
def test_bad_tables(tmp_path, kind, data, extra, match):
    p = tmp_path / f"c.{kind}"
    p.write_bytes(data)
    with pytest.raises(StageError, match=match):
        read(p, kind, text_column="t", **extra)


def test_bad_parquet_and_text(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StageError, match=r"c.parquet: not a readable Parquet file"):
        read(tmp_path / "c.parquet", "parquet", text_column="t")
    (tmp_path / "c.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(StageError, match=r"src: c.txt: line 2: not valid UTF-8 at byte 9"):
        read(tmp_path / "c.txt", "text", documents="line")
    with pytest.raises(StageError, match=r"decompressed size exceeds max_bytes=100"):
        cf.read_corpus(fmt("text", documents="line"), _gz(tmp_path, b"x" * 10_000), "src", 100, None)


def _gz(d: Path, data: bytes) -> Path:
    (d / "big.gz").write_bytes(gzip.compress(data))
    return d / "big.gz"


def test_archive_members_refused(tmp_path):
    t = make_tar(tmp_path / "l.tar.gz", {"ok.txt": b"fine"}, links={"evil.txt": (tarfile.SYMTYPE, "/etc/passwd")})
    with pytest.raises(StageError, match=r"archive member 'evil.txt' is a symlink \(to '/etc/passwd'\)"):
        read(t, "text_files")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("../up.txt")
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"hi"))
    (tmp_path / "u.tar").write_bytes(buf.getvalue())
    with pytest.raises(StageError, match=r"unsafe archive member '../up.txt'"):
        read(tmp_path / "u.tar", "text_files")
    z = _archive(tmp_path / "none.zip", {"a.md": b"x"})
    with pytest.raises(StageError, match=r"no file matches pattern '\*.txt'; expected at least one"):
        read(z, "text_files")


def test_bad_format_through_the_stage_keeps_previous_outputs(tmp_path):
    params = make_sources(tmp_path / "src")
    root = tmp_path / "repo"
    download.run(cfg_of(params), root)
    before = snapshot(root)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n"just a string"\n')
    p = with_(with_(params, "corpus.source", {"kind": "file", "path": str(bad), "sha256": sha(bad.read_bytes())}),
              "corpus.format", {"kind": "jsonl", "text_column": "text"})
    with pytest.raises(StageError) as e:
        download.run(cfg_of(p), root)
    assert str(e.value) == (f"file {bad}: bad.jsonl: line 2: a JSON str, not an object; "
                            "expected one JSON object per line")
    assert snapshot(root) == before


def test_plain_text_through_the_stage(tmp_path):
    params = make_sources(tmp_path / "src")
    txt = tmp_path / "lines.txt"
    txt.write_text("".join(f"Line document {i}.\n" for i in range(8)), encoding="utf-8")
    p = with_(with_(params, "corpus.source", {"kind": "file", "path": str(txt), "sha256": sha(txt.read_bytes())}),
              "corpus.format", {"kind": "text", "documents": "line"})
    m = download.run(cfg_of(p), tmp_path / "repo")
    assert m["corpus"]["articles"] == 8 and m["corpus"]["pages"] == {"records": 8}
    assert m["corpus"]["splits"]["validation"]["articles"] == 2
    val = read_jsonl(tmp_path / "repo/data/corpus/validation.jsonl")
    assert all(set(d) == {"id", "title", "text"} for d in val)
    assert json.loads((tmp_path / "repo/data/manifests/download.json").read_text()) == m
