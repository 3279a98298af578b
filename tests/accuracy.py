"""What a star_attention backward is judged against (shared by test_star_attention.py and test_fuzz.py)."""

from __future__ import annotations

import math

import torch

import htc_kernels as hk


def rel(a, b, floor=1e-30):
    """||a - b|| / max(||b||, floor)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def stored_output_grads(q, k, v, layout, scale, softcap, out, g):
    """float64 ``(dq, dk, dv)`` that the FlashAttention-2 backward computes exactly when the forward
    output reaches it as stored: ``out`` ``[B, Hq, Sq, D]`` (in its dtype, e.g. bf16), ``g`` the
    output gradient, q ``[B, Hq, Sq, D]`` and k/v ``[B, Hkv, Skv, D]`` clean (finite) inputs.

    Every backend takes ``delta_i = g_i . out_i`` from the stored output (as FlashAttention and
    PyTorch's flash/efficient kernels do), so its dS = p (dP - delta) carries the output's rounding:
    the exact gradient plus ``-p_ij (delta_i - delta_exact_i)``, the gradient of
    ``-(delta_i - delta_exact_i) * lse_i``. Where ``dP - delta`` cancels (few keys, one query row)
    that term exceeds the error of the same math in bf16, so the exact gradient is the wrong target."""
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    g64 = g.detach().double()
    o64 = hk.star_attention_reference(q64, k64, v64, layout, scale, softcap)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    scores = q64 @ k64.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = hk.star_mask(layout, q.shape[2]).expand(q.shape[0], -1, -1)[:, None]  # [B, 1, Sq, Skv]
    row_ok = mask.any(-1)  # [B, 1, Sq]: False on PAD rows, whose lse is never used
    lse = torch.where(mask, scores, float("-inf")).where(row_ok[..., None], 0.0).logsumexp(-1)
    d_delta = (g64 * (out.detach().double() - o64.detach())).sum(-1).where(row_ok, 0.0)
    loss = (g64 * o64).sum() - (d_delta * lse).sum()
    return torch.autograd.grad(loss, (q64, k64, v64))
