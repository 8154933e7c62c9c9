"""MLflow tracking shared by the training stages (no CLI).

In:  the stage name, its params section (a dict, flattened to `a.b.c` keys), tags (e.g. task,
     strategy, seed, lr, fraction, objective, order), metrics over steps, artifact paths.
Out: MLflow runs in the experiment `EXPERIMENT` (or the one given), placed in a tree by
     `ptf.training.tracking_tree`: one pipeline run per `dvc repro` / `dvc exp run` / Prefect flow
     run, one stage run per DVC stage under it, and, for stages that train several
     configurations and seeds (their call sites pass a `seed` tag), one run per configuration
     and seed under the stage run; each named for what it is (`finetune source/full lr=3e-4
     seed=0`) and tagged `dvc.stage`, `stage`, `ptf.level`, `ptf.pipeline`,
     `mlflow.source.git.commit`, the call site's tags, `configuration`, `objective`,
     `foundation`, and the hashes of the stage's inputs (`input.<name>`, see `input_hashes`).
     Every run gets `wall_time_s`; `trainable_fraction` also gives `trainable_pct`.

Store: `MLFLOW_TRACKING_URI` if set, else `sqlite:///<root>/mlflow.db` (git-ignored).
`check_reachable(uri)` fails fast with a `StageError` naming the URI when the store cannot be
reached, refuses writes, when `PTF_PIPELINE_RUN_ID` names a run that is gone, or (given
`experiment`) when that experiment is deleted or of MLflow's GenAI kind; stages call it before any
training. Starting a run repeats those checks before it creates anything, and deletes what it
created if the store refuses a write midway (`ptf.training.tracking_store`). Starting is safe when
processes start together on a fresh store. Only the main process logs: pass
`enabled=accelerator.is_main_process`; a disabled `RunLogger` is a no-op with the same API.
Metrics are buffered and sent with one `log_batch` per `flush_every` metrics or `flush_seconds`
(SQLite costs ~50 ms per call).

    check_reachable(tracking_uri(root), experiment=cfg.experiment)
    with start_run("pretrain", params=cfg.model_dump(), tags={**input_hashes(root, deps)},
                   root=root, enabled=is_main) as run:
        run.log({"train_loss": 3.2}, step=10)
        run.log_artifacts(path)          # a directory, or run.log_artifact(file)
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptf.common.cli import StageError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT = "pretrain-finetune-forgetting"
_MAX_PARAM_LEN = 6000


def tracking_uri(root: Path | str = ".") -> str:
    """`MLFLOW_TRACKING_URI`, else `sqlite:///<abs root>/mlflow.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """`uri` without a password or user name, fit for messages and logs."""
    p = urllib.parse.urlsplit(uri)
    if not (p.username or p.password):
        return uri
    return urllib.parse.urlunsplit(p._replace(netloc="***@" + p.netloc.rpartition("@")[2]))


def check_reachable(uri: str, timeout: float = 5.0, experiment: str | None = None) -> None:
    """Raise `StageError` naming `uri` (redacted) if the tracking store cannot be reached or
    created, refuses writes, or `PTF_PIPELINE_RUN_ID` names a run it no longer has; with
    `experiment`, also if that experiment is deleted or of MLflow's GenAI kind."""
    from ptf.training import tracking_store as store

    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (tracking URI)
                if r.status >= 400:
                    raise StageError(f"MLflow tracking server {shown} answered HTTP {r.status} on /health")
        except urllib.error.HTTPError as e:
            raise StageError(f"MLflow tracking server {shown} answered HTTP {e.code} on /health; "
                             "check MLFLOW_TRACKING_URI") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise StageError(f"MLflow tracking store {shown} is not reachable ({reason}); start the "
                             "server or unset/fix MLFLOW_TRACKING_URI") from None
    elif uri.startswith("sqlite:///"):
        db = store.sqlite_path(uri)
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise StageError(f"MLflow tracking store {shown}: directory {db.parent} is missing or "
                             "not writable")
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file:"):] if uri.startswith("file:") else uri)
        parent = path if path.exists() else path.parent
        if not os.access(parent, os.W_OK):
            raise StageError(f"MLflow tracking store {shown}: {parent} is not writable")
    store.probe_writes(uri, shown, timeout)
    if experiment or os.environ.get("PTF_PIPELINE_RUN_ID"):
        check_names(uri, shown, experiment)


def check_names(uri: str, shown: str, experiment: str | None) -> None:
    """The experiment's kind and the pipeline run named by the environment (no writes)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ptf.training import tracking_store as store
    from ptf.training.tracking_tree import PIPELINE_ENV, check_pipeline_run

    try:
        with store.store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            exp = store.check_kind(client, experiment) if experiment else None
            if os.environ.get(PIPELINE_ENV):
                check_pipeline_run(client, os.environ[PIPELINE_ENV], shown,
                                   exp.experiment_id if exp else None)
    except MlflowException as e:
        raise store.refused(shown, "answer a read", e) from None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}` (lists JSON-encoded)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = s[:_MAX_PARAM_LEN]
    return out


def git_commit(root: Path | str = ".") -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _md5_dir(path: Path) -> str:
    h = hashlib.md5()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
    return h.hexdigest()


def input_hashes(root: Path | str, deps: Mapping[str, Path | str]) -> dict[str, str]:
    """Tags `input.<name>` for each dep: for a shards dir with a `manifest.json`, the sha256 of
    the manifest (which lists every shard's sha256); for another dir, the md5 of its files'
    names and bytes; for a file, its sha256. Missing deps are tagged "missing"."""
    tags = {}
    for name, rel in deps.items():
        p = Path(root) / rel
        if (p / "manifest.json").is_file():
            v = "sha256:" + hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()
        elif p.is_dir():
            v = "md5:" + _md5_dir(p)
        elif p.is_file():
            v = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            v = "missing"
        tags[f"input.{name}"] = v
    return tags


class RunLogger:
    """One MLflow run, placed in the run tree (`ptf.training.tracking_tree`); a no-op when
    `enabled` is False (non-main processes)."""

    def __init__(self, stage: str, params: Mapping[str, Any], tags: Mapping[str, str],
                 root: Path | str = ".", experiment: str = EXPERIMENT, uri: str | None = None,
                 enabled: bool = True, flush_every: int = 50, flush_seconds: float = 30.0):
        self.enabled = enabled
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self.run_id: str | None = None
        self._buf: list[Any] = []
        self._flush_every = flush_every
        self._logged: set[str] = set()
        if not enabled:
            return
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import SQLAlchemyError

        from ptf.training import tracking_store as store
        from ptf.training import tracking_tree as tree

        self.uri = uri or tracking_uri(root)
        self._shown = redact(self.uri)
        # `dvc repro` names the item (`finetune@movies-lora`) in DVC_STAGE; outside DVC, the module's.
        base = {"dvc.stage": os.environ.get("DVC_STAGE", stage), "stage": stage}
        commit = git_commit(root)
        if commit:
            base["mlflow.source.git.commit"] = commit
        placement = tree.Placement()
        try:
            with store.store_lock(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                exp_id = store.ensure_experiment(self.client, experiment)
                tree.place(placement, self.client, exp_id, self.uri, experiment, stage, tags,
                           Path(root), self._shown, base)
                self._place = placement
                self.run_id = placement.run_id
                self._log_params(params)
        except (MlflowException, OSError, SQLAlchemyError) as e:
            self._undo(placement)
            raise store.refused(self._shown, "start the run", e) from None
        except BaseException:
            self._undo(placement)
            raise

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _undo(self, placement: Any) -> None:
        """Delete the runs this call created and mark FAILED the ones it had reopened (best
        effort): no half-logged run tree."""
        from ptf.training.tracking_tree import forget_stage_run

        client = getattr(self, "client", None)
        reopened = [r for r in (placement.stage_run, placement.pipeline if placement.owns_pipeline else None)
                    if r and r not in placement.created]
        for run_id in reversed(placement.created):
            forget_stage_run(run_id)
            try:
                client.delete_run(run_id)
            except Exception:  # noqa: BLE001 - the store already refused a write
                pass
        for run_id in reopened:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001
                pass
        self.run_id = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        metrics = with_stable_names(metrics)
        self._logged.update(metrics)
        self._buf += [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        if (len(self._buf) >= self._flush_every
                or time.monotonic() - self._last_flush > self._flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self.enabled and self._buf:
            for i in range(0, len(self._buf), 1000):
                self.client.log_batch(self.run_id, metrics=self._buf[i:i + 1000])
            self._buf = []
        self._last_flush = time.monotonic()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path | str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """End the run (with `wall_time_s` unless the stage logged its own), its stage run when it
        is a configuration run, and a pipeline run that its stages own."""
        if not (self.enabled and self.run_id):
            return
        from ptf.training import tracking_tree as tree

        pl = self._place
        if "wall_time_s" not in self._logged:
            self.log({"wall_time_s": time.time() - pl.started}, step=0)
        self.flush()
        self.client.set_terminated(self.run_id, status)
        if pl.stage_run != self.run_id:
            start = self.client.get_run(pl.stage_run).info.start_time / 1000
            tree.close(self.client, pl.stage_run, status, start)
        if pl.owns_pipeline:
            start = self.client.get_run(pl.pipeline).info.start_time / 1000
            tree.close(self.client, pl.pipeline, status, start)
        self.run_id = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        if exc_type is None:
            self.end("FINISHED")
        else:
            try:
                self.end("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
            except Exception:  # noqa: BLE001 - never mask the original error
                pass


def with_stable_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics`, plus the names the runs table shows as columns on every run that has them:
    `trainable_pct` (100 x `trainable_fraction`)."""
    out = dict(metrics)
    if "trainable_fraction" in out and "trainable_pct" not in out:
        out["trainable_pct"] = 100.0 * float(out["trainable_fraction"])
    return out


def start_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              *, root: Path | str = ".", experiment: str = EXPERIMENT, uri: str | None = None,
              enabled: bool = True) -> RunLogger:
    """Start one run (use as a context manager). `params`: the stage's section as a dict."""
    return RunLogger(stage, params, tags or {}, root=root, experiment=experiment, uri=uri,
                     enabled=enabled)
