"""The MLflow store under the stages' runs: safe to start on concurrently, checked before compute.

In:  a tracking URI (`sqlite:///...`, `http(s)://...`), an `MlflowClient` on it, an experiment name.
Out:
  - `store_lock(uri)`: a cross-process lock (a file lock in the temporary directory, keyed by the
    database path) held while a process first opens a SQLite store and places its runs. Without
    it, processes that start together on a fresh file race in MLflow's own schema migrations
    (`duplicate column name: step`) and in experiment creation (`Experiment(name=...) already
    exists`). Over HTTP the server serialises, and `ensure_experiment` handles the race.
  - `ensure_experiment(client, name)`: the experiment's id; created when absent (create, and on
    "already exists" look it up again: another process won the race), tagged
    `mlflow.experimentKind = custom_model_development` so that MLflow labels it "Machine learning"
    (training runs), never GenAI. A `StageError` when the experiment is deleted, or when someone
    else set its kind to `genai_development` (nothing is created then).
  - `check_kind(client, name)`: the same check without creating anything.
  - `probe_writes(uri)`: a `StageError` when the store answers but refuses writes (a read-only
    SQLite file; an HTTP server or proxy that answers 401/403/405/5xx to a POST). The probe leaves
    no trace: over HTTP it posts an experiment with no name, which a writable MLflow server
    rejects as invalid (400) after its permission checks.
  - `refused(uri, what, exc)`: the `StageError` for a write the store refused midway.

The UI value was read from the pinned MLflow's bundle (mlflow/server/js/build/static/js/main.*.js):
`CUSTOM_MODEL_DEVELOPMENT="custom_model_development"` is the kind its selector writes for "Machine
learning". MLflow 3.17 decides the landing tab from its global workflow switch (`?workflowType=
machine_learning` in the URL, else the browser's last choice, default GenAI), so the dashboard's
links carry that parameter too (flows/dashboard.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ptf.common.cli import StageError

KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
GENAI_KIND = "genai_development"
# kinds the UI writes by itself when it guesses (not a person's choice): ours replaces them
REPLACEABLE_KINDS = {"", "no_inferred_type", "custom_model_development_inferred",
                     "genai_development_inferred"}
REFUSED_HTTP = (401, 403, 405, 500, 501, 502, 503, 504)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (query string dropped), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive cross-process lock for a SQLite store; a no-op for other stores."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    key = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ptf-mlflow-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remedy(name: str) -> str:
    return (f"choose another experiment name (the `experiment` key of the stage's section of "
            f"params.yaml) or set the tag back: MlflowClient().set_experiment_tag(<id>, "
            f"'{KIND_TAG}', '{TRAINING_KIND}')")


def check_kind(client: Any, name: str) -> Any:
    """The experiment `name` (None when absent); `StageError` if deleted or of the GenAI kind."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None
    if exp.lifecycle_stage == "deleted":
        raise StageError(f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted; restore "
                         f"it (`mlflow experiments restore --experiment-id {exp.experiment_id}`) or "
                         "choose another experiment name in params.yaml")
    kind = exp.tags.get(KIND_TAG, "")
    if kind == GENAI_KIND:
        raise StageError(f"MLflow experiment {name!r} (id {exp.experiment_id}) is tagged "
                         f"{KIND_TAG}={kind}: it holds GenAI traces, not training runs; "
                         + _remedy(name))
    return exp


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlartifacts/` beside the
    database (what `flows.dashboard` serves), not `mlruns/` under whatever directory the first
    process ran in. None for other stores (the server decides)."""
    db = sqlite_path(uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db else None


def ensure_experiment(client: Any, name: str) -> str:
    """The id of the experiment `name`, created when absent (safe when processes race), tagged as
    model training. Raises `StageError` before creating anything when it cannot be used."""
    from mlflow.exceptions import MlflowException

    exp = check_kind(client, name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={KIND_TAG: TRAINING_KIND},
                                            artifact_location=artifact_location(client.tracking_uri))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        exp = check_kind(client, name)  # another process created it first
        if exp is None:
            raise StageError(f"MLflow experiment {name!r} exists but cannot be read back")
    if exp.tags.get(KIND_TAG, "") in REPLACEABLE_KINDS:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def _auth_headers() -> dict[str, str]:
    """MLflow's own client credentials from the environment, for the HTTP probe."""
    import base64

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and pw:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}
    return {}


def probe_writes(uri: str, shown: str, timeout: float = 5.0) -> None:
    """`StageError` naming `shown` (the redacted URI) when the store refuses writes."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/create"
        req = urllib.request.Request(url, data=json.dumps({}).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **_auth_headers()})
        try:
            with urllib.request.urlopen(req, timeout=timeout):  # noqa: S310 (tracking URI)
                return
        except urllib.error.HTTPError as e:
            if e.code in REFUSED_HTTP:
                raise StageError(f"MLflow tracking store {shown} answers but refuses writes (HTTP "
                                 f"{e.code} on POST /api/2.0/mlflow/experiments/create); check the "
                                 "server's permissions and MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, "
                                 "or point MLFLOW_TRACKING_URI at a writable store") from None
        except (urllib.error.URLError, OSError):
            return  # reachability is checked (and reported) by the caller
        return
    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=1.0)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            return  # another process is writing: writable, just busy
        raise StageError(f"MLflow tracking store {shown} refuses writes ({e}); make {db} "
                         "writable or point MLFLOW_TRACKING_URI elsewhere") from None


def refused(shown: str, what: str, exc: BaseException) -> StageError:
    """The one-line error for a write (`what`) the store refused after the checks passed."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StageError(f"MLflow tracking store {shown} refused to {what} ({first[:300]}); nothing "
                      "was left half-logged; fix the store or MLFLOW_TRACKING_URI and rerun")
