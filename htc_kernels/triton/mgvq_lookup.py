"""Triton kernel for the MGVQ grouped nearest-code lookup (DESIGN.md §3–4).

One program per (block of ``BLOCK_N`` tokens, group): the token block is normalised once, then the
group's codebook is streamed in ``BLOCK_K`` tiles; each tile's scores ``[BLOCK_N, BLOCK_K]`` live
only in registers and update a running (best score, lowest best index) per token. No N x K buffer.
The selected code is gathered and written in the same program. Offsets are int64.

Score convention as csrc/mgvq_lookup/mgvq_math.h: cosine ``<z/|z|, c/|c|>``; squared L2
``<2z, c> - |c|^2``; larger wins; ties -> lowest index; NaN/-inf never win; a token-group where no
code wins gets index -1 and NaN codes (non-finite z).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mgvq_lookup_kernel(
    z_ptr,  # [N, G, D] contiguous, any float dtype
    cb_ptr,  # [G, K, D] fp32: unit codes (cosine) or raw codes (squared L2)
    cbsq_ptr,  # [G, K] fp32: |c|^2 (squared L2 only)
    codes_ptr,  # [N, G, D] fp32 out
    idx_ptr,  # [N, G] int64 out
    N,
    G,
    K,
    D,
    NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    z_off = (offs_n[:, None] * G + g) * D + offs_d[None, :]
    z = tl.load(z_ptr + z_off, mask=nd_mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        nrm = tl.sqrt(tl.sum(z * z, axis=1))
        z = z / tl.maximum(nrm, 1e-12)[:, None]
    else:
        z = z * 2.0
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_N], -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        c_off = (g * K + offs_k[:, None].to(tl.int64)) * D + offs_d[None, :]
        c = tl.load(cb_ptr + c_off, mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.sum(z[:, None, :] * c[None, :, :], axis=2)  # [BLOCK_N, BLOCK_K]
        if not NORMALIZE:
            csq = tl.load(cbsq_ptr + g * K + offs_k, mask=k_mask, other=0.0)
            s = s - csq[None, :]
        s = tl.where(k_mask[None, :] & (s == s), s, float("-inf"))
        m = tl.max(s, axis=1)
        cand = tl.where(s == m[:, None], offs_k[None, :], 2147483647)
        tile_idx = tl.min(cand, axis=1)
        upd = m > best
        best = tl.where(upd, m, best)
        best_idx = tl.where(upd, tile_idx, best_idx)
    tl.store(idx_ptr + offs_n * G + g, best_idx.to(tl.int64), mask=n_mask)
    valid = best_idx >= 0
    row = (g * K + tl.maximum(best_idx, 0).to(tl.int64)) * D
    code = tl.load(cb_ptr + row[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
    code = tl.where(valid[:, None], code, float("nan"))
    tl.store(codes_ptr + z_off, code, mask=nd_mask)


def tile_sizes(d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D) for head dim ``d``: the score tile BLOCK_N x BLOCK_K x BLOCK_D is
    bounded (16384 elements) so registers do not spill for d up to 32."""
    block_d = triton.next_power_of_2(max(d, 1))
    block_n = 64
    block_k = max(16, min(128, 16384 // (block_n * block_d)))
    return block_n, block_k, block_d


@torch.library.triton_op("htc::mgvq_lookup_triton", mutates_args=())
def mgvq_lookup_triton(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """z ``[..., G, d]``, codebook ``[G, K, d]`` -> (codes ``[..., G, d]`` (z's dtype), indices)."""
    G, K, d = codebook.shape
    zc = z.contiguous()
    n = zc.numel() // (G * d)
    cbf = codebook.float()
    if normalize:
        cbf = torch.nn.functional.normalize(cbf, dim=-1)
    cbf = cbf.contiguous()
    cbsq = (cbf * cbf).sum(-1).contiguous()
    codes = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    indices = torch.empty(z.shape[:-1], dtype=torch.int64, device=z.device)
    block_n, block_k, block_d = tile_sizes(d)
    if n > 0:
        grid = (triton.cdiv(n, block_n), G)
        torch.library.wrap_triton(_mgvq_lookup_kernel)[grid](
            zc,
            cbf,
            cbsq,
            codes,
            indices,
            n,
            G,
            K,
            d,
            NORMALIZE=normalize,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
    return codes.to(z.dtype), indices


@mgvq_lookup_triton.register_fake
def _(z, codebook, normalize):
    # Explicit fake: under TRITON_INTERPRET=1 the traced body would interpret on FakeTensors.
    # Contiguous outputs, as the kernel writes them (not empty_like: z may be a transposed view).
    return z.new_empty(z.shape), z.new_empty(z.shape[:-1], dtype=torch.int64)
