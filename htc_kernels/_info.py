"""Installation report: versions, extension status, compiled archs, CPU ISA, usable backends."""

from __future__ import annotations

import platform
import sys


def info() -> dict:
    """What this installation can do here (a plain dict, printed by ``python -m htc_kernels.info``)."""
    import torch

    from htc_kernels import _ext
    from htc_kernels.backends import compiled_runs_on, smem_optin, triton_reasons

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build = _ext.build_info()
    isa = _ext.cpu_isa()
    cuda_ok = torch.cuda.is_available()
    cuda = "no: " + ("no CUDA device" if build.get("cuda") else "extension built without CUDA")
    if build.get("cuda") and cuda_ok:
        dev = torch.device("cuda", 0)
        major, minor = torch.cuda.get_device_capability(dev)
        if not compiled_runs_on(dev):
            cuda = f"no: built for {build.get('cuda_archs')!r}, this GPU is {major}.{minor}"
        else:
            cuda = "yes" + cuda_smem_limits(_ext.cuda_smem()["star"], smem_optin(dev))
    backends = {
        "reference": "yes",
        "cpu": "yes" if _ext.available() else f"no: {_ext.LOAD_ERROR}",
        "cuda": cuda,
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


def cuda_smem_limits(table: dict, optin: int | None) -> str:
    """What a GPU offering ``optin`` bytes of shared memory per block cannot run of the CUDA star
    kernels (``table``: ``_ext.cuda_smem()["star"]``), as a suffix for the backends line ("" if all)."""
    if optin is None:
        return ""
    names = {0: "fp32", 1: "bf16", 2: "fp16"}
    fwd, bwd = set(), set()
    for (elt, d, _cap), (f, dq, dkdv) in table.items():
        if f > optin:
            fwd.add(f"{names[elt]} D={d}")
        elif max(dq, dkdv) > optin:
            bwd.add(f"{names[elt]} D={d}")
    parts = [f"{', '.join(sorted(fwd))} (forward)"] * bool(fwd) + [
        f"{', '.join(sorted(bwd))} (backward)"
    ] * bool(bwd)
    return (
        f", except {'; '.join(parts)}: {optin} B of shared memory per block (Triton runs those)"
        if parts
        else ""
    )


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
