"""Fault injection on the real pipeline: SIGKILL anywhere, concurrent runs, a dead MLflow store.

One uninterrupted smoke run is the reference (`smoke_run`, the session fixture of
tests/conftest.py). While it runs, a second `dvc repro` is started in the same repo: DVC refuses it ("... is busy, it is being
blocked by: (PID n): dvc repro") and the first run still completes with the reference hashes.

A second smoke repo (`interrupted`) is killed with SIGKILL at five points, one after another,
each followed by `dvc repro` that reaches the next point:
  download        `PIPELINE_FAULT=download`: a verified source file stored in the temporary raw dir
  tokenize-shard  `PIPELINE_FAULT=tokenize-shard`: the first record batch of the first shard written
  checkpoint-save from outside: as soon as `.step-00000020.tmp/` (the checkpoint being written)
                  appears, the whole process group (dvc, accelerate, the worker) is killed (the
                  test checks that it died mid-save, after the step-10 checkpoint was complete)
  finetune        `PIPELINE_FAULT=finetune`: the arm trained and saved, not yet renamed into place
  forgetting      `PIPELINE_FAULT=forgetting`: forgetting.json written, the other outputs not yet
(`PIPELINE_FAULT` is read by `ptf.common.cli.maybe_die`, which SIGKILLs its own process. The
points injected must be exactly the `maybe_die("...")` call sites of the code, found by an AST
scan; for each, DVC must report the stage command `exited with -9` (or 137 where the shell
forwards the status), i.e. killed by SIGKILL, not
any failure. A kill in the middle of a training step: tests/test_pretrain.py
`test_resume_after_sigkill_is_bit_exact`.)
The stages with no kill point are not recomputed when they need not be: the repo starts with
the reference run's DVC run cache, less the entries of the stages killed (pretrain and the stage of
every `maybe_die` point), so `dvc repro` restores such a stage only where its command, params and
every dependency's hash equal the reference's, i.e. where every rerun upstream of it reproduced the
reference byte for byte; otherwise (e.g. wise_ft, downstream of a rerun fine-tune's metrics file,
whose timings differ) it runs. The stages killed always run again, and their outputs are compared.
After every kill: no file of `data/` outside a hidden `.<name>.tmp-*` / `.<name>.old-*` sibling
is partial: each either matches the reference byte for byte (or, for a metrics JSON, on every
deterministic key), or is a complete checkpoint. After the last rerun: every cached output hash
in dvc.lock and every deterministic metric equals the reference's.

Excluded from the comparison, because they differ between two clean runs by nature:
  - metric keys that measure time or speed: `wall_time_s`, `train_time_s`, `train_cpu_s`,
    `tokens_per_s` (any key ending in `_s` or `_per_s`), and `resumed_from_step` (a resumed
    pretrain says which checkpoint it started from; the weights and losses are identical);
  - the md5 of those metrics files in dvc.lock (they hold the keys above);
  - MLflow runs (the killed attempts leave FAILED/RUNNING runs by design; they are history).

Also here: with `MLFLOW_TRACKING_URI` pointing at a closed port, the pretrain and finetune stage
commands stop with one `error:` line naming the URI, before any training, and leave every
output untouched (in a copy of the reference run: the shared one is read-only). (Download
retries: tests/test_fetch.py; the flow's retry of `download`: tests/test_flow_retry.py.)
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ptf.common.atomic import atomic_dir
from tests.smoke import (CKPT, ROOT, assert_same_results, closed_port, copy_smoke_repo, finish,
                         make_smoke_repo, pipeline_env, sh, stable, start_repro)

# Each `maybe_die` point and the DVC stage whose command it kills in the smoke pipeline.
INJECTED = {"download": "download", "tokenize-shard": "tokenize",
            "finetune": "finetune@movies-full", "forgetting": "forgetting"}
# The stages the `interrupted` fixture kills: every point's, and pretrain's checkpoint save.
KILLED = {*INJECTED.values(), "pretrain"}
CODE_DIRS = ("stages", "ptf", "flows")

def hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def visible_files(repo: Path) -> list[Path]:
    data = repo / "data"
    return sorted(p.relative_to(repo) for p in data.rglob("*")
                  if p.is_file() and not hidden(p.relative_to(data)))


def assert_nothing_partial(repo: Path, ref: Path, where: str) -> None:
    """Every visible file under data/ is a finished output: equal to the reference's file (JSON
    metrics: on their deterministic keys), or a file of a complete checkpoint."""
    for rel in visible_files(repo):
        f, g = repo / rel, ref / rel
        if str(rel).startswith(CKPT + "/"):
            step_dir = next(p for p in [f.parent, *f.parents] if p.name.startswith("step-"))
            assert (step_dir / "COMPLETE").is_file(), f"{where}: {rel} in an incomplete checkpoint"
            continue
        assert g.is_file(), f"{where}: {rel} is visible but is no output of a complete run"
        if rel.suffix == ".json" and str(rel).startswith("data/metrics/"):
            assert stable(json.loads(f.read_text())) == stable(json.loads(g.read_text())), \
                f"{where}: {rel} differs from the reference"
        else:
            assert f.read_bytes() == g.read_bytes(), f"{where}: {rel} is partial or differs"


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """Poll `ready()` as fast as possible; when true SIGKILL the process group of `proc`.
    Returns whether it killed (False: `proc` ended first)."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    return False


def seed_run_cache(repo: Path, ref: Path, leave_out: set[str]) -> set[str]:
    """Copy into `repo`'s DVC cache the run cache of the finished `ref` (and the objects its
    outputs are stored as), less the entries of the stages in `leave_out`, which then run whatever
    happens; the stages whose entries were copied, by name. DVC restores a stage from such an
    entry only where the stage's command, params and dependency hashes all equal the reference's."""
    by_cmd = {spec["cmd"]: name for name, spec in yaml.safe_load((ref / "dvc.lock").read_text())["stages"].items()}
    src, dest = ref / ".dvc/cache/runs", repo / ".dvc/cache/runs"
    seeded = set()
    for entry in sorted(p for p in src.rglob("*") if p.is_file()):
        stage = by_cmd[yaml.safe_load(entry.read_text())["cmd"]]
        if stage not in leave_out:
            (dest / entry.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry, dest / entry.relative_to(src))
            seeded.add(stage)
    shutil.copytree(ref / ".dvc/cache/files", repo / ".dvc/cache/files", dirs_exist_ok=True)
    return seeded


def locked_stages(repo: Path) -> set[str]:
    lock = repo / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.is_file() else set()




def fault_points_in_code() -> dict[str, list[str]]:
    """Every `maybe_die(<point>)` call of the project's code: point -> ["file:line", ...]. A call
    whose point is not a string literal is reported under "<not a literal>"."""
    found: dict[str, list[str]] = {}
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and (
                        getattr(node.func, "id", None) == "maybe_die"
                        or getattr(node.func, "attr", None) == "maybe_die"):
                    arg = node.args[0] if node.args else None
                    point = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                        else "<not a literal>"
                    found.setdefault(point, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def killed_by_sigkill(out: str) -> list[str]:
    """The stages whose command DVC reports as killed by SIGKILL: `exited with -9` where the
    shell execs the command, `exited with 137` (128 + 9) where the shell stays its parent and
    reports the signal as its own status (CI's shell does; local dash execs)."""
    return re.findall(r"failed to reproduce '([^']+)': failed to run: [^\n]*, exited with (?:-9|137)\b",
                      out)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, smoke_run) -> dict:
    """A smoke repo killed at every fault point in turn, then run to the end.

    What each kill did is recorded, not asserted here, so that a kill point that was missed
    fails the test that checks it (with every point's outcome) rather than this fixture."""
    ref = smoke_run["repo"]
    repo = make_smoke_repo(tmp_path_factory.mktemp("faults-kill") / "repo")
    seeded = seed_run_cache(repo, ref, KILLED)
    assert seeded and not seeded & KILLED, seeded  # (the reference has entries of the others)
    hits: dict[str, dict] = {}
    partial: list[str] = []

    def check_partial(where: str) -> None:
        try:
            assert_nothing_partial(repo, ref, where)
        except AssertionError as e:
            partial.append(str(e))

    def inject(point: str) -> None:
        proc = start_repro(repo, PIPELINE_FAULT=point)
        out = finish(proc)
        hits[point] = {"returncode": proc.returncode, "sigkilled": killed_by_sigkill(out),
                       "locked": locked_stages(repo), "tail": out[-3000:]}
        check_partial(point)

    inject("download")
    inject("tokenize-shard")

    # checkpoint save, from outside: kill the process group while step 20 is being written
    # (the step-10 checkpoint is complete by then: the rerun resumes from it)
    fp_dir = lambda: next((p for p in (repo / CKPT).iterdir() if p.is_dir()), None) \
        if (repo / CKPT).is_dir() else None  # noqa: E731
    proc = start_repro(repo)
    killed = kill_when(proc, lambda: (d := fp_dir()) is not None and (d / ".step-00000020.tmp").is_dir())
    d = fp_dir()
    hits["checkpoint-save"] = {
        "returncode": proc.returncode, "killed": killed, "locked": locked_stages(repo),
        "mid_save": d is not None and (d / ".step-00000020.tmp").is_dir()
        and not (d / "step-00000020").exists() and (d / "step-00000010" / "COMPLETE").is_file(),
        "tail": finish(proc)[-3000:]}
    check_partial("checkpoint-save")

    inject("finetune")
    inject("forgetting")
    final = sh(["dvc", "repro"], repo, timeout=900)
    return {"repo": repo, "hits": hits, "partial": partial, "final": final.stdout}


# --------------------------------------------------------------------------- tests

def test_second_repro_while_one_runs_is_refused_and_harmless(smoke_run):
    second = smoke_run["second"]
    msg = second.stdout + second.stderr
    assert second.returncode != 0
    assert "is busy, it is being blocked by" in msg and "dvc repro" in msg, msg
    repo = smoke_run["repo"]
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    declared = sh(["dvc", "stage", "list", "--name-only"], repo).stdout.split()
    assert sorted(locked_stages(repo)) == sorted(declared)


def test_the_injected_points_are_the_points_of_the_code():
    """The fixture kills at every `maybe_die` point of the code and at no point the code lacks."""
    in_code = fault_points_in_code()
    assert "<not a literal>" not in in_code, in_code
    assert set(in_code) == set(INJECTED), in_code
    assert all(len(sites) == 1 for sites in in_code.values()), in_code


def test_every_kill_point_was_hit_and_left_nothing_partial(interrupted):
    hits = interrupted["hits"]
    assert set(hits) == {*INJECTED, "checkpoint-save"}
    for point, stage in INJECTED.items():
        h = hits[point]
        # DVC reports the stage command killed by SIGKILL (`exited with -9` / 137), not any failure
        assert h["sigkilled"] == [stage], f"{point}: {h['sigkilled']}, exit {h['returncode']}\n{h['tail']}"
        assert h["returncode"] != 0 and stage not in h["locked"], f"{point}: {stage} recorded as done"
    h = hits["checkpoint-save"]
    assert h["killed"] and h["returncode"] == -signal.SIGKILL, f"pretrain ended before the kill\n{h['tail']}"
    assert h["mid_save"], "the kill did not land inside the checkpoint save"
    assert "pretrain" not in h["locked"]
    assert not interrupted["partial"], "\n".join(interrupted["partial"])


def test_reruns_resume_and_finish_with_the_reference_outputs(interrupted, smoke_run):
    repo, ref = interrupted["repo"], smoke_run["repo"]
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    # the pretrain rerun after the checkpoint-save kill resumed from the step-10 checkpoint
    assert json.loads((repo / "data/metrics/pretrain.json").read_text())["resumed_from_step"] == 10
    assert_same_results(repo, ref)
    assert_nothing_partial(repo, ref, "final")
    # and no stale temporary is left beside the outputs
    assert not [p for p in (repo / "data").rglob(".*.tmp-*")]


@pytest.fixture(scope="module")
def smoke_copy(smoke_run, tmp_path_factory) -> Path:
    """A copy of the reference run to start stage commands in (the reference is read-only)."""
    return copy_smoke_repo(smoke_run["repo"], tmp_path_factory.mktemp("faults-copy") / "repo")


@pytest.mark.parametrize("cmd", [
    ["accelerate", "launch", "--config_file", "accelerate/default.yaml", "-m", "stages.pretrain"],
    ["python", "-m", "stages.finetune", "--task", "movies", "--strategy", "full"],
], ids=["pretrain", "finetune"])
def test_unreachable_mlflow_stops_before_compute(smoke_copy, cmd):
    repo = smoke_copy
    before = {str(p): p.stat().st_mtime_ns for p in (repo / "data").rglob("*") if p.is_file()}
    with closed_port() as port:
        proc = sh(cmd, repo, pipeline_env(repo, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"),
                  check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors and f"http://127.0.0.1:{port} is not reachable" in errors[0], proc.stderr[-3000:]
    # no traceback from the project's code (`accelerate launch` adds its own CalledProcessError
    # traceback when the worker exits 1: that is the launcher's, after our one-line error)
    assert 'stages/' not in "".join(ln for ln in proc.stderr.splitlines() if ln.lstrip().startswith("File "))
    assert "step" not in proc.stdout  # no training progress
    after = {str(p): p.stat().st_mtime_ns for p in (repo / "data").rglob("*") if p.is_file()}
    assert after == before


def test_stale_old_sibling_of_an_interrupted_replace_is_cleared(tmp_path):
    """A kill between the two renames of a directory replace leaves `.<name>.old-<pid>`; the
    next write of that output removes it (it would otherwise sit inside a parent output)."""
    dest = tmp_path / "out"
    (tmp_path / ".out.old-99999").mkdir()
    (tmp_path / ".out.old-99999" / "f").write_text("old")
    (tmp_path / ".out.tmp-abc").mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_model_dirs_hold_safetensors_only(smoke_run):
    """Saved models are safetensors; the only pickled files are Accelerate's own resume state
    under data/checkpoints (cache: false, never pushed; read back weights-only: test_security)."""
    data = smoke_run["repo"] / "data"
    pickles = [p for p in data.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert all(str(p.relative_to(data)).startswith("checkpoints/") for p in pickles), pickles
    models = data / "models"
    assert list(models.rglob("*.safetensors"))
    assert not [p for p in models.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
