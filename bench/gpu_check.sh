#!/usr/bin/env bash
# The GPU check, as one command for a lent GPU machine (its device time is short: one call).
#
# In:  this repo's work tree; optionally .whl/ (wheels of the packages that machine lacks, for its
#      Python: installed with --no-deps into /tmp/site) and .gpu/data/ (the download stage's
#      outputs of configs/smoke.yaml: that machine reaches no network, so the download stage
#      cannot run there), both made here by bench/gpu_prepare.sh; $OUT (a folder for what comes
#      back; default /tmp/gpu-check).
# Out: $OUT/bench.txt: bench/pretrain_speed.py on configs/gpu.yaml (its 85 M-parameter model in bf16:
#      tokens/s and MFU against the measured bf16 matmul and the datasheet rate);
#      $OUT/repro.txt, $OUT/metrics.txt, $OUT/gpu-check.tgz: a short `dvc repro` of the whole DAG
#      on the GPU (configs/smoke.yaml's data, tasks and arms, with gpu.yaml's 12-layer d=768
#      model pretrained in bf16 for GPU_STEPS steps), in a copy of this tree under /tmp, so the
#      repo's params.yaml and data/ are left as they are.
# Run: OUT=/tmp/o bash bench/gpu_check.sh   (optional: GPU_STEPS, BENCH_STEPS (0: no bench),
#      BENCH_REPEATS, REPRO_TIMEOUT, GPU_MODEL=smoke (smoke's own model: to try it on a CPU), PY)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
REPO=$(pwd)
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ -d "${WHEELS:-.whl}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY - <<'EOF' | tee -a "$OUT/gpu.txt"
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print({p: m.version(p) for p in ("transformers", "accelerate", "peft", "datasets", "mlflow-skinny",
                                 "dvc", "pydantic", "tokenizers", "pyarrow")})
EOF

echo "== bench/pretrain_speed.py --params configs/gpu.yaml"
[ "${BENCH_STEPS:-30}" = 0 ] || timeout 240 $PY bench/pretrain_speed.py --params configs/gpu.yaml \
    --steps "${BENCH_STEPS:-30}" --repeats "${BENCH_REPEATS:-3}" 2>&1 | grep -v "it/s\]$" \
    | tee "$OUT/bench.txt"

echo "== dvc repro on the GPU (smoke data and arms, gpu.yaml's model in bf16)"
W=/tmp/gpu-run; rm -rf "$W"; mkdir -p "$W"
tar --exclude=./.whl --exclude=./.venv --exclude=./data --exclude=./.git --exclude=./runs \
    -cf - . | tar -xf - -C "$W"
if git rev-parse --git-dir >/dev/null 2>&1; then    # data/: its tracked files only (metrics, .gitignore)
  git ls-files -z data | tar --null -T - -cf - | tar -xf - -C "$W"
else
  tar -cf - data | tar -xf - -C "$W"
fi
cp -r .gpu/data/. "$W/data/"
cd "$W" || exit 1
$PY - "${GPU_STEPS:-200}" "${GPU_MODEL:-gpu}" <<'EOF'
import sys
from ruamel.yaml import YAML
y = YAML()
p = y.load(open("configs/smoke.yaml"))
g = y.load(open("configs/gpu.yaml"))["pretrain"]
p["pretrain"].update(max_steps=int(sys.argv[1]), eval_every=100, eval_blocks=64, log_every=20,
                     checkpoint_every=100)
if sys.argv[2] == "gpu":     # "smoke": smoke's 2-layer model in fp32 (a check of this script on a CPU)
    p["tokenize"]["block_size"] = 128
    p["pretrain"].update(model={**g["model"], "max_positions": 128}, batch_size=32, lr=6e-4,
                         warmup_steps=20, mixed_precision="bf16")
y.dump(p, open("params.yaml", "w"))
EOF
[ "${GPU_MODEL:-gpu}" = smoke ] || sed -i 's/^use_cpu: true/use_cpu: false/' accelerate/default.yaml
git init -q && git add -A && git -c user.name=gpu -c user.email=gpu@localhost commit -qm gpu-check
dvc commit -f download >/dev/null || exit 1          # the carried outputs stand for the stage
start=$(date +%s)
timeout "${REPRO_TIMEOUT:-330}" $PY -m flows.mlflow_record repro 2>&1 | tr '\r' '\n' \
    | grep --line-buffered -v "it/s\]$\|s/it\]$\|^\s*$" \
    | while IFS= read -r l; do echo "$(( $(date +%s) - start )) $l"; done | tee "$OUT/repro.txt"
echo "repro: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s (lines: seconds since its start)" \
    | tee -a "$OUT/repro.txt"
dvc metrics show --json > "$OUT/metrics.json" 2>&1
$PY - <<'EOF' 2>&1 | tee "$OUT/metrics.txt"
import json
from pathlib import Path
m = json.loads(Path("data/metrics/pretrain.json").read_text())
print({k: v for k, v in m.items() if not isinstance(v, (dict, list))})
since = Path("params.yaml").stat().st_mtime     # the metrics this run wrote (not the tracked default's)
for f in sorted(Path("data/metrics").glob("**/*.json")):
    if f.stat().st_mtime > since:
        print(f, f.stat().st_size, "bytes")
s = Path("data/metrics/forgetting_summary.md")
print(s.read_text()[:3000] if s.is_file() else "no forgetting summary")
EOF
tar -czf "$OUT/gpu-check.tgz" params.yaml dvc.lock data/metrics data/plots 2>/dev/null
cd "$REPO"
