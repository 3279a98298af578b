"""Triton kernel for the MGVQ grouped nearest-code lookup (DESIGN.md §3–4).

One program per (block of ``BLOCK_N`` tokens, group): the token block is normalised once, then the
group's codebook is streamed in ``BLOCK_K`` tiles; each tile's scores ``[BLOCK_N, BLOCK_K]`` live
only in registers and update a running (best score, lowest best index) per token. No N x K buffer.
The selected code is gathered and written in the same program. Offsets are int64.

Score convention as csrc/mgvq_lookup/mgvq_math.h: cosine ``<z/|z|, c/|c|>``; squared L2
``<2z, c> - |c|^2``; larger wins; ties -> lowest index; NaN/-inf never win; a token-group where no
code wins gets index -1 and NaN codes (non-finite z, a group of NaN/Inf codes, or a squared-L2 token
too large for float32 against its group's codes); the caller raises on it (mgvq_lookup.py). No
overflow for finite inputs: squares are formed after an exact power-of-two scaling (per token for
cosine, by the group's scale for squared L2), as in mgvq_math.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from htc_kernels.mgvq_lookup import _unit, l2_group_scales, l2_token_limit


@triton.jit
def _pow2_scale(m):
    """Power of two s with m * s in [1, 2) (m >= 0; 1 for 0), exponent clamped to [-126, 126]: the
    exponent bits of m, as mgvq_math.h pow2_scale."""
    e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(e, 1), 253)
    s = ((254 - e) << 23).to(tl.float32, bitcast=True)
    return tl.where(m == 0.0, 1.0, s)


@triton.jit
def _mgvq_lookup_kernel(
    z_ptr,  # [N, G, D] contiguous, any float dtype
    cb_ptr,  # [G, K, D] fp32: unit codes (cosine) or codes times their group's scale (squared L2)
    cbsq_ptr,  # [G, K] fp32: |scaled c|^2 (squared L2 only)
    gscale_ptr,  # [G] fp32: each group's scale (squared L2 only)
    src_ptr,  # [G, K, D] fp32: the codes returned (unit codes, or the raw codes for squared L2)
    codes_ptr,  # [N, G, D] fp32 out
    idx_ptr,  # [N, G] int64 out
    N,
    G,
    K,
    D,
    limit,  # squared L2: largest |z_j * scale| (l2_token_limit)
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
        # |z| = |sc z| / sc without overflow (sc: power of two); v / max(|v|, eps) as F.normalize.
        # Not named s: the tile loop's scores are s, and a name bound before a loop is loop-carried
        # (its shape may not change inside: the compiler refuses, the interpreter does not check).
        sc = _pow2_scale(tl.max(tl.abs(z), axis=1))
        zs = z * sc[:, None]
        n_s = tl.sqrt(tl.sum(zs * zs, axis=1))
        clamped = ~(n_s > 1e-12 * sc)
        # (z_j s) / (s |z|): one rounding per element, as the reference's _unit (z_j * (s / n_s)
        # would round twice)
        z = tl.where(clamped[:, None], z / 1e-12, zs / tl.where(clamped, 1.0, n_s)[:, None])
        token_ok = n_mask
    else:
        z = z * tl.load(gscale_ptr + g)
        # Finite and within the overflow-free range (NaN compares false); else no code wins.
        token_ok = tl.min(tl.where(tl.abs(z) <= limit, 1, 0), axis=1) == 1
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
    best_idx = tl.where(token_ok, best_idx, -1)
    tl.store(idx_ptr + offs_n * G + g, best_idx.to(tl.int64), mask=n_mask)
    valid = best_idx >= 0
    row = (g * K + tl.maximum(best_idx, 0).to(tl.int64)) * D
    code = tl.load(src_ptr + row[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
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
    raw = codebook.float().contiguous()
    if normalize:
        cbf = _unit(raw).contiguous()
        gscale = torch.ones(G, dtype=torch.float32, device=z.device)
        src = cbf
    else:
        gscale = l2_group_scales(raw).contiguous()
        cbf = (raw * gscale[:, None, None]).contiguous()
        src = raw
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
            gscale,
            src,
            codes,
            indices,
            n,
            G,
            K,
            d,
            l2_token_limit(d),
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
