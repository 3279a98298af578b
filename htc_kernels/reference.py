"""Dense-mask PyTorch references: the oracles every kernel is tested against (DESIGN.md §6)."""

from __future__ import annotations

import math
import numbers

import torch

from htc_kernels.layout import StarLayout, star_mask

STAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_star_inputs(q, k, v, layout) -> None:
    """ValueError unless q/k/v and the layout make a call of star_attention (or its reference): dense
    4-D tensors of one dtype and device, GQA heads, a layout of the keys on q's device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"star_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_nested:
            raise ValueError(
                f"star_attention: {name} must be a dense (strided) tensor, got layout {t.layout}"
                + (" (nested)" if t.is_nested else "")
                + "; pad the sequences and describe the padding with PAD kinds"
            )
        if t.dim() != 4:
            raise ValueError(f"star_attention: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in STAR_DTYPES:
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
    layout.check_unmodified()  # every call: an edited layout.kinds would otherwise change nothing, silently


def star_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: StarLayout,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention under the star mask, materialising the ``[B, Hq, Sq, Skv]`` scores.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (float32/bfloat16/float16/float64; computed in that
    dtype, autocast or not; checked as star_attention checks them) -> ``[B, Hq, Sq, D]``. PAD query
    rows are exactly zero with zero gradient. Differentiable (forward and reverse mode, any order).

    Scores are ``s = scale * q.k`` (scale default ``1/sqrt(D)``); with ``softcap=c`` (a finite float
    > 0; None: no capping) each becomes ``c * tanh(s / c)`` before the mask and softmax (Gemma2's
    ``attn_logit_softcapping``): ``out_i = sum_j softmax_j(c tanh(s_ij / c) | allowed) v_j``.

    Masked means never read (DESIGN.md §2): a query's output and every gradient are independent of
    the keys and values it may not attend (NaN/Inf included), of q at PAD rows, and of the output
    gradient at PAD rows. Dense products would multiply masked zeros by NaN, so PAD query rows enter
    them as zeros and non-finite K/V rows as zeros; the exact contribution of such a key is added back
    column by column, read only at the query rows the mask allows (rare: only poisoned inputs).
    """
    check_star_inputs(q, k, v, layout)
    # Autocast off: the oracle computes in q's dtype, as the kernels do (their ops are not autocast).
    with torch.autocast(q.device.type, enabled=False):
        return _dense_star_attention(q, k, v, layout, scale, softcap)


def _dense_star_attention(q, k, v, layout, scale, softcap):
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    softcap = check_softcap(softcap)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    mask = star_mask(layout, sq).expand(b, -1, -1)[:, None]  # [B, 1, Sq, Skv]
    row_ok = mask.any(-1, keepdim=True)  # [B, 1, Sq, 1]: False exactly on PAD rows
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    q = torch.where(row_ok, q, zero)
    bad_k = ~torch.isfinite(k).all(-1)  # [B, Hq, Skv]
    bad_v = ~torch.isfinite(v).all(-1)
    k_fin = torch.where(bad_k[..., None], zero, k)
    v_fin = torch.where(bad_v[..., None], zero, v)
    scores = torch.matmul(q, k_fin.transpose(-1, -2)) * scale
    rows = torch.arange(sq, device=q.device)
    for n, h, j in bad_k.nonzero().tolist():  # exact scores of a non-finite key, allowed rows only
        k_sel = torch.where(mask[n, 0, :, j, None], k[n, h, j], zero)  # [Sq, D]
        col = (q[n, h] * k_sel).sum(-1) * scale
        scores = scores.index_put((_idx(n, q), _idx(h, q), rows, _idx(j, q)), col)
    if softcap is not None:  # before the mask (masked scores are replaced by select either way)
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(mask, scores, torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
    # Masked probabilities are 0 by select: a row that attends a non-finite score is NaN throughout.
    probs = torch.where(mask, torch.softmax(torch.where(row_ok, scores, zero), dim=-1), zero)
    out = torch.matmul(probs, v_fin)
    for n, h, j in bad_v.nonzero().tolist():  # p_ij * v_j of a non-finite value row, allowed rows only
        v_sel = torch.where(mask[n, 0, :, j, None], v[n, h, j], zero)  # [Sq, D]
        out = out.index_put(
            (_idx(n, q), _idx(h, q)), (probs[n, h, :, j, None] * v_sel)[None], accumulate=True
        )
    return torch.where(row_ok, out, zero)


def check_softcap(softcap) -> float | None:
    """``softcap`` as a float cap (None: no capping); ValueError for anything but None or a finite
    number > 0 (0, negatives, NaN, inf, bool and non-numbers would silently mean something else)."""
    if softcap is None:
        return None
    ok = isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
    if ok:
        softcap = float(softcap)
        ok = math.isfinite(softcap) and softcap >= _F32_TINY and softcap <= _F32_MAX
    if not ok:
        raise ValueError(
            f"softcap must be None (no capping) or a finite number > 0 (scores become "
            f"softcap * tanh(score / softcap); within float32's normal range), got {softcap!r}"
        )
    return softcap


def check_scale(scale, head_dim: int) -> float:
    """``scale`` as a float (None: ``1 / sqrt(head_dim)``); ValueError for anything but None or a
    finite real number within float32's range (a tensor's gradient would be dropped: the kernels take
    a float; bool and str would silently mean something else)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    ok = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
    if ok:
        scale = float(scale)
        ok = math.isfinite(scale) and abs(scale) <= _F32_MAX
    if not ok:
        raise ValueError(
            f"scale must be None or a finite real number (within float32's range), got {scale!r} "
            f"({type(scale).__name__}); pass float(scale) (a learnable scale: star_attention_reference "
            "differentiates through it)"
        )
    return scale


_F32_TINY = torch.finfo(torch.float32).tiny
_F32_MAX = torch.finfo(torch.float32).max


def _idx(i: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([i], device=like.device)
