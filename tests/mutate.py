"""`make mutate`: mutation testing (mutmut 3) of the modules the results rest on, group by group.

In:  the groups of `[tool.ptf-mutate]` in pyproject.toml (each: mutant-name globs, the files
     they are in, the tests of those modules) and the shared `[tool.mutmut]` settings; the
     project's files as `git ls-files` lists them (tracked, or untracked and not ignored).
Out: per group, a scratch copy `<dir>/<group>` (a git repo, as some tests need one) whose
     pyproject.toml gets the group's `only_mutate` and test selection, `mutmut run <globs>` there,
     and its results; then one table, per module: mutants tried, killed (a test failed, or it ran
     past its time limit), survived, no tests (no selected test reaches the line), the score
     killed / tried, and the group's wall time; then every mutant not killed, to look at with
     `make mutate-show G=<group> M=<mutant name>`. Exit 0 unless a mutmut run fails.

    python tests/mutate.py [--dir DIR] [GROUP ...]        # default: every group

Not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).parent / "mutmut"
KILLED = {"killed", "timeout", "caught by type check"}
NOT_TRIED = {"not checked", "skipped"}
RESULT = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+)\.x\S*__mutmut_\d+): (?P<status>.+?)\s*$")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def group_pyproject(text: str, shared: dict, group: dict) -> str:
    """pyproject.toml with its [tool.mutmut] table replaced by the shared settings plus the
    group's only_mutate and test selection (the group tables are dropped)."""
    cfg = {**shared, "only_mutate": group["only_mutate"],
           "pytest_add_cli_args_test_selection": group["tests"]}
    head = text[:re.search(r"^\[tool\.mutmut\]", text, re.M).start()]
    return head + "[tool.mutmut]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.items())


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    if files.returncode != 0:
        raise SystemExit(f"git ls-files failed: {files.stderr}")
    for rel in filter(None, files.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def git(cwd: Path, *args: str) -> None:
    proc = subprocess.run(["git", "-c", "user.name=mutate", "-c", "user.email=mutate@localhost", *args],
                          cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed in {cwd}:\n{proc.stderr}")


def run_group(group: dict, shared: dict, base: Path) -> tuple[list[tuple[str, str, str]], float]:
    """mutmut on one group in a fresh scratch copy; [(module, mutant, status)] and the seconds."""
    scratch = base / group["name"]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    copy_project(scratch)
    pyproject = scratch / "pyproject.toml"
    pyproject.write_text(group_pyproject(pyproject.read_text(), shared, group))
    git(scratch, "init", "-q")
    git(scratch, "add", "-A")
    git(scratch, "commit", "-qm", "make mutate scratch copy")
    print(f"== {group['name']}: {' '.join(group['mutants'])} <- {' '.join(group['tests'])}", flush=True)
    start = time.monotonic()
    # its own process group: stopping this script (Ctrl-C, a timeout's SIGTERM) stops mutmut's
    # workers too, instead of leaving them running
    run = subprocess.Popen([str(MUTMUT), "run", *group["mutants"]], cwd=scratch, start_new_session=True)
    try:
        run.wait()
    except BaseException:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
        raise
    seconds = time.monotonic() - start
    if run.returncode != 0:
        raise SystemExit(f"mutmut run failed for group {group['name']} (exit {run.returncode}); "
                         f"its copy: {scratch}")
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=scratch,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"mutmut results failed for group {group['name']}:\n{out.stderr}")
    rows = [(m["module"], m["name"], m["status"]) for m in map(RESULT.match, out.stdout.splitlines())
            if m and m["status"] not in NOT_TRIED]
    return rows, seconds


def report(rows: list[tuple[str, str, str, str]], seconds: dict[str, float]) -> str:
    per_module: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for group, module, _, status in rows:
        per_module[(group, module)]["killed" if status in KILLED else status] += 1
    lines = [f"{'group':<15} {'module':<34} {'tried':>6} {'killed':>7} {'survived':>9} "
             f"{'no tests':>9} {'score':>7} {'group time':>11}"]
    for (group, module), c in sorted(per_module.items()):
        tried = sum(c.values())
        lines.append(f"{group:<15} {module:<34} {tried:>6} {c['killed']:>7} {c['survived']:>9} "
                     f"{c['no tests']:>9} {c['killed'] / tried:>7.1%} {seconds[group] / 60:>9.1f} m")
    missed = sorted((g, n, s) for g, _, n, s in rows if s not in KILLED)
    if missed:
        lines += ["", "not killed (make mutate-show G=<group> M=<mutant>):"]
        lines += [f"  {g}: {n}: {s}" for g, n, s in missed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    groups = conf["ptf-mutate"]["group"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("groups", nargs="*", help="groups to run (default: all): " + ", ".join(g["name"] for g in groups))
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ptf-mutate",
                    help="where the scratch copies go (default: %(default)s)")
    args = ap.parse_args(argv)
    unknown = set(args.groups) - {g["name"] for g in groups}
    if unknown:
        ap.error(f"unknown group(s) {sorted(unknown)}; groups: {[g['name'] for g in groups]}")
    chosen = [g for g in groups if not args.groups or g["name"] in args.groups]
    rows, seconds = [], {}
    for group in chosen:
        got, seconds[group["name"]] = run_group(group, conf["mutmut"], args.dir)
        rows += [(group["name"], *r) for r in got]
    text = report(rows, seconds)
    print("\n" + text)
    (args.dir / "report.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop mutmut's group too
    sys.exit(main())
