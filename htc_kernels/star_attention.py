"""star_attention: the public function, its backends, and op registration (fake, autograd).

The C++ schemas live in csrc/ops.cpp; this module adds ``register_fake`` and ``register_autograd``
once per op (DESIGN.md §3–4).
"""

from __future__ import annotations

import math

import torch

from htc_kernels import _ext
from htc_kernels.backends import Backend, compiled_reasons, select, triton_reasons
from htc_kernels.layout import StarLayout
from htc_kernels.reference import star_attention_reference

_STAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_star_inputs(q, k, v, layout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"star_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"star_attention: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in _STAR_DTYPES:
            raise ValueError(
                f"star_attention: {name} has dtype {t.dtype}; supported: float32, bfloat16, float16 "
                "(and float64 on backend='reference'); cast q, k, v first (e.g. q.to(torch.bfloat16))"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"star_attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"star_attention: devices differ: q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"star_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    b, hq, sq, d = q.shape
    if d == 0:
        raise ValueError(f"star_attention: head dim D must be >= 1, got q {tuple(q.shape)}")
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
        return compiled_reasons(q, "cpu")

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
