"""The benchmarks still run against the code they measure (both had broken silently: a helper
moved out of their imports, a params key renamed): each runs once on tiny sizes, as a user
would start it, and prints its summary; no timing is asserted (benches measure, tests don't)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def run(*args: str) -> str:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_pretrain_speed_runs_on_a_params_file():
    out = run("bench/pretrain_speed.py", "--params", "configs/smoke.yaml", "--steps", "3",
              "--repeats", "1")
    assert "hidden 32, 2 layers" in out and "ratio stage / Trainer" in out, out


def test_sweep_speed_runs_and_finds_the_same_results(tmp_path):
    # the repo's own data/ may hold a pretrained model and tasks; an empty --data gives the
    # random-weights model and the synthetic task, the same on every machine
    out = tmp_path / "s.json"
    run("bench/sweep_speed.py", "--strategies", "linear_probe", "--k", "4", "--repeats", "1",
        "--data", str(tmp_path), "--out", str(out))
    r = json.loads(out.read_text())["strategies"]["linear_probe"]
    assert r["same_results"] == {"compared": 1, "mismatches": []}
    assert r["configs_per_cpu_minute"]["together"] > 0
