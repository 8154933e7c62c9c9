"""Safe loading and no leaks.

- No pickle is read from an input or an artifact: an AST scan of stages/, flows/, scripts/ and
  bench/ finds no `pickle.load(s)`, no `torch.load` without `weights_only=True`, no
  `weights_only=False`; models are saved as safetensors (the saved pipeline model dirs hold no
  pickles: tests/test_faults.py `test_model_dirs_hold_safetensors_only`).
- Accelerate checkpoints (`data/checkpoints/pretrain/*/step-*/`: optimizer.bin, scheduler.bin,
  random_states_0.pkl are written with torch.save) are read back by `Accelerator.load_state`
  through `accelerate.utils.load`, which passes `weights_only=True` (numpy allowlist): checked
  by spying on `torch.load` while a real checkpoint is resumed. They are `cache: false`, so they
  never travel through a DVC remote.
- Archive extraction rejects traversal and links: tests/test_download.py
  (`test_unsafe_member_names`, `test_link_members`), tests/test_fetch.py
  (`test_zip_symlink_and_size_bound`).
- Servers the project starts bind to 127.0.0.1 by default (the MLflow dashboard, Prefect's
  server and runner settings); no file of the project binds to 0.0.0.0.
- No secret is written: params files hold no secret-looking key or credentialed URL; an MLflow
  run started with secrets in the environment records none of them in params, tags or metrics;
  an unreachable tracking URI with credentials is reported without its password.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("stages", "flows", "scripts", "bench")
SECRET = "s3cr3t-Pa55-xyz"


def _py_files() -> list[Path]:
    return sorted(p for d in SCANNED if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def unsafe_loads(src: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            kw = {k.arg: k.value for k in node.keywords}
            wo = kw.get("weights_only")
            if name.endswith(("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load")):
                found.append(f"{where}:{node.lineno}: {name}")
            elif name in ("torch.load", "load") and name == "torch.load" and not (
                    isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif isinstance(wo, ast.Constant) and wo.value is False:
                found.append(f"{where}:{node.lineno}: {name}(weights_only=False)")
            elif kw.get("serialization_format") is not None and isinstance(
                    kw["serialization_format"], ast.Constant) and kw["serialization_format"].value == "pickle":
                found.append(f"{where}:{node.lineno}: {name}(serialization_format='pickle')")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in ("pickle", "cPickle", "dill") for m in mods):
                found.append(f"{where}:{node.lineno}: imports {mods}")
    return found


def test_the_scanner_finds_unsafe_loads():
    bad = ("import pickle\nimport torch\npickle.load(f)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nx.load_state(d, weights_only=False)\n")
    assert len(unsafe_loads(bad, "x")) == 5
    assert unsafe_loads("import torch\ntorch.load(p, weights_only=True)\n", "x") == []


def test_no_pickle_is_read_anywhere_in_the_code():
    files = _py_files()
    assert len(files) > 10
    found = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, "\n".join(found)


def test_models_are_saved_as_safetensors():
    src = "\n".join(p.read_text() for p in _py_files())
    assert "safe_serialization=False" not in src
    assert "torch.save(" not in src


def test_resuming_a_checkpoint_loads_it_with_weights_only(tmp_path, monkeypatch):
    """Accelerate writes optimizer/scheduler/RNG state with torch.save (pickle format); our
    resume path (`Trainer._resume` -> `Accelerator.load_state`) must read them weights-only."""
    import torch

    from ptf.training.trainer import reset_accelerate
    from ptf.training.trainer import adamw, make_accelerator, warmup_cosine
    reset_accelerate()
    acc = make_accelerator("no", 1, 0)
    model = torch.nn.Linear(4, 2)
    opt = adamw([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=1e-3)
    sched = warmup_cosine(opt, 1, 10, 1)
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    acc.save_state(str(tmp_path / "ckpt"))
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert any(n.endswith((".bin", ".pkl")) for n in written), written  # pickled state: honest
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    acc.load_state(str(tmp_path / "ckpt"))
    assert calls and all(c is True for c in calls), calls
    reset_accelerate()


def test_servers_bind_to_localhost_by_default():
    from flows.dashboard import server_command
    cmd = server_command(REPO)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    import flows.dashboard as dash
    assert 'default="127.0.0.1"' in Path(dash.__file__).read_text()
    from prefect.settings import get_current_settings
    s = get_current_settings()
    assert s.server.api.host in ("127.0.0.1", "localhost")
    assert s.runner.server.host in ("127.0.0.1", "localhost")
    offenders = [str(p.relative_to(REPO)) for p in
                 [*_py_files(), *REPO.glob("*.yaml"), *REPO.glob("configs/*.yaml"), REPO / "Makefile"]
                 if p.is_file() and "0.0.0.0" in p.read_text()]
    assert not offenders


# a key that names a credential: password, secret, api_key, hf_token, ... (not tokenizer/virtual_tokens)
SECRET_KEY = re.compile(r"^(.*[_.-])?(pass(word|wd)?|secret|api[_-]?key|access[_-]?key|"
                        r"private[_-]?key|credentials?|auth|token)$", re.I)


def _keys(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}{k}"
            yield from _keys(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v, prefix)


@pytest.mark.parametrize("path", ["params.yaml", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml"))])
def test_params_hold_no_secrets(path):
    text = (REPO / path).read_text()
    keys = [k for k in _keys(yaml.safe_load(text)) if SECRET_KEY.search(k.rsplit(".", 1)[-1])]
    assert not keys, keys
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a URL with credentials"


def test_mlflow_run_records_no_secret_from_the_environment(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ptf.training.tracking import start_run
    for var in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_KEY"):
        monkeypatch.setenv(var, SECRET)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with start_run("pretrain", {"lr": 0.1, "model": {"hidden": 8}}, {"input.shards": "sha256:0"},
                   root=tmp_path, experiment="secrets", uri=uri) as run:
        run.log({"loss": 1.0}, step=1)
        run_id = run.run_id
    r = MlflowClient(uri).get_run(run_id)
    recorded = repr((r.data.params, r.data.tags, r.data.metrics, r.info))
    assert SECRET not in recorded
    assert not [k for k in {**r.data.params, **r.data.tags} if SECRET_KEY.search(k)]
    assert SECRET_KEY.search("hf_token") and not SECRET_KEY.search("virtual_tokens")
    assert SECRET.encode() not in (tmp_path / "mlflow.db").read_bytes()


def test_unreachable_uri_with_credentials_is_reported_without_the_password():
    from ptf.common.cli import StageError
    from ptf.training.tracking import check_reachable
    from tests.smoke import closed_port
    with closed_port() as port, pytest.raises(StageError) as e:
        check_reachable(f"http://user:{SECRET}@127.0.0.1:{port}", timeout=2)
    assert f"127.0.0.1:{port}" in str(e.value)
    assert SECRET not in str(e.value)
