"""Loads the compiled extension once. If it cannot load, importing htc_kernels still works: one warning
names the reason, and the reference/Triton backends remain usable."""

from __future__ import annotations

import os
import warnings

_C = None
LOAD_ERROR: str | None = None
# Every schema of csrc/ops.cpp that htc_kernels/star_attention.py and mgvq_lookup.py register
# fake/autograd implementations for.
REQUIRED_OPS = (
    "star_plan",
    "star_attention",
    "star_attention_backward",
    "mgvq_lookup",
    "mgvq_lookup_backward",
)

if os.environ.get("HTC_NO_EXT") == "1":
    LOAD_ERROR = "disabled by HTC_NO_EXT=1"
else:
    try:
        import torch  # noqa: F401  (loads libtorch before the extension)

        from htc_kernels import _C  # type: ignore[attr-defined,no-redef]

        # A stale build (sources newer than the .so) lacks schemas the Python side registers against.
        missing = [op for op in REQUIRED_OPS if not hasattr(torch.ops.htc, op)]
        if missing:
            raise ImportError(f"stale build: ops {missing} missing from htc_kernels._C")
        if not hasattr(_C, "cpu_isa"):
            raise ImportError("stale build: htc_kernels._C predates the CPU ISA dispatch (no cpu_isa)")
        if not hasattr(_C, "cuda_smem"):
            raise ImportError("stale build: htc_kernels._C predates cuda_smem")
    except Exception as exc:  # noqa: BLE001 (any import failure must degrade, not crash)
        _C = None
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"

if LOAD_ERROR is not None:
    warnings.warn(
        f"htc_kernels: compiled extension not loaded ({LOAD_ERROR}); only the 'reference' and "
        "'triton' backends are available. Rebuild with `make setup` or "
        "`pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


def build_info() -> dict:
    return dict(_C.build_info()) if _C is not None else {}


def cuda_smem() -> dict:
    """Shared memory per block of the CUDA kernels: ``"star"`` ``{(dtype, D, softcap): (forward, dq,
    dkdv)}`` (dtype 0 fp32, 1 bf16, 2 fp16; softcap 0/1), ``"mgvq"`` ``{(d, normalize): bytes}``; both
    empty without CUDA. A pybind call: read it once, at import (it breaks torch.compile's tracing)."""
    if _C is None:
        return {"star": {}, "mgvq": {}}
    info = _C.cuda_smem()
    return {
        "star": {tuple(r[:3]): tuple(r[3:]) for r in info["star"]},
        "mgvq": {(r[0], bool(r[1])): r[2] for r in info["mgvq"]},
    }


def cpu_isa() -> dict:
    """The CPU kernel variant chosen at load (``active``), or why none runs (``error``: e.g. a bad
    ``HTC_CPU_ISA``; every CPU op call then raises it), the variants compiled in and those this CPU runs."""
    return dict(_C.cpu_isa()) if _C is not None else {}


if _C is not None and cpu_isa()["error"]:
    warnings.warn(f"htc_kernels: {cpu_isa()['error']}", RuntimeWarning, stacklevel=2)
