"""Workspace checks of the results page (no CLI): is the run the page would describe complete,
current and declared?

In:  a repository root: its dvc.lock, `dvc status`, dvc.yaml's declared metrics, params.yaml's
     declared fine-tune matrix, and the metrics files.
Out: `check_clean` (refuses a stale pipeline), `lock_stamp` (sha256 of dvc.lock, git commit,
     clean tree), `load_metrics` (the page's metrics, each a metric of dvc.yaml, the fine-tune
     ones exactly those of the declared matrix), `ResultsError` for anything that would make the
     page unfaithful.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ptf.common import paths
from ptf.common.cli import StageError
from ptf.measures import outputs

PAGE = Path("docs/results.md")
FIGURES = Path("docs/figures")
LOCK = Path("dvc.lock")
METRICS = {
    "pretrain": paths.METRICS / "pretrain.json",
    "curves": outputs.CURVES_JSON,
    "sequential": outputs.SEQUENTIAL_JSON,
    "forgetting": paths.METRICS / "forgetting.json",
    "baselines": paths.METRICS / "baselines.json",
    "representation": paths.METRICS / "representation.json",
    "frontier": paths.METRICS / "frontier.json",
}


class ResultsError(StageError):
    """The workspace cannot give a faithful page (stale pipeline, missing metrics or models)."""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def lock_stamp(root: Path, page: Path = PAGE, figures: Path = FIGURES) -> dict[str, Any]:
    """sha256 of dvc.lock's bytes; the git commit, and whether the tree is clean apart from the
    page's own outputs (then the commit alone reproduces the page)."""
    lock = root / LOCK
    if not lock.is_file():
        raise ResultsError(f"{lock}: missing; run `dvc repro` first")
    commit = _git(root, "rev-parse", "--verify", "HEAD")
    porcelain = _git(root, "status", "--porcelain", "--", ".",
                     f":(exclude){Path(page).as_posix()}", f":(exclude){Path(figures).as_posix()}")
    return {"lock_sha256": sha256_file(lock),
            "git_commit": commit.strip() if commit else None,
            "git_clean": porcelain is not None and porcelain.strip() == "" and bool(commit)}


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json` in `root`, parsed ({} when every stage is up to date)."""
    try:
        p = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root,
                           capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        raise ResultsError(f"`dvc status --json` could not run in {root}: {e}") from None
    if p.returncode != 0:
        raise ResultsError(f"`dvc status --json` failed in {root} (exit {p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-500:]}")
    text = p.stdout.strip()
    try:
        return json.loads(text[text.index("{"):]) if text else {}
    except (ValueError, json.JSONDecodeError):
        raise ResultsError(f"`dvc status --json` printed no JSON: {text[-300:]!r}") from None


def check_clean(status: dict[str, Any]) -> None:
    """Refuse unless every stage is up to date: the page must describe exactly dvc.lock."""
    if not status:
        return
    lines = []
    for stage, changes in sorted(status.items()):
        what = []
        for ch in changes if isinstance(changes, list) else [changes]:
            if isinstance(ch, dict):
                for kind, files in ch.items():
                    names = sorted(files) if isinstance(files, dict) else [str(files)]
                    more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
                    what.append(f"{kind}: {', '.join(names[:4])}{more}")
            else:
                what.append(str(ch))
        lines.append(f"{stage} ({'; '.join(what) or 'changed'})")
    more = f" | (+{len(lines) - 6} more stages)" if len(lines) > 6 else ""
    raise ResultsError("`dvc status` is not clean, so the outputs do not match dvc.lock: "
                       + " | ".join(lines[:6]) + more + ". Run `dvc repro` (or `dvc checkout`) first.")


def declared_metrics(root: Path) -> list[str]:
    """The metrics paths of dvc.yaml (foreach stages: their `do` body), `${item.x}` and
    `${section.key}` templates turned into `*` globs."""
    import yaml

    f = root / "dvc.yaml"
    if not f.is_file():
        raise ResultsError(f"{f}: missing")
    spec = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    found = []
    for stage in (spec.get("stages") or {}).values():
        stage = stage.get("do", stage)          # a foreach stage's body
        for m in stage.get("metrics") or []:
            p = next(iter(m)) if isinstance(m, dict) else m
            found.append(re.sub(r"\$\{[^}]*\}", "*", str(p)))
    return found


def _read(path: Path) -> Any:
    try:
        return outputs.read_json(path, "run `dvc repro`")
    except StageError as e:
        raise ResultsError(str(e)) from None


def load_metrics(root: Path, matrix: outputs.Matrix) -> dict[str, Any]:
    """{name: content} of the page's metrics files, each checked to be a metric of dvc.yaml;
    `finetune` maps "<task>/<strategy>" of exactly the declared arms to its file's content,
    and forgetting.json must describe exactly that matrix."""
    declared = declared_metrics(root)

    def check_declared(rel: Path) -> None:
        if not any(fnmatch.fnmatchcase(rel.as_posix(), pat) for pat in declared):
            raise ResultsError(f"{rel} is not a metric of dvc.yaml; the page reads only declared metrics")

    found: dict[str, Any] = {}
    for name, rel in METRICS.items():
        check_declared(rel)
        found[name] = _read(root / rel)
    found["finetune"] = {}
    for t, s in matrix.arms():
        f = outputs.finetune_file(Path("."), t, s)
        check_declared(f)
        if not (root / f).is_file():
            raise ResultsError(f"{root / f}: missing; the arm {t}/{s} is declared by params.yaml "
                               f"(finetune.runs); run `dvc repro finetune@{t}-{s}`")
        found["finetune"][f"{t}/{s}"] = _read(root / f)
    fg = found["forgetting"]
    for key in ("tasks", "claims", "sequential"):
        if key not in fg:
            raise ResultsError(f"{root / METRICS['forgetting']}: no `{key}`; rerun `dvc repro forgetting`")
    have = {f"{t}/{s}" for t, arms in fg["tasks"].items() for s in arms if s != "wise_ft"}
    if have != set(found["finetune"]):
        raise ResultsError(f"{root / METRICS['forgetting']}: describes the arms {sorted(have)}, but params.yaml "
                           f"declares {sorted(found['finetune'])}; rerun `dvc repro forgetting`")
    check_frontier(root, found["frontier"])
    lacking = sorted(set(matrix.tasks) - set((found["baselines"].get("tasks") or {})))
    if lacking:
        raise ResultsError(f"{root / METRICS['baselines']}: no baselines of the declared tasks {lacking}; "
                           "add them to baselines.tasks and run `dvc repro baselines`")
    return found


def check_frontier(root: Path, fr: dict[str, Any]) -> None:
    """frontier.json must describe every item of `sweep.runs` (task x strategy) and every
    configuration params.yaml's sweep declares (the frontier stage refuses a sweep file that
    lacks one)."""
    from ptf.training.sweep_config import load_sweep

    if fr.get("applicable") is False:     # no LM head: the page says why, nothing to check
        return
    cfg = load_sweep(root / "params.yaml")
    rel = root / METRICS["frontier"]
    for r in cfg.runs.values():
        t, s = r.task, r.strategy
        have = {p["key"] for p in (((fr.get("tasks") or {}).get(t) or {}).get(s) or {}).get("points", [])}
        lacking = [p.key for p in cfg.points(s) if p.key not in have]
        if lacking:
            raise ResultsError(f"{rel}: no configuration `{lacking[0]}` of sweep@{t}-{s}, which params.yaml "
                               "declares; rerun `dvc repro frontier`")


def source_files(root: Path, matrix: outputs.Matrix) -> list[Path]:
    return ([root / p for p in METRICS.values()]
            + [outputs.finetune_file(root, t, s) for t, s in matrix.arms()])


def reference_and_scratch(root: Path) -> tuple[str, str]:
    """The forgetting stage's reference and scratch strategies (params.yaml), for the prose."""
    from ptf.common.config import read_params

    sec = read_params(root / "params.yaml").get("forgetting") or {}
    return str(sec.get("reference_strategy", "full")), str(sec.get("scratch_strategy", "scratch"))
