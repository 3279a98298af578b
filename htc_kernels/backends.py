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


def compiled_reasons(t: torch.Tensor, device_type: str) -> list[str]:
    """Why the compiled (C++/CUDA) kernel for `device_type` cannot take tensor `t` ([] if it can)."""
    reasons = []
    if not _ext.available():
        reasons.append(f"the compiled extension is not loaded ({_ext.LOAD_ERROR})")
    elif device_type == "cuda" and not EXT_CUDA:
        reasons.append("the extension was built without CUDA")
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
