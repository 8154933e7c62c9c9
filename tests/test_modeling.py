"""Model construction: sizes from params, ids from the tokenizer, Auto* round trips."""
from __future__ import annotations

import pytest

from ptf.common.config import ConfigError, parse_section
from ptf.models.modeling import ModelConfig, build_model, flops_per_token, param_counts
from pretrain_fixtures import TINY, make_tokenizer


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {"bpe": make_tokenizer(d / "bpe", "bpe"), "wordpiece": make_tokenizer(d / "wp", "wordpiece")}


def test_clm_is_llama_with_tokenizer_ids(toks, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    tok = toks["bpe"]
    m = build_model(ModelConfig(**TINY), "clm", tok)
    assert type(m).__name__ == "LlamaForCausalLM"
    c = m.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
            c.intermediate_size, c.max_position_embeddings) == (len(tok), 32, 2, 2, 64, 64)
    assert c.pad_token_id == tok.pad_token_id and c.eos_token_id == tok.eos_token_id
    m.save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "LlamaForCausalLM"
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert clf.config.pad_token_id == tok.pad_token_id


def test_mlm_is_bert_and_needs_mask(toks, tmp_path):
    from transformers import AutoModelForMaskedLM
    m = build_model(ModelConfig(**TINY), "mlm", toks["wordpiece"])
    assert type(m).__name__ == "BertForMaskedLM" and m.config.pad_token_id == toks["wordpiece"].pad_token_id
    m.save_pretrained(tmp_path)
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path)).__name__ == "BertForMaskedLM"
    with pytest.raises(ValueError, match="mask token"):
        build_model(ModelConfig(**TINY), "mlm", toks["bpe"])


def test_param_counts_and_flops(toks):
    m = build_model(ModelConfig(**TINY), "clm", toks["bpe"])
    c = param_counts(m)
    v = len(toks["bpe"])
    assert c["embedding"] == v * 32 and c["output"] == v * 32  # tied head counted as output
    assert c["total"] == sum(p.numel() for p in m.parameters())
    f = flops_per_token(m, 16)
    assert f["flops_per_token"] == 6 * (c["non_embedding"] + c["output"]) + 12 * 2 * 16 * 32
    assert "12 x layers 2" in f["formula"]


@pytest.mark.parametrize("bad,key", [({"hidden": 0}, "m.hidden"), ({"heads": 3}, "heads=3"),
                                     ({"dropout": "0.1"}, "m.dropout"), ({"extra": 1}, "m.extra")])
def test_invalid_model_params(bad, key):
    with pytest.raises(ConfigError, match=key):
        parse_section("m", {**TINY, **bad}, ModelConfig)
