#!/usr/bin/env bash
# What bench/gpu_check.sh carries to a lent GPU machine, made here (that machine reaches no network).
#
# In:  this repo with its venv (make setup); network to the package registries.
# Out: .whl/  wheels for Python 3.12 x86-64 of the packages that machine's image lacks (DVC, MLflow's
#             tracking client, pydantic, datasets, ruamel.yaml and their own needs), each at the
#             version this venv has (antlr4's wheel is built here: PyPI has only its sdist);
#      .gpu/data/  the download stage's outputs for configs/smoke.yaml (data/raw, corpus, tasks,
#             foundation, manifests/download.json), made in a scratch clone under /tmp.
#      Both are added to .git/info/exclude; together about 40 MB of the 64 MiB a call may carry.
# Then: run(command="OUT=$OUT bash bench/gpu_check.sh > $OUT/log.txt 2>&1; tail -c 8000 $OUT/log.txt",
#           carry=[".whl", ".gpu"], timeout_s=600)
# The list below was read off the image's package list (../.library/device/KINDS.md, 2026-11-17),
# plus typing_extensions and typing_inspection, older or missing there (seen on 2026-12-04).
set -euo pipefail
REPO=$(pwd)
PY=${PY:-$REPO/.venv/bin/python}
PKGS="aiohttp-retry alembic amqp annotated-types antlr4-python3-runtime appdirs atpublic billiard
cachetools celery cffi click-didyoumean click-plugins click-repl configobj cryptography databricks-sdk
datasets dictdiffer dill diskcache distro dpath dulwich dvc dvc-data dvc-http dvc-objects dvc-render
dvc-studio-client dvc-task entrypoints fastapi flatten-dict flufl-lock funcy gitdb gitpython
google-auth grandalf greenlet gto httpcore2 httpx2 hydra-core importlib-metadata iterative-telemetry
kombu mako mlflow-skinny mlflow-tracing multiprocess omegaconf opentelemetry-api opentelemetry-proto
opentelemetry-sdk opentelemetry-semantic-conventions orjson platformdirs prompt-toolkit pyasn1
pyasn1-modules pycparser pydantic pydantic-core pydantic-settings pydot pygit2 pygtrie pyparsing
python-dotenv ruamel-yaml ruamel-yaml-clib scmrepo semver shortuuid shtab smmap sqlalchemy sqlparse
sqltrie starlette tomlkit truststore typing-extensions typing-inspection tzlocal uvicorn vine
voluptuous wcwidth zc-lockfile"
for p in /.whl/ /.gpu/; do
  grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done

# the venv's version of each package (names normalised as pip does)
norm() { tr 'A-Z_.' 'a-z--'; }
$PY -m pip freeze 2>/dev/null | awk -F'==' '{print $1" "$2}' | while read -r n v; do
  echo "$(echo "$n" | norm) $v"; done > /tmp/gpu-prepare-freeze.txt
reqs=()
for p in $PKGS; do
  v=$(awk -v n="$p" '$1 == n {print $2}' /tmp/gpu-prepare-freeze.txt)
  [ -n "$v" ] || { echo "error: $p is not in this venv (make setup)" >&2; exit 1; }
  reqs+=("$p==$v")
done
rm -rf .whl /tmp/gpu-prepare-sdist && mkdir -p .whl /tmp/gpu-prepare-sdist
$PY -m pip wheel -q --no-deps -w /tmp/gpu-prepare-sdist \
    "$(printf '%s\n' "${reqs[@]}" | grep '^antlr4-python3-runtime==')"
plat=""
for t in manylinux1 manylinux2010 manylinux2014 manylinux_2_5 manylinux_2_12 manylinux_2_17 \
         manylinux_2_24 manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  plat="$plat --platform ${t}_x86_64"
done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $plat --platform any --find-links /tmp/gpu-prepare-sdist -d .whl "${reqs[@]}"

W=/tmp/gpu-prepare-smoke
rm -rf "$W" && git clone -q "$REPO" "$W"
(cd "$W" && cp configs/smoke.yaml params.yaml && PATH=$REPO/.venv/bin:$PATH DVC_NO_ANALYTICS=1 \
   dvc repro -q download)
rm -rf .gpu && mkdir -p .gpu/data/manifests
cp -r "$W"/data/{raw,corpus,tasks,foundation} .gpu/data/
cp "$W"/data/manifests/download.json .gpu/data/manifests/
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1); .gpu: $(du -sh .gpu | cut -f1)"
