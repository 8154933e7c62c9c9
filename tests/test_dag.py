"""The DAG and the params agree with the code (LitGPT's config-hub test, for DVC).

- every `dvc.yaml` stage runs `python -m stages.<x>` or `accelerate launch ... -m stages.<x>`;
- its deps list exactly the stage module and every `ptf/` library module it imports, directly
  or not (no more: an edit to a module a stage does not run must not rerun it), so DVC never
  serves a stale result after a shared module changes;
- no stage entry module imports another one; `scripts/` and `bench/` import no `_private` name
  of `stages/` or `ptf/` and nothing from `tests/`;
- its `params` name the one section the module reads (plus, for `forgetting`, the declared
  arms it reads, and for `wise_ft`, the fine-tune subsets and the forgetting stage's held-out
  measure), and that section of every params file (params.yaml and
  configs/*.yaml) builds the module's strict `Config`.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from ptf.common.config import parse_section, read_params

ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
CMD = re.compile(r"^(python|accelerate launch( --\S+( \S+)?)*) -m (stages\.\w+)( .*)?$")


def _stages() -> dict[str, dict]:
    """Each stage's body (a `foreach` stage's `do`, with its `foreach` kept beside)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"] or {}
    return {k: ({**v["do"], "foreach": v["foreach"]} if "do" in v else v) for k, v in stages.items()}


def _module_of(cmd: str) -> str:
    m = CMD.match(cmd.strip())
    assert m, f"cmd must be only `python -m stages.<x>` or `accelerate launch ... -m stages.<x>`: {cmd!r}"
    return m.group(4)


def _module_file(name: str) -> Path | None:
    """The .py file of a project module (`ptf.x.y`, `stages.x`), or None (third party)."""
    for cand in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
        if name.split(".")[0] in ("ptf", "stages") and cand.is_file():
            return cand
    return None


def imported_stage_modules(module: str) -> set[str]:
    """`module` and every project module (`stages.*`, `ptf.*`) it imports, transitively (read
    with ast, not run); package `__init__` files are left out (they hold only a docstring)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            todo += [n for n in names if (ROOT / (n.replace(".", "/") + ".py")).is_file()
                     and n.split(".")[0] in ("ptf", "stages")]
    return {m for m in seen if (ROOT / (m.replace(".", "/") + ".py")).is_file()}


def test_dvc_yaml_has_stages():
    assert "download" in _stages()


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_list_every_imported_module(stage):
    spec = _stages()[stage]
    module = _module_of(spec["cmd"])
    deps = {d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])}
    needed = {m.replace(".", "/") + ".py" for m in imported_stage_modules(module)}
    missing = sorted(needed - deps)
    assert not missing, f"stage {stage!r} imports {missing} but does not list them in deps"
    code = {d for d in deps if d.endswith(".py")}
    extra = sorted(code - needed)
    assert not extra, f"stage {stage!r} lists {extra} in deps but does not import them"


def _entry_modules() -> set[str]:
    return {_module_of(s["cmd"]) for s in _stages().values()}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("entry", sorted(_entry_modules()))
def test_no_stage_entry_module_imports_another(entry):
    others = _entry_modules() - {entry}
    path = _module_file(entry)
    bad = [m for m, names in _imports(path)
           if m in others or (m == "stages" and any(f"stages.{n}" in others for n in names))]
    assert not bad, f"{entry} imports the stage entry module(s) {bad}: move what they share into ptf/"


def test_library_imports_no_stage():
    bad = [(str(f.relative_to(ROOT)), m) for f in sorted((ROOT / "ptf").rglob("*.py"))
           for m, _ in _imports(f) if m.split(".")[0] == "stages"]
    assert not bad, f"the library imports stage entry modules: {bad}"


@pytest.mark.parametrize("folder", ["scripts", "bench", "flows"])
def test_scripts_import_no_private_name_and_no_tests(folder):
    bad = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        for m, names in _imports(f):
            top = m.split(".")[0]
            if top == "tests" or m in ("conftest",) or m.endswith("_fixtures"):
                bad.append(f"{f.name}: imports {m}")
            if top in ("stages", "ptf"):
                bad += [f"{f.name}: imports private {m}.{n}" for n in names if n.startswith("_")]
                bad += [f"{f.name}: imports private module {m}" for p in m.split(".") if p.startswith("_")]
        if "sys.path.insert(0, str(REPO / \"tests\"))" in f.read_text():
            bad.append(f"{f.name}: puts tests/ on sys.path")
    assert not bad, bad


# Besides its own section, a stage may read these upstream keys: the forgetting stage reads
# exactly the arms that `finetune.runs` declares; WiSE-FT evaluates on the fine-tune's subsets
# and measures drift exactly as the forgetting stage does.
UPSTREAM_MATRIX_KEYS = {"forgetting": ("finetune.runs",),
                        "representation": ("finetune.runs",),
                        "wise_ft": ("finetune.data", "forgetting.max_blocks", "forgetting.batch_size",
                                    "forgetting.mask_prob", "forgetting.mask_seed", "forgetting.worse_margin"),
                        # the arms' other values, the budget and the held-out measure: one measure, one budget
                        "sweep": ("finetune.pooling", "finetune.data", "finetune.train", "finetune.arms.full",
                                  "forgetting.max_blocks", "forgetting.batch_size", "forgetting.mask_prob",
                                  "forgetting.mask_seed"),
                        "frontier": ("forgetting.reference_strategy", "forgetting.alpha",
                                     "forgetting.bootstrap_resamples", "forgetting.bootstrap_seed")}


def _resolve(ref: str):
    """`${a.b}` of params.yaml."""
    node = read_params(ROOT / "params.yaml")
    for part in ref.strip("${}").split("."):
        node = node[part]
    return node


def _param_keys(spec) -> list[str]:
    """The stage's params entries; a matrix or foreach stage's `${item.x}` is filled from its
    first item."""
    keys = [p if isinstance(p, str) else next(iter(p)) for p in spec.get("params", [])]
    if "foreach" in spec:
        items = _resolve(spec["foreach"]) if isinstance(spec["foreach"], str) else spec["foreach"]
        first = next(iter(items.values())) if isinstance(items, dict) else items[0]
        for name, value in first.items():
            keys = [k.replace("${item.%s}" % name, str(value)) for k in keys]
    for name, values in (spec.get("matrix") or {}).items():
        first = values[0] if isinstance(values, list) else None
        if first is None:   # `${finetune.tasks}`: resolved from params.yaml
            first = read_params(ROOT / "params.yaml")
            for part in values.strip("${}").split("."):
                first = first[part]
            first = first[0]
        keys = [k.replace("${item.%s}" % name, str(first)) for k in keys]
    return keys


@pytest.mark.parametrize("params_file", PARAM_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", sorted(_stages()))
def test_params_section_builds_config(stage, params_file):
    """One section per stage (whole, or some of its keys), present in every params file and
    building the module's strict Config."""
    spec = _stages()[stage]
    module = importlib.import_module(_module_of(spec["cmd"]))
    keys = _param_keys(spec)
    upstream = [k for k in keys if k in UPSTREAM_MATRIX_KEYS.get(stage, ())]
    keys = [k for k in keys if k not in upstream]
    sections = sorted({k.split(".")[0] for k in keys})
    assert len(sections) == 1, f"stage {stage!r} must read exactly one params section, lists {keys}"
    params = read_params(params_file)
    assert sections[0] in params, f"{params_file.name} lacks section {sections[0]!r}"
    for key in keys + upstream:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{params_file.name} lacks {key!r}"
            node = node[part]
    parse_section(sections[0], params[sections[0]], module.Config)


def test_finetune_params_cover_what_the_stage_reads():
    """Every top-level finetune key except what selects the matrix and the other stages' own
    keys is a param of the finetune stage, so changing it reruns the fine-tunes."""
    keys = {k.split(".")[1] for k in _param_keys(_stages()["finetune"])}
    read = set(read_params(ROOT / "params.yaml")["finetune"]) - {"runs", "curves", "sequential"}
    assert read == keys


@pytest.mark.parametrize("params_file", PARAM_FILES, ids=lambda p: p.name)
def test_param_files_have_the_same_sections(params_file):
    assert set(read_params(params_file)) == set(read_params(ROOT / "params.yaml"))


def test_finetune_runs_are_the_dag_items_and_the_cli_refuses_others(tmp_path, monkeypatch, capsys):
    """The `foreach` items are `finetune.runs` (stage finetune@<task>-<strategy>); the stage's CLI
    refuses a pair that params.yaml does not declare, naming the key, before any work."""
    import sys

    from stages import finetune

    for params_file in PARAM_FILES:
        runs = read_params(params_file)["finetune"]["runs"]
        assert all(k == f"{v['task']}-{v['strategy']}" for k, v in runs.items()), params_file.name
    (tmp_path / "params.yaml").write_text((ROOT / "configs" / "smoke.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["finetune", "--task", "movies", "--strategy", "lora"])
    with pytest.raises(SystemExit) as e:
        finetune.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: finetune.runs: no arm movies-lora") and "movies-full" in err[0]
