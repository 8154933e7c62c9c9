"""Tiny, hermetic fixtures for the fine-tuning tests: a BPE tokenizer, a 2-layer Llama (hidden 32)
saved as the pretrained model, two small labelled tasks and a pretraining shard split.

`make_root(tmp_path)` lays them out like the pipeline's `data/` and returns the root.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "boring", "terrible", "dull"]
TOPICS = {"sport": ["game", "team", "goal"], "money": ["bank", "stock", "price"],
          "science": ["atom", "cell", "star"]}
FILLER = ["the", "a", "movie", "was", "really", "this", "it", "film", "so", "very", "plot", "and"]


def _sentences(rng: random.Random, n: int, kind: str) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        words = rng.choices(FILLER, k=rng.randint(3, 7))
        if kind == "polarity":
            label = rng.randint(0, 1)
            words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
        else:
            label = rng.randint(0, len(TOPICS) - 1)
            words.insert(rng.randint(0, len(words)), rng.choice(list(TOPICS.values())[label]))
        out.append((" ".join(words), label))
    return out


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = POS + NEG + FILLER + [w for ws in TOPICS.values() for w in ws]
    corpus = [" ".join(words)] * 5 + [" ".join(reversed(words))] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def make_pretrained(dest: Path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make_task(dest: Path, kind: str, seed: int, n=(48, 24, 24)) -> Path:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rng = random.Random(seed)
    names = ["negative", "positive"] if kind == "polarity" else list(TOPICS)
    feats = Features({"id": Value("string"), "text": Value("string"), "label": ClassLabel(names=names)})
    splits = {}
    for split, k in zip(["train", "validation", "test"], n):
        rows = _sentences(rng, k, kind)
        splits[split] = Dataset.from_dict(
            {"id": [f"{split}-{i}" for i in range(k)], "text": [t for t, _ in rows],
             "label": [y for _, y in rows]}, features=feats)
    DatasetDict(splits).save_to_disk(str(dest))
    return dest


def make_shards(root: Path, tokenizer, block_size: int = 16, n_blocks: int = 24) -> None:
    from ptf.data.shards import write_shards

    rng = random.Random(7)
    ids: list[int] = []
    for text, _ in _sentences(rng, 200, "polarity"):
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]
    out = root / "data" / "shards" / "train"
    out.mkdir(parents=True, exist_ok=True)
    entry = write_shards(blocks, out, block_size=block_size, shard_blocks=16)
    (root / "data" / "shards" / "manifest.json").write_text(json.dumps({"train": entry}))


def make_root(root: Path) -> Path:
    tok = make_tokenizer()
    make_pretrained(root / "data" / "models" / "pretrained", tok)
    make_task(root / "data" / "tasks" / "movies", "polarity", seed=1)
    make_task(root / "data" / "tasks" / "source", "topic", seed=2)
    make_shards(root, tok)
    return root
