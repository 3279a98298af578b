"""Backend selection shared by every kernel family (DESIGN.md §4).

Each backend says whether it can run a given call and, if not, why (xformers' ``not_supported_reasons``
idea). ``backend="auto"`` takes the first backend of a family's priority list with no reasons; an
explicit backend that cannot run raises a ValueError listing its reasons and the backends that could.
Nothing falls back silently to a different computation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD

from htc_kernels import _ext

BACKEND_NAMES = ("auto", "reference", "cpu", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXT_CUDA = bool(_ext.build_info().get("cuda"))  # read once: pybind calls break torch.compile
EXT_CUDA_ARCHS = _ext.build_info().get("cuda_archs", "") if EXT_CUDA else ""


def parse_cuda_archs(spec: str) -> tuple[tuple[int, int, bool], ...] | None:
    """TORCH_CUDA_ARCH_LIST entries ("8.0;9.0", "8.6+PTX", "9.0a") -> (major, minor, with PTX);
    None if an entry is not a number (an arch name: then the launch itself says)."""
    out = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        major, _, minor = item.removesuffix("+PTX").rstrip("af").partition(".")
        if not (major.isdigit() and (minor or "0").isdigit()):
            return None
        out.append((int(major), int(minor or 0), ptx))
    return tuple(out)


def runs_on(capability: tuple[int, int], archs: tuple[tuple[int, int, bool], ...] | None) -> bool:
    """Whether code built for ``archs`` runs on a GPU of ``capability``: machine code of its major
    and a minor no higher (sm_80 runs on sm_86/89, not on sm_90, sm_100 or sm_120), or PTX of an arch
    no newer (JIT-compiled by the driver)."""
    if archs is None:
        return True
    return any(
        (a_major == capability[0] and a_minor <= capability[1])
        or (ptx and (a_major, a_minor) <= tuple(capability))
        for a_major, a_minor, ptx in archs
    )


_EXT_ARCHS = parse_cuda_archs(EXT_CUDA_ARCHS)


def compiled_runs_on(device: torch.device) -> bool:
    """Whether the loaded extension has kernels for ``device`` (a CUDA device: built with CUDA, for
    its architecture)."""
    if not _ext.available():
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not EXT_CUDA:
        return False
    return runs_on(torch.cuda.get_device_capability(device), _EXT_ARCHS)


def smem_optin(device: torch.device) -> int | None:
    """A CUDA device's shared memory per block with opt-in; None where this torch does not report it
    (then the kernels' launch checks it: a clear error, but after the backend was chosen)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def compiled_reasons(t: torch.Tensor, device_type: str) -> list[str]:
    """Why the compiled (C++/CUDA) kernel for `device_type` cannot take tensor `t` ([] if it can)."""
    reasons = []
    if not _ext.available():
        reasons.append(f"the compiled extension is not loaded ({_ext.LOAD_ERROR})")
    elif device_type == "cuda" and not EXT_CUDA:
        reasons.append("the extension was built without CUDA")
    elif device_type == "cuda" and t.device.type == "cuda" and not compiled_runs_on(t.device):
        major, minor = torch.cuda.get_device_capability(t.device)
        reasons.append(
            f"the extension's CUDA kernels were built for {EXT_CUDA_ARCHS!r}, which cannot run on compute "
            f'capability {major}.{minor} (rebuild with TORCH_CUDA_ARCH_LIST="{major}.{minor}")'
        )
    if t.device.type != device_type:
        where = "the CPU" if device_type == "cpu" else "a CUDA device"
        reasons.append(f"tensors are on {t.device}, not {where}")
    if t.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {t.dtype} not supported (float32, bfloat16, float16)")
    return reasons


class Backend:
    """One implementation of one kernel family. ``any_autodiff``: it differentiates in every mode
    (the references: plain torch ops); the kernels' ops have torch.autograd (reverse mode) only."""

    name: str = ""
    any_autodiff: bool = False

    def not_supported_reasons(self, *args, **kwargs) -> list[str]:
        raise NotImplementedError

    def reasons(self, *args, **kwargs) -> list[str]:
        """``not_supported_reasons``, plus the autodiff modes the backend lacks: through an op with
        reverse-mode autograd only, a forward-mode tangent comes out zero or missing, silently."""
        why = self.not_supported_reasons(*args, **kwargs)
        return why if self.any_autodiff else [*why, *_autodiff_reasons(args)]


def _autodiff_reasons(args) -> list[str]:
    if torch.compiler.is_compiling():
        return []
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        return [
            "forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): the kernel has reverse-mode "
            "gradients only (backend='reference' differentiates in both modes)"
        ]
    if any(torch._C._functorch.is_gradtrackingtensor(t) for t in tensors):
        return [
            "torch.func.grad / vjp / jacrev: the kernel's op has torch.autograd gradients only "
            "(torch.autograd.grad and .backward() work; backend='reference' supports torch.func)"
        ]
    return []


def triton_reasons(device) -> list[str]:
    """Why Triton cannot run on ``device`` here ([] if it can)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return [f"triton is not installed ({exc})"]
    if device.type == "cuda":
        return []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return []
    return [f"triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"]


def select(family: str, backends: Sequence[Backend], name: str, *args, **kwargs) -> Backend:
    """The backend to run ``family`` with: ``name`` if it can run, else a ValueError saying why."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"{family}: unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    # Reasons are gathered only where they decide something or go into an error: a decode step calls
    # this once per layer, and every backend's checks cost microseconds.
    if name == "auto":
        reasons = {}
        for be in backends:
            why = be.reasons(*args, **kwargs)
            if not why:
                return be
            reasons[be.name] = why
        raise ValueError(f"{family}: no backend can run this call: {reasons}")
    chosen = next((be for be in backends if be.name == name), None)
    if chosen is None:
        raise ValueError(f"{family}: backend {name!r} is not implemented for this op")
    why = chosen.reasons(*args, **kwargs)
    if why:
        usable = [be.name for be in backends if be is not chosen and not be.reasons(*args, **kwargs)]
        raise ValueError(
            f"{family}: backend {name!r} cannot run this call: {'; '.join(why)}. "
            f"Backends that can: {usable or 'none'}"
        )
    return chosen
