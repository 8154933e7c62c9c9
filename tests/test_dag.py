"""The DAG and the params agree with the code (LitGPT's config-hub test, for DVC).

- every `dvc.yaml` stage runs `python -m stages.<x>` or `accelerate launch ... -m stages.<x>`;
- its deps list the stage module and every `stages/` module it imports, directly or not, so DVC
  never serves a stale result after a shared module changes;
- its `params` name the one section the module reads, and that section of every params file
  (params.yaml and configs/*.yaml) builds the module's strict `Config`.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from stages.config import parse_section, read_params

ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
CMD = re.compile(r"^(python|accelerate launch( --\S+( \S+)?)*) -m (stages\.\w+)( .*)?$")


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"] or {}


def _module_of(cmd: str) -> str:
    m = CMD.match(cmd.strip())
    assert m, f"cmd must be only `python -m stages.<x>` or `accelerate launch ... -m stages.<x>`: {cmd!r}"
    return m.group(4)


def imported_stage_modules(module: str) -> set[str]:
    """`module` and every `stages.*` module it imports, transitively (read with ast, not run)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            todo += [n for n in names if n.startswith("stages.") and (ROOT / (n.replace(".", "/") + ".py")).is_file()]
    return seen


def test_dvc_yaml_has_stages():
    assert "download" in _stages()


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_list_every_imported_module(stage):
    spec = _stages()[stage]
    module = _module_of(spec["cmd"] if isinstance(spec.get("cmd"), str) else spec["do"]["cmd"])
    deps = {d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", spec.get("do", {}).get("deps", []))}
    needed = {m.replace(".", "/") + ".py" for m in imported_stage_modules(module)}
    missing = sorted(needed - deps)
    assert not missing, f"stage {stage!r} imports {missing} but does not list them in deps"


@pytest.mark.parametrize("params_file", PARAM_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", sorted(_stages()))
def test_params_section_builds_config(stage, params_file):
    spec = _stages()[stage]
    module = importlib.import_module(_module_of(spec["cmd"]))
    sections = [p if isinstance(p, str) else next(iter(p)) for p in spec.get("params", [])]
    assert len(sections) == 1, f"stage {stage!r} must read exactly one params section, lists {sections}"
    params = read_params(params_file)
    assert sections[0] in params, f"{params_file.name} lacks section {sections[0]!r}"
    parse_section(sections[0], params[sections[0]], module.Config)


@pytest.mark.parametrize("params_file", PARAM_FILES, ids=lambda p: p.name)
def test_param_files_have_the_same_sections(params_file):
    assert set(read_params(params_file)) == set(read_params(ROOT / "params.yaml"))
