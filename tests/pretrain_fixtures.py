"""Tiny hermetic inputs for the pretrain/trainer tests: a BPE (or WordPiece) tokenizer trained
on a few sentences and packed Arrow shards written with ptf.data.shards, laid out like the
outputs of stages tokenizer/tokenize under `root/data`."""
from __future__ import annotations


import random
from pathlib import Path

from ptf.common import paths
from ptf.common.atomic import write_json
from ptf.data.shards import write_shards

WORDS = ("the cat dog sat on a mat and ran to big small red blue house tree river "
         "quick brown fox jumps over lazy bird sings in morning light").split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(n)]


def make_tokenizer(out: Path, kind: str = "bpe", vocab: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = sentences(400, 0)
    if kind == "bpe":
        specials = ["<|pad|>", "<|endoftext|>"]
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        t.train_from_iterator(text, trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", pad_token="<|pad|>",
                                       model_max_length=1024)
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        t.decoder = decoders.WordPiece()
        t.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
        t.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_max_length=1024)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def make_data(root: Path, kind: str = "bpe", block: int = 32, train_docs: int = 600,
              val_docs: int = 80) -> dict:
    """data/tokenizer + data/shards under root; returns the manifest."""
    tok = make_tokenizer(root / paths.TOKENIZER, kind)
    manifest: dict = {"block_size": block}
    for split, n, seed in (("train", train_docs, 1), ("validation", val_docs, 2)):
        ids: list[int] = []
        for s in sentences(n, seed):
            enc = tok(s, add_special_tokens=False)["input_ids"]
            ids += enc + [tok.eos_token_id] if kind == "bpe" else [tok.cls_token_id] + enc + [tok.sep_token_id]
        blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
        d = root / paths.SHARDS / split
        d.mkdir(parents=True, exist_ok=True)
        manifest[split] = write_shards(blocks, d, block, shard_blocks=max(1, len(blocks) // 2 + 1))
    write_json(root / paths.SHARDS / "manifest.json", manifest)
    return manifest


TINY = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "max_positions": 64,
        "dropout": 0.0}


def pretrain_params(**over) -> dict:
    p = {"objective": "clm", "seed": 0, "model": dict(TINY), "batch_size": 8, "grad_accum": 1,
         "max_steps": 12, "lr": 3e-3, "min_lr_ratio": 0.1, "weight_decay": 0.01,
         "adam_beta1": 0.9, "adam_beta2": 0.98, "warmup_steps": 2, "grad_clip": 1.0,
         "mixed_precision": "no", "mlm_probability": 0.15, "eval_every": 6, "eval_blocks": 0,
         "eval_batch_size": 16, "log_every": 2, "checkpoint_every": 4, "keep_checkpoints": 2,
         "experiment": "test"}
    p.update(over)
    return p


def write_params(root: Path, **over) -> None:
    import yaml
    (root / "params.yaml").write_text(yaml.safe_dump({"pretrain": pretrain_params(**over)}))

