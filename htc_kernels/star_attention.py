"""star_attention: the public function, its backends, and op registration (fake, autograd).

The C++ schemas live in csrc/ops.cpp; this module adds ``register_fake`` and ``register_autograd``
once per op (DESIGN.md §3–4).
"""

from __future__ import annotations

import torch

from htc_kernels import _ext
from htc_kernels.backends import KERNEL_DTYPES, Backend, compiled_reasons, select, smem_optin, triton_reasons
from htc_kernels.layout import StarLayout, _cache_hit
from htc_kernels.reference import check_scale, check_softcap, check_star_inputs, star_attention_reference


class _ReferenceStar(Backend):
    name = "reference"
    any_autodiff = True

    def not_supported_reasons(self, q, k, v, layout, softcap):
        return []

    def __call__(self, q, k, v, layout, scale, softcap):
        return star_attention_reference(q, k, v, layout, scale, softcap)


class _CpuStar(Backend):
    """The C++ kernel (csrc/star_attention/star_attention_cpu.cpp)."""

    name = "cpu"
    block_q = 64
    block_k = 64

    def not_supported_reasons(self, q, k, v, layout, softcap):
        return compiled_reasons(q, "cpu")

    def __call__(self, q, k, v, layout, scale, softcap):
        plan = layout.plan(q.shape[2], self.block_q, self.block_k)
        out, _ = torch.ops.htc.star_attention(
            q,
            k,
            v,
            layout._kinds,
            layout._groups,
            plan,
            self.block_q,
            self.block_k,
            layout.topology_id,
            scale,
            _op_softcap(softcap),
        )
        return out


class _TritonStar(Backend):
    """The Triton kernels (htc_kernels/triton/star_attention.py), ops htc::star_attention_triton and
    htc::star_attention_triton_backward: CUDA devices, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    max_head_dim = 256  # the kernels keep [tile, D] operands and accumulators in registers

    def not_supported_reasons(self, q, k, v, layout, softcap):
        reasons = triton_reasons(q.device)
        if not reasons and _triton_star() is None:
            reasons.append(f"the Triton kernel failed to load ({_TRITON_STAR_ERROR})")
        if q.dtype not in KERNEL_DTYPES:
            reasons.append(f"dtype {q.dtype} not supported (float32, bfloat16, float16)")
        d = q.shape[-1]
        if not 1 <= d <= self.max_head_dim:
            reasons.append(f"head dim {d} not supported (1..{self.max_head_dim})")
        if k.shape[2] >= 2**31:
            reasons.append(f"Skv = {k.shape[2]} positions do not fit the kernels' int32 positions")
        if q.device.type == "cuda" and not reasons:
            index = q.device.index if q.device.index is not None else torch.cuda.current_device()
            major, minor = _triton_star().cuda_capability(index)
            if major < 8:
                reasons.append(f"the Triton kernel needs compute capability >= 8.0, got {major}.{minor}")
        return reasons

    def __call__(self, q, k, v, layout, scale, softcap):
        mod = _triton_star()
        cfg = mod.tile_config(q.shape[-1], q.dtype, q.device, q.shape[2])
        # The TEXT/VOCO key panel when the layout calls for it (>= 2 images in a sample; StarLayout).
        panel = layout.key_panel(cfg.block_k) if layout.uses_key_panel else None
        lists = _triton_tile_lists(layout, q.shape[2], cfg.block_q, cfg.block_k, panel is not None)
        out, _ = torch.ops.htc.star_attention_triton(
            q,
            k,
            v,
            layout._kinds,
            layout._groups,
            *lists,
            cfg.block_q,
            cfg.block_k,
            layout.topology_id,
            scale,
            _op_softcap(softcap),
            panel,
        )
        return out


# The CUDA kernels' head dims and key-tile sizes (csrc/star_attention/star_attention_kernel.cuh:
# supported_head_dim, fwd_block_k; the op refuses plans built with other block sizes).
_CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)


def _cuda_block_k(dtype: torch.dtype, head_dim: int) -> int:
    if dtype == torch.float32:
        return 16  # three bf16 terms per operand: small key tiles keep the kernel within 255 registers
    return 64 if head_dim <= 128 else 32


class _CudaStar(Backend):
    """The CUDA C++ kernel (csrc/star_attention/star_attention_cuda.cu): mma.sync tensor cores
    (fp32 as three bf16 terms), sm_80+, head dims 64/80/96/128/256; block_q 64, block_k by dtype
    and head dim."""

    name = "cuda"
    block_q = 64

    def not_supported_reasons(self, q, k, v, layout, softcap):
        reasons = compiled_reasons(q, "cuda")
        d = q.shape[-1]
        if d not in _CUDA_HEAD_DIMS:
            dims = ", ".join(map(str, _CUDA_HEAD_DIMS))
            reasons.append(f"head dim {d} not supported by the CUDA kernel ({dims})")
        if q.device.type == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(q.device)
            if major < 8:
                reasons.append(
                    f"GPU compute capability {major}.{minor} < 8.0 (the kernel needs sm_80+ tensor cores)"
                )
            need = _CUDA_SMEM.get((_CUDA_ELT.get(q.dtype), d, int(softcap is not None)))
            training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            reasons += _smem_reasons(need, training, smem_optin(q.device))
        return reasons

    def __call__(self, q, k, v, layout, scale, softcap):
        block_k = _cuda_block_k(q.dtype, q.shape[-1])
        # The TEXT/VOCO key panel when the layout calls for it (>= 2 images in a sample; StarLayout).
        panel = layout.key_panel(block_k) if layout.uses_key_panel else None
        plan = layout.plan(q.shape[2], self.block_q, block_k, panel=panel is not None)
        out, _ = torch.ops.htc.star_attention(
            q,
            k,
            v,
            layout._kinds,
            layout._groups,
            plan,
            self.block_q,
            block_k,
            layout.topology_id,
            scale,
            _op_softcap(softcap),
            panel,
        )
        return out


# Shared memory per block of the CUDA kernels (forward, dQ, dK/dV) by (dtype, D, softcap): 99 KB parts
# (sm_86/89/120) cannot run some (bf16 D=128's dQ needs 105 KB), so the choice is made before the
# forward, not by a refusal in the middle of a training step's backward. Read once (a pybind call).
_CUDA_SMEM = _ext.cuda_smem()["star"]
_CUDA_ELT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _smem_reasons(need: tuple[int, int, int] | None, training: bool, optin: int | None) -> list[str]:
    """Why the CUDA kernels of one build (``need``: bytes for forward, dQ, dK/dV) cannot run on a GPU
    offering ``optin`` bytes per block; the backward's count when inputs require grad."""
    if need is None or optin is None:
        return []
    kernels = zip(("forward", "dQ", "dK/dV"), need if training else need[:1])
    over = [f"{name} {size} B" for name, size in kernels if size > optin]
    if not over:
        return []
    used = ", ".join(over)
    return [f"the CUDA kernels need more shared memory per block ({used}) than this GPU offers ({optin} B)"]


_TRITON_STAR = None
_TRITON_STAR_ERROR: str | None = None


def _triton_star():
    """The Triton kernels' module, imported on first use (its import registers the ops and their
    autograd; importing triton and the op machinery costs seconds, so not at ``import htc_kernels``);
    None if that fails."""
    global _TRITON_STAR, _TRITON_STAR_ERROR
    if _TRITON_STAR is None and _TRITON_STAR_ERROR is None:
        try:
            from htc_kernels.triton import star_attention as mod

            _TRITON_STAR = mod
        except Exception as exc:  # noqa: BLE001 (report the reason through not_supported_reasons)
            _TRITON_STAR_ERROR = f"{type(exc).__name__}: {exc}"
    return _TRITON_STAR


def _triton_tile_lists(layout: StarLayout, q_len: int, block_q: int, block_k: int, panel: bool):
    """The Triton kernels' tile lists of ``layout.plan(q_len, block_q, block_k, panel)``, built once per
    layout and arguments (like the plan itself): no per-call work but a dict lookup."""
    cache = getattr(layout, "_triton_tile_lists", None)
    if cache is None:
        cache = {}
        layout._triton_tile_lists = cache
    key = (q_len, block_q, block_k, panel)
    lists = cache.get(key)
    if lists is None or not _cache_hit(lists[0]):  # built under inference_mode, called for training
        lists = _triton_star().tile_lists(layout.plan(q_len, block_q, block_k, panel=panel))
        cache[key] = lists
    return lists


# "auto" takes the first backend that can run. CPU tensors: the C++ kernel. CUDA tensors: the CUDA C++
# kernel, then Triton (head dims the CUDA kernel is not built for), then the dense reference. Why CUDA
# first: measured on an H100 (sm_90, bf16, scripts/gpu_check.sh, 2026-11-22,
# benchmarks/results/gpu-nvidia-h100-80gb-hbm3.md) it was 1.7x faster than Triton in the LLaVA-shape
# forward at B=16, 2.3x in forward+backward and 1.5x at 16 images. sm_80 has not been measured; the
# same order is assumed there (both kernels use mma-class tensor cores without Hopper-only paths).
# The Triton kernels were rewritten after that measurement (2026-11-23: pipelined, spill-free; never
# timed): the next GPU run re-measures both before this order changes.
_STAR_CPU_ORDER = (_CpuStar(), _ReferenceStar(), _TritonStar(), _CudaStar())
_STAR_GPU_ORDER = (_CudaStar(), _TritonStar(), _ReferenceStar(), _CpuStar())


def _op_softcap(softcap: float | None) -> float:
    """The ops' softcap argument: 0.0 means no capping."""
    return 0.0 if softcap is None else softcap


def star_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: StarLayout,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention under the star-graph mask of ``layout`` (DESIGN.md §2).

    Args:
        q: ``[B, Hq, Sq, D]`` float32 / bfloat16 / float16 (any strides).
        k, v: ``[B, Hkv, Skv, D]``, same dtype and device; ``Hq % Hkv == 0`` (GQA, K/V not expanded).
        layout: :class:`StarLayout` of the ``Skv`` keys (batch ``B`` or 1), on q's device. Queries are
            the last ``Sq`` key positions (``Sq < Skv``: decode, bottom-right aligned).
        scale: softmax scale, default ``1/sqrt(D)``: scores ``s_ij = scale * q_i . k_j``.
        softcap: logit soft-capping (Gemma2 / PaliGemma2 ``attn_logit_softcapping``): a finite
            float ``c > 0`` replaces each score by ``c * tanh(s_ij / c)`` before the mask and softmax,
            in the forward and the gradients; ``None`` (default): no capping. Anything else (0,
            negative, NaN, inf, a non-number) raises ValueError.
        backend: ``"auto" | "reference" | "cpu" | "triton" | "cuda"``.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype; PAD query rows are zero. Differentiable in q, k, v: the kernels
        through torch.autograd (reverse mode); forward-mode AD and torch.func.grad/jvp need the
        reference (``"auto"`` takes it then; an explicit kernel backend refuses).
    """
    check_star_inputs(q, k, v, layout)
    try:
        softcap = check_softcap(softcap)
        scale = check_scale(scale, q.shape[-1])
    except ValueError as exc:
        raise ValueError(f"star_attention: {exc}") from None
    order = _STAR_GPU_ORDER if q.device.type == "cuda" else _STAR_CPU_ORDER
    be = select("star_attention", order, backend, q, k, v, layout, softcap)
    return be(q, k, v, layout, scale, softcap)


def _register_star_ops() -> None:
    @torch.library.register_fake("htc::star_plan")
    def _(kinds, groups, q_len, block_q, block_k, topology, panel=None):
        b, s = kinds.shape
        n_panel = 0 if panel is None else panel.shape[1] // block_k
        return kinds.new_empty((b, -(-q_len // block_q), n_panel + -(-s // block_k)), dtype=torch.uint8)

    @torch.library.register_fake("htc::star_attention")
    def _(q, k, v, kinds, groups, plan, block_q, block_k, topology, scale, softcap, panel=None):
        b, h, s, _d = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return out, q.new_empty((b, h, s), dtype=torch.float32)

    @torch.library.register_fake("htc::star_attention_backward")
    def _(dout, q, k, v, out, lse, grad_lse, kinds, groups, plan, *args):  # args: block_q .. panel
        return (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device),
        )

    def setup_context(ctx, inputs, output):
        q, k, v, kinds, groups, plan, block_q, block_k, topology, scale, softcap, panel = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kinds, groups, plan, panel)
        ctx.args = (block_q, block_k, topology, scale, softcap)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kinds, groups, plan, panel = ctx.saved_tensors
        # create_graph=True runs this with grad enabled: the kernels' gradients are not themselves
        # differentiable (PyTorch would only warn and give a zero second derivative).
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (grad_out, grad_lse, q, k, v)
        ):
            raise RuntimeError(
                "star_attention: double backward (create_graph=True) is not supported by the cpu/cuda "
                "kernels, whose gradients are first-order only; use backend='reference' for higher-order "
                "gradients"
            )
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        # The kernel forms delta_i = dO_i . O_i - grad_lse_i itself (FlashAttention-2, plus the gradient
        # reaching lse directly), so both outputs are differentiated exactly without an extra pass.
        dq, dk, dv = torch.ops.htc.star_attention_backward(
            grad_out, q, k, v, out, lse, grad_lse, kinds, groups, plan, *ctx.args, panel
        )
        return dq, dk, dv, *([None] * 9)

    torch.library.register_autograd("htc::star_attention", backward, setup_context=setup_context)


if _ext.available():
    _register_star_ops()
