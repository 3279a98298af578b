"""Custom-op wrappers: fake implementations, autograd and backend dispatch (DESIGN.md §3–4).

The C++ schemas live in csrc/ops.cpp; this module adds ``register_fake`` and ``register_autograd``
once per op and implements the public functions on top of ``torch.ops.htc``.
"""

from __future__ import annotations

import math

import torch

from htc_kernels import _ext
from htc_kernels.backends import Backend, select, triton_reasons
from htc_kernels.layout import StarLayout
from htc_kernels.reference import star_attention_reference

# ----------------------------------------------------------------------------------------------------
# star_attention
# ----------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EXT_CUDA = bool(_ext.build_info().get("cuda"))  # read once: pybind calls break torch.compile


def _compiled_reasons(t: torch.Tensor, device_type: str) -> list[str]:
    """Why the compiled (C++/CUDA) kernel for `device_type` cannot take tensor `t` ([] if it can)."""
    reasons = []
    if not _ext.available():
        reasons.append(f"the compiled extension is not loaded ({_ext.LOAD_ERROR})")
    elif device_type == "cuda" and not _EXT_CUDA:
        reasons.append("the extension was built without CUDA")
    if t.device.type != device_type:
        where = "the CPU" if device_type == "cpu" else "a CUDA device"
        reasons.append(f"tensors are on {t.device}, not {where}")
    if t.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {t.dtype} not supported (float32, bfloat16, float16)")
    return reasons


def _check_star_inputs(q, k, v, layout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"star_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"star_attention: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"star_attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"star_attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"star_attention: devices differ: q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"star_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    b, hq, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"star_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim"
        )
    hkv, skv = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"star_attention: query heads {hq} not divisible by key/value heads {hkv}")
    if not isinstance(layout, StarLayout):
        raise ValueError(f"star_attention: layout must be a StarLayout, got {type(layout).__name__}")
    if layout.seq_len != skv:
        raise ValueError(
            f"star_attention: layout describes {layout.seq_len} keys but k has Skv={skv} "
            "(kinds must cover the whole key sequence)"
        )
    if layout.batch_size not in (1, b):
        raise ValueError(f"star_attention: layout batch {layout.batch_size} != B={b} (or 1)")
    if not 1 <= sq <= skv:
        raise ValueError(
            f"star_attention: need 1 <= Sq ({sq}) <= Skv ({skv}) (decode is bottom-right aligned)"
        )
    if layout.device != q.device:
        raise ValueError(
            f"star_attention: layout on {layout.device} but q on {q.device}; use layout.to(q.device)"
        )


class _ReferenceStar(Backend):
    name = "reference"

    def not_supported_reasons(self, q, k, v, layout):
        return []

    def __call__(self, q, k, v, layout, scale):
        return star_attention_reference(q, k, v, layout, scale)


class _CpuStar(Backend):
    """The C++ kernel (csrc/star_attention/star_attention_cpu.cpp)."""

    name = "cpu"
    block_q = 64
    block_k = 64

    def not_supported_reasons(self, q, k, v, layout):
        return _compiled_reasons(q, "cpu")

    def __call__(self, q, k, v, layout, scale):
        plan = layout.plan(q.shape[2], self.block_q, self.block_k)
        out, _ = torch.ops.htc.star_attention(
            q,
            k,
            v,
            layout.kinds,
            layout.groups,
            plan,
            self.block_q,
            self.block_k,
            layout.topology_id,
            scale,
        )
        return out


class _NotYet(Backend):
    """A backend named in the API whose kernel for this family has not landed yet."""

    def __init__(self, name: str, issue: str):
        self.name = name
        self._issue = issue

    def not_supported_reasons(self, q, k, v, layout):
        reasons = [f"the {self.name} star_attention kernel is not implemented yet ({self._issue})"]
        if self.name == "triton":
            reasons += triton_reasons(q.device)
        return reasons


_STAR_BACKENDS = (
    _CpuStar(),
    _ReferenceStar(),
    _NotYet("triton", "GPU backends"),
    _NotYet("cuda", "GPU backends"),
)


def star_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: StarLayout,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention under the star-graph mask of ``layout`` (DESIGN.md §2).

    Args:
        q: ``[B, Hq, Sq, D]`` float32 / bfloat16 / float16 (any strides).
        k, v: ``[B, Hkv, Skv, D]``, same dtype and device; ``Hq % Hkv == 0`` (GQA, K/V not expanded).
        layout: :class:`StarLayout` of the ``Skv`` keys (batch ``B`` or 1), on q's device. Queries are
            the last ``Sq`` key positions (``Sq < Skv``: decode, bottom-right aligned).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto" | "reference" | "cpu" | "triton" | "cuda"``.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype; PAD query rows are zero. Differentiable in q, k, v.
    """
    _check_star_inputs(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    be = select("star_attention", _STAR_BACKENDS, backend, q, k, v, layout)
    return be(q, k, v, layout, scale)


def _register_star_ops() -> None:
    @torch.library.register_fake("htc::star_plan")
    def _(kinds, groups, q_len, block_q, block_k, topology):
        b, s = kinds.shape
        return kinds.new_empty((b, -(-q_len // block_q), -(-s // block_k)), dtype=torch.uint8)

    @torch.library.register_fake("htc::star_attention")
    def _(q, k, v, kinds, groups, plan, block_q, block_k, topology, scale):
        b, h, s, _d = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return out, q.new_empty((b, h, s), dtype=torch.float32)

    @torch.library.register_fake("htc::star_attention_backward")
    def _(dout, q, k, v, out, lse, grad_lse, kinds, groups, plan, block_q, block_k, topology, scale):
        return (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device),
        )

    def setup_context(ctx, inputs, output):
        q, k, v, kinds, groups, plan, block_q, block_k, topology, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kinds, groups, plan)
        ctx.args = (block_q, block_k, topology, scale)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kinds, groups, plan = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        # The kernel forms delta_i = dO_i . O_i - grad_lse_i itself (FlashAttention-2, plus the gradient
        # reaching lse directly), so both outputs are differentiated exactly without an extra pass.
        dq, dk, dv = torch.ops.htc.star_attention_backward(
            grad_out, q, k, v, out, lse, grad_lse, kinds, groups, plan, *ctx.args
        )
        return dq, dk, dv, None, None, None, None, None, None, None

    torch.library.register_autograd("htc::star_attention", backward, setup_context=setup_context)


if _ext.available():
    _register_star_ops()


# --------------------------------------------------------------------------------------------------
# mgvq_lookup (issue 4)
# --------------------------------------------------------------------------------------------------

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
        return _compiled_reasons(z, "cpu")

    def __call__(self, z, codebook, normalize):
        return torch.ops.htc.mgvq_lookup(z, codebook, normalize)


class _CudaMgvq(_CpuMgvq):
    """The CUDA kernel (csrc/mgvq_lookup/mgvq_lookup_cuda.cu)."""

    name = "cuda"

    def not_supported_reasons(self, z, codebook, normalize):
        return _compiled_reasons(z, "cuda")


class _TritonMgvq(Backend):
    """The Triton kernel (htc_kernels/triton/mgvq_lookup.py), op htc::mgvq_lookup_triton."""

    name = "triton"

    def not_supported_reasons(self, z, codebook, normalize):
        reasons = triton_reasons(z.device)
        if not reasons and _triton_mgvq() is None:
            reasons.append(f"the Triton kernel failed to register ({_TRITON_MGVQ_ERROR})")
        if z.dtype not in _KERNEL_DTYPES:
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
        and (z.device.type == "cpu" or (z.device.type == "cuda" and _EXT_CUDA))
        and z.dtype in _KERNEL_DTYPES
    )
    if use_op:
        grad_z, grad_cb = torch.ops.htc.mgvq_lookup_backward(grad_codes, z, codebook, indices, ctx.normalize)
    else:
        grad_z, grad_cb = mgvq_lookup_backward_reference(grad_codes, z, codebook, indices, ctx.normalize)
    return grad_z, grad_cb, None


def _register_mgvq_ops() -> None:
    @torch.library.register_fake("htc::mgvq_lookup")
    def _(z, codebook, normalize):
        return torch.empty_like(z), z.new_empty(z.shape[:-1], dtype=torch.int64)

    @torch.library.register_fake("htc::mgvq_lookup_backward")
    def _(grad_codes, z, codebook, indices, normalize):
        return torch.empty_like(z), torch.empty_like(codebook)

    torch.library.register_autograd("htc::mgvq_lookup", _mgvq_backward, setup_context=_mgvq_setup_context)


if _ext.available():
    _register_mgvq_ops()
