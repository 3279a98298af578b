"""mgvq_lookup: the public function, its references, backends, and op registration (fake, autograd).

The C++ schemas live in csrc/ops.cpp; this module adds ``register_fake`` and ``register_autograd``
once per op (DESIGN.md §3–4).
"""

from __future__ import annotations

import torch

from htc_kernels import _ext
from htc_kernels.backends import EXT_CUDA, KERNEL_DTYPES, Backend, compiled_reasons, select, triton_reasons

_MGVQ_NORM_EPS = 1e-12  # torch.nn.functional.normalize's clamp (MGVQ's l2norm)


def _check_mgvq_inputs(z, codebook, normalize) -> None:
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"mgvq_lookup: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"mgvq_lookup: {name} must be floating point, got {t.dtype}")
    if codebook.dim() != 3:
        raise ValueError(
            f"mgvq_lookup: codebook must be 3-D [G, K, d], got shape {tuple(codebook.shape)} "
            "(an MGVQ Embedding(G*K, d) weight is codebook.view(G, K, d))"
        )
    g, k, d = codebook.shape
    if z.dim() < 2 or z.shape[-2] != g or z.shape[-1] != d:
        raise ValueError(
            f"mgvq_lookup: z {tuple(z.shape)} must be [..., G={g}, d={d}] to match codebook "
            f"{tuple(codebook.shape)} (e.g. z.view(N, {g}, {d}) for {g * d}-channel latents)"
        )
    if g == 0 or k == 0 or d == 0:
        raise ValueError(f"mgvq_lookup: codebook {tuple(codebook.shape)} needs G, K, d >= 1")
    if z.dtype != codebook.dtype:
        raise ValueError(
            f"mgvq_lookup: z ({z.dtype}) and codebook ({codebook.dtype}) must have the same dtype"
        )
    if z.device != codebook.device:
        raise ValueError(f"mgvq_lookup: z on {z.device} but codebook on {codebook.device}")
    if not isinstance(normalize, bool):
        raise ValueError(f"mgvq_lookup: normalize must be a bool, got {type(normalize).__name__}")


def _normalize_vjp(v: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Backward of ``v / max(|v|, eps)`` along the last dim (no gradient through a clamped norm)."""
    n = v.norm(dim=-1, keepdim=True)
    inv = 1.0 / n.clamp_min(_MGVQ_NORM_EPS)
    y = v * inv
    proj = torch.where(n > _MGVQ_NORM_EPS, y * (y * dy).sum(-1, keepdim=True), torch.zeros_like(y))
    return inv * (dy - proj)


def mgvq_lookup_backward_reference(grad_codes, z, codebook, indices, normalize):
    """Straight-through backward in PyTorch ops (O(N*G*d + G*K*d)), where no compiled op runs."""
    g, k, d = codebook.shape
    gc = grad_codes.float().reshape(-1, g, d)
    zf = z.float().reshape(-1, g, d)
    grad_z = _normalize_vjp(zf, gc) if normalize else gc
    flat = (indices.reshape(-1, g) + torch.arange(g, device=z.device) * k).reshape(-1)
    acc = torch.zeros(g * k, d, dtype=torch.float32, device=z.device)
    acc.index_add_(0, flat, gc.reshape(-1, d))
    acc = acc.view(g, k, d)
    grad_cb = _normalize_vjp(codebook.float(), acc) if normalize else acc
    return grad_z.reshape(z.shape).to(z.dtype), grad_cb.to(codebook.dtype)


def mgvq_lookup_reference(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense oracle: materialises the ``[..., G, K]`` scores in z's dtype (use float64 in tests).

    Same contract and autograd as :func:`mgvq_lookup`: codes are the (unit-normalised when
    ``normalize``) selected codes, exactly; their gradient reaches z straight-through (through z's
    normalisation) and the codebook through the gather. Ties -> lowest index (``torch.argmax``).
    """
    if not torch.isfinite(z).all():
        raise ValueError("mgvq_lookup: z contains NaN/Inf")
    zn = torch.nn.functional.normalize(z, dim=-1) if normalize else z
    cbn = torch.nn.functional.normalize(codebook, dim=-1) if normalize else codebook
    if normalize:
        scores = torch.einsum("...gd,gkd->...gk", zn, cbn)
    else:
        scores = -(zn.unsqueeze(-2) - cbn).pow(2).sum(-1)
    scores = torch.nan_to_num(scores.detach(), nan=float("-inf"))
    indices = scores.argmax(-1)
    sel = cbn[torch.arange(codebook.shape[0], device=z.device), indices]
    codes = sel + (zn - zn.detach())  # value exactly sel; gradient straight-through to z
    return codes, indices


class _ReferenceMgvq(Backend):
    name = "reference"

    def not_supported_reasons(self, z, codebook, normalize):
        return []

    def __call__(self, z, codebook, normalize):
        return mgvq_lookup_reference(z, codebook, normalize)


class _CpuMgvq(Backend):
    """The C++ kernel (csrc/mgvq_lookup/mgvq_lookup_cpu.cpp)."""

    name = "cpu"

    def not_supported_reasons(self, z, codebook, normalize):
        return compiled_reasons(z, "cpu")

    def __call__(self, z, codebook, normalize):
        return torch.ops.htc.mgvq_lookup(z, codebook, normalize)


class _CudaMgvq(_CpuMgvq):
    """The CUDA kernel (csrc/mgvq_lookup/mgvq_lookup_cuda.cu)."""

    name = "cuda"

    def not_supported_reasons(self, z, codebook, normalize):
        return compiled_reasons(z, "cuda")


class _TritonMgvq(Backend):
    """The Triton kernel (htc_kernels/triton/mgvq_lookup.py), op htc::mgvq_lookup_triton."""

    name = "triton"

    def not_supported_reasons(self, z, codebook, normalize):
        reasons = triton_reasons(z.device)
        if not reasons and _triton_mgvq() is None:
            reasons.append(f"the Triton kernel failed to register ({_TRITON_MGVQ_ERROR})")
        if z.dtype not in KERNEL_DTYPES:
            reasons.append(f"dtype {z.dtype} not supported (float32, bfloat16, float16)")
        return reasons

    def __call__(self, z, codebook, normalize):
        return torch.ops.htc.mgvq_lookup_triton(z, codebook, normalize)


_TRITON_MGVQ_ERROR: str | None = None
_TRITON_MGVQ_LOADED = False


def _triton_mgvq():
    """Imports (once) and registers the Triton op with its autograd; None if that fails."""
    global _TRITON_MGVQ_ERROR, _TRITON_MGVQ_LOADED
    if not _TRITON_MGVQ_LOADED:
        _TRITON_MGVQ_LOADED = True
        try:
            from htc_kernels.triton import mgvq_lookup as mod

            torch.library.register_autograd(
                "htc::mgvq_lookup_triton", _mgvq_backward, setup_context=_mgvq_setup_context
            )
            _triton_mgvq.module = mod
        except Exception as exc:  # noqa: BLE001 (report the reason through not_supported_reasons)
            _TRITON_MGVQ_ERROR = f"{type(exc).__name__}: {exc}"
    return getattr(_triton_mgvq, "module", None)


_MGVQ_CPU_ORDER = (_CpuMgvq(), _ReferenceMgvq(), _TritonMgvq(), _CudaMgvq())
_MGVQ_GPU_ORDER = (_CudaMgvq(), _TritonMgvq(), _ReferenceMgvq(), _CpuMgvq())


def mgvq_lookup(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused grouped nearest-code lookup (MGVQ's quantizer), without an N x K distance matrix.

    Args:
        z: ``[..., G, d]`` latents (float32 / bfloat16 / float16 for the kernels; any float for
            ``"reference"``), any strides.
        codebook: ``[G, K, d]``, same dtype and device
            (MGVQ's ``Embedding(G*K, d).weight.view(G, K, d)``).
        normalize: True = cosine (MGVQ's ``l2_norm``: z and codes unit-normalised, largest dot
            product wins, codes returned unit-normalised); False = squared L2 (raw codes returned).
        backend: ``"auto" | "reference" | "cpu" | "triton" | "cuda"``.

    Returns:
        ``codes [..., G, d]`` (z's dtype), ``indices [..., G]`` int64 (into the group's K codes).
        Ties break to the lowest index. Gradient: straight-through from codes to z (through z's
        normalisation when ``normalize``) and to the selected codebook rows (index-add, through the
        codes' normalisation).

    Non-finite values: NaN/Inf in z raise a ValueError on the CPU kernel and the reference; the
    GPU kernels (no host sync) return index -1 and NaN codes for such token-groups. A codebook row
    whose score is NaN is never selected.
    """
    _check_mgvq_inputs(z, codebook, normalize)
    order = _MGVQ_GPU_ORDER if z.device.type == "cuda" else _MGVQ_CPU_ORDER
    be = select("mgvq_lookup", order, backend, z, codebook, normalize)
    return be(z, codebook, normalize)


def _mgvq_setup_context(ctx, inputs, output):
    z, codebook, normalize = inputs
    _codes, indices = output
    ctx.save_for_backward(z, codebook, indices)
    ctx.normalize = normalize


def _mgvq_backward(ctx, grad_codes, grad_indices):
    z, codebook, indices = ctx.saved_tensors
    if grad_codes is None:
        grad_codes = torch.zeros_like(z)
    use_op = (
        _ext.available()
        and (z.device.type == "cpu" or (z.device.type == "cuda" and EXT_CUDA))
        and z.dtype in KERNEL_DTYPES
    )
    if use_op:
        grad_z, grad_cb = torch.ops.htc.mgvq_lookup_backward(grad_codes, z, codebook, indices, ctx.normalize)
    else:
        grad_z, grad_cb = mgvq_lookup_backward_reference(grad_codes, z, codebook, indices, ctx.normalize)
    return grad_z, grad_cb, None


def _register_mgvq_ops() -> None:
    # Outputs are contiguous whatever z's strides (the kernels allocate them with at::empty(sizes));
    # empty_like(z) would mirror a transposed z and make inductor's output-stride assertion fail.
    @torch.library.register_fake("htc::mgvq_lookup")
    def _(z, codebook, normalize):
        return z.new_empty(z.shape), z.new_empty(z.shape[:-1], dtype=torch.int64)

    @torch.library.register_fake("htc::mgvq_lookup_backward")
    def _(grad_codes, z, codebook, indices, normalize):
        return z.new_empty(z.shape), codebook.new_empty(codebook.shape)

    torch.library.register_autograd("htc::mgvq_lookup", _mgvq_backward, setup_context=_mgvq_setup_context)


if _ext.available():
    _register_mgvq_ops()
