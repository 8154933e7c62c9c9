"""`dvc exp run -S` over the declared arms (`finetune.runs`), on a completed smoke run (a copy of
the shared one): the forgetting stage reads exactly the arms that params.yaml declares, never
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
    assert declared["runs"] == ["movies-full", "movies-linear_probe", "movies-scratch"], declared

    # an arm dropped (Hydra's `~key`): only forgetting reruns; linear_probe's metrics stay, unread
    # (target `forgetting`: the stages after it, e.g. representation, read the arms their own way
    # and are tested elsewhere; leaving them out keeps `make test` within its budget)
    p = sh(["dvc", "exp", "run", "forgetting", "-S", "~finetune.runs.movies-linear_probe"], repo, env, timeout=600)
    assert "Running stage 'forgetting'" in p.stdout and "Running stage 'finetune@" not in p.stdout, p.stdout
    fg = forgetting(repo)
    assert fg["matrix"] == {"runs": ["movies-full", "movies-scratch"], "tasks": ["movies"]}
    assert {t: sorted(a) for t, a in fg["tasks"].items()} == {"movies": ["full", "scratch", "wise_ft"]}
    assert (repo / "data/metrics/finetune/movies/linear_probe.json").is_file()
    assert "| movies | linear_probe |" not in (repo / "data/metrics/forgetting_summary.md").read_text()

    # another task (one arm, to keep the test cheap; Hydra's `+key=` adds it): it is fine-tuned;
    # the movies metrics left in the workspace are not read; WiSE-FT follows to tweets-full
    p = sh(["dvc", "exp", "run", "forgetting", "-S", "~finetune.runs.movies-full", "-S", "~finetune.runs.movies-scratch", "-S", "+finetune.runs.tweets-full={task: tweets, strategy: full}",
            "-S", "wise_ft.task=tweets"], repo, env, timeout=600)
    assert "Running stage 'finetune@tweets-full'" in p.stdout, p.stdout
    fg = forgetting(repo)
    assert fg["matrix"] == {"runs": ["tweets-full"], "tasks": ["tweets"]}
    assert {t: sorted(a) for t, a in fg["tasks"].items()} == {"tweets": ["full", "wise_ft"]}
    assert (repo / "data/metrics/finetune/movies/full.json").is_file()
    summary = (repo / "data/metrics/forgetting_summary.md").read_text()
    # no row of a movies arm (the sequential tables, which train movies too, name it in a later column)
    assert "| tweets | full |" in summary
    assert not [line for line in summary.splitlines() if line.startswith("| movies |")], summary
