"""Task formats (ptf/data/task_formats.py) and clean splits (ptf/data/dedup.py): labelled tables
in every format on small files made here, given splits, groups, label rules, every bad input as
one error naming the source, the line or row and what was expected, previous outputs intact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptf.common.cli import StageError
from ptf.common.config import ConfigError
from ptf.data.dedup import dedup_splits, normalise
from ptf.data.task_formats import TaskRow
from stages import download
from tests.download_fixtures import make_sources, sha, with_
from tests.test_download import cfg_of, snapshot

POS = ["a fine film", "truly great", "lovely acting", "superb plot", "wonderful score", "great fun",
       "brilliant cast", "moving story", "delightful", "charming", "a joy", "smart writing"]
NEG = ["dull film", "awful acting", "boring plot", "weak score", "a mess", "tedious",
       "flat cast", "clumsy story", "dreary", "pointless", "a bore", "lazy writing"]


def file_src(path: Path) -> dict:
    return {"kind": "file", "path": str(path), "sha256": sha(path.read_bytes())}


def one_table_params(tmp_path: Path, path: Path, table: dict, labels: dict) -> dict:
    """The fixture params with a single task `t` built from one table with its own source."""
    p = make_sources(tmp_path / "src")
    p["tasks"].update(source=None, files={"tab": {"source": file_src(path), **table}},
                      labels={"lab": labels}, tasks={"t": {"files": ["tab"], "labels": "lab"}})
    return p


def load(root: Path, task: str = "t"):
    from datasets import load_from_disk
    return load_from_disk(str(root / "data/tasks" / task))


def csv_rows(n_rep: int = 1) -> bytes:
    lines = ["text,label,doc"]
    for r in range(n_rep):
        lines += [f'"{t} {r}",pos,p{i}' for i, t in enumerate(POS)]
        lines += [f'"{t} {r}",neg,n{i}' for i, t in enumerate(NEG)]
    return ("\n".join(lines) + "\n").encode()


# ----------------------------------------------------------------------------- formats
def test_csv_string_labels_with_groups(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(csv_rows(3))
    p = one_table_params(tmp_path, path, {"format": {"kind": "csv"}, "text": "text",
                                          "group": {"column": "doc"}},
                         {"kind": "column", "column": "label"})
    m = download.run(cfg_of(p), tmp_path / "repo")
    dd = load(tmp_path / "repo")
    assert dd["train"].features["label"].names == ["neg", "pos"]  # sorted label values
    assert sum(len(dd[s]) for s in dd) == 72 and m["tasks"]["t"]["label_names"] == ["neg", "pos"]
    side = {}
    for s in dd:
        for t in dd[s]["text"]:
            side.setdefault(t.rsplit(" ", 1)[0], set()).add(s)  # rows of one doc share the text stem
    assert all(len(v) == 1 for v in side.values())
    assert m["sources"]["tasks"]["files"]["tab"]["source"]["kind"] == "file"
    assert m["sources"]["tasks"]["files"]["tab"]["rows"] == 72


def test_jsonl_int_labels_given_splits_and_map(tmp_path):
    rows = [{"sentence": t, "y": i % 3, "part": "tst" if i < 6 else "dev" if i < 12 else "trn"}
            for i, t in enumerate(POS + NEG)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table = {"format": {"kind": "jsonl"}, "text": "sentence",
             "split": {"column": "part", "names": {"trn": "train", "dev": "validation", "tst": "test"}}}
    p = one_table_params(tmp_path, path, table, {"kind": "column", "column": "y"})
    download.run(cfg_of(p), tmp_path / "r1")
    dd = load(tmp_path / "r1")
    assert (len(dd["train"]), len(dd["validation"]), len(dd["test"])) == (12, 6, 6)
    assert dd["train"].features["label"].names == ["0", "1", "2"]
    assert dd["test"]["text"] == POS[:6]
    # a mapping renames and drops (null) values; its values give the class order
    p2 = with_(p, "tasks.labels.lab", {"kind": "column", "column": "y", "map": {2: "b", "1": None, 0: "a"}})
    download.run(cfg_of(p2), tmp_path / "r2")
    dd = load(tmp_path / "r2")
    assert dd["train"].features["label"].names == ["b", "a"] and sum(len(dd[s]) for s in dd) == 16


def test_parquet_and_hf_tables(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = {"review": POS + NEG, "stars": [5] * 12 + [1] * 12, "rid": list(range(24))}
    pq.write_table(pa.table(data), tmp_path / "t.parquet")
    bins = {"kind": "bins", "column": "stars", "range": [1, 5], "classes": {"bad": [1, 2], "good": [4, 5]}}
    p = one_table_params(tmp_path, tmp_path / "t.parquet",
                         {"format": {"kind": "parquet"}, "text": "review", "id": "rid"}, bins)
    download.run(cfg_of(p), tmp_path / "r1")
    dd = load(tmp_path / "r1")
    assert dd["train"].features["label"].names == ["bad", "good"] and sum(len(dd[s]) for s in dd) == 24
    assert all(i.startswith("tab:") for i in dd["test"]["id"])

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(data))
    hf = {"kind": "hf", "name": "someone/reviews", "config": None, "split": "train", "revision": "a" * 40}
    p = with_(p, "tasks.files.tab", {"source": hf, "format": {"kind": "hf"}, "text": "review", "id": "rid"})
    download.run(cfg_of(p), tmp_path / "r2")
    assert [load(tmp_path / "r2")[s]["text"] for s in dd] == [dd[s]["text"] for s in dd]


def test_vader_rules_are_params_not_code(tmp_path):
    """The polarity rule is a `bins` rule: moving its threshold changes which rows survive."""
    p = make_sources(tmp_path / "src")
    m1 = download.run(cfg_of(p), tmp_path / "r1")
    p2 = with_(p, "tasks.labels.polarity.classes", {"negative": [-4, -0.05], "positive": [0.05, 4]})
    m2 = download.run(cfg_of(p2), tmp_path / "r2")
    rows = lambda m: sum(e["rows"] for e in m["tasks"]["movies"]["splits"].values())  # noqa: E731
    assert rows(m1) == 30 and rows(m2) == 40  # |0.2| and |-0.1| now kept
    assert m1["tasks"]["source"] == m2["tasks"]["source"]


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def csv_case(tmp_path):
    """(params for a good CSV task, its path, a root holding its outputs, a failing-run check)."""
    path = tmp_path / "t.csv"
    path.write_bytes(csv_rows(2))
    p = one_table_params(tmp_path, path, {"format": {"kind": "csv"}, "text": "text"},
                         {"kind": "column", "column": "label"})
    root = tmp_path / "repo"
    download.run(cfg_of(p), root)
    before = snapshot(root)

    def fails(data: bytes, match: str, params: dict | None = None) -> str:
        path.write_bytes(data)
        q = with_(params or p, "tasks.files.tab.source", file_src(path))
        with pytest.raises(StageError, match=match) as e:
            download.run(cfg_of(q), root)
        assert snapshot(root) == before
        assert len(str(e.value).splitlines()) == 1
        return str(e.value)

    return p, path, fails


def test_csv_without_the_named_column(csv_case):
    p, path, fails = csv_case
    msg = fails(b"body,label\nx,pos\n", r"line 2: no column 'text'; expected a column 'text'")
    assert msg.startswith(f"file {path} -> t.csv: ")


def test_label_column_with_one_class(csv_case):
    _, _, fails = csv_case
    data = ("text,label\n" + "".join(f"row {i},pos\n" for i in range(20))).encode()
    fails(data, r"task 't': labels 'lab' give one class \('pos'\) over file .*t.csv; expected at least 2")


def test_empty_text_duplicate_id_and_unknown_label(csv_case):
    p, _, fails = csv_case
    fails(b"text,label\nok,pos\n  ,neg\n", r"t.csv: line 3: empty text '' in column 'text'")
    q = with_(p, "tasks.files.tab.id", "text")
    fails(b"text,label\nsame,pos\nsame,neg\nother,neg\n", r"t.csv: line 3: duplicate id 'same'", q)
    q = with_(p, "tasks.labels.lab.map", {"pos": "positive", "neg": "negative"})
    fails(b"text,label\na,pos\nb,meh\nc,neg\nd,neg\ne,pos\n",
          r"t.csv: line 3: label 'meh' in column 'label' is not in the mapping; expected one of \['neg', 'pos'\]", q)


def test_jsonl_line_not_an_object_and_bad_given_split(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": "x", "split": "train"}) + "\n" for t in POS))
    p = one_table_params(tmp_path, path, {"format": {"kind": "jsonl"}, "text": "text",
                                          "split": {"column": "split"}}, {"kind": "column", "column": "label"})
    with open(path, "a") as f:
        f.write('"a string"\n')
    with pytest.raises(StageError, match=r"t.jsonl: line 13: a JSON str, not an object; expected one JSON object"):
        download.run(cfg_of(with_(p, "tasks.files.tab.source", file_src(path))), tmp_path / "r")
    path.write_text(json.dumps({"text": "a", "label": "x", "split": "holdout"}) + "\n")
    with pytest.raises(StageError, match=r"line 1: split 'holdout' in column 'split'; expected one of "
                                         r"\['train', 'validation', 'test'\]"):
        download.run(cfg_of(with_(p, "tasks.files.tab.source", file_src(path))), tmp_path / "r")


@pytest.mark.parametrize("dotted, value, match", [
    ("tasks.files.tab.group", {"column": "doc"}, r"`group` applies to the seeded split"),
    ("tasks.files.tab.split", {"column": "s", "value": "test"}, r"give exactly one of `column` and `value`"),
    ("tasks.files.tab.format", {"kind": "hf"}, r"files.tab: format 'hf' does not fit a source of kind 'file'"),
    ("tasks.files.tab.source", None, r"files.tab: no `source`, and tasks.source is null"),
    ("tasks.labels.lab", {"kind": "bins", "column": "x", "range": [0, 1], "classes": {"a": [0, 1]}},
     r"download.tasks.labels.lab.bins.classes: .*at least 2 items"),
])
def test_bad_table_params(tmp_path, dotted, value, match):
    path = tmp_path / "t.csv"
    path.write_bytes(csv_rows())
    p = one_table_params(tmp_path, path, {"format": {"kind": "csv"}, "text": "text", "split": {"value": "train"}},
                         {"kind": "column", "column": "label"})
    with pytest.raises(ConfigError, match=match):
        cfg_of(with_(p, dotted, value))


# ----------------------------------------------------------------------------- clean splits
def test_normalise():
    assert normalise("  Great!!  MOVIE...\t") == "great movie"
    assert normalise("Ｃａｆé—ok") == normalise("café ok") == "café ok"
    assert normalise("!!! :-)") == ""


def _rows(texts: list[str], groups: list[str] | None = None) -> list[TaskRow]:
    return [TaskRow(str(i), t, None if groups is None else groups[i], None, f"line {i + 1}", {})
            for i, t in enumerate(texts)]


def test_dedup_moves_components_to_their_majority_split():
    a = _rows(["Good film.", "good  FILM", "bad", "other", "good film!"])
    b = _rows(["x1", "x2 BAD", "bad"], groups=["d1", "d1", "d2"])
    splits = {"a": ["test", "train", "validation", "train", "test"], "b": ["train", "train", "test"]}
    new, rep = dedup_splits({"a": a, "b": b}, splits)
    # "good film": 2 test + 1 train -> test; "bad": validation (a) + test (b, group d2) -> tie -> validation
    assert new == {"a": ["test", "test", "validation", "train", "test"], "b": ["train", "train", "validation"]}
    assert rep["moved_rows"] == 2 and rep["moved"] == {"test->validation": 1, "train->test": 1}
    assert rep["by_file"] == {"a": 1, "b": 1} and rep["components_across_splits"] == 2


def test_dedup_keeps_a_group_whole():
    b = _rows(["s1", "dup", "s3", "dup"], groups=["d1", "d1", "d1", "d2"])
    new, rep = dedup_splits({"b": b}, {"b": ["test", "test", "test", "train"]})
    assert new["b"] == ["test"] * 4 and rep["moved_rows"] == 1  # d2 joins d1's side, d1 stays whole


def test_dedup_through_the_stage(tmp_path):
    p = make_sources(tmp_path / "src")
    from tests.download_fixtures import make_tar, task_files
    files = task_files()
    files["tweets"] += b"\r\n98\t2.0\tMovie sentence 1 was GREAT!!\r\n99\t-2.0\tamazon review 3 sentence 1"
    tar = make_tar(tmp_path / "t.tar.gz", {f"hutto/{k}.txt": v for k, v in files.items()})
    p = with_(with_(p, "tasks.source", file_src(tar)), "tasks.files.tweets.sha256", sha(files["tweets"]))
    m = download.run(cfg_of(with_(p, "tasks.dedup_across_splits", True)), tmp_path / "on")
    assert m["dedup"]["moved_rows"] >= 1 and "dedup" not in download.run(cfg_of(p), tmp_path / "off")
    dd = load(tmp_path / "on", "source")
    side: dict[str, set] = {}
    for s in dd:
        for t in dd[s]["text"]:
            side.setdefault(normalise(t), set()).add(s)
    assert all(len(v) == 1 for v in side.values())
    splits = m["sources"]["tasks"]["files"]["tweets"]["split_rows"]
    assert sum(splits.values()) == 32
