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
  # The editable install points at this tree (pure Python: HTC_NO_EXT), then the extension is built in
  # place: one build, and its objects stay in build/python (tests/test_cpu_isa.py disassembles them;
  # later runs rebuild incrementally). pip's own build would run in a temporary directory.
  echo "[setup] installing htc-kernels (editable, --no-build-isolation), then building htc_kernels._C in place"
  HTC_NO_EXT=1 $PIP install --quiet --no-build-isolation --no-deps -e .
  "$VENV/bin/python" setup.py --quiet build_ext --inplace
  touch "$VENV/.htc-editable"
else
  so=$(ls htc_kernels/_C*.so 2>/dev/null | head -n 1 || true)
  if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ] && [ "${HTC_REBUILD:-0}" != 1 ]; then
    # Nothing to do (a .so built by an older setup.sh, whose pip build ran in a temporary directory,
    # would otherwise be rebuilt from nothing: ~25 min with CUDA and the CPU variants).
    echo "[setup] extension up to date ($so; HTC_REBUILD=1 rebuilds, e.g. after changing HTC_* build variables)"
  else
    # Incremental rebuild of the extension (ninja): seconds when nothing changed since the last one.
    "$VENV/bin/python" setup.py --quiet build_ext --inplace
  fi
fi
"$VENV/bin/python" -m htc_kernels.info --short
