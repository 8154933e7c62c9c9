"""`dvc exp run -S` over the fine-tune matrix, on a completed smoke run (a copy of the shared
one): the forgetting stage reads exactly the task x strategy arms that params.yaml declares, never
whatever lies in data/metrics/finetune/ (issue 12: the README's own experiment command failed
when metrics of arms no longer declared were still in the workspace)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.smoke import pipeline_env, sh


def copy_repo(src: Path, dest: Path) -> Path:
    """The smoke repo with its outputs and DVC cache, without DVC's transient state."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {"tmp"} & set(names) if Path(folder).name == ".dvc" else set()

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return dest


def forgetting(repo: Path) -> dict:
    return json.loads((repo / "data/metrics/forgetting.json").read_text())


def test_exp_run_reports_only_the_declared_arms(smoke_run, tmp_path):
    repo = copy_repo(smoke_run["repo"], tmp_path / "repo")
    env = pipeline_env(repo)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "completed smoke run"], repo, env)
    declared = forgetting(repo)["matrix"]
    assert declared["strategies"] == ["full", "linear_probe", "scratch"], declared

    # a subset of the strategies: only forgetting reruns; linear_probe's metrics stay, unread
    p = sh(["dvc", "exp", "run", "-S", "finetune.strategies=[full,scratch]"], repo, env, timeout=600)
    assert "Running stage 'forgetting'" in p.stdout and "Running stage 'finetune@" not in p.stdout, p.stdout
    fg = forgetting(repo)
    assert fg["matrix"] == {"tasks": ["movies"], "strategies": ["full", "scratch"]}
    assert {t: sorted(a) for t, a in fg["tasks"].items()} == {"movies": ["full", "scratch"]}
    assert (repo / "data/metrics/finetune/movies/linear_probe.json").is_file()
    assert "| movies | linear_probe |" not in (repo / "data/metrics/forgetting_summary.md").read_text()

    # another task (one arm, to keep the test cheap): it is fine-tuned; the movies metrics left
    # in the workspace are not read
    p = sh(["dvc", "exp", "run", "-S", "finetune.tasks=[tweets]", "-S", "finetune.strategies=[full]"],
           repo, env, timeout=600)
    assert "Running stage 'finetune@tweets-full'" in p.stdout, p.stdout
    fg = forgetting(repo)
    assert fg["matrix"] == {"tasks": ["tweets"], "strategies": ["full"]}
    assert {t: sorted(a) for t, a in fg["tasks"].items()} == {"tweets": ["full"]}
    assert (repo / "data/metrics/finetune/movies/full.json").is_file()
    summary = (repo / "data/metrics/forgetting_summary.md").read_text()
    assert "| tweets | full |" in summary and "| movies |" not in summary
