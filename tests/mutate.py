"""`make mutate`: mutation testing (mutmut 3) of the modules the results rest on, group by group.

In:  the groups of `[tool.ptf-mutate]` in pyproject.toml (each: mutant-name globs, the files
     they are in, the tests of those modules, fast targeted files first, tests left out as too
     slow to run per mutant, the survivors judged equivalent, each with why, and `mutmut`: settings
     of its own over the shared `[tool.mutmut]` ones) and the shared settings; the project's files as
     `git ls-files` lists them (tracked, or untracked and not ignored).
Out: per group, a scratch copy `<dir>/<group>` (a git repo, as some tests need one) whose
     pyproject.toml gets the group's `only_mutate` and test selection and whose tests/conftest.py
     runs the group's test files in the listed order (mutmut stops a mutant's tests at the first
     failure), `mutmut run <globs>` there, and its results; then one table, per module: mutants
     tried, killed (a test failed, or it ran past its time limit), survived, no tests (no
     selected test reaches the line), judged equivalent, the score killed / (tried - equivalent),
     and the group's wall time and CPU time per core (on a shared machine the wall time depends
     on the others' load); then every mutant not killed, to look at with
     `make mutate-show G=<group> M=<mutant name>`, the equivalent ones with why, and equivalent
     entries that no longer match (killed, or renumbered by an edit). Exit 0 unless a mutmut run
     fails.

    python tests/mutate.py [--dir DIR] [GROUP ...]        # default: every group not `optional`
    python tests/mutate.py --all [--dir DIR]                 # every group (over 2 hours)
    python tests/mutate.py --report [--dir DIR] [GROUP ...]   # the table again, no new run

A group marked `optional = true` runs only when named (or with --all), so that the default run
stays under half an hour on 2 cores.

Not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
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
CORES = os.cpu_count() or 1
TIMES = ".ptf-mutate-times.json"   # a group's wall and CPU seconds, in its scratch copy
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
    """pyproject.toml with its [tool.mutmut] table replaced by the shared settings, the group's
    own `mutmut` settings over them, and the group's only_mutate and test selection, less its
    `deselect`ed tests (the group tables are dropped)."""
    deselect = [arg for node in group.get("deselect", []) for arg in ("--deselect", node)]
    cfg = {**shared, **group.get("mutmut", {}), "only_mutate": group["only_mutate"],
           "pytest_add_cli_args_test_selection": group["tests"] + deselect}
    head = text[:re.search(r"^\[tool\.mutmut\]", text, re.M).start()]
    return head + "[tool.mutmut]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.items())


# Appended to the scratch copy's tests/conftest.py. mutmut hands each mutant's tests to pytest as
# an unordered set of node ids and runs them with -x: conftest's collection hook sorts them by
# its FIRST files, set here to the group's `tests` order (targeted, fast files first), so that a
# killed mutant stops at its first, cheapest failing test.
ORDER_HOOK = """

# ---- added by tests/mutate.py in the scratch copy only: run the group's test files in order
FIRST = {order!r}
"""


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


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process and its descendants."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_group(group: dict, shared: dict, base: Path) -> tuple[list[tuple[str, str, str]], float, float]:
    """mutmut on one group in a fresh scratch copy; [(module, mutant, status)], the wall seconds
    and the CPU seconds of mutmut and its workers (on a shared machine the wall time depends on
    the load; CPU seconds / cores is what the group takes on idle cores)."""
    scratch = base / group["name"]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    copy_project(scratch)
    pyproject = scratch / "pyproject.toml"
    pyproject.write_text(group_pyproject(pyproject.read_text(), shared, group))
    conftest = scratch / "tests" / "conftest.py"
    if not re.search(r"^FIRST = ", conftest.read_text(), re.M):
        raise SystemExit("tests/conftest.py has no FIRST (the test files its collection hook runs "
                         "first): tests/mutate.py cannot order the group's tests")
    conftest.write_text(conftest.read_text() + ORDER_HOOK.format(order=tuple(Path(t).name for t in group["tests"])))
    git(scratch, "init", "-q")
    git(scratch, "add", "-A")
    git(scratch, "commit", "-qm", "make mutate scratch copy")
    print(f"== {group['name']}: {' '.join(group['mutants'])} <- {' '.join(group['tests'])}", flush=True)
    start, cpu_start = time.monotonic(), children_cpu()
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
    seconds, cpu = time.monotonic() - start, children_cpu() - cpu_start
    if run.returncode != 0:
        raise SystemExit(f"mutmut run failed for group {group['name']} (exit {run.returncode}); "
                         f"its copy: {scratch}")
    (scratch / TIMES).write_text(json.dumps({"wall_s": seconds, "cpu_s": cpu}))
    return read_results(group, scratch)


def read_results(group: dict, scratch: Path) -> tuple[list[tuple[str, str, str]], float, float]:
    """A finished group's mutants and times, from its scratch copy (`--report` reads them
    again after an edit of the `equivalent` lists, without rerunning mutmut)."""
    times = scratch / TIMES
    if not times.is_file():
        raise SystemExit(f"{scratch}: no finished mutmut run of group {group['name']} here")
    t = json.loads(times.read_text())
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=scratch,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"mutmut results failed for group {group['name']}:\n{out.stderr}")
    rows = [(m["module"], m["name"], m["status"]) for m in map(RESULT.match, out.stdout.splitlines())
            if m and m["status"] not in NOT_TRIED]
    return rows, t["wall_s"], t["cpu_s"]


def judge(group: dict, rows: list[tuple[str, str, str]]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Rows with each survivor that the group's `equivalent` list names marked "equivalent" (it
    leaves the score's denominator), and a note for every entry that no longer applies (the
    mutant was killed, or is gone: mutmut numbers a function's mutants in order, so an edit of
    the function renumbers them and the list must be reviewed)."""
    listed = dict(group.get("equivalent", []))
    seen = {name: status for _, name, status in rows}
    stale = [f"{group['name']}: {name}: listed as equivalent but {seen[name]}" if name in seen
             else f"{group['name']}: {name}: listed as equivalent but not among the mutants tried"
             for name in listed if seen.get(name) not in ("survived", "no tests")]
    return [(m, n, "equivalent" if n in listed and s in ("survived", "no tests") else s)
            for m, n, s in rows], stale


def report(rows: list[tuple[str, str, str, str]], seconds: dict[str, float], cpu: dict[str, float],
           stale: list[str] = (), why: dict[str, str] | None = None) -> str:
    per_module: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for group, module, _, status in rows:
        per_module[(group, module)]["killed" if status in KILLED else status] += 1
    lines = [f"{'group':<15} {'module':<34} {'tried':>6} {'killed':>7} {'survived':>9} "
             f"{'no tests':>9} {'equiv':>6} {'score':>7} {'wall':>8} {'cpu/core':>9}"]
    for (group, module), c in sorted(per_module.items()):
        tried = sum(c.values())
        judged = tried - c["equivalent"]
        score = f"{c['killed'] / judged:>7.1%}" if judged else f"{'-':>7}"
        lines.append(f"{group:<15} {module:<34} {tried:>6} {c['killed']:>7} {c['survived']:>9} "
                     f"{c['no tests']:>9} {c['equivalent']:>6} {score} {seconds[group] / 60:>6.1f} m "
                     f"{cpu[group] / CORES / 60:>7.1f} m")
    lines.append(f"score = killed / (tried - equivalent). total: {sum(seconds.values()) / 60:.1f} min "
                 f"wall, {sum(cpu.values()) / CORES / 60:.1f} min of CPU per core ({CORES} cores)")
    missed = sorted((g, n, s) for g, _, n, s in rows if s not in KILLED | {"equivalent"})
    if missed:
        lines += ["", "not killed (make mutate-show G=<group> M=<mutant>):"]
        lines += [f"  {g}: {n}: {s}" for g, n, s in missed]
    equivalent = sorted((g, n) for g, _, n, s in rows if s == "equivalent")
    if equivalent:
        lines += ["", "judged equivalent ([tool.ptf-mutate] `equivalent`):"]
        lines += [f"  {g}: {n}: {(why or {}).get(n, '')}" for g, n in equivalent]
    if stale:
        lines += ["", "equivalent entries to review:"] + [f"  {x}" for x in stale]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    groups = conf["ptf-mutate"]["group"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("groups", nargs="*", help="groups to run (default: all but the optional ones): "
                    + ", ".join(g["name"] + (" (optional)" if g.get("optional") else "") for g in groups))
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ptf-mutate",
                    help="where the scratch copies go (default: %(default)s)")
    ap.add_argument("--all", action="store_true", help="every group, the optional ones too")
    ap.add_argument("--report", action="store_true",
                    help="no new run: the table again from the groups' finished runs in --dir "
                         "(after an edit of an `equivalent` list)")
    args = ap.parse_args(argv)
    unknown = set(args.groups) - {g["name"] for g in groups}
    if unknown:
        ap.error(f"unknown group(s) {sorted(unknown)}; groups: {[g['name'] for g in groups]}")
    chosen = [g for g in groups
              if args.all or g["name"] in args.groups or not (args.groups or g.get("optional"))]
    rows, seconds, cpu, stale, why = [], {}, {}, [], {}
    for group in chosen:
        if args.report:
            got, seconds[group["name"]], cpu[group["name"]] = read_results(group, args.dir / group["name"])
        else:
            got, seconds[group["name"]], cpu[group["name"]] = run_group(group, conf["mutmut"], args.dir)
        got, old = judge(group, got)
        rows += [(group["name"], *r) for r in got]
        stale += old
        why.update(dict(group.get("equivalent", [])))
    text = report(rows, seconds, cpu, stale, why)
    print("\n" + text)
    (args.dir / "report.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop mutmut's group too
    sys.exit(main())
