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


def test_param_counts_and_flops_derived_by_hand(toks):
    """The counts and FLOPs of a small Llama worked out from the architecture's shapes, not from
    the code's counts. Every size differs from the others (hidden 32, 3 layers, 4 heads, SwiGLU
    48, seq_len 16), so a formula that takes one for another is caught.

    vocab V = 300 (the BPE fixture's). Llama layers have no biases:
      attention  q, k, v, o:                         4 x 32 x 32 = 4,096
      SwiGLU     gate, up (32->48), down (48->32):   3 x 32 x 48 = 4,608
      RMSNorm    input, post-attention:                   2 x 32 =    64
      one layer                                                  = 8,768;  3 layers = 26,304
      final RMSNorm                                              =    32
      non-embedding                                              = 26,336
      embedding  V x 32 = 9,600; the LM head is tied to it: total = 26,336 + 9,600 = 35,936,
                 and the head counts as output-layer params: 9,600
    FLOPs per token at seq_len 16 (PaLM appendix: 6 N + 12 L T H, N = non-embedding + output):
      6 x (26,336 + 9,600) = 215,616;  12 x 3 x 16 x 32 = 18,432;  sum = 234,048
    """
    tok = toks["bpe"]
    assert len(tok) == 300, "the BPE fixture's vocab changed: redo the arithmetic"
    cfg = ModelConfig(hidden=32, layers=3, heads=4, intermediate=48, max_positions=64, dropout=0.0)
    m = build_model(cfg, "clm", tok)
    assert param_counts(m) == {"total": 35_936, "embedding": 9_600, "output": 9_600,
                               "non_embedding": 26_336}
    assert sum(p.numel() for p in m.parameters()) == 35_936  # torch agrees (tied head once)
    f = flops_per_token(m, 16)
    assert f["flops_per_token"] == 234_048
    assert f["formula"] == ("6 x (non_embedding 26,336 + output 9,600) + 12 x layers 3 x seq_len 16 "
                            "x hidden 32 = 234,048")


def test_bert_counts_and_flops_derived_by_hand(toks):
    """The same for the TINY BERT (post-LN, biases, learned positions), vocab V = 123 (the
    WordPiece fixture's).

      embedding tables: word V x 32 = 3,936, position 64 x 32 = 2,048, token type 2 x 32 = 64
                        -> 6,048
      embedding LayerNorm 2 x 32                                  =     64
      one layer: q, k, v 3 x (32 x 32 + 32) = 3,168; attention out 32 x 32 + 32 = 1,056;
                 LayerNorm 64; intermediate 32 x 64 + 64 = 2,112; out 64 x 32 + 32 = 2,080;
                 LayerNorm 64                                       =  8,544; 2 layers = 17,088
      MLM head: transform 32 x 32 + 32 = 1,056, LayerNorm 64, decoder bias V = 123;
                its weight is tied to the word table (counted as output: 3,936)
      non-embedding = 64 + 17,088 + 1,056 + 64 + 123               = 18,395
      total = 6,048 + 18,395                                       = 24,443
    FLOPs per token at seq_len 16: 6 x (18,395 + 3,936) + 12 x 2 x 16 x 32 = 133,986 + 12,288
                                                                    = 146,274
    """
    tok = toks["wordpiece"]
    assert len(tok) == 123, "the WordPiece fixture's vocab changed: redo the arithmetic"
    m = build_model(ModelConfig(**TINY), "mlm", tok)
    assert param_counts(m) == {"total": 24_443, "embedding": 6_048, "output": 3_936,
                               "non_embedding": 18_395}
    assert flops_per_token(m, 16)["flops_per_token"] == 146_274


@pytest.mark.parametrize("bad,key", [({"hidden": 0}, "m.hidden"), ({"heads": 3}, "heads=3"),
                                     ({"dropout": "0.1"}, "m.dropout"), ({"extra": 1}, "m.extra")])
def test_invalid_model_params(bad, key):
    with pytest.raises(ConfigError, match=key):
        parse_section("m", {**TINY, **bad}, ModelConfig)
