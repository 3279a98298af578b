#!/usr/bin/env bash
# One-command, idempotent environment setup: .venv with pinned torch and dependencies, and the package
# installed editable with its compiled extension. A second run only re-runs the (incremental) build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.14.1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

stamp="$VENV/.htc-deps-$(cat requirements/dev.txt | sha256sum | cut -c1-16)-torch$TORCH_VERSION"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch==$TORCH_VERSION and requirements/dev.txt"
  $PIP install --quiet "torch==$TORCH_VERSION"
  $PIP install --quiet -r requirements/dev.txt
  rm -f "$VENV"/.htc-deps-*
  touch "$stamp"
fi

if [ ! -f "$VENV/.htc-editable" ] || ! "$VENV/bin/python" -c "import htc_kernels" >/dev/null 2>&1; then
  echo "[setup] installing htc-kernels (editable, --no-build-isolation)"
  $PIP install --quiet --no-build-isolation --no-deps -e .
  touch "$VENV/.htc-editable"
else
  # Incremental rebuild of the extension (ninja): seconds when nothing changed.
  "$VENV/bin/python" setup.py --quiet build_ext --inplace
fi
"$VENV/bin/python" -m htc_kernels.info --short
