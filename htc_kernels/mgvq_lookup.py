"""mgvq_lookup: the public function, its references, backends, and op registration (fake, autograd).

The C++ schemas live in csrc/ops.cpp; this module adds ``register_fake`` and ``register_autograd``
once per op (DESIGN.md §3–4).
"""

from __future__ import annotations

import math

import torch

from htc_kernels import _ext
from htc_kernels.backends import (
    KERNEL_DTYPES,
    Backend,
    compiled_reasons,
    compiled_runs_on,
    select,
    smem_optin,
    triton_reasons,
)

_MGVQ_NORM_EPS = 1e-12  # torch.nn.functional.normalize's clamp (MGVQ's l2norm)
_MGVQ_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_mgvq_inputs(z, codebook, normalize) -> None:
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"mgvq_lookup: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"mgvq_lookup: {name} must be floating point, got {t.dtype}")
        if t.dtype not in _MGVQ_DTYPES:
            raise ValueError(
                f"mgvq_lookup: {name} has dtype {t.dtype}; supported: float32, bfloat16, float16 "
                "(and float64 on backend='reference'); cast z and codebook first"
            )
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


def pow2_scale(m: torch.Tensor) -> torch.Tensor:
    """The power of two ``s`` with ``m * s`` in [1, 2) for each ``m >= 0`` (1 where ``m == 0``), its
    exponent clamped so that ``s`` is a normal number of m's dtype (csrc/mgvq_lookup/mgvq_math.h).
    Scaling by it is exact: squares formed after it cannot overflow, and equal the unscaled ones times
    ``s**2`` bit for bit wherever those do not overflow or underflow."""
    _, e = torch.frexp(m)  # m = mantissa * 2**e, mantissa in [0.5, 1)
    lim = int(math.log2(torch.finfo(m.dtype).max)) - 1  # 126 for float32: s and 1/s stay normal
    s = torch.ldexp(torch.ones_like(m), (1 - e).clamp(-lim, lim))
    return torch.where(m == 0, torch.ones_like(m), s)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """``v / max(|v|, eps)`` along the last dim (F.normalize, MGVQ's l2norm) without overflow for any
    finite v: |v| is formed from ``v * s`` (:func:`pow2_scale` of max |v_j|). Differentiable, with
    F.normalize's gradient (none through a clamped norm)."""
    s = pow2_scale(v.detach().abs().amax(-1, keepdim=True))
    vs = v * s
    n_s = vs.norm(dim=-1, keepdim=True)  # = s |v|
    clamped = ~(n_s > _MGVQ_NORM_EPS * s)
    # Both branches are evaluated: keep the unselected one finite so its zero gradient stays zero.
    return torch.where(clamped, v / _MGVQ_NORM_EPS, vs / torch.where(clamped, torch.ones_like(n_s), n_s))


def _normalize_vjp(v: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Backward of ``v / max(|v|, eps)`` along the last dim (no gradient through a clamped norm)."""
    s = pow2_scale(v.abs().amax(-1, keepdim=True))
    n_s = (v * s).norm(dim=-1, keepdim=True)  # = s |v|, without overflow
    clamped = ~(n_s > _MGVQ_NORM_EPS * s)
    inv = torch.where(clamped, torch.full_like(n_s, 1 / _MGVQ_NORM_EPS), s / n_s)
    y = v * inv
    proj = torch.where(clamped, torch.zeros_like(y), y * (y * dy).sum(-1, keepdim=True))
    return inv * (dy - proj)


def l2_group_scales(codebook: torch.Tensor) -> torch.Tensor:
    """``[G]``: the squared-L2 scale of each group (its codes and the tokens against them are scaled by
    it): :func:`pow2_scale` of the group's largest finite |c_j| (NaN/Inf rows are never selected)."""
    finite = torch.isfinite(codebook).all(-1, keepdim=True)
    return pow2_scale(torch.where(finite, codebook.abs(), torch.zeros_like(codebook)).amax(dim=(1, 2)))


def l2_token_limit(d: int) -> float:
    """Largest |z_j * scale| a token may have in the squared-L2 kernels (mgvq_math.h l2_token_limit)."""
    return float(torch.finfo(torch.float32).max) / (8.0 * (d + 1))


def _first_bad(flags: torch.Tensor, g: int) -> tuple[int, int]:
    first = int(flags.reshape(-1).nonzero()[0, 0])
    return first // g, first % g


def _raise_no_code(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> None:
    """Some token-group got no code (index < 0): raise why (the messages of mgvq_checks.h)."""
    g, _, d = codebook.shape
    n, gi = _first_bad(indices < 0, g)
    zrow = z.reshape(-1, g, d)[n, gi].float()
    if not bool(torch.isfinite(zrow).all()):
        raise ValueError(
            f"mgvq_lookup: z contains NaN/Inf (first at token {n}, group {gi}); "
            "the lookup needs finite latents"
        )
    cb = codebook[gi].float()
    finite = torch.isfinite(cb).all(-1, keepdim=True)
    if not bool(finite.any()):
        raise ValueError(f"mgvq_lookup: every code of group {gi} is NaN/Inf: no code can be selected")
    cmax = float(torch.where(finite, cb.abs(), torch.zeros_like(cb)).max())
    raise ValueError(
        f"mgvq_lookup: z at token {n}, group {gi} (max |z| = {float(zrow.abs().max()):.6g}) is too large "
        f"for the squared-L2 score against the codes of group {gi} (max |c| = {cmax:.6g}): it would "
        "overflow float32. Scale z and the codebook by a common factor (the nearest code does not change) "
        "or use normalize=True"
    )


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
    if normalize:
        # Rows holding NaN/Inf are never selected: their gradient is 0 (not 0 * Inf), also in a
        # double backward (the vjp sees them as zero rows).
        cbf = codebook.float()
        finite = torch.isfinite(cbf).all(-1, keepdim=True)
        safe = torch.where(finite, cbf, torch.zeros_like(cbf))
        grad_cb = torch.where(finite, _normalize_vjp(safe, acc), torch.zeros_like(acc))
    else:
        grad_cb = acc
    return grad_z.reshape(z.shape).to(z.dtype), grad_cb.to(codebook.dtype)


def mgvq_lookup_reference(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense oracle: materialises the ``[..., G, K]`` scores in z's dtype (use float64 in tests).

    Same contract and autograd as :func:`mgvq_lookup`: codes are the (unit-normalised when
    ``normalize``) selected codes, exactly; their gradient reaches z straight-through (through z's
    normalisation) and the codebook through the gather. Ties -> lowest index (``torch.argmax``).
    """
    g, _, d = codebook.shape
    bad = ~torch.isfinite(z).all(-1)
    if bool(bad.any()):
        n, gi = _first_bad(bad, g)
        raise ValueError(
            f"mgvq_lookup: z contains NaN/Inf (first at token {n}, group {gi}); "
            "the lookup needs finite latents"
        )
    # No overflow for any finite input: cosine is scale-invariant (_unit scales each vector), and
    # squared L2 is invariant under a common scale of z and the group's codes (per token-group here).
    zn = _unit(z) if normalize else z
    with torch.no_grad():
        cbn = _unit(codebook) if normalize else codebook
        if normalize:
            # Products summed per code, not a GEMM: a GEMM may round equal codes differently by
            # their place in it, and then argmax no longer finds the lowest of equal scores.
            scores = (zn.unsqueeze(-2) * cbn).sum(-1)
        else:
            finite = torch.isfinite(codebook).all(-1, keepdim=True)
            cmax = torch.where(finite, codebook.abs(), torch.zeros_like(codebook)).amax(dim=(1, 2))  # [G]
            t = pow2_scale(torch.maximum(z.abs().amax(-1), cmax)).unsqueeze(-1)  # [..., G, 1]
            scores = -((z * t).unsqueeze(-2) - codebook * t.unsqueeze(-1)).pow(2).sum(-1)
        scores = torch.nan_to_num(scores, nan=float("-inf"))
        indices = torch.where((scores == float("-inf")).all(-1), -1, scores.argmax(-1))
        if bool((indices < 0).any()):
            _raise_no_code(z, codebook, indices)
    # Normalised after the gather: only selected rows carry a gradient (a NaN/Inf row is never
    # selected and gets 0, not 0 * Inf).
    sel = codebook[torch.arange(g, device=z.device), indices]
    sel = _unit(sel) if normalize else sel
    codes = sel + (zn - zn.detach())  # value exactly sel; gradient straight-through to z
    return codes, indices


class _ReferenceMgvq(Backend):
    name = "reference"
    any_autodiff = True

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


_CUDA_SMEM = _ext.cuda_smem()["mgvq"]  # {(d, normalize): bytes per block}, read once (a pybind call)


class _CudaMgvq(_CpuMgvq):
    """The CUDA kernel (csrc/mgvq_lookup/mgvq_lookup_cuda.cu)."""

    name = "cuda"

    def not_supported_reasons(self, z, codebook, normalize):
        reasons = compiled_reasons(z, "cuda")
        g, _, d = codebook.shape
        if g > 65535:
            reasons.append(f"G = {g} groups > 65535 (the CUDA kernel's grid)")
        if d > 200:
            reasons.append(f"d = {d} > 200 (the CUDA kernel's limit)")
        elif z.device.type == "cuda" and torch.cuda.is_available():
            need = _CUDA_SMEM.get((d, bool(normalize)))
            optin = smem_optin(z.device)
            if need is not None and optin is not None and need > optin:
                reasons.append(
                    f"d = {d} needs {need} B of shared memory per block, this GPU offers {optin} B"
                )
        return reasons


class _TritonMgvq(Backend):
    """The Triton kernel (htc_kernels/triton/mgvq_lookup.py), op htc::mgvq_lookup_triton."""

    name = "triton"

    def not_supported_reasons(self, z, codebook, normalize):
        reasons = triton_reasons(z.device)
        if not reasons and _triton_mgvq() is None:
            reasons.append(f"the Triton kernel failed to register ({_TRITON_MGVQ_ERROR})")
        if z.dtype not in KERNEL_DTYPES:
            reasons.append(f"dtype {z.dtype} not supported (float32, bfloat16, float16)")
        if z.device.type == "cuda" and codebook.shape[0] > 65535:
            reasons.append(f"G = {codebook.shape[0]} groups > 65535 (the kernel's grid)")
        return reasons

    def __call__(self, z, codebook, normalize):
        codes, indices = torch.ops.htc.mgvq_lookup_triton(z, codebook, normalize)
        # The kernel marks token-groups with no code -1; raise like the CPU kernel (one host sync; a
        # graph break under torch.compile: a silent -1 would be a wrong result).
        if indices.numel() and bool((indices < 0).any()):
            _raise_no_code(z, codebook, indices)
        return codes, indices


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
        Ties (equal computed scores) break to the lowest index; distances equal in exact arithmetic
        can round apart (DESIGN §6 asks index equality only beyond rounding). Gradient:
        straight-through from codes to z (through z's normalisation when ``normalize``) and to the
        selected codebook rows (index-add, through the codes' normalisation); the kernels through
        torch.autograd only (forward-mode AD and torch.func.grad/jvp: the reference, which ``"auto"``
        then takes).

    No overflow for any finite input: squares are formed after an exact power-of-two scaling (per
    vector for cosine, per group of codes and its tokens for squared L2).

    Errors (ValueError; on a GPU this costs one host sync per call): NaN/Inf in z and a group whose
    codes are all NaN/Inf (every backend); squared L2 on the kernels (cpu/triton/cuda), a token whose
    magnitude against its group's codes would overflow float32 even after scaling (|z| ~ 1e37 / d
    times the codes'), with the fix in the message (the reference scales per token and group, and
    computes it). A codebook row holding NaN/Inf is never selected.
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
    use_op = compiled_runs_on(z.device) and z.dtype in KERNEL_DTYPES
    # A double backward (create_graph=True runs this with grad enabled) needs a differentiable
    # backward: the op has no autograd of its own, so the PyTorch one computes it.
    if use_op and not torch.is_grad_enabled():
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
