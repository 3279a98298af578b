"""star_attention layouts and peers shared by the CPU suite (``test_bench_star_attention.py``) and the
GPU benchmark (``gpu_star_attention.py``).

Each peer builder does the per-layout preprocessing once (dense masks, block masks, biases) and returns
``fn(q, k, v) -> out`` for ``[B, H, S, D]`` tensors, as a model would build its mask once per batch for
all layers. A builder that cannot run here raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

import htc_kernels as hk

T, V, C, P = (int(x) for x in (hk.TokenKind.TEXT, hk.TokenKind.VISUAL, hk.TokenKind.VOCO, hk.TokenKind.PAD))


class Skip(Exception):
    """A provider cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


def llava_kinds(scale: int = 1) -> list[int]:
    """DESIGN §7's LLaVA shape: 35 text + 580 visual + 1 voco + 64 text (= 680), each part x scale."""
    return [T] * (35 * scale) + [V] * (580 * scale) + [C] * scale + [T] * (64 * scale)


def image_kinds(
    n_images: int, prefix: int = 35, visual: int = 580, voco: int = 1, between: int = 8, suffix: int = 64
) -> list[int]:
    """A text prefix, then ``n_images`` x (visual run, voco run, ``between`` text), then a text suffix.
    With the defaults, 4 images: S = 2455; 16 images with ``between=13``: S = 9603."""
    kinds = [T] * prefix
    for _ in range(n_images):
        kinds += [V] * visual + [C] * voco + [T] * between
    return kinds + [T] * suffix


# --------------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------------


def dense_mask(layout: hk.StarLayout) -> torch.Tensor:
    """``[B or 1, 1, S, S]`` bool, True = may attend (broadcasts over heads), on the layout's device."""
    return hk.star_mask(layout)[:, None]


def hf_additive_mask(layout: hk.StarLayout, q_len: int | None = None) -> torch.Tensor:
    """``[B, 1, Sq, S]`` float32, 0 where allowed and finfo.min elsewhere: the 4-D mask a transformers
    model takes as ``attention_mask`` (VoCo-LLaMA's way); Sq = the last ``q_len`` queries."""
    allowed = hk.star_mask(layout, q_len)[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def sdpa_dense_mask(layout: hk.StarLayout):
    """``F.scaled_dot_product_attention`` with the dense bool mask (what HF and VoCo-LLaMA do)."""
    mask = dense_mask(layout)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return fn


def sdpa_causal_flash(layout: hk.StarLayout):
    """Dense causal attention through SDPA's flash backend: a lower bound for *different* work (every
    causal pair instead of the star mask's few). Its reference is plain causal attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fn


def star_mask_mod(layout: hk.StarLayout):
    """FlexAttention ``mask_mod`` computing DESIGN §2's rule from the layout's kinds and groups.

    A batch-1 layout broadcasts over the batch: the mask_mod then ignores the batch index (FlexAttention
    calls it with the real batch index, which would read past a ``[1, S]`` tensor)."""
    if layout.topology != "star":
        raise NotImplementedError("star_mask_mod implements the star topology only")
    kd, gr = layout.kinds.long(), layout.groups.long()
    if layout.batch_size == 1:
        kd, gr = kd[0], gr[0]

        def at(t, b, i):
            return t[i]
    else:

        def at(t, b, i):
            return t[b, i]

    def mask_mod(b, h, qi, kj):
        kq, kk = at(kd, b, qi), at(kd, b, kj)
        ok = (kj <= qi) & (kq != P) & (kk != P)
        visual_ok = torch.where(kq == V, kj == qi, (kq == C) & (at(gr, b, qi) == at(gr, b, kj)))
        return ok & ((kk != V) | visual_ok)

    return mask_mod


def flex_block_mask(layout: hk.StarLayout):
    """The BlockMask of :func:`star_mask_mod` on the layout's device (FlexAttention's default 128-blocks;
    batch and heads broadcast when the layout has batch 1)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = layout.batch_size, layout.seq_len
    return create_block_mask(star_mask_mod(layout), b if b > 1 else None, None, s, s, device=layout.device)


def flex_provider(block_mask, compiled):
    """``fn(q, k, v)`` calling ``compiled`` (``torch.compile(flex_attention)``) with ``block_mask``.

    Every new shape/dtype is a new compilation: dynamo's default recompile limit (8) would be hit over a
    suite and flex would silently fall back to its unfused eager path, so the limit is raised, and a
    fallback is turned into an error (checked on the first call for each dtype)."""
    from torch.nn.attention import flex_attention as flex_mod

    cfg = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, limit):
            setattr(cfg, limit, max(getattr(cfg, limit), 64))
            break
    shown = getattr(flex_mod, "_WARNINGS_SHOWN", set())  # warn-once registry (absent in older torch)
    checked: set[torch.dtype] = set()

    def fn(q, k, v):
        if q.dtype in checked:
            return compiled(q, k, v, block_mask=block_mask)
        shown.discard("flex_attention_performance")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="flex_attention called without torch.compile")
            out = compiled(q, k, v, block_mask=block_mask)
        checked.add(q.dtype)
        return out

    return fn


@functools.cache
def flex_backward_reason(device_type: str = "cpu") -> str | None:
    """Why FlexAttention cannot do a backward on ``device_type`` (probed on tiny inputs), or None."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 16, 16, device=device_type, requires_grad=True)
    try:
        flex_attention(q, q.detach(), q.detach()).sum().backward()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def xformers_bias(layout: hk.StarLayout, batch: int, heads: int, dtype: torch.dtype):
    """xformers ``memory_efficient_attention`` with the mask as an additive tensor ``attn_bias`` (its
    general, slow path: 0 where allowed, -inf elsewhere), inputs transposed to xformers' [B, S, H, D].

    The bias is stored once per layout sample and expanded (stride 0) over batch and heads; its rows are
    padded to a multiple of 8 elements and sliced back, the alignment xformers asks for."""
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001 (ImportError, or a broken build raising anything)
        raise Skip(f"xformers is not installed/importable ({type(exc).__name__}: {exc})") from None
    if layout.device.type != "cuda":
        raise Skip("xformers memory_efficient_attention needs CUDA tensors")
    mask = dense_mask(layout)  # [Lb, 1, S, S]
    s = layout.seq_len
    storage = torch.zeros(*mask.shape[:3], -(-s // 8) * 8, dtype=dtype, device=layout.device)
    bias = storage[..., :s].masked_fill_(~mask, float("-inf")).expand(batch, heads, s, s)

    def fn(q, k, v):
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)

    return fn


def eager_attention(layout: hk.StarLayout, head_dim: int):
    """matmul + masked_fill(finfo.min) + fp32 softmax + matmul (HF "eager"); PAD rows zeroed after."""
    masked_out = ~dense_mask(layout)
    keep = (layout.kinds != P)[:, None, :, None]
    scale = 1.0 / math.sqrt(head_dim)

    def fn(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(masked_out, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v) * keep

    return fn
