"""Fine-tune the pretrained model on one task with one strategy: one declared arm of
`finetune.runs` (DVC `foreach`, stage finetune@<task>-<strategy>).

In:  data/models/pretrained (HF model + tokenizer; the architecture is read from it, never from
     params), data/tasks/<task>/ (DatasetDict train/validation/test, columns id/text/label),
     data/shards/ (replay and ewc only), params section `finetune` (`FinetuneKeys`).
Out: data/models/finetuned/<task>/<strategy>/seed<k>/ for every seed, in the strategy's layout
     (ptf.models.artifacts: an HF directory for AutoModelForSequenceClassification and
     pipeline("text-classification"); a peft adapter with its `base/` classifier for
     AutoPeftModelForSequenceClassification; LoRA also merged under seed<k>/merged/), each
     with its tokenizer, a model card README.md and `finetune_meta.json`;
     data/metrics/finetune/<task>/<strategy>.json (per seed and mean/std: test accuracy and
     macro-F1 at the best validation point, val accuracy, chosen LR, LR search, trainable
     parameters, train time; per seed also `val_predictions` / `test_predictions`, the predicted
     class ids in split order, and `replay_blocks`; top level `validation_labels` /
     `test_labels`, the gold ids in the same order); one MLflow run per seed tagged task,
     strategy, seed.

Protocol: the LR of every arm is chosen on the validation split from its grid
(`finetune.arms.<strategy>.lrs`) with the first seed; the other seeds run at the chosen LR
(`ptf.training.finetuning.run_arm`). Budgets are optimizer steps (`finetune.train.max_steps`),
the same for every arm; early stopping and model selection use validation accuracy; test
accuracy is read at the best validation point.

Run: python -m stages.finetune --task movies --strategy lora
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.atomic import atomic_dir, write_json
from ptf.common.cli import main_guard, maybe_die
from ptf.common.config import ConfigError
from ptf.data.tasks import load_task
from ptf.models.strategies import check_strategy
from ptf.training.finetune_config import FinetuneKeys, load_stage_config
from ptf.training.finetuning import Context, preflight, run_arm


class Config(FinetuneKeys):
    """The keys of the `finetune` section this stage reads."""

    def check_declared(self, task: str, strategy: str) -> None:
        """`--task`/`--strategy` must be an arm of `finetune.runs` (what DVC runs and the
        forgetting stage reads), else a `ConfigError` naming the key it would have."""
        if (task, strategy) not in self.declared_arms():
            raise ConfigError(f"finetune.runs: no arm {task}-{strategy} (--task {task} --strategy "
                              f"{strategy}); declared: {', '.join(sorted(self.runs))}")


def run(cfg: Config, task: str, strategy: str, root: Path = Path(".")) -> dict[str, Any]:
    from ptf.training.tracking import check_reachable, tracking_uri

    check_strategy(strategy, "--strategy")
    ctx = Context.create(root, cfg)
    data = load_task(root, task, ctx.tokenizer, cfg.data)
    preflight(ctx, strategy, data)
    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    t0 = time.perf_counter()
    out = root / paths.FINETUNED / task / strategy
    with atomic_dir(out) as tmp:
        res = run_arm(ctx, data, strategy, cfg.seeds, cfg.train.max_steps, save_dir=tmp,
                      publish_dir=out)
        maybe_die("finetune")  # fault-injection point (tests/test_faults.py)
    metrics = {"task": task, "pooling": cfg.pooling, "max_steps": cfg.train.max_steps,
               "wall_time_s": time.perf_counter() - t0, **res}
    write_json(root / paths.METRICS / "finetune" / task / f"{strategy}.json", metrics)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--strategy", required=True)
    args = ap.parse_args()

    def go():
        check_strategy(args.strategy, "--strategy")   # before reading params
        cfg = load_stage_config(Config)
        cfg.check_declared(args.task, args.strategy)
        m = run(cfg, args.task, args.strategy)
        print(f"{args.task}/{args.strategy}: test accuracy {m['test_accuracy']['mean']:.4f} "
              f"± {m['test_accuracy']['std']:.4f} (lr {m['chosen_lr']:g}, "
              f"{m['wall_time_s']:.0f} s)")

    main_guard(go)


if __name__ == "__main__":
    main()
