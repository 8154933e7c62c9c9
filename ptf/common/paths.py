"""Where every stage reads and writes, relative to the repo root (the working directory of
`dvc repro`). `dvc.yaml` names the same paths; `tests/test_dag.py` checks that they agree.

Layout of `data/` (DVC outputs, except checkpoints/):
  raw/                       fetched source files, by sha256 (download)
  corpus/{train,validation}.jsonl   one article (or task sentence) per line: {"id","title","text"}
  tasks/<task>/              HF DatasetDict (train/validation/test) with columns id, text, label
  manifests/download.json    counts and source hashes
  tokenizer/                 PreTrainedTokenizerFast directory
  shards/{train,validation}/ Arrow shards of packed blocks + manifest.json
  models/pretrained/         HF model directory (+ tokenizer): the first pretrained backbone
  models/pretrained/backbones.json   {"seeds": [first, ...]}, when pretrain.extra_seeds asks for more
  models/pretrained/backbones/<seed>/   each further backbone, a whole HF directory (+ tokenizer);
                             fine-tune seed k starts from backbone k mod N (ptf.models.backbones)
  checkpoints/pretrain/      Accelerate state to resume from: git-ignored, not a DVC output
  models/finetuned/<task>/<strategy>/
  metrics/*.json             DVC metrics
  plots/*                    DVC plot data (CSV/JSON) and PNG figures
"""
from pathlib import Path

DATA = Path("data")
RAW = DATA / "raw"
CORPUS = DATA / "corpus"
TASKS = DATA / "tasks"
MANIFESTS = DATA / "manifests"
TOKENIZER = DATA / "tokenizer"
SHARDS = DATA / "shards"
MODELS = DATA / "models"
PRETRAINED = MODELS / "pretrained"
FINETUNED = MODELS / "finetuned"
CHECKPOINTS = DATA / "checkpoints"
METRICS = DATA / "metrics"
PLOTS = DATA / "plots"
