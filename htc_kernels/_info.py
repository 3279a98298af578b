"""Installation report: versions, extension status, compiled archs, CPU ISA, usable backends."""

from __future__ import annotations

import platform
import sys


def info() -> dict:
    """What this installation can do here (a plain dict, printed by ``python -m htc_kernels.info``)."""
    import torch

    from htc_kernels import _ext
    from htc_kernels.backends import triton_reasons

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build = _ext.build_info()
    isa = _ext.cpu_isa()
    cuda_ok = torch.cuda.is_available()
    backends = {
        "reference": "yes",
        "cpu": "yes" if _ext.available() else f"no: {_ext.LOAD_ERROR}",
        "cuda": (
            "yes"
            if (build.get("cuda") and cuda_ok)
            else "no: " + ("no CUDA device" if build.get("cuda") else "extension built without CUDA")
        ),
        "triton": "; ".join(triton_reasons(torch.device("cuda" if cuda_ok else "cpu"))) or "yes",
    }
    if backends["triton"] != "yes":
        backends["triton"] = "no: " + backends["triton"]
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_ok else None,
        "triton": triton_version,
        "extension_loaded": _ext.available(),
        "extension_error": _ext.LOAD_ERROR,
        "extension_cuda": build.get("cuda", False),
        "cuda_archs": build.get("cuda_archs", ""),
        "compiled_cpu_isa": build.get("cpu_isa", ""),
        # The CPU kernel variant in use (chosen at load from CPUID, or forced by HTC_CPU_ISA).
        "cpu_isa": isa.get("active") or (f"none: {isa['error']}" if isa.get("error") else None),
        "cpu_isa_runnable": " ".join(isa.get("runnable", [])),
        # How the bf16 star_attention tiles (forward and backward) are multiplied (HTC_CPU_BF16_TILES):
        # fp32 (default), dpbf16, emulated, amx, amx_emulated.
        "cpu_bf16_tiles": isa.get("bf16_tiles") or None,
        "cpu_march": build.get("cpu_march", ""),
        "openmp": build.get("openmp", False),
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "backends": backends,
    }


def _main(argv: list[str]) -> None:
    data = info()
    if "--short" in argv:
        print(
            f"htc_kernels: torch {data['torch']}, extension "
            f"{'loaded' if data['extension_loaded'] else 'NOT loaded (' + str(data['extension_error']) + ')'}"
            f", cuda archs [{data['cuda_archs']}], cpu isa {data['cpu_isa']} of [{data['compiled_cpu_isa']}]"
        )
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<{width}} {v}")
        else:
            print(f"{key:<{width}} {value}")
