"""Fixtures shared by the strategy building-block tests (adapters, WiSE-FT, DoRA/OSF): the tiny
BPE tokenizer, a 2-layer Llama and a 2-layer BERT saved as pretrained models, a classifier built
from one of them, and a padded batch of short texts. Import the fixtures by name."""
from __future__ import annotations

import pytest
import torch

from finetune_fixtures import make_pretrained, make_tokenizer

TEXTS = ["the movie was good", "bad plot and so dull", "a great film", "it was awful"]
LABELS = torch.tensor([1, 0, 1, 0])


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tok):
    return make_pretrained(tmp_path_factory.mktemp("llama") / "pretrained", tok)


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tok):
    return make_bert(tmp_path_factory.mktemp("bert") / "pretrained", tok)


def make_bert(dest, tok, layers: int = 2):
    """A BertForMaskedLM (no pooler, as the pipeline's MLM checkpoints) with the tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers,
                               num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64, pad_token_id=tok.pad_token_id)
                    ).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def classifier(path, n_labels: int = 2, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels)


def encode(tok, texts=TEXTS, left: bool = True) -> dict:
    tok.padding_side = "left" if left else "right"
    return dict(tok(list(texts), padding=True, return_tensors="pt"))
