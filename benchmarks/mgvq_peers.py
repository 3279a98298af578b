"""Quantize steps to compare with ``MGVQTokenizer.quantize_latent`` (CPU and GPU MGVQ encoder benchmarks).

Each takes the latent ``[B, C, h, w]`` of an ``htc_model.mgvq.MGVQTokenizer`` and returns
``(quant [B, C, h, w], indices [B, h*w, G])`` like ``quantize_latent``, from the tokenizer's codebook:

    htc           MGVQTokenizer.quantize_latent: GroupedQuantizer / hk.mgvq_lookup (fused, no N x K)
    mgvq_sort     MGVQ's official math: per group, distance rows -|z|^2 - |e|^2 + 2 z.e, full sort
    cdist_argmin  torch.cdist per group ([G, N, K] distances), argmin
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PROVIDERS = ["htc", "mgvq_sort", "cdist_argmin"]


class Quantized(NamedTuple):
    quant: torch.Tensor  # [B, C, h, w]
    indices: torch.Tensor  # [B, h*w, G]


class SortQuantizer(nn.Module):
    """MGVQ's official quantize math (``VectorQuantizer.forward`` in eval): for each group, unit
    latents and unit codes, distance rows ``-|z|^2 - |e|^2 + 2 z.e`` over the group's K codes, a
    full ascending sort of every row, the last index."""

    def __init__(self, tokenizer):
        super().__init__()
        q = tokenizer.quantize
        self.weight, self.groups, self.dim, self.k = q.embedding.weight, q.groups, q.dim, q.codes_per_group

    def forward(self, latent: torch.Tensor) -> Quantized:
        b, _, h, w = latent.shape
        quants, indices = [], []
        for g in range(self.groups):
            z = latent[:, g * self.dim : (g + 1) * self.dim].permute(0, 2, 3, 1).contiguous()
            z = F.normalize(z, dim=-1)
            zf = z.view(-1, self.dim)
            emb = F.normalize(self.weight[g * self.k : (g + 1) * self.k], dim=-1)
            dot = torch.einsum("bd,dn->bn", zf, emb.t())
            d = -zf.pow(2).sum(1, keepdim=True) - emb.pow(2).sum(1) + 2 * dot
            idx = d.sort(dim=1)[1][:, -1]
            zq = emb[idx].view(z.shape)
            quants.append((z + (zq - z).detach()).permute(0, 3, 1, 2))
            indices.append(idx)
        return Quantized(torch.cat(quants, 1), torch.stack(indices, -1).view(b, h * w, self.groups))


class CdistQuantizer(SortQuantizer):
    """``torch.cdist`` between the unit latents and unit codes of every group (``[G, N, K]``), argmin."""

    def forward(self, latent: torch.Tensor) -> Quantized:
        b, c, h, w = latent.shape
        z = latent.permute(0, 2, 3, 1).reshape(-1, self.groups, self.dim).transpose(0, 1)  # [G, N, d]
        z = F.normalize(z, dim=-1).contiguous()
        emb = F.normalize(self.weight.view(self.groups, self.k, self.dim), dim=-1)
        idx = torch.cdist(z, emb).argmin(-1)  # [G, N]
        codes = emb[torch.arange(self.groups).unsqueeze(1), idx]  # [G, N, d]
        quant = codes.transpose(0, 1).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return Quantized(quant, idx.t().reshape(b, h * w, self.groups))


def quantize_step(tokenizer, provider: str):
    if provider == "htc":
        return tokenizer.quantize_latent
    return {"mgvq_sort": SortQuantizer, "cdist_argmin": CdistQuantizer}[provider](tokenizer)
