"""stages/download.py: corpus + tasks from pinned sources, atomic, deterministic, clear errors."""
from __future__ import annotations

import bz2
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from stages import download
from ptf.data import fetch
from ptf.common.cli import StageError
from ptf.common.config import ConfigError, load_section, parse_section
from tests.download_fixtures import make_sources, make_tar, sha, task_files, wiki_xml, with_

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("data/raw", "data/corpus", "data/tasks", "data/manifests/download.json")


def cfg_of(params: dict) -> download.Config:
    return parse_section("download", params, download.Config)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "data").rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One good run on the fixture sources: (params, root, manifest)."""
    base = tmp_path_factory.mktemp("dl")
    params = make_sources(base / "src")
    root = base / "repo"
    manifest = download.run(cfg_of(params), root)
    return params, root, manifest


# ----------------------------------------------------------------------------- good runs
def test_corpus_is_plain_text_split_by_article(built):
    _, root, m = built
    train = read_jsonl(root / "data/corpus/train.jsonl")
    val = read_jsonl(root / "data/corpus/validation.jsonl")
    titles = sorted(d["title"] for d in train + val)
    # redirect, talk page and the template-only page are gone
    assert titles == ["Alpha", "Beta", "Delta", "Epsilon", "Gamma", "Zeta"]
    assert len(val) == 2 and not {d["id"] for d in train} & {d["id"] for d in val}
    assert all(set(d) == {"id", "title", "text"} for d in train + val)
    alpha = next(d["text"] for d in train + val if d["title"] == "Alpha")
    for junk in ("TEMPLATEJUNK", "REFJUNK", "TABLEJUNK", "FILEJUNK", "CATJUNK", "COMMENTJUNK",
                 "{{", "[[", "<ref", "{|", "'''", "Alpha.svg"):
        assert junk not in alpha, junk
    for kept in ("Alpha is the first letter of the alphabet.", "History", "Phoenicia",
                 "the site & more."):
        assert kept in alpha, kept
    c = m["corpus"]
    assert c["articles"] == 6 and c["chars"] == sum(len(d["text"]) for d in train + val)
    assert c["pages"] == {"pages": 9, "skipped_empty": 1, "skipped_namespace": 1, "skipped_redirect": 1}
    assert c["splits"]["validation"]["articles"] == 2 and c["splits"]["train"]["task_docs"] == 0
    assert json.loads((root / "data/manifests/download.json").read_text()) == m


def test_tasks_are_datasetdicts_with_document_disjoint_splits(built):
    from datasets import load_from_disk

    _, root, m = built
    assert sorted(p.name for p in (root / "data/tasks").iterdir()) == ["amazon", "movies", "nyt", "source", "tweets"]
    by_split = {}
    for task in ("movies", "amazon", "nyt", "tweets", "source"):
        dd = load_from_disk(str(root / "data/tasks" / task))
        assert list(dd) == ["train", "validation", "test"]
        for split, ds in dd.items():
            assert ds.column_names == ["id", "text", "label"]
            assert ds.features["id"].dtype == "string" and ds.features["text"].dtype == "string"
            assert len(ds) == m["tasks"][task]["splits"][split]["rows"] > 0
            counts = m["tasks"][task]["splits"][split]["labels"]
            assert sum(counts.values()) == len(ds)
            for rid in ds["id"]:
                by_split.setdefault(rid, set()).add(split)
        names = dd["train"].features["label"].names
        assert names == (["negative", "positive"] if task != "source" else ["movies", "amazon", "nyt", "tweets"])
    # each sentence has one split across every task that holds it
    assert all(len(s) == 1 for s in by_split.values())
    # amazon/nyt: a document never sits on two sides
    docs = {}
    for rid, s in by_split.items():
        f, _, raw = rid.partition(":")
        if f in ("amazon", "nyt"):
            docs.setdefault((f, raw.split("_")[0]), set()).update(s)
    assert docs and all(len(s) == 1 for s in docs.values())
    # polarity drops |rating| < 0.5 (0.2 and -0.1 in the fixture), the source task keeps all rows
    movies = load_from_disk(str(root / "data/tasks/movies"))
    assert sum(len(ds) for ds in movies.values()) == 30
    assert m["sources"]["tasks"]["files"]["movies"]["rows"] == 40
    src_rows = sum(e["rows"] for e in m["tasks"]["source"]["splits"].values())
    assert src_rows == 40 + 36 + 24 + 30
    pos = movies["train"].filter(lambda r: r["label"] == 1)["text"]
    assert pos and all("great" in t for t in pos)


def test_same_inputs_give_identical_bytes_and_cache_avoids_fetching(built, tmp_path):
    params, root, _ = built
    other = tmp_path / "repo2"
    download.run(cfg_of(params), other)
    assert snapshot(other) == snapshot(root)
    # second run in the same root: the raw cache answers, the source may be gone
    moved = Path(params["corpus"]["source"]["path"]).with_suffix(".moved")
    Path(params["corpus"]["source"]["path"]).rename(moved)
    try:
        download.run(cfg_of(params), other)
    finally:
        moved.rename(params["corpus"]["source"]["path"])
    assert snapshot(other) == snapshot(root)
    assert not [p for p in (other / "data").iterdir() if p.name.startswith(".")]


def test_add_task_text_appends_only_train_sentences(built, tmp_path):
    from datasets import load_from_disk

    params, root, _ = built
    m = download.run(cfg_of(with_(params, "corpus.add_task_text", True)), tmp_path)
    train = read_jsonl(tmp_path / "data/corpus/train.jsonl")
    task_text = {d["text"] for d in train if d["id"].startswith("task:")}
    held_out, trained = set(), set()
    for task in ("movies", "amazon", "nyt", "tweets", "source"):
        dd = load_from_disk(str(tmp_path / "data/tasks" / task))
        trained |= set(dd["train"]["text"])
        held_out |= set(dd["validation"]["text"]) | set(dd["test"]["text"])
    assert task_text == trained and not task_text & held_out
    assert m["corpus"]["splits"]["train"]["task_docs"] == len(task_text)
    assert (tmp_path / "data/corpus/validation.jsonl").read_bytes() == (root / "data/corpus/validation.jsonl").read_bytes()


def test_caps_max_articles_and_max_train(built, tmp_path):
    params, _, _ = built
    p = with_(with_(params, "corpus.max_articles", 3), "tasks.max_train", 5)
    m = download.run(cfg_of(p), tmp_path)
    assert m["corpus"]["articles"] == 3 and m["corpus"]["pages"]["pages"] == 5
    assert all(e["splits"]["train"]["rows"] == 5 for e in m["tasks"].values())


def test_hf_source_calls_load_dataset(built, tmp_path, monkeypatch):
    import datasets

    params, _, _ = built
    calls = []

    def fake_load_dataset(name, config, split, revision):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_dict({"id": ["1", "2", "3"], "title": ["A", "B", "C"],
                                           "text": ["a text", "b text", "c text"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hf = {"kind": "hf", "name": "wikimedia/wikipedia", "config": "20231101.en", "split": "train",
          "revision": "b04c8d1ceb2f5cd4588862100d08de323dccfbaa"}
    p = with_(with_(params, "corpus.source", hf), "corpus.format",
              {"kind": "hf", "text_column": "text", "id_column": "id", "title_column": "title"})
    m = download.run(cfg_of(p), tmp_path)
    assert calls == [("wikimedia/wikipedia", "20231101.en", "train", hf["revision"])]
    assert m["corpus"]["articles"] == 3 and m["sources"]["corpus"]["kind"] == "hf"


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def good_root(built, tmp_path):
    """A root holding good outputs, and a check that a failing run leaves them intact."""
    params, root, _ = built
    r = tmp_path / "repo"
    download.run(cfg_of(params), r)
    before = snapshot(r)

    def fails(p: dict, match: str) -> str:
        with pytest.raises(StageError, match=match) as e:
            download.run(cfg_of(p), r)
        assert snapshot(r) == before
        assert not [x for x in (r / "data").rglob(".*")], "a temporary output was left behind"
        return str(e.value)

    return params, tmp_path, fails


def _task_tar(d: Path, name: str, members: dict[str, bytes], links=None) -> dict:
    path = make_tar(d / name, members, links=links)
    return {"kind": "file", "path": str(path), "sha256": sha(path.read_bytes())}


def test_sha256_mismatch(good_root):
    params, _, fails = good_root
    msg = fails(with_(params, "corpus.source.sha256", "0" * 64), "sha256 mismatch")
    assert "dump.xml.bz2" in msg and "0" * 64 in msg and sha(bz2.compress(wiki_xml())) in msg
    msg = fails(with_(params, "tasks.files.nyt.sha256", "1" * 64), "sha256 mismatch for tasks file 'nyt'")
    assert "hutto/nyt.txt" in msg


def test_truncated_task_archive(good_root):
    params, d, fails = good_root
    whole = Path(params["tasks"]["source"]["path"]).read_bytes()
    cut = d / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    msg = fails(with_(params, "tasks.source", {"kind": "file", "path": str(cut), "sha256": sha(cut.read_bytes())}),
                "truncated or corrupt")
    assert "cut.tar.gz" in msg


def test_truncated_dump(good_root):
    params, d, fails = good_root
    data = bz2.compress(wiki_xml())[:200]
    (d / "cut.xml.bz2").write_bytes(data)
    fails(with_(params, "corpus.source", {"kind": "file", "path": str(d / "cut.xml.bz2"), "sha256": sha(data)}),
          r"cut.xml.bz2 is (truncated or corrupt|not well-formed)")


def test_corrupt_dump_xml(good_root):
    params, d, fails = good_root
    data = bz2.compress(b"<mediawiki><page><title>x</title></mediawiki>")
    (d / "bad.xml.bz2").write_bytes(data)
    fails(with_(params, "corpus.source", {"kind": "file", "path": str(d / "bad.xml.bz2"), "sha256": sha(data)}),
          "bad.xml.bz2 is not well-formed MediaWiki XML")


@pytest.mark.parametrize("bad_name, reason", [
    ("../hutto/movies.txt", r"unsafe archive member '\.\./hutto/movies.txt': a '\.\.' component"),
    ("hutto/x/../movies.txt", r"unsafe archive member .*'\.\.' component"),
    ("/hutto/movies.txt", r"unsafe archive member '/hutto/movies.txt': an absolute path"),
])
def test_unsafe_member_names(good_root, bad_name, reason):
    params, d, fails = good_root
    files = {f"hutto/{k}.txt": v for k, v in task_files().items() if k != "movies"}
    files[bad_name] = task_files()["movies"]
    fails(with_(params, "tasks.source", _task_tar(d, "evil.tar.gz", files)), reason)


@pytest.mark.parametrize("kind, word", [(tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink")])
def test_link_members(good_root, kind, word):
    params, d, fails = good_root
    files = {f"hutto/{k}.txt": v for k, v in task_files().items() if k != "movies"}
    src = _task_tar(d, "links.tar.gz", files, links={"hutto/movies.txt": (kind, "/etc/passwd")})
    fails(with_(params, "tasks.source", src), f"'hutto/movies.txt' is a {word}")


def test_missing_member(good_root):
    params, _, fails = good_root
    msg = fails(with_(params, "tasks.files.tweets.member", "hutto/nope.txt"), "member 'hutto/nope.txt' not found")
    assert "tasks.tar.gz" in msg


def test_empty_corpus(good_root):
    params, d, fails = good_root
    data = bz2.compress(wiki_xml([("2", "R", "0", True, "#REDIRECT [[A]]"), ("3", "Talk:A", "1", False, "t")]))
    (d / "empty.xml.bz2").write_bytes(data)
    fails(with_(params, "corpus.source", {"kind": "file", "path": str(d / "empty.xml.bz2"), "sha256": sha(data)}),
          r"empty corpus: no articles after parsing empty.xml.bz2 \(pages=2, skipped_namespace=1, skipped_redirect=1\)")


def _tasks_with(params, d, name, data):
    files = {f"hutto/{k}.txt": v for k, v in task_files().items()}
    files[f"hutto/{name}.txt"] = data
    p = with_(params, "tasks.source", _task_tar(d, "t2.tar.gz", files))
    return with_(p, f"tasks.files.{name}.sha256", sha(data))


def test_non_utf8_task_file(good_root):
    params, d, fails = good_root
    data = task_files()["tweets"] + b"\r\n99\t1.0\tcaf\xe9"
    fails(_tasks_with(params, d, "tweets", data), r"hutto/tweets.txt: line 31: not valid UTF-8 at byte \d+")


@pytest.mark.parametrize("row, match", [
    (b"99\t1.0", r"line 41: malformed row '99\\t1.0': 2 cells; expected 3 tab-separated cells \(id, rating, text\)"),
    (b"99\t1.0\t  ", r"line 41: empty text '' in column 'text'"),
    (b"99\tgood\tsome text", r"line 41: rating 'good' is not a number in \[-4, 4\]"),
    (b"99\t7.5\tsome text", r"line 41: rating '7.5' is not a number"),
    (b"1\t1.0\tdup", r"line 41: duplicate id '1'"),
])
def test_malformed_task_row(good_root, row, match):
    params, d, fails = good_root
    msg = fails(_tasks_with(params, d, "movies", task_files()["movies"] + b"\r\n" + row), match)
    assert "hutto/movies.txt" in msg


def test_grouped_file_needs_document_ids(good_root):
    params, d, fails = good_root
    fails(_tasks_with(params, d, "nyt", task_files()["nyt"] + b"\r\n77\t1.0\tno doc"),
          r"hutto/nyt.txt: line 25: id '77' does not match the group pattern")


def test_main_exits_1_with_one_line(built, tmp_path):
    params, _, _ = built
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": with_(params, "corpus.source.sha256", "0" * 64)}))
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=tmp_path, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sha256 mismatch" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "data/corpus").exists()


# ----------------------------------------------------------------------------- params
@pytest.mark.parametrize("dotted, value, match", [
    ("corpus.typo", 1, r"download.corpus.typo: unknown key"),
    ("tasks.files.movies.extra", True, r"download.tasks.files.movies.extra: unknown key"),
    ("seed", "7", r"download.seed: got '7'; expected: Input should be a valid integer"),
    ("corpus.add_task_text", "yes", r"download.corpus.add_task_text: got 'yes'"),
    ("corpus.validation_fraction", 1.5, r"download.corpus.validation_fraction: got 1.5; expected: Input should be less than 1"),
    ("tasks.labels.polarity.classes", {"negative": [-4, 0.5], "positive": [0.5, 4]}, r"classes 'negative' and 'positive' overlap"),
    ("tasks.labels.polarity.kind", "stars", r"download.tasks.labels.polarity: .*'column', 'bins', 'table'"),
    ("tasks.tasks.movies.labels", "nope", r"tasks.movies.labels: 'nope' not among labels"),
    ("tasks.files.amazon.group.pattern", r"\d+_\d+", r"must have exactly one capture group, has 0"),
    ("tasks.files.movies.format.kind", "xls", r"download.tasks.files.movies.format: .*'csv', 'tsv', 'jsonl', 'parquet', 'hf'"),
    ("tasks.files.movies.sha256", None, r"`member` and `sha256` go together"),
    ("corpus.format", {"kind": "hf", "text_column": "text"}, r"format 'hf' cannot read a source of kind 'file'"),
    ("corpus.format", {"kind": "text"}, r"download.corpus.format.text.documents: missing key"),
    ("tasks.max_train", 0, r"download.tasks.max_train: got 0"),
    ("corpus.max_articles", 1, r"download.corpus.max_articles: got 1"),
    ("max_bytes", -1, r"download.max_bytes: got -1"),
    ("corpus.source.kind", "ftp", r"download.corpus.source: .*'pypi', 'url', 'file', 'hf', 'dir'"),
    ("corpus.source.sha256", "abc", r"download.corpus.source.file.sha256: got 'abc'"),
    ("tasks.files.movies.member", "../movies.txt", r"download.tasks.files.movies.member: got '../movies.txt'"),
    ("tasks.source.members", ["/abs/x.tar.gz"], r"download.tasks.source.file.members.0: got .*must be relative"),
    ("tasks.test_fraction", 0.85, r"validation_fraction \+ test_fraction must be below 1"),
    ("tasks.tasks.movies.files", ["nope"], r"tasks.movies.files: \['nope'\] not among files"),
    ("tasks.tasks.source.files", ["movies"], r"labels 'source' \(kind table\) needs at least 2 files"),
    ("tasks.tasks.movies.labels", "Stars", r"download.tasks.tasks.movies.labels: got 'Stars'"),
])
def test_invalid_params(built, dotted, value, match):
    params, _, _ = built
    with pytest.raises(ConfigError, match=match):
        cfg_of(with_(params, dotted, value))


@pytest.mark.parametrize("dotted", ["seed", "corpus.add_task_text", "corpus.format", "tasks.files.amazon.text",
                                    "corpus.source.sha256", "tasks.dedup_across_splits"])
def test_missing_param(built, dotted):
    params, _, _ = built
    p = with_(params, dotted, None)
    *head, last = dotted.split(".")
    node = p
    for k in head:
        node = node[k]
    del node[last]
    with pytest.raises(ConfigError, match=rf"download\.{dotted.replace('.', '.*')}: missing key"):
        cfg_of(p)


def test_source_kinds_validate():
    ok = {"sha256": "a" * 64}
    for src in ({"kind": "pypi", "name": "gensim", "version": "4.4.0", "dist": "wheel", "members": ["a/b.bz2"], **ok},
                {"kind": "url", "url": "https://example.org/x.bz2", **ok},
                {"kind": "file", "path": "data/*.bz2", **ok},
                {"kind": "hf", "name": "wikimedia/wikipedia", "config": None, "split": "train", "revision": "0" * 40},
                {"kind": "dir", "path": "corpus/", **ok}):
        fmt = {"hf": {"kind": "hf", "text_column": "text"}, "dir": {"kind": "text_files"}}.get(
            src["kind"], {"kind": "mediawiki"})
        m = download.CorpusConfig.model_validate({"source": src, "format": fmt, "validation_fraction": 0.1,
                                                  "max_articles": None, "add_task_text": False})
        assert m.source.kind == src["kind"]
    for bad in ({"kind": "pypi", "name": "gensim", "version": "4.4.0", "dist": "egg", **ok},
                {"kind": "url", "url": "ftp://example.org/x", **ok},
                {"kind": "hf", "name": "w", "config": None, "split": "train", "revision": "main"},
                {"kind": "hf", "name": "w", "config": None, "split": "train", "revision": "0" * 40, **ok}):
        with pytest.raises(ConfigError):
            parse_section("download.corpus", {"source": bad, "format": {"kind": "mediawiki"},
                                               "validation_fraction": 0.1, "max_articles": None,
                                               "add_task_text": False}, download.CorpusConfig)


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/smoke.yaml", "configs/gpu.yaml"])
def test_real_params_load(params_file):
    cfg = load_section("download", download.Config, ROOT / params_file)
    if params_file == "configs/gpu.yaml":  # a corpus of its scale (tests/test_formats_gpu.py)
        assert cfg.corpus.source.kind == "hf" and cfg.corpus.format.kind == "hf"
    else:
        assert cfg.corpus.source.kind == "pypi" and cfg.corpus.source.sha256.startswith("a53f4648")
    assert list(cfg.tasks.files) == ["movies", "amazon", "nyt", "tweets"]
    assert cfg.tasks.files["amazon"].group.column == "id" and cfg.tasks.files["movies"].group is None
    assert cfg.tasks.labels["polarity"].kind == "bins"


# ----------------------------------------------------------------------------- the real sources
def test_real_default_sources_through_pip(tmp_path):
    """The defaults of params.yaml, fetched with pip: 106 articles, the four VADER files."""
    cfg = load_section("download", download.Config, ROOT / "params.yaml")
    m = download.run(cfg, tmp_path)
    assert m["corpus"]["articles"] == 106
    assert 2_500_000 < m["corpus"]["chars"] < 3_600_000
    rows = {k: v["rows"] for k, v in m["sources"]["tasks"]["files"].items()}
    assert rows == {"movies": 10605, "amazon": 3708, "nyt": 5190, "tweets": 4200}
    assert sum(m["tasks"]["source"]["splits"][s]["rows"] for s in download.SPLITS) == 23703
    raw = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "data/raw").rglob("*") if p.is_file())
    assert raw == [m["sources"]["corpus"]["stored"], m["sources"]["tasks"]["stored"]]
    for stored in raw:
        assert fetch.sha256_file(tmp_path / stored) == Path(stored).parent.name
