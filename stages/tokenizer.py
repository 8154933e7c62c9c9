"""Stage `tokenizer`: train a subword tokenizer on the training corpus.

In:  data/corpus/train.jsonl (one document per line, `{"id", "title", "text"}`); never the
     validation split. Params: the `tokenizer` section of params.yaml.
Out: data/tokenizer/, a `PreTrainedTokenizerFast` directory (`tokenizer.json`,
     `tokenizer_config.json`) that `AutoTokenizer.from_pretrained` loads, with
     `model_max_length` and the special tokens of its kind set:
       - `bpe`: byte-level BPE (GPT-2 style, for a causal LM). Special tokens from params:
         `bos`/`eos` (e.g. both `<|endoftext|>`) and `pad`. No token is added by the
         post-processor; documents are separated by `eos` when packed (stage `tokenize`).
       - `wordpiece`: BERT-style WordPiece (for a masked LM) with `pad`, `unk`, `cls`, `sep`,
         `mask` (`[PAD] [UNK] [CLS] [SEP] [MASK]`) and the BERT post-processor
         `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]`.
     The special tokens take ids 0.. in the order pad, unk, cls, sep, mask, bos, eos (those the
     kind has, duplicates once). Same corpus and params give byte-identical files (WordPiece
     is trained through a plain BPE trainer on "marked" continuation characters, because
     `tokenizers`' WordPieceTrainer numbers `##c` in a random hash order: see `_train_wordpiece`).
Run: python -m stages.tokenizer
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ptf.common import paths
from ptf.common.atomic import atomic_dir
from ptf.common.cli import StageError, main_guard
from ptf.common.config import StrictModel, load_section
from ptf.data.corpus import iter_batches, iter_texts
from ptf.models.modeling import FOUNDATION_DIR, read_foundation

# Roles each kind needs in `special_tokens`, exactly (no more, no less).
ROLES = {
    "bpe": ("bos", "eos", "pad"),
    "wordpiece": ("pad", "unk", "cls", "sep", "mask"),
}
# Order of the special tokens in the vocabulary (ids 0..).
_ID_ORDER = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")


_TRAINED = ("vocab_size", "min_frequency", "lowercase", "model_max_length", "special_tokens",
            "batch_docs")


def _opt(**kw):
    """A key the trained kinds need and kind `foundation` must not have (checked per kind)."""
    return Field(default=None, validate_default=True, **kw)


class Config(StrictModel):
    kind: Literal["bpe", "wordpiece", "foundation"]
    vocab_size: int | None = _opt(ge=64, le=1_000_000)
    min_frequency: int | None = _opt(ge=1)
    lowercase: bool | None = _opt()
    model_max_length: int | None = _opt(ge=8, le=1_048_576)
    # role -> token string; roles required per kind: see ROLES
    special_tokens: dict[str, str] | None = _opt()
    batch_docs: int | None = _opt(ge=1, le=1_000_000)  # documents per batch fed to the trainer
    max_docs: int | None = Field(default=None, ge=1)  # train on this many documents, evenly spaced; null: all

    @field_validator(*_TRAINED)
    @classmethod
    def _per_kind(cls, v, info: ValidationInfo):
        kind = info.data.get("kind")
        if kind == "foundation" and v is not None:
            raise ValueError("not used by kind 'foundation' (the foundation's own tokenizer is "
                             "passed through); remove it")
        if kind in ROLES and v is None:
            raise ValueError(f"missing key; kind {kind!r} needs it")
        return v

    @model_validator(mode="after")
    def _check_special_tokens(self) -> Config:
        if self.kind == "foundation" or self.special_tokens is None:
            return self
        need = set(ROLES[self.kind])
        have = set(self.special_tokens)
        if have != need:
            missing, extra = sorted(need - have), sorted(have - need)
            raise ValueError(
                f"special_tokens for kind {self.kind!r} must have exactly the roles "
                f"{sorted(need)}" + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else ""))
        for role, tok in self.special_tokens.items():
            if not tok or tok != tok.strip():
                raise ValueError(f"special_tokens.{role}: {tok!r} must be non-empty without "
                                 "surrounding spaces")
        if self.kind == "bpe" and self.vocab_size <= 256 + len(self.ordered_special_tokens()):
            raise ValueError(f"vocab_size={self.vocab_size} leaves no room for merges: a "
                             "byte-level BPE has 256 byte tokens plus the special tokens")
        if self.kind == "bpe" and self.special_tokens["pad"] == self.special_tokens["eos"]:
            # Padding with eos makes a label mask drop the real eos tokens too.
            raise ValueError("special_tokens.pad must differ from special_tokens.eos")
        if self.kind == "wordpiece" and len(set(self.special_tokens.values())) != 5:
            raise ValueError("special_tokens of kind 'wordpiece' must be 5 distinct tokens")
        return self

    def ordered_special_tokens(self) -> list[str]:
        """The special tokens in vocabulary order, each once."""
        out: list[str] = []
        for role in _ID_ORDER:
            tok = self.special_tokens.get(role)
            if tok is not None and tok not in out:
                out.append(tok)
        return out


# ---------------------------------------------------------------- corpus reading (shared)


# ---------------------------------------------------------------- building the tokenizer

def build_untrained(cfg: Config):
    """A `tokenizers.Tokenizer` with the normalizer, pre-tokenizer and decoder of `cfg.kind`
    and an empty model (the model comes from training)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if cfg.kind == "bpe":
        tok = Tokenizer(models.BPE())  # byte-level: no unk needed
        norm = [normalizers.NFC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token=cfg.special_tokens["unk"],
                                         continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None,
            lowercase=cfg.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_post_processor(tok, cfg: Config) -> None:
    if cfg.kind == "wordpiece":
        from tokenizers import processors

        cls, sep = cfg.special_tokens["cls"], cfg.special_tokens["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])


# WordPiece training, made deterministic. `tokenizers`' WordPieceTrainer gives the `##c`
# continuation characters their ids in the iteration order of a randomly seeded hash map, and
# BPE breaks ties between equally frequent pairs by id, so two runs can learn different
# vocabularies. Instead: every non-initial character c of a word is mapped to a private-use
# "marked" character (U+F0000 + ord(c)), so `##c` is an ordinary alphabet character (alphabet
# ids are assigned in sorted order); a plain BPE trainer then learns exactly the merges the
# WordPiece trainer would, deterministically; the marks are turned back into `##` at the end.
# Words with a character outside the Basic Multilingual Plane (rare: emoji, some CJK) cannot be
# marked and are left out of training (they still encode, piecewise or as [UNK]).
_MARK = 0xF0000
_BMP_END = "\U00010000"


class _MarkTable(dict):
    def __missing__(self, o: int) -> int:
        self[o] = _MARK + o
        return _MARK + o


_MARKS = _MarkTable()


def _mark_words(tok, text: str) -> str:
    words = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
    return " ".join(w[0] + w[1:].translate(_MARKS) for w, _ in words if max(w) < _BMP_END)


def _unmark(token: str) -> str:
    plain = "".join(chr(ord(c) - _MARK) if c >= "\U000F0000" else c for c in token)
    return "##" + plain if token[0] >= "\U000F0000" else plain


def _train_wordpiece(corpus: Callable[[], Iterable[list[str]]], cfg: Config,
                     length: int | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = build_untrained(cfg)
    specials = cfg.ordered_special_tokens()
    # Pass 1: every (normalized) character may start a word at encoding time, so all of them
    # belong to the plain alphabet, as in WordPieceTrainer.
    alphabet: set[str] = set()
    for batch in corpus():
        for text in batch:
            alphabet.update(tok.normalizer.normalize_str(text))
    alphabet = sorted(c for c in alphabet if c < _BMP_END and not c.isspace())
    marked = Tokenizer(models.BPE())
    marked.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  show_progress=False, special_tokens=specials,
                                  initial_alphabet=alphabet)
    marked.train_from_iterator(([_mark_words(tok, t) for t in b] for b in corpus()),
                               trainer=trainer, length=length)
    inv = {i: t for t, i in marked.get_vocab(with_added_tokens=True).items()}
    vocab: dict[str, int] = {}
    for i in range(len(inv)):
        t = inv[i]
        vocab[t if t in specials else _unmark(t)] = i
    if len(vocab) != len(inv):
        raise RuntimeError("wordpiece: marked vocabulary did not map one-to-one")
    tok.model = models.WordPiece(vocab, unk_token=cfg.special_tokens["unk"],
                                 continuing_subword_prefix="##")
    tok.add_special_tokens(specials)
    return tok


def train(corpus: Callable[[], Iterable[list[str]]], cfg: Config, length: int | None = None):
    """Train on `corpus()`, an iterable of text batches (called once per pass over the data);
    return the trained `tokenizers.Tokenizer`."""
    from tokenizers import pre_tokenizers, trainers

    if cfg.kind == "bpe":
        tok = build_untrained(cfg)
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, show_progress=False,
            special_tokens=cfg.ordered_special_tokens(),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus(), trainer=trainer, length=length)
    else:
        tok = _train_wordpiece(corpus, cfg, length)
    _add_post_processor(tok, cfg)
    tok.no_truncation()
    tok.no_padding()
    return tok


def wrap(tok, cfg: Config):
    """The trained tokenizer as a `PreTrainedTokenizerFast` with its special tokens set."""
    from transformers import PreTrainedTokenizerFast

    st = cfg.special_tokens
    kw = {f"{role}_token": st[role] for role in ROLES[cfg.kind]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=cfg.model_max_length,
        padding_side="right", clean_up_tokenization_spaces=False, **kw)


def evenly_spaced(n: int, k: int | None) -> range | list[int]:
    """Indices of `k` documents spread evenly over `n` (all of them if k is None or >= n)."""
    if k is None or k >= n:
        return range(n)
    return [i * n // k for i in range(k)]


def pass_through(root: Path) -> None:
    """Kind `foundation`: the foundation's own tokenizer (data/foundation), saved unchanged in
    content as data/tokenizer (re-serialised by `transformers`, key-sorted)."""
    from transformers import AutoTokenizer

    d = root / FOUNDATION_DIR
    rec = read_foundation(d)
    if rec is None:
        raise StageError(f"{d}: tokenizer.kind is 'foundation' but the download stage fetched no "
                         "foundation (download.foundation is null)")
    tok = AutoTokenizer.from_pretrained(str(d))
    with atomic_dir(root / paths.TOKENIZER) as tmp:
        tok.save_pretrained(str(tmp))
        _normalise_saved(tmp)
    print(f"tokenizer: the foundation's ({rec['name']}), {len(tok)} tokens -> {root / paths.TOKENIZER}")


def run(cfg: Config, root: Path = Path(".")) -> None:
    root = Path(root)
    if cfg.kind == "foundation":
        pass_through(root)
        return
    src = root / paths.CORPUS / "train.jsonl"
    # Validate the whole file before training (the trainer would otherwise see a partial corpus
    # if the error surfaced inside its iterator, and Rust would obscure the message).
    n_all = sum(1 for _ in iter_texts(src))
    keep = set(evenly_spaced(n_all, cfg.max_docs)) if cfg.max_docs is not None else None
    n_docs = n_all if keep is None else len(keep)
    from tqdm import tqdm

    passes = 1 if cfg.kind == "bpe" else 2
    bar = tqdm(total=n_docs * passes, desc=f"tokenizer: train {cfg.kind}", unit="doc")

    def corpus():
        for b in iter_batches(src, cfg.batch_docs, keep):
            bar.update(len(b))
            yield b

    tok = train(corpus, cfg, length=n_docs)
    bar.close()
    if tok.get_vocab_size() < len(cfg.ordered_special_tokens()) + 1:
        raise StageError(f"{src}: corpus too small to train a vocabulary")
    hf = wrap(tok, cfg)
    with atomic_dir(root / paths.TOKENIZER) as tmp:
        hf.save_pretrained(str(tmp))
        _normalise_saved(tmp)
    print(f"tokenizer: {cfg.kind}, vocab {tok.get_vocab_size()} (asked {cfg.vocab_size}), "
          f"{n_docs} documents -> {root / paths.TOKENIZER}")


def _normalise_saved(out: Path) -> None:
    """Rewrite the saved JSON files key-sorted, so that their bytes depend only on content."""
    for p in sorted(out.glob("*.json")):
        if p.name == "tokenizer.json":
            continue  # already deterministic (vocab ordered by id); key order matters to readers
        obj = json.loads(p.read_text(encoding="utf-8"))
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                     encoding="utf-8")


def main() -> None:
    run(load_section("tokenizer", Config))


if __name__ == "__main__":
    main_guard(main)
