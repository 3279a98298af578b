"""Code run in a fresh Python process: for what is read once at import (TRITON_INTERPRET, HTC_CPU_ISA)
or a failure that must fail one test, not the session (a crash)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` with this process's ``sys.path`` and environment plus ``env``."""
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


def run_interpreted(code: str) -> None:
    """Run ``code`` under ``TRITON_INTERPRET=1``; it must exit 0 and print ``ok``."""
    out = run_python(code + "\nprint('ok')\n", TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1:] == ["ok"], out.stdout[-3000:]


# The interpreter child runs wherever Triton is installed and no GPU would run the compiled kernels.
interpreter_child = pytest.mark.skipif(
    not HAS_TRITON or torch.cuda.is_available(),
    reason="needs triton, and no GPU (a GPU runs the compiled kernels; torch < 2.14 cannot wrap "
    "interpreted Triton functions)",
)
