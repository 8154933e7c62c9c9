"""ptf: the library the pipeline's stages share (pretrain → transfer → forgetting). No CLI.

Grouped by concern, imports point down the list (a package imports only those above it):
  common/    atomic writes, paths under data/, strict params loading, errors and the stage guard
  data/      sources (fetch, MediaWiki text), task data, Arrow shards
  models/    model construction, pretraining objectives, the strategy registry, saved artifacts
  training/  the one training loop, Accelerate helpers, fine-tuning runs, MLflow tracking
  measures/  forgetting measures (LM drift, CL matrix), statistics and claims, readers of stage outputs
  report/    Markdown tables, figures and the results page's sections
Stage entry points (`python -m stages.<x>`) live in `stages/`; they import from here, never
from each other.
"""
