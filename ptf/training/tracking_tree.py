"""Where a stage's MLflow run goes in the run tree, and what it is called (no CLI).

    pipeline run   one per pipeline execution (`dvc repro`, `dvc exp run`, a Prefect flow run)
      stage run    one per DVC stage execution (`finetune@source-full`, `pretrain`, ...)
        configuration runs   one per configuration and seed, for stages that train several

In:  an `MlflowClient`, the experiment id, the stage name and the tags its call site passes
     (task, strategy, seed, lr, fraction, objective, orders), the repo root, the environment.
Out: `place(...)` creates the runs a `start_run` needs and returns a `Placement` (run ids, which
     runs it created, so that a refused write can delete them again: never a half-logged tree);
     `reopen`/`close` keep a stage run's and a DVC-owned pipeline run's status current; the
     names (`finetune source/full lr=3e-4 seed=0`, `curves source/linear_probe 5% seed=1`) and
     tags (`configuration`, `objective`, `foundation`, `ptf.level`, `ptf.pipeline`).

How a run finds its pipeline run:
  1. `PTF_PIPELINE_RUN_ID` (set by the Prefect flow and by `python -m flows.mlflow_record repro`):
     that run; one that no longer exists (or is deleted, or lives in another experiment) is a
     `StageError` before anything is created.
  2. Else the nearest `dvc` process above this one (found in /proc: `dvc repro`, `dvc exp run`,
     a queue worker's `dvc exp exec-run`): the pipeline run tagged `ptf.pipeline.key =
     dvc:<host>:<pid>:<start time in clock ticks since boot>`, found or created (when processes
     race, the oldest one is kept and the others deleted). Each `dvc` invocation is thus one
     pipeline run, and a later one never reuses it (a pid is reused only with another start time).
     Its status follows its stages: RUNNING while one runs, then FINISHED or FAILED.
  3. Else (a stage module started by hand, a test; `PTF_PIPELINE=off`; no /proc): no pipeline run.
A stage that logs one run (pretrain, sequential, forgetting) is the stage run itself; a stage that
logs one run per configuration and seed (the call sites pass a `seed` tag: finetune, curves) gets a
stage run made on its first call and kept for the process, and each call becomes its child.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ptf.common import paths
from ptf.common.cli import StageError

PIPELINE_ENV = "PTF_PIPELINE_RUN_ID"
SWITCH_ENV = "PTF_PIPELINE"
PARENT_TAG = "mlflow.parentRunId"
PIPELINE_TAG = "ptf.pipeline"      # on every run of one execution: the pipeline run's id
KEY_TAG = "ptf.pipeline.key"
OWNER_TAG = "ptf.pipeline.owner"   # "dvc": its stages set its status; else whoever opened it
LEVEL_TAG = "ptf.level"
PIPELINE, STAGE, CONFIGURATION = "pipeline", "stage", "configuration"

_STAGE_RUNS: dict[tuple, str] = {}   # (uri, experiment, pipeline, dvc stage, root) -> stage run id


# ------------------------------------------------------------------------ names and tags
def short_number(value: Any) -> str:
    """3e-4 for 0.0003, 0.01 for 0.01: the shorter of the plain and the scientific form."""
    v = float(value)
    plain = f"{v:g}"
    mant, exp = f"{v:e}".split("e")
    sci = f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return sci if len(sci) < len(plain) else plain


def percent(fraction: Any) -> str:
    return f"{round(float(fraction) * 100, 6):g}%"


def configuration(tags: Mapping[str, str]) -> str:
    """What a configuration run trains, without its seed: `source/full lr=3e-4`, `source/lora 5%`."""
    what = f"{tags.get('task', '?')}/{tags.get('strategy', '?')}"
    if "fraction" in tags:
        return f"{what} {percent(tags['fraction'])}"
    return f"{what} lr={short_number(tags['lr'])}" if "lr" in tags else what


def config_name(stage: str, tags: Mapping[str, str]) -> str:
    return f"{stage} {configuration(tags)} seed={tags['seed']}"


def sequential_tags(orders: list[list[str]], strategies: list[str], seeds: list[int]) -> dict[str, str]:
    """The sequential stage's tags (its call site, and `flows.mlflow_record` for a stage that did
    not run): `orders` "a,b|b,a", `strategies` "full,replay", `seeds` "0,1,2"."""
    return {"orders": "|".join(",".join(map(str, o)) for o in orders),
            "strategies": ",".join(map(str, strategies)), "seeds": ",".join(map(str, seeds))}


def stage_name(stage: str, dvc_stage: str, tags: Mapping[str, str]) -> str:
    """`finetune source/full`, `curves source`, `pretrain mlm`, `sequential full+replay: source →
    movies; movies → source`, `forgetting`."""
    if "orders" in tags:
        orders = "; ".join(" → ".join(o.split(",")) for o in tags["orders"].split("|"))
        return f"{stage} {'+'.join(tags.get('strategies', '').split(','))}: {orders}"
    if "@" in dvc_stage and "task" in tags and "strategy" in tags:
        return f"{stage} {tags['task']}/{tags['strategy']}"
    if "task" in tags:
        return f"{stage} {tags['task']}"
    if "objective" in tags:
        return f"{stage} {tags['objective']}"
    return dvc_stage


def file_sha(path: Path) -> str | None:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def lock_out_md5(root: Path, out: Path | str) -> str | None:
    """The md5 that `dvc.lock` records for the output `out`, if any."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    for spec in stages.values():
        for o in spec.get("outs", []):
            if o.get("path") == str(out):
                return o.get("md5")
    return None


def foundation_tags(root: Path) -> dict[str, str]:
    """`objective` and `foundation` of the pretrained model the stage fine-tunes (from its
    `config.json` and the md5 `dvc.lock` gives it), e.g. `llama 2L d=128 clm @1a2b3c4d`."""
    cfg_file = Path(root) / paths.PRETRAINED / "config.json"
    if not cfg_file.is_file():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return {}
    arch = (cfg.get("architectures") or [""])[0]
    objective = "mlm" if arch.endswith("MaskedLM") else "clm"
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer", "?"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd", "?"))
    md5 = lock_out_md5(root, paths.PRETRAINED)
    found = f"{cfg.get('model_type', 'model')} {layers}L d={hidden} {objective}"
    return {"objective": objective, "foundation": found + (f" @{md5[:8]}" if md5 else "")}


def pipeline_tags(root: Path) -> dict[str, str]:
    """What identifies a pipeline execution's inputs: git commit, hashes of dvc.lock and
    params.yaml, DVC's experiment name/baseline and the Prefect flow run, when present."""
    from ptf.training.tracking import git_commit

    tags = {"mlflow.source.git.commit": git_commit(root), "dvc.lock.sha256": file_sha(root / "dvc.lock"),
            "params.sha256": file_sha(root / "params.yaml"),
            "dvc.exp.name": os.environ.get("DVC_EXP_NAME"),
            "dvc.exp.baseline": os.environ.get("DVC_EXP_BASELINE_REV"),
            "prefect.flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID"),
            "ptf.root": str(Path(root).resolve()), LEVEL_TAG: PIPELINE}
    return {k: v for k, v in tags.items() if v}


# ------------------------------------------------------------------------ the dvc invocation
@dataclass
class Invocation:
    """A `dvc` process: its pid, start (clock ticks since boot and epoch seconds), argv."""
    pid: int
    ticks: int
    started: float
    argv: list[str]

    @property
    def key(self) -> str:
        return f"dvc:{socket.gethostname()}:{self.pid}:{self.ticks}"

    @property
    def command(self) -> str:
        i = next(i for i, a in enumerate(self.argv) if _is_dvc(a))
        return " ".join(["dvc", *self.argv[i + 1:]])


def _is_dvc(arg: str) -> bool:
    return os.path.basename(arg) == "dvc"


def _proc(pid: int) -> tuple[int, int, list[str]] | None:
    """(parent pid, start time in clock ticks since boot, argv) of `pid`, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), int(fields[19]), [a.decode(errors="replace") for a in argv if a]


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def dvc_invocation(start: int | None = None) -> Invocation | None:
    """The nearest `dvc` process above `start` (default: this process's parent), or None."""
    pid = start if start is not None else os.getppid()
    for _ in range(64):
        if pid <= 1:
            return None
        info = _proc(pid)
        if info is None:
            return None
        ppid, ticks, argv = info
        # `dvc ...` (a console script: [python, .../dvc, ...] or [.../dvc, ...]) or `python -m dvc`
        head = argv[:2]
        if any(_is_dvc(a) for a in head) or argv[1:3] == ["-m", "dvc"]:
            if argv[1:3] == ["-m", "dvc"]:
                argv = [argv[0], "dvc", *argv[3:]]
            return Invocation(pid, ticks, _boot_time() + ticks / os.sysconf("SC_CLK_TCK"), argv)
        pid = ppid
    return None


# ------------------------------------------------------------------------ placing runs
@dataclass
class Placement:
    """The runs one `start_run` call uses: `run_id` (its own), the stage run (a configuration
    run's parent, else itself), the pipeline run and whether the stages own its status."""
    run_id: str = ""
    stage_run: str | None = None
    pipeline: str | None = None
    owns_pipeline: bool = False
    created: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)


def check_pipeline_run(client: Any, run_id: str, shown: str, experiment_id: str | None = None) -> None:
    """`StageError` unless `run_id` is an active run (of `experiment_id`, when given)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise StageError(f"the pipeline run {run_id} named by {PIPELINE_ENV} no longer exists in "
                         f"{shown}; unset {PIPELINE_ENV} (a bare `dvc repro` makes its own) or "
                         "start the pipeline again")
    if experiment_id is not None and run.info.experiment_id != experiment_id:
        raise StageError(f"the pipeline run {run_id} ({PIPELINE_ENV}) is in experiment "
                         f"{run.info.experiment_id}, not in {experiment_id} where this stage logs; "
                         "use one experiment name in every section of params.yaml")


def keyed_run(client: Any, exp_id: str, key: str, name: str, tags: Mapping[str, str],
              created: list[str]) -> str:
    """The active run tagged `ptf.pipeline.key = key`, created when absent; when processes race,
    every one keeps the oldest and deletes its own duplicate."""
    query = f"tags.`{KEY_TAG}` = '{key}'"
    order = ["attributes.start_time ASC", "attributes.run_id ASC"]
    found = client.search_runs([exp_id], query, order_by=order, max_results=5)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={**tags, KEY_TAG: key})
    mine = run.info.run_id
    created.append(mine)
    client.set_tag(mine, PIPELINE_TAG, mine)
    first = client.search_runs([exp_id], query, order_by=order, max_results=5)[0].info.run_id
    if first != mine:
        client.delete_run(mine)
        created.remove(mine)
    return first


def pipelines_enabled() -> bool:
    """False when `PTF_PIPELINE` is off/0/false/no: runs are then not grouped by execution."""
    return os.environ.get(SWITCH_ENV, "").lower() not in ("0", "off", "false", "no")


def resolve_pipeline(client: Any, exp_id: str, root: Path, shown: str,
                     created: list[str]) -> tuple[str | None, bool]:
    """(pipeline run id or None, whether this pipeline's stages set its status)."""
    given = os.environ.get(PIPELINE_ENV)
    if given:
        check_pipeline_run(client, given, shown, exp_id)
        return given, False
    if not pipelines_enabled():
        return None, False
    inv = dvc_invocation()
    if inv is None:
        return None, False
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(inv.started))
    tags = {**pipeline_tags(root), OWNER_TAG: "dvc", "dvc.command": inv.command[:500]}
    return keyed_run(client, exp_id, inv.key, f"{inv.command[:60]} · {when}", tags, created), True


def reopen(client: Any, run_id: str | None) -> None:
    if run_id:
        client.update_run(run_id, status="RUNNING")


def close(client: Any, run_id: str | None, status: str, started: float) -> None:
    """End `run_id` with `status` and its `wall_time_s` since `started`."""
    if run_id:
        client.log_metric(run_id, "wall_time_s", time.time() - started)
        client.set_terminated(run_id, status)


def place(pl: Placement, client: Any, exp_id: str, uri: str, experiment: str, stage: str,
          tags: Mapping[str, str], root: Path, shown: str, base: Mapping[str, str]) -> Placement:
    """Fill `pl` with the runs of one `start_run(stage, tags=...)` call (see the module
    docstring). `base`: tags every run gets (dvc.stage, git commit, ...). On error, the caller
    deletes `pl.created`."""
    pl.pipeline, pl.owns_pipeline = resolve_pipeline(client, exp_id, root, shown, pl.created)
    dvc_stage = base["dvc.stage"]
    common = {**base, **({PIPELINE_TAG: pl.pipeline, PARENT_TAG: pl.pipeline} if pl.pipeline else {})}
    own = {k: str(v) for k, v in tags.items()}
    found = foundation_tags(root) if stage != "pretrain" else {}
    if "seed" in own:   # one of several configuration runs of this stage
        key = (uri, experiment, pl.pipeline, dvc_stage, str(Path(root).resolve()), os.getpid())
        if key not in _STAGE_RUNS:
            item = ("task", "strategy") if "@" in dvc_stage else ("task",)  # curves: many strategies
            stage_tags = {**common, **found, LEVEL_TAG: STAGE, **{k: own[k] for k in item if k in own}}
            run = client.create_run(exp_id, run_name=stage_name(stage, dvc_stage, own), tags=stage_tags)
            pl.created.append(run.info.run_id)
            _STAGE_RUNS[key] = run.info.run_id
        pl.stage_run = _STAGE_RUNS[key]
        reopen(client, pl.stage_run)
        run_tags = {**common, **found, **own, PARENT_TAG: pl.stage_run, LEVEL_TAG: CONFIGURATION,
                    "configuration": configuration(own)}
        name = config_name(stage, own)
    else:
        run_tags = {**common, **found, **own, LEVEL_TAG: STAGE}
        name = stage_name(stage, dvc_stage, own)
    if pl.owns_pipeline:
        reopen(client, pl.pipeline)
    run = client.create_run(exp_id, run_name=name, tags={**run_tags, "mlflow.runName": name})
    pl.run_id = run.info.run_id
    pl.created.append(pl.run_id)
    if pl.stage_run is None:
        pl.stage_run = pl.run_id
    return pl


def forget_stage_run(run_id: str) -> None:
    """Drop a deleted stage run from this process's cache."""
    for k in [k for k, v in _STAGE_RUNS.items() if v == run_id]:
        del _STAGE_RUNS[k]
