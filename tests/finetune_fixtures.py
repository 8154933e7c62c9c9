"""Tiny, hermetic fixtures for the fine-tuning tests: a BPE tokenizer and a 2-layer Llama (hidden
32), or a WordPiece tokenizer and a 2-layer BERT (the two architectures the pretrain stage
builds), saved as the pretrained model; two small labelled tasks and a pretraining shard split.

`make_root(tmp_path, arch)` lays them out like the pipeline's `data/` and returns the root.
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
    words = _words()
    corpus = [" ".join(words)] * 5 + [" ".join(reversed(words))] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _words() -> list[str]:
    return POS + NEG + FILLER + [w for ws in TOPICS.values() for w in ws]


def make_wordpiece_tokenizer():
    """A BERT-style tokenizer ([CLS] text [SEP], a [MASK] token): one WordPiece per fixture
    word, from a fixed vocabulary (a trained one differs between processes: hash order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(_words())))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   eos_token="[SEP]")


def make_bert(dest: Path, tokenizer, seed: int = 0) -> Path:
    """A 2-layer BertForMaskedLM (dropout on, as BERT's default) saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                     pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(cfg).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make_modernbert(dest: Path, tokenizer, seed: int = 0) -> Path:
    """A 2-layer ModernBertForMaskedLM: an architecture whose HF head can mean-pool (not one the
    pretrain stage builds; a foundation a user may bring)."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(seed)
    cfg = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                           pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                           sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                           eos_token_id=tokenizer.sep_token_id, global_attn_every_n_layers=1,
                           local_attention=16)
    ModernBertForMaskedLM(cfg).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


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


def make_root(root: Path, arch: str = "llama") -> Path:
    """`data/` with the pretrained model (`llama`: clm, `bert` / `modernbert`: mlm), tasks
    movies (2 classes) and source (3 classes), and pretraining shards."""
    tok = make_tokenizer() if arch == "llama" else make_wordpiece_tokenizer()
    build = {"llama": make_pretrained, "bert": make_bert, "modernbert": make_modernbert}[arch]
    build(root / "data" / "models" / "pretrained", tok)
    make_task(root / "data" / "tasks" / "movies", "polarity", seed=1)
    make_task(root / "data" / "tasks" / "source", "topic", seed=2)
    make_shards(root, tok)
    return root


STEPS = 3


def runs_of(task: str, strategies) -> dict:
    """`finetune.runs` declaring `task` with each of `strategies`."""
    return {f"{task}-{s}": {"task": task, "strategy": s} for s in strategies}


def params(arch: str = "llama", **over) -> dict:
    """A `finetune` params section for the fixtures: every registry strategy, tiny budgets."""
    from ptf.models.strategies import STRATEGIES

    lr = lambda v: {"lrs": v, "weight_decay": 0.0}  # noqa: E731
    targets = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"],
               "modernbert": ["Wqkv"]}[arch]
    p = {
        "runs": runs_of("movies", STRATEGIES), "seeds": [0], "pooling": "last",
        "data": {"max_train": 48, "max_eval": 24, "max_length": 16, "seed": 0},
        "train": {"batch_size": 8, "eval_batch_size": 24, "grad_accum": 1, "max_steps": STEPS,
                  "warmup_steps": 1, "eval_every": STEPS, "patience": None, "grad_clip": 1.0,
                  "mixed_precision": "no"},
        "arms": {
            "full": lr([1e-3]), "lower_lr": lr([1e-4]), "linear_probe": lr([1e-2]),
            "freeze_bottom": {**lr([1e-3]), "layers": 1},
            "gradual_unfreeze": {**lr([1e-3]), "every": 1, "factor": 2.6},
            "lora": {**lr([1e-2]), "r": 2, "alpha": 4.0, "dropout": 0.0,
                     "target_modules": targets},
            "prompt_tuning": {**lr([1e-2]), "virtual_tokens": 3},
            "replay": {**lr([1e-3]), "weight": 1.0, "batch_size": 2, "block_len": 8},
            "ewc": {**lr([1e-3]), "lam": 1.0, "fisher_blocks": 2, "fisher_batch_size": 1,
                    "block_len": 8, "normalize": True},
            "l2sp": {**lr([1e-3]), "alpha": 0.1},
            "scratch": lr([1e-3]),
            "dora": {**lr([1e-2]), "r": 2, "alpha": 4.0, "dropout": 0.0,
                     "target_modules": targets},
            "adapter": {**lr([1e-2]), "reduction_factor": 4, "placement": "both",
                        "activation": "relu"},
            "osf": {**lr([1e-3]), "effective_rank": 0.5, "target_modules": None},
        },
        "curves": {"task": "movies", "strategies": ["full", "scratch"], "fractions": [0.1, 1.0],
                   "seeds": [0, 1], "epochs": 1.0, "min_steps": 2, "lr_search": False},
        "sequential": {"orders": [["movies", "source"]], "strategies": ["l2sp"], "seeds": [0],
                       "max_steps": 2},
    }
    for k, v in over.items():
        sect, _, key = k.partition(".")
        (p[sect].__setitem__(key, v) if key else p.__setitem__(sect, v))
    return p


def cfg_of(p: dict, model):
    """The section validated whole (as the stages load it), then the keys `model` reads."""
    from ptf.common.config import parse_section
    from ptf.training.finetune_config import FinetuneSection

    parse_section("finetune", p, FinetuneSection)
    return parse_section("finetune", p, model)
