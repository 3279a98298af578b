"""Dense-mask PyTorch references: the oracles every kernel is tested against (DESIGN.md §6)."""

from __future__ import annotations

import math

import torch

from htc_kernels.layout import StarLayout, star_mask


def star_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: StarLayout,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention under the star mask, materialising the ``[B, Hq, Sq, Skv]`` scores.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (any floating dtype; computed in that dtype) ->
    ``[B, Hq, Sq, D]``. PAD query rows are exactly zero with zero gradient. Differentiable.
    """
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    mask = star_mask(layout, sq).expand(b, -1, -1)[:, None]  # [B, 1, Sq, Skv]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    row_ok = mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~row_ok, 0.0), dim=-1)
    out = torch.matmul(probs, v)
    return torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))
