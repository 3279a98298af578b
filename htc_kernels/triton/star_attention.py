"""Triton star attention, forward and backward (DESIGN.md §2, §4; issue 8).

Data flow: layout -> block plan (uint8 ``[Bp, n_qt, n_kt]`` of TileKind) -> *tile lists* -> kernels.
The tile lists (:func:`tile_lists`) are the plan compacted per row: for query tile ``qt`` the non-SKIP
key tiles in ascending order, each entry ``kt << 3 | kind`` (int32), and the rows' loop steps as an
exclusive prefix (a row's visits, 1 for a row without any); the backward's key-side lists are the
same compaction of the plan's transpose, with counts. Kernels walk only these entries, so
a SKIP tile is never loaded, never tested, never looped over (the LLaVA-shape plan is ~90% SKIP).

Key panel (``StarLayout.key_panel``; taken when a sample holds >= 2 images, ``layout.uses_key_panel``):
the plan's key tiles are then in a *mapped* order, ``NP`` panel tiles holding every TEXT/VOCO key of
the sample in position order (empty slots -1 at the end), then the sequence's tiles with those keys as
holes (PAD: never read; their panel slot computes them). A visual query tile then visits a few dense
panel tiles instead of one mostly masked tile per earlier image (<voco> and the text after it): 16
images, 64x64 tiles, 1798 visits -> 697. Kernels gather K/V rows by position (:func:`_key_tile`),
CAUSAL compares positions, a DIAG tile is always a sequence tile (a TEXT/VOCO row's own key there is a
hole), and dK/dV rows are stored from each key's one slot: still one writer per row, no atomics.

Every visited tile is one ``tl.dot`` pair (two for dQ and dK/dV) with the mask applied by select:
  FULL    only the causal/PAD-row compare.
  CAUSAL  the same with ``j <= i``.
  MASKED  the normative rule evaluated per element from the tile's kinds/groups (:func:`_allowed`).
  DIAG    the same rule (visual self-attention: the diagonal). Tensor-core work the CUDA kernel does
          row-wise, but here a second, row-wise loop meant q in registers, a branch around loads and
          spills; a DIAG tile loads the same K/V rows either way.
The visiting loop has no branch around its loads, so Triton software-pipelines them (``num_stages``).
What the kernels compile to on sm_80/sm_90 (pipelining, registers, spills) is reported without a GPU
by :mod:`htc_kernels.triton._codegen`.

Forward: FlashAttention-2 online softmax in base 2 with fp32 statistics and accumulator; writes out
(q's dtype) and lse (float32, natural log, -inf on rows with nothing to attend: PAD rows output 0,
live rows whose every allowed score is -inf NaN). Its work items are the query tiles of
every (batch, query head), tile index fastest; a program takes one (``TileConfig.persist`` 0: q
loaded once, before the loop) or, persistent (``persist`` programs per SM, :func:`_work_split`), a
run of consecutive ones with near-equal visit counts (split on the device by
:func:`_star_split_kernel`) in one flat loop over all their visits, q and the rows' kinds loaded
per visit at the loop's top level so the pipeline fetches the next tile's q and K/V while this one
computes (the tile table's note says why). Backward, deterministic (no atomics, a fixed visiting
order): a row kernel forms delta = rowsum(dO * O) - grad_lse; a dQ kernel walks the row lists with
the forward's work items; a dK/dV kernel walks, per (key tile, batch x kv head) item (one program
each or persistent runs, as in the forward), the key tile's column list and, for each visited query
tile, every query head of its GQA group, so each dK/dV row has exactly one writer.

"Masked means never read" (DESIGN.md §2): scores are masked with ``tl.where`` (a select, so a NaN
score at a masked pair disappears); q/k/v/dO rows at PAD positions are never loaded (masked loads
give exact zeros); a V (forward), K (dQ), or Q/dO (dK/dV) row that some rows of a tile attend and
others may not is the 0 * NaN hazard of ``tl.dot``. Each visiting kernel runs twice (the note above
``_star_fwd_kernel``): a plain pass that flags the programs whose output came out NaN/Inf, then, for
those only, an exact pass where :func:`_dot_kept` feeds the dot finite values and adds the
non-finite entries' products back for the pairs that are allowed.

Soft-capping (``softcap`` c > 0, the constexpr SOFTCAP): every score becomes ``c * tanh(s / c)``
before the mask; the backward recomputes ``t = tanh(s / c)`` and scales dS by ``1 - t^2``. SOFTCAP
False compiles the uncapped kernels unchanged.

Offsets are int64 (strides may exceed 2**31 elements); any strides, including a non-unit last one.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from htc_kernels.layout import TileKind, TokenKind

# TokenKind / TileKind values as compile-time constants of the kernels.
_TEXT = tl.constexpr(int(TokenKind.TEXT))
_VISUAL = tl.constexpr(int(TokenKind.VISUAL))
_VOCO = tl.constexpr(int(TokenKind.VOCO))
_PAD = tl.constexpr(int(TokenKind.PAD))
_SKIP = tl.constexpr(int(TileKind.SKIP))
_DIAG = tl.constexpr(int(TileKind.DIAG))
_MASKED = tl.constexpr(int(TileKind.MASKED))
_LOG2E_C = tl.constexpr(1.4426950408889634)
_LN2_C = tl.constexpr(0.6931471805599453)
_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _allowed(pos_q, kind_q, grp_q, pos_k, kind_k, grp_k, tile_kind, topology):
    """Which (query, key) pairs of one tile may attend: bool, broadcast of the operands.

    pos/kind/grp are broadcastable ([M, 1] against [1, N] or the transpose). Rows past Sq and keys past
    Skv arrive with kind PAD. FULL and CAUSAL tiles need only causality (they hold no PAD key a live
    row could reach, and out-of-range keys lie past every live row); MASKED and DIAG tiles apply
    DESIGN.md §2 (in a DIAG tile that leaves the diagonal of the rows whose own key is there).
    """
    ok = (pos_k <= pos_q) & (kind_q != _PAD)
    if (tile_kind == _DIAG) | (tile_kind == _MASKED):
        same_group = grp_q == grp_k
        visual_ok = tl.where(topology == 0, pos_k == pos_q, same_group)  # star: self only; group: image
        vis = tl.where(kind_q == _VISUAL, visual_ok, (kind_q == _VOCO) & same_group)
        ok = ok & (kind_k != _PAD) & ((kind_k != _VISUAL) | vis)
    return ok


@triton.jit
def _key_tile(KINDS, GROUPS, PANEL, lay, pan, kt, NP, Skv, BLOCK_N: tl.constexpr):
    """Mapped key tile ``kt`` (module docstring, "key panel"): positions, kinds, groups ``[BLOCK_N]``
    int32 and ``own`` (bool: this slot is its key's one slot, so dK/dV rows are stored from here).
    Tiles ``kt < NP`` are panel tiles (positions from PANEL; empty slots -1 come back PAD); the rest
    are sequence tiles, where with a panel (NP > 0) the TEXT/VOCO keys are holes: PAD, never read
    (their panel slot computes them). Keys that are no key (empty slots, past Skv) get position
    INT32_MAX, past every query. Branch-free (masked loads, selects): the visiting loops call it at
    their top level, where Triton software-pipelines the K/V loads that depend on it."""
    idx = tl.arange(0, BLOCK_N)
    in_panel = kt < NP
    slot = tl.load(PANEL + pan + kt * BLOCK_N + idx, mask=in_panel & (idx < BLOCK_N), other=-1)
    pos = tl.where(in_panel, slot, (kt - NP) * BLOCK_N + idx)
    valid = (pos >= 0) & (pos < Skv)
    kind = tl.load(KINDS + lay + pos, mask=valid, other=_PAD).to(tl.int32)
    grp = tl.load(GROUPS + lay + pos, mask=valid, other=-1)
    hole = (NP > 0) & (kt >= NP) & ((kind == _TEXT) | (kind == _VOCO))
    own = valid & ~hole
    kind = tl.where(hole, _PAD, kind)
    pos = tl.where(valid, pos, 2147483647)
    return pos, kind, grp, own


@triton.jit
def _tanh(x):
    """tanh from exp (libdevice's is not available under TRITON_INTERPRET): ``(1 - e) / (1 + e)`` with
    ``e = exp(-2|x|)`` (never overflows; exactly +-1 at +-inf), and near 0, where ``1 - e`` cancels,
    the odd Taylor series to x^9 (relative error < 1e-8 for |x| < 1/4). About 3e-7 relative overall."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    poly = a * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    t = tl.where(a < 0.25, poly, t)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(s, softcap, inv_softcap):
    """Soft-capping of log2-domain scores ``s`` (natural score times log2(e)): returns the capped
    scores ``c tanh(s_nat / c)``, again in the log2 domain, and ``t = tanh(s_nat / c)`` (the backward's
    derivative is ``1 - t^2``). ``c * t`` is formed before the log2(e) factor, so no cap overflows."""
    t = _tanh(s * (_LN2_C * inv_softcap))
    return (softcap * t) * _LOG2E_C, t


@triton.jit
def _dot_kept(acc, a, b, keep, PREC: tl.constexpr):
    """``acc + a @ b`` with a ``[X, R]``, b ``[R, D]``, keep ``[X, R]`` bool (a is 0 where not keep).

    Equal to ``tl.dot`` when b is finite. A non-finite entry of b reaches exactly the rows x with
    ``keep[x, r]`` and no other: the dot sees b with its non-finite entries zeroed and, only when the
    tile holds one (a rare branch), the IEEE value of the kept non-finite products is added: for each
    (x, d), NaN if some kept product is NaN (a NaN, or a zero weight times an infinity) or infinities of
    both signs meet, else the infinity's sign. One accumulator counts them in fields of one number,
    ``(+inf products) + 256 (-inf products) + 65536 (NaN products)``, through 0/1 indicator dots whose
    operands are powers of two (exact in TF32, exact sums in fp32 for R <= 128): no loop, and no more
    live registers than the common path.
    """
    finite = tl.abs(b.to(tl.float32)) < float("inf")
    acc = tl.dot(a, tl.where(finite, b, tl.zeros_like(b)), acc, input_precision=PREC)
    if tl.sum(tl.where(finite, 0, 1)) > 0:
        bf = b.to(tl.float32)
        b_pos = (bf == float("inf")).to(tl.float32)
        b_neg = (bf == float("-inf")).to(tl.float32)
        af = a.to(tl.float32)
        code = tl.dot((keep & (af > 0)).to(tl.float32), b_pos + 256.0 * b_neg, input_precision="tf32")
        code = tl.dot((keep & (af < 0)).to(tl.float32), b_neg + 256.0 * b_pos, code, input_precision="tf32")
        code = tl.dot(keep.to(tl.float32), 65536.0 * (bf != bf).to(tl.float32), code, input_precision="tf32")
        code = tl.dot(
            (keep & (af == 0)).to(tl.float32), 65536.0 * (b_pos + b_neg), code, input_precision="tf32"
        )
        n_neg = tl.floor(code * (1.0 / 256.0))  # exact below 65536
        n_pos = code - 256.0 * n_neg
        fix = tl.where(n_pos > 0, float("inf"), 0.0)
        fix = tl.where(n_neg > 0, float("-inf"), fix)
        fix = tl.where((code >= 65536.0) | ((n_pos > 0) & (n_neg > 0)), float("nan"), fix)
        acc += fix
    return acc


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _nonfinite_rows(x, rows):
    """Does a row of ``x`` ``[M, N]`` selected by ``rows`` ``[M]`` hold NaN or +-Inf? (one value for the
    whole program)"""
    return tl.sum((rows[:, None] & ~(tl.abs(x) < float("inf"))).to(tl.int32)) > 0


# Each visiting kernel (forward, dQ, dK/dV) is launched twice, EXACT False, then True (the same source).
# EXACT False, the pass that does the work: the second product of a tile is a plain tl.dot, where a
# non-finite entry of its right factor (V; K for dQ; dO, Q for dK/dV) at a pair that some row may not
# attend poisons that row as 0 * Inf/NaN. Poison is NaN, and NaN stays to the end, so the program looks
# at its accumulator once and writes FLAGS[pid] = 1 if a row it stores holds NaN/Inf (poisoned, or
# legitimately non-finite), else 0. EXACT True: only the flagged programs run (the others load and
# store nothing) the pass again with _dot_kept (each non-finite entry reaches exactly the rows that may
# attend it), overwriting their outputs. The common pass thus keeps no mask and no copy of the right
# factor beyond its dot, and the rare path's registers are not charged to it.
#
# Every loop visits its list with no branch around its loads: Triton software-pipelines the loads of a
# loop's body (num_stages), not those under an `if`. So DIAG tiles are tensor-core tiles here, masked by
# the rule like MASKED ones (the row-wise DIAG path of the CUDA kernel kept a second loop, q in
# registers and spills).


@triton.jit
def _first_item(a, STEPS, ssb, mult, Bp, H, n_t, BP2: tl.constexpr, NT_P2: tl.constexpr):
    """The first work item whose first loop step is >= ``a`` (below the total), and that step. Items
    are (b, h, tile), tile fastest; steps of (b, h, tile): all of samples < b (every head), then heads
    < h of sample b, then mult * STEPS[b, tile] (the exclusive prefix; STEPS[b, n_t] is one head's
    total). int32: the host keeps the total below 2**31 (_work_split)."""
    if BP2 == 1:  # one layout for the batch: the same steps per (batch, head)
        per_head = tl.load(STEPS + n_t) * mult
        b = a // (H * per_head)
        before = b * H * per_head
    else:
        bb = tl.arange(0, BP2)
        tb = tl.load(STEPS + bb * ssb + n_t, mask=bb < Bp, other=0) * mult
        upto = tl.cumsum(tb, 0) * H  # steps of samples 0..b
        b = tl.sum(((upto <= a) & (bb < Bp)).to(tl.int32))
        before = tl.sum(tl.where(bb == b, upto - H * tb, 0))
        per_head = tl.sum(tl.where(bb == b, tb, 0))
    r = a - before
    h = r // per_head
    r = r - h * per_head
    row = STEPS + b * ssb
    tt = tl.arange(0, NT_P2)
    before_tile = tl.load(row + tt, mask=tt < n_t, other=0) * mult
    tile = tl.sum(((before_tile < r) & (tt < n_t)).to(tl.int32))  # n_t: the next head's first tile
    return (b * H + h) * n_t + tile, before + h * per_head + tl.load(row + tile) * mult


@triton.jit
def _program_items(STEPS, ssb, mult, B, Bp, H, n_t, BP2: tl.constexpr, NT_P2: tl.constexpr):
    """A persistent program's work: its first item and its number of loop steps. The programs split
    all steps (visits, at least one per item) into near-equal runs of whole items, in item order."""
    if BP2 == 1:
        total = B * H * tl.load(STEPS + n_t) * mult
    else:
        bb = tl.arange(0, BP2)
        total = H * mult * tl.sum(tl.load(STEPS + bb * ssb + n_t, mask=bb < Bp, other=0))
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    chunk = total // n_prog
    rem = total - chunk * n_prog
    a0 = pid * chunk + tl.minimum(pid, rem)  # run p: steps [a0, a1), no product beyond the total
    a1 = a0 + chunk + (pid < rem).to(tl.int32)
    item, first = _first_item(a0, STEPS, ssb, mult, Bp, H, n_t, BP2, NT_P2)
    _next, stop = _first_item(tl.minimum(a1, total - 1), STEPS, ssb, mult, Bp, H, n_t, BP2, NT_P2)
    return item, tl.where(a1 >= total, total, stop) - first


@triton.jit(do_not_specialize=("mult", "B", "Bp", "H", "n_t"))
def _star_split_kernel(STEPS, WORK, ssb, mult, B, Bp, H, n_t, BP2: tl.constexpr, NT_P2: tl.constexpr):
    """WORK[p] = (first item, loop steps) of persistent program p (grid: the programs of the forward,
    dQ or dK/dV launch that follows; items of the forward and dQ are query tiles of (batch, query
    head), mult 1; of dK/dV key tiles of (batch, kv head), mult the GQA group). Its own launch:
    computed in those kernels' prologue it cost them 20-30 registers in the loop (sm_90, ptxas), 255
    at D=128."""
    item, steps = _program_items(STEPS, ssb, mult, B, Bp, H, n_t, BP2, NT_P2)
    pid = tl.program_id(0)
    tl.store(WORK + 2 * pid, item)
    tl.store(WORK + 2 * pid + 1, steps)


@triton.jit
def _query_item(item, run, KINDS, GROUPS, STEPS, s_lay, ssb, Hq, Sq, Skv, BLOCK_M: tl.constexpr):
    """Work item ``item`` of the forward and dQ (query tile ``qt`` of batch ``b``, query head ``h``; tile
    index fastest, so consecutive items share a head's K/V in L2; one index, not a 2-D grid: CUDA caps
    grid.y at 65535, which B * H can exceed): b, h (int64), qt, its loop steps
    ``n`` (its visits; 1 for a tile without visits, all rows PAD, whose step only stores its zero
    rows), and its rows: index, in range, position, kind (PAD past Sq), group, live. ``run`` False: an
    item with no rows and no steps (nothing loaded beyond its steps)."""
    n_qt = tl.cdiv(Sq, BLOCK_M)
    qt = item % n_qt
    bh = item // n_qt
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    prefix = STEPS + b * ssb + qt
    n = tl.where(run, tl.load(prefix + 1) - tl.load(prefix), 0)
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = (rows < Sq) & run
    pos_q = rows + (Skv - Sq)
    kind_q = tl.load(KINDS + b * s_lay + pos_q, mask=row_in, other=_PAD).to(tl.int32)
    grp_q = tl.load(GROUPS + b * s_lay + pos_q, mask=row_in, other=-1)
    return b, h, qt, n, rows, row_in, pos_q, kind_q, grp_q, kind_q != _PAD


@triton.jit
def _row_tile(X, b, h, rows, live, sb, sh, ss, sd, D, BLOCK_D: tl.constexpr, F32_DOTS: tl.constexpr):
    """Rows ``rows`` of X[b, h] as a ``[BLOCK_M, BLOCK_D]`` tile; rows not ``live`` (PAD) are never
    read: zeros."""
    dd = tl.arange(0, BLOCK_D)
    ptrs = X + b * sb + h * sh + rows.to(tl.int64)[:, None] * ss + dd[None, :] * sd
    x = tl.load(ptrs, mask=live[:, None] & (dd < D)[None, :], other=0.0)
    return x.to(tl.float32) if F32_DOTS else x


@triton.jit
def _fwd_store(acc, l_i, m_i, live_q, O, LSE, b, h, rows, row_in, sob, soh, sos, sod, slb, slh, D,
               BLOCK_D: tl.constexpr):  # fmt: skip
    """Store one query tile's output (q's dtype) and lse (float32, natural log; PAD rows: 0 and -inf)
    from the online-softmax state; returns 1 (int32) if a live row holds NaN/Inf (the note above
    _star_fwd_kernel), else 0. A live row that attended nothing (l = 0: every allowed score was -inf,
    an attended key holding an infinity) outputs NaN, the reference's 0/0, not a PAD row's zeros."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], tl.where(live_q, float("nan"), 0.0)[:, None], acc / l_safe[:, None])
    dd = tl.arange(0, BLOCK_D)
    o_ptrs = O + b * sob + h * soh + rows.to(tl.int64)[:, None] * sos + dd[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_in[:, None] & (dd < D)[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2_C)
    tl.store(LSE + b * slb + h * slh + rows, lse, mask=row_in)
    return _nonfinite_rows(acc, live_q).to(tl.int32)


@triton.jit
def _dq_store(dq, scale, live_q, DQ, b, h, rows, row_in, sqgb, sqgh, sqgs, sqgd, D, BLOCK_D: tl.constexpr):
    """Store one query tile's dQ (times scale, in q's dtype); returns 1 (int32) if a live row holds
    NaN/Inf, else 0."""
    dd = tl.arange(0, BLOCK_D)
    dq_ptrs = DQ + b * sqgb + h * sqgh + rows.to(tl.int64)[:, None] * sqgs + dd[None, :] * sqgd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_in[:, None] & (dd < D)[None, :])
    return _nonfinite_rows(dq, live_q).to(tl.int32)


# do_not_specialize: sizes that change from call to call (every decode step) and the topology get no
# specialisation (Triton's "== 1" and "% 16 == 0" variants), so one compiled kernel serves them all;
# strides and D keep theirs (they decide vectorised loads).
# fmt: off
@triton.jit(do_not_specialize=("Hq", "Sq", "Skv", "topology", "NP"))
def _star_fwd_kernel(
    Q, K, V, O, LSE,  # q [B,Hq,Sq,D], k/v [B,Hkv,Skv,D] (any strides), out like q, lse [B,Hq,Sq] fp32
    KINDS, GROUPS,  # [Bp, Skv] int8 / int32
    PANEL,  # key panel [Bp, NP * BLOCK_N] int32 (read only when NP > 0)
    TILES,  # row lists [Bp, n_qt, n_kt] int32 (kt << 3 | kind, zeros after the row's visits)
    STEPS,  # [Bp, n_qt + 1] int32: per row, the exclusive prefix of its loop steps (tile_lists)
    FLAGS,  # int32 [grid]: "redo exactly", per program (the note above)
    WORK,  # int32 [grid, 2]: (first item, loop steps) per program when PERSIST (_star_split_kernel)
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos, sod,
    slb, slh,
    s_lay,  # batch stride of kinds/groups (0: one layout for the batch)
    s_pan, NP,  # PANEL batch stride, number of panel tiles (0: identity key order)
    stb, str_, ssb,  # TILES batch/row strides, STEPS batch stride (0 when shared by the batch)
    Hq, GROUP, Sq, Skv, D,
    qk_scale,  # softmax scale * log2(e)
    topology,  # 0 star, 1 group (runtime: one compiled kernel for both)
    softcap, inv_softcap,  # the cap c and 1/c (read only when SOFTCAP)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PERSIST: tl.constexpr,
    PREC: tl.constexpr, F32_DOTS: tl.constexpr, SOFTCAP: tl.constexpr, EXACT: tl.constexpr,
):
    # fmt: on
    pid = tl.program_id(0)
    # EXACT: only the programs the first launch flagged run; the others read nothing, store nothing.
    run = (tl.load(FLAGS + pid) != 0) if EXACT else True
    if PERSIST:  # a run of items: q and the rows are loaded per visit, in the loop (the note above)
        item = tl.load(WORK + 2 * pid)
        steps = tl.where(run, tl.load(WORK + 2 * pid + 1), 0)
    else:  # one item: q and the rows once, before the loop
        item = pid
        b, h, qt, n, rows, row_in, pos_q, kind_q, grp_q, live_q = _query_item(
            item, run, KINDS, GROUPS, STEPS, s_lay, ssb, Hq, Sq, Skv, BLOCK_M
        )
        q = _row_tile(Q, b, h, rows, live_q, sqb, sqh, sqs, sqd, D, BLOCK_D, F32_DOTS)
        steps = n
    dd = tl.arange(0, BLOCK_D)
    d_in = dd < D
    bad = 0
    t = 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # One flat loop over the visits of this program's items (visit t of `item`), every load at its top
    # level: with PERSIST the next item's q and first tiles load while this one finishes.
    for _step in range(steps):
        if PERSIST:
            b, h, qt, n, rows, row_in, pos_q, kind_q, grp_q, live_q = _query_item(
                item, True, KINDS, GROUPS, STEPS, s_lay, ssb, Hq, Sq, Skv, BLOCK_M
            )
            q = _row_tile(Q, b, h, rows, live_q, sqb, sqh, sqs, sqd, D, BLOCK_D, F32_DOTS)
        hk = h // GROUP
        e = tl.load(TILES + b * stb + qt * str_ + t)
        lay = b * s_lay
        cols, kind_k, grp_k, _own = _key_tile(KINDS, GROUPS, PANEL, lay, b * s_pan, e >> 3, NP, Skv, BLOCK_N)
        kind_k = tl.where((e & 7) != _SKIP, kind_k, _PAD)  # an item without visits: its step reads no key
        ld = (kind_k != _PAD)[:, None] & d_in[None, :]  # PAD keys are never read
        cols64 = cols.to(tl.int64)
        k = tl.load(K + b * skb + hk * skh + cols64[:, None] * sks + dd[None, :] * skd, mask=ld, other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols64[:, None] * svs + dd[None, :] * svd, mask=ld, other=0.0)
        k = k.to(tl.float32) if F32_DOTS else k
        v = v.to(tl.float32) if F32_DOTS else v
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if SOFTCAP:  # before the mask: masked scores are replaced below
            s, _t = _capped(s, softcap, inv_softcap)
        ok = _allowed(
            pos_q[:, None], kind_q[:, None], grp_q[:, None], cols[None, :], kind_k[None, :], grp_k[None, :],
            e & 7, topology,
        )  # fmt: skip
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - ref)
        p = tl.exp2(s - ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EXACT:
            acc = _dot_kept(acc * alpha[:, None], p.to(v.dtype), v, ok, PREC)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
        if PERSIST:
            if t + 1 >= n:  # the item's last visit: store its rows, start the next item
                bad |= _fwd_store(
                    acc, l_i, m_i, live_q, O, LSE, b, h, rows, row_in,
                    sob, soh, sos, sod, slb, slh, D, BLOCK_D,
                )  # fmt: skip
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                item += 1
                t = 0
            else:
                t += 1
        else:
            t += 1
    if not PERSIST:  # after the loop (in it, the store's registers would count against the loop's)
        bad = _fwd_store(
            acc, l_i, m_i, live_q, O, LSE, b, h, rows, row_in, sob, soh, sos, sod, slb, slh, D, BLOCK_D
        )
    if not EXACT:
        tl.store(FLAGS + pid, bad)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


# fmt: off
@triton.jit(do_not_specialize=("Hq", "Sq", "Skv"))
def _star_bwd_delta_kernel(
    O, DO, GLSE, DELTA, KINDS,  # out/dO [B,Hq,Sq,D], grad_lse [B,Hq,Sq] fp32, delta [B,Hq,Sq] fp32 out
    sob, soh, sos, sod,
    sdb, sdh, sds, sdd,
    sgb, sgh,
    s_lay,
    Hq, Sq, Skv, D,
    HAS_GLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # fmt: on
    """delta = rowsum(dO * O) - grad_lse on live rows, 0 on PAD rows (whose dO is never read)."""
    n_qt = tl.cdiv(Sq, BLOCK_M)
    qt = tl.program_id(0) % n_qt
    bh = tl.program_id(0) // n_qt
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Sq
    kind_q = tl.load(KINDS + b * s_lay + rows + (Skv - Sq), mask=row_in, other=_PAD)
    live = kind_q != _PAD
    dd = tl.arange(0, BLOCK_D)
    ld = live[:, None] & (dd < D)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + b * sob + h * soh + rows64[:, None] * sos + dd[None, :] * sod, mask=ld, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows64[:, None] * sds + dd[None, :] * sdd, mask=ld, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_GLSE:
        delta -= tl.load(GLSE + b * sgb + h * sgh + rows, mask=live, other=0.0)
    tl.store(DELTA + (b * Hq + h) * Sq + rows, tl.where(live, delta, 0.0), mask=row_in)


@triton.jit
def _dq_item(
    item, run, Q, DO, LSE, DELTA, KINDS, GROUPS, STEPS, sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, slb, slh,
    s_lay, ssb, Hq, Sq, Skv, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOTS: tl.constexpr,
):
    """:func:`_query_item` of dQ, plus the rows' q, dO, lse (log2 domain) and delta."""
    b, h, qt, n, rows, row_in, pos_q, kind_q, grp_q, live_q = _query_item(
        item, run, KINDS, GROUPS, STEPS, s_lay, ssb, Hq, Sq, Skv, BLOCK_M
    )
    q = _row_tile(Q, b, h, rows, live_q, sqb, sqh, sqs, sqd, D, BLOCK_D, F32_DOTS)
    do = _row_tile(DO, b, h, rows, live_q, sdb, sdh, sds, sdd, D, BLOCK_D, F32_DOTS)
    lse2 = tl.load(LSE + b * slb + h * slh + rows, mask=live_q, other=0.0) * _LOG2E_C
    delta = tl.load(DELTA + (b * Hq + h) * Sq + rows, mask=live_q, other=0.0)
    return b, h, qt, n, rows, row_in, pos_q, kind_q, grp_q, live_q, q, do, lse2, delta


# fmt: off
@triton.jit(do_not_specialize=("Hq", "Sq", "Skv", "topology", "NP"))
def _star_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    KINDS, GROUPS, PANEL, TILES, STEPS, FLAGS, WORK,  # as in _star_fwd_kernel
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdb, sdh, sds, sdd,
    slb, slh,
    sqgb, sqgh, sqgs, sqgd,  # dq
    s_lay, s_pan, NP, stb, str_, ssb,
    Hq, GROUP, Sq, Skv, D,
    qk_scale, scale,
    topology,  # 0 star, 1 group (runtime: one compiled kernel for both)
    softcap, inv_softcap,  # the cap c and 1/c (read only when SOFTCAP)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PERSIST: tl.constexpr,
    PREC: tl.constexpr, F32_DOTS: tl.constexpr, SOFTCAP: tl.constexpr, EXACT: tl.constexpr,
):
    # fmt: on
    """dQ of query tiles (work items as in the forward): dq_i = scale * sum_j dS_ij k_j over each
    tile's row list."""
    pid = tl.program_id(0)
    run = (tl.load(FLAGS + pid) != 0) if EXACT else True  # as in the forward
    if PERSIST:  # as in the forward: the rows' q, dO, lse, delta loaded per visit
        item = tl.load(WORK + 2 * pid)
        steps = tl.where(run, tl.load(WORK + 2 * pid + 1), 0)
    else:
        item = pid
        b, h, qt, n, rows, row_in, pos_q, kind_q, grp_q, live_q, q, do, lse2, delta = _dq_item(
            item, run, Q, DO, LSE, DELTA, KINDS, GROUPS, STEPS, sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd,
            slb, slh, s_lay, ssb, Hq, Sq, Skv, D, BLOCK_M, BLOCK_D, F32_DOTS,
        )  # fmt: skip
        steps = n
    dd = tl.arange(0, BLOCK_D)
    d_in = dd < D
    bad = 0
    t = 0
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for _step in range(steps):
        if PERSIST:
            b, h, qt, n, rows, row_in, pos_q, kind_q, grp_q, live_q, q, do, lse2, delta = _dq_item(
                item, True, Q, DO, LSE, DELTA, KINDS, GROUPS, STEPS, sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd,
                slb, slh, s_lay, ssb, Hq, Sq, Skv, D, BLOCK_M, BLOCK_D, F32_DOTS,
            )  # fmt: skip
        hk = h // GROUP
        e = tl.load(TILES + b * stb + qt * str_ + t)
        lay = b * s_lay
        cols, kind_k, grp_k, _own = _key_tile(KINDS, GROUPS, PANEL, lay, b * s_pan, e >> 3, NP, Skv, BLOCK_N)
        kind_k = tl.where((e & 7) != _SKIP, kind_k, _PAD)  # an item without visits: its step reads no key
        ld = (kind_k != _PAD)[:, None] & d_in[None, :]
        cols64 = cols.to(tl.int64)
        k = tl.load(K + b * skb + hk * skh + cols64[:, None] * sks + dd[None, :] * skd, mask=ld, other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols64[:, None] * svs + dd[None, :] * svd, mask=ld, other=0.0)
        k = k.to(tl.float32) if F32_DOTS else k
        v = v.to(tl.float32) if F32_DOTS else v
        ok = _allowed(
            pos_q[:, None], kind_q[:, None], grp_q[:, None], cols[None, :], kind_k[None, :], grp_k[None, :],
            e & 7, topology,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if SOFTCAP:
            s, t_cap = _capped(s, softcap, inv_softcap)
        p = tl.exp2(tl.where(ok, s - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # d capped / d score = 1 - t^2
            ds = ds * (1.0 - t_cap * t_cap)
        ds = tl.where(ok, ds, 0.0)  # a select: NaN at masked pairs (non-finite k or v) goes nowhere
        if EXACT:
            dq = _dot_kept(dq, ds.to(k.dtype), k, ok, PREC)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
        if PERSIST:
            if t + 1 >= n:  # the item's last visit: store its rows, start the next item
                bad |= _dq_store(
                    dq, scale, live_q, DQ, b, h, rows, row_in, sqgb, sqgh, sqgs, sqgd, D, BLOCK_D
                )
                dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                item += 1
                t = 0
            else:
                t += 1
        else:
            t += 1
    if not PERSIST:
        bad = _dq_store(dq, scale, live_q, DQ, b, h, rows, row_in, sqgb, sqgh, sqgs, sqgd, D, BLOCK_D)
    if not EXACT:
        tl.store(FLAGS + pid, bad)


@triton.jit
def _key_item(item, run, KINDS, GROUPS, PANEL, STEPS, s_lay, s_pan, ssb, NP, Hkv, GROUP, Skv,
              BLOCK_N: tl.constexpr):  # fmt: skip
    """Work item ``item`` of dK/dV (mapped key tile ``kt`` of batch ``b``, kv head ``hk``; tile index
    fastest): b, hk (int64), kt, its loop steps ``n`` (query tiles of its column list times the GQA
    group; a column without visits takes the group's steps, its rows never read), and its keys as
    :func:`_key_tile` gives them (``own``: the keys whose dK/dV rows it stores). ``run`` False: no
    steps, no keys."""
    n_kt = NP + tl.cdiv(Skv, BLOCK_N)
    kt = item % n_kt
    bh = item // n_kt
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    cols, kind_k, grp_k, own = _key_tile(KINDS, GROUPS, PANEL, b * s_lay, b * s_pan, kt, NP, Skv, BLOCK_N)
    prefix = STEPS + b * ssb + kt
    n = tl.where(run, (tl.load(prefix + 1) - tl.load(prefix)) * GROUP, 0)
    return b, hk, kt, n, cols, tl.where(run, kind_k, _PAD), grp_k, own & run


# fmt: off
@triton.jit(do_not_specialize=("Hq", "Hkv", "Sq", "Skv", "topology", "NP"))
def _star_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    KINDS, GROUPS, PANEL,
    TILES,  # column lists [Bp, n_kt, n_qt] int32 (qt << 3 | kind, zeros after the column's visits)
    STEPS,  # [Bp, n_kt + 1] int32: per column, the exclusive prefix of its visits (tile_lists)
    FLAGS, WORK,  # as in _star_fwd_kernel
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdb, sdh, sds, sdd,
    slb, slh,
    skgb, skgh, skgs, skgd,  # dk
    svgb, svgh, svgs, svgd,  # dv
    s_lay, s_pan, NP, stb, str_, ssb,
    Hq, Hkv, GROUP, Sq, Skv, D, qk_scale, scale,
    topology,  # 0 star, 1 group (runtime: one compiled kernel for both)
    softcap, inv_softcap,  # the cap c and 1/c (read only when SOFTCAP)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PERSIST: tl.constexpr,
    PREC: tl.constexpr, F32_DOTS: tl.constexpr, SOFTCAP: tl.constexpr, EXACT: tl.constexpr,
):
    # fmt: on
    """dK, dV of key tiles of kv heads: for each, the query tiles of its column list and for each of
    them every query head of the GQA group (one writer per dK/dV row: no atomics, fixed order). Work
    items and persistence as in the forward; k and v are loaded once per item (persist 0) or per
    visit."""
    pid = tl.program_id(0)
    q_off = Skv - Sq
    run = (tl.load(FLAGS + pid) != 0) if EXACT else True  # as in the forward
    if PERSIST:
        item = tl.load(WORK + 2 * pid)
        steps = tl.where(run, tl.load(WORK + 2 * pid + 1), 0)
    else:
        item = pid
        b, hk, kt, n, cols, kind_k, grp_k, own = _key_item(
            item, run, KINDS, GROUPS, PANEL, STEPS, s_lay, s_pan, ssb, NP, Hkv, GROUP, Skv, BLOCK_N
        )
        k = _row_tile(K, b, hk, cols, kind_k != _PAD, skb, skh, sks, skd, D, BLOCK_D, F32_DOTS)
        v = _row_tile(V, b, hk, cols, kind_k != _PAD, svb, svh, svs, svd, D, BLOCK_D, F32_DOTS)
        steps = n
    bad = 0
    it = 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # One flat loop over (query tile, head of the GQA group) visits: the loads stay at the loop's top
    # level; with PERSIST over the visits of a run of key tiles.
    for _step in range(steps):
        if PERSIST:
            b, hk, kt, n, cols, kind_k, grp_k, own = _key_item(
                item, True, KINDS, GROUPS, PANEL, STEPS, s_lay, s_pan, ssb, NP, Hkv, GROUP, Skv, BLOCK_N
            )
            k = _row_tile(K, b, hk, cols, kind_k != _PAD, skb, skh, sks, skd, D, BLOCK_D, F32_DOTS)
            v = _row_tile(V, b, hk, cols, kind_k != _PAD, svb, svh, svs, svd, D, BLOCK_D, F32_DOTS)
        t = it // GROUP
        h = hk * GROUP + (it - t * GROUP)
        e = tl.load(TILES + b * stb + kt * str_ + t)
        rows = (e >> 3) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = (rows < Sq) & ((e & 7) != _SKIP)  # a column without visits: its steps read no row
        pos_q = rows + q_off
        lay = b * s_lay
        kind_q = tl.load(KINDS + lay + pos_q, mask=row_in, other=_PAD).to(tl.int32)
        grp_q = tl.load(GROUPS + lay + pos_q, mask=row_in, other=-1)
        live_q = kind_q != _PAD
        okT = _allowed(
            pos_q[None, :], kind_q[None, :], grp_q[None, :], cols[:, None], kind_k[:, None], grp_k[:, None],
            e & 7, topology,
        )  # transposed orientation: [keys, rows]  # fmt: skip
        q = _row_tile(Q, b, h, rows, live_q, sqb, sqh, sqs, sqd, D, BLOCK_D, F32_DOTS)
        do = _row_tile(DO, b, h, rows, live_q, sdb, sdh, sds, sdd, D, BLOCK_D, F32_DOTS)
        lse2 = tl.load(LSE + b * slb + h * slh + rows, mask=live_q, other=0.0) * _LOG2E_C
        delta = tl.load(DELTA + (b * Hq + h) * Sq + rows, mask=live_q, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        if SOFTCAP:
            sT, tT = _capped(sT, softcap, inv_softcap)
        pT = tl.exp2(tl.where(okT, sT - lse2[None, :], float("-inf")))
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dsT = tl.where(okT, dsT, 0.0)
        if EXACT:
            dv = _dot_kept(dv, pT.to(do.dtype), do, okT, PREC)
            dk = _dot_kept(dk, dsT.to(q.dtype), q, okT, PREC)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
        if PERSIST:
            if it + 1 >= n:  # the item's last visit: store its rows, start the next item
                bad |= _dkdv_store(
                    dk, dv, scale, own, DK, DV, b, hk, cols, skgb, skgh, skgs, skgd, svgb, svgh, svgs, svgd,
                    D, BLOCK_D,
                )  # fmt: skip
                dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                item += 1
                it = 0
            else:
                it += 1
        else:
            it += 1
    if not PERSIST:
        bad = _dkdv_store(
            dk, dv, scale, own, DK, DV, b, hk, cols, skgb, skgh, skgs, skgd, svgb, svgh, svgs, svgd,
            D, BLOCK_D,
        )  # fmt: skip
    if not EXACT:
        tl.store(FLAGS + pid, bad)


@triton.jit
def _dkdv_store(dk, dv, scale, own, DK, DV, b, hk, cols, skgb, skgh, skgs, skgd, svgb, svgh, svgs, svgd, D,
                BLOCK_D: tl.constexpr):  # fmt: skip
    """Store one key tile's dK (times scale) and dV in k's dtype, the rows it ``own``s; returns 1
    (int32) if one of them holds NaN/Inf (PAD keys' zeros too: 0 * a NaN q row poisons them)."""
    dd = tl.arange(0, BLOCK_D)
    st = own[:, None] & (dd < D)[None, :]
    cols64 = cols.to(tl.int64)
    dk_ptrs = DK + b * skgb + hk * skgh + cols64[:, None] * skgs + dd[None, :] * skgd
    dv_ptrs = DV + b * svgb + hk * svgh + cols64[:, None] * svgs + dd[None, :] * svgd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=st)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=st)
    return (_nonfinite_rows(dk, own) | _nonfinite_rows(dv, own)).to(tl.int32)


# ------------------------------------------------------------------------------------------------
# tile lists and tile configurations (host side)
# ------------------------------------------------------------------------------------------------


def _compact(plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """plan ``[Bp, R, C]`` uint8 -> entries ``[Bp, R, C]`` int32 (``c << 3 | kind`` of the non-SKIP
    tiles of each row, ascending c, then zeros) and counts ``[Bp, R]`` int32. Torch ops only, no host
    sync (a stable sort moves the non-SKIP tiles to the front), so it runs where the plan lives."""
    kind = plan.to(torch.int32)
    col = torch.arange(plan.shape[-1], device=plan.device, dtype=torch.int32)
    live = kind != int(TileKind.SKIP)
    order = torch.sort((~live).to(torch.int32), dim=-1, stable=True).indices
    entries = torch.gather(col * 8 + kind, -1, order)
    counts = live.sum(-1, dtype=torch.int32)
    entries = torch.where(torch.gather(live, -1, order), entries, torch.zeros_like(entries))
    return entries.contiguous(), counts.contiguous()


def tile_lists(plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' sparse form of a block plan ``[Bp, n_qt, n_kt]``: row lists ``[Bp, n_qt, n_kt]``
    and row steps ``[Bp, n_qt + 1]`` (forward, dQ: the exclusive prefix over the rows of their visit
    counts, 1 for a row without visits; the last column is the sample's total per head), column lists
    ``[Bp, n_kt, n_qt]`` and column steps ``[Bp, n_kt + 1]`` (dK/dV, the same over the columns; a
    visit is then a query tile, times the GQA group's heads), all int32."""
    q_tiles, q_counts = _compact(plan)
    k_tiles, k_steps = _compact(plan.transpose(1, 2))
    return q_tiles, _steps(q_counts), k_tiles, _steps(k_steps)


def _steps(counts: torch.Tensor) -> torch.Tensor:
    """counts ``[Bp, R]`` -> the exclusive prefix ``[Bp, R + 1]`` of ``max(count, 1)`` (int32)."""
    return torch.nn.functional.pad(torch.cumsum(counts.clamp(min=1), -1, dtype=torch.int32), (1, 0))


class TileConfig(NamedTuple):  # a NamedTuple: torch.compile traces its construction without a break
    block_q: int  # BLOCK_M: query rows per tile (also the plan's block_q)
    block_k: int  # BLOCK_N: keys per tile (also the plan's block_k)
    warps_fwd: int
    warps_bwd: int
    stages: int
    # Programs per SM of the visiting kernels (_work_split); 0: one program per tile (its q, or k and v,
    # loaded once).
    persist: int = 0


# (max head dim, 16-bit config, fp32 config) per arch; D is padded to a power of two in registers.
# Why these numbers:
# - Square 64-tiles are the plan's granularity (as the CPU kernel's): at the LLaVA shape the visual
#   block's diagonal then falls in DIAG tiles, and 64 rows are enough for mma.sync / wgmma M. Larger
#   tiles would turn more DIAG/SKIP tiles into MASKED ones (the workload is memory-bound: work skipped
#   beats tensor-core efficiency).
# - Registers bound the tile: the dK/dV program keeps k, v and two fp32 accumulators of [BLOCK_N, D]
#   live while it streams q/dO tiles; at D=256 (or fp32, whose IEEE dots run on FMA units with fp32
#   operands) 64-row tiles spill more, so they shrink to 32.
# - Warps and stages from what the kernels compile to (htc_kernels/triton/_codegen.py, triton 3.8,
#   no GPU needed; table in benchmarks/results/triton-codegen.md): 2 stages software-pipeline the K/V
#   (q/dO) tile loads of the visiting loops. sm_90, 16-bit, D <= 128: every kernel pipelined and
#   spill-free (dK/dV at D=64 needs 8 warps: 4 spill). sm_80, D=128: the forward needs 8 warps to be
#   spill-free; its dK/dV keeps 8 B of spill and unpipelined q/dO loads at any warps/stages tried
#   with 2 stages (spill-free only without pipelining). D=256 and fp32 still spill (see the table).
# - 32-row tiles run with 2 warps: measured on an H100 (triton 3.6, 2026-11-22), fp32 32x32 tiles at
#   D=128 with 4 warps gave wrong outputs (rel. error ~1) and NaN gradients, with 2 warps exact
#   (≤ 6e-7); 4 and 8 warps at D=256 failed the same tests. A compiler issue we did not isolate.
# - persist: a program per tile lives for ~2-3 visits at the LLaVA shape (a visual query tile visits
#   2: the text-prefix tile and its DIAG tile; a visual key tile is visited by its DIAG and the <voco>
#   tile), so each pays its prologue's chain of dependent loads (counts, kinds, q, the list entry, key
#   kinds, K/V) with nothing in flight behind it; the H100 run of 2026-11-22 put the CUDA kernel (the
#   same one program per tile) at ~9 CTA-us per visit, ~10x its MMA time. Persistent programs (2 per
#   SM) walk one flat loop over the visits of a run of consecutive tiles, so the next tile's operands
#   load while this one computes. Costs: the per-tile operands through shared memory per visit (sm_90
#   D=128: forward 107 KB instead of 82 KB at 225 registers, still 2 per SM; dQ 148 KB; dK/dV 148 KB
#   but 193 registers instead of 255), K/V (dK/dV) re-read from L2 per visit, and a split kernel per
#   launch (runs of near-equal visits: equal tile counts left the busiest program 1.39x the mean at 16
#   images, the LLaVA shape 1.00x). Not on sm_80 (its forward spills 72 B, its dQ 1.2 KB that way),
#   fp32 or D=256. Never timed.
# None of these is a timing: the GPU check's tile sweep (benchmarks/gpu_star_attention.py,
# SWEEP_TILES, through _override_tiles) times neighbours at the LLaVA shape and 16 images: set this
# table from its "Triton tile sweep" tables.
_TILE_TABLE = {
    "sm90": (
        (64, TileConfig(64, 64, 4, 8, 2, 2), TileConfig(64, 64, 4, 4, 1)),
        (128, TileConfig(64, 64, 4, 8, 2, 2), TileConfig(32, 32, 2, 2, 1)),
        (256, TileConfig(32, 32, 2, 2, 2), TileConfig(32, 32, 2, 2, 1)),
    ),
    "sm80": (
        (64, TileConfig(64, 64, 4, 4, 2), TileConfig(64, 64, 4, 4, 1)),
        (128, TileConfig(64, 64, 8, 8, 2), TileConfig(32, 32, 2, 2, 1)),
        (256, TileConfig(32, 32, 2, 2, 1), TileConfig(32, 32, 2, 2, 1)),
    ),
}
# Under TRITON_INTERPRET=1 (CPU tests): small tiles, so small test shapes still span several tiles of
# every kind. Not 16: the interpreter's cost is per operation, whatever the tile size (32 halves the
# suite's time against 16). persist 3 (the interpreter counts as one SM): 3 programs, so the tests walk
# several query tiles per program (tests/test_star_attention.py also runs persist 0).
_INTERPRETER_TILES = TileConfig(32, 32, 1, 1, 1, 3)
# Decode (few query rows): tl.dot's minimum M instead of rows that would be masked away.
_DECODE_BLOCK_Q = 16


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result
def cuda_capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (a constant to torch.compile: no graph break)."""
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _work_split(tiles: torch.Tensor, steps: torch.Tensor, batch, heads, persist: int, device, mult=1) -> dict:
    """Grid and WORK of a visiting launch over the ``batch * heads * n_t`` tiles of the lists ``tiles``
    / ``steps`` (:func:`tile_lists`; rows for the forward and dQ, columns with ``mult`` the GQA group
    for dK/dV): one program per tile (persist 0, few tiles, or so many that the steps could pass
    int32) with WORK unused, else ``persist`` programs per SM (the interpreter counts as one SM), each
    a run of whole tiles with near-equal loop steps, WORK from :func:`_star_split_kernel`."""
    bp, n_t, width = tiles.shape
    n_items = batch * heads * n_t
    programs = persist * (_sm_count(_index(device)) if device.type == "cuda" else 1)
    bound = n_items * max(width, 1) * mult  # steps: at most one per list entry (and head), per tile
    if not persist or n_items <= programs or bound >= 2**31:
        return {"grid": (n_items,), "WORK": steps, "PERSIST": False}
    work = torch.empty((programs, 2), dtype=torch.int32, device=device)
    bp2 = 1 if bp == 1 else triton.next_power_of_2(bp)
    torch.library.wrap_triton(_star_split_kernel)[(programs,)](
        steps, work, 0 if bp == 1 else steps.stride(0), mult, batch, bp, heads, n_t,
        BP2=bp2, NT_P2=triton.next_power_of_2(n_t),
    )  # fmt: skip
    return {"grid": (programs,), "WORK": work, "PERSIST": True}


# A configuration that replaces the table's for every call while set: the GPU benchmark's tile sweep
# (benchmarks/gpu_star_attention.py) times neighbours of the table's entries with it. Not an API.
_TILE_OVERRIDE: TileConfig | None = None


@contextlib.contextmanager
def _override_tiles(cfg: TileConfig):
    """Every call in the block (forward and its backward) uses ``cfg`` instead of the tile table."""
    global _TILE_OVERRIDE
    saved, _TILE_OVERRIDE = _TILE_OVERRIDE, cfg
    try:
        yield
    finally:
        _TILE_OVERRIDE = saved


def tile_config(head_dim: int, dtype: torch.dtype, device: torch.device, q_len: int) -> TileConfig:
    """The tile configuration for one call (block sizes fix the plan the call needs)."""
    if _TILE_OVERRIDE is not None:
        return _TILE_OVERRIDE
    if device.type != "cuda":
        cfg = _INTERPRETER_TILES
    else:
        major, _minor = cuda_capability(_index(device))
        cfg = None
        for d_max, half, fp32 in _TILE_TABLE["sm90" if major >= 9 else "sm80"]:
            if cfg is None and head_dim <= d_max:
                cfg = fp32 if dtype == torch.float32 else half
    if q_len <= _DECODE_BLOCK_Q:
        cfg = TileConfig(_DECODE_BLOCK_Q, *cfg[1:])
    return cfg


def _launch(
    device: torch.device, head_dim: int, dtype: torch.dtype, q_len: int, backward: bool, exact: bool = False
) -> dict:
    """num_warps / num_stages of one launch (the block sizes arrive with the tile lists). The exact
    pass (rare: non-finite values met) is not software-pipelined: its shared memory goes to _dot_kept."""
    cfg = tile_config(head_dim, dtype, device, q_len)
    warps = cfg.warps_bwd if backward else cfg.warps_fwd
    return {"num_warps": warps, "num_stages": 1 if exact else cfg.stages}


# ------------------------------------------------------------------------------------------------
# ops
# ------------------------------------------------------------------------------------------------


def _new_output(shape, dtype, device) -> torch.Tensor:
    # HTC_POISON_OUTPUTS=1 (tests): NaN-filled, so an element a kernel fails to write cannot pass.
    if os.environ.get("HTC_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_args(q, k, v, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, block_q, block_k, *scalars):
    """Shape/dtype checks of a raw op call (the public function has validated already): ValueError.
    ``scalars``: topology, scale, softcap, panel."""
    topology, scale, softcap, panel = scalars
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError("star_attention_triton: q, k, v must be 4-D [B, H, S, D] with k.shape == v.shape")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"star_attention_triton: q, k, v must share a dtype among fp32/bf16/fp16, got {q.dtype}"
        )
    b, hq, sq, d = q.shape
    bk_, hkv, skv, dk = k.shape
    if bk_ != b or dk != d or hkv == 0 or hq % hkv or not 1 <= sq <= skv or not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"star_attention_triton: q {tuple(q.shape)}, k {tuple(k.shape)}: need equal B and D "
            f"(1 <= D <= {MAX_HEAD_DIM}), Hq % Hkv == 0, 1 <= Sq <= Skv"
        )
    bp = kinds.shape[0] if kinds.dim() == 2 else -1
    if (
        kinds.dtype != torch.int8
        or groups.dtype != torch.int32
        or kinds.dim() != 2
        or groups.shape != kinds.shape
        or kinds.shape[1] != skv
        or bp not in (1, b)
    ):
        raise ValueError("star_attention_triton: kinds int8 / groups int32 must be [1 or B, Skv]")
    for blk in (block_q, block_k):
        if blk not in (16, 32, 64, 128):
            raise ValueError(f"star_attention_triton: block sizes must be 16, 32, 64 or 128, got {blk}")
    n_panel = 0
    if panel is not None:
        if panel.dtype != torch.int32 or panel.dim() != 2 or panel.shape[0] != bp or panel.shape[1] % block_k:
            raise ValueError(
                f"star_attention_triton: panel must be int32 [1 or B, P] (StarLayout.key_panel(block_k), "
                f"P a multiple of block_k={block_k}), got {panel.dtype} {tuple(panel.shape)}"
            )
        n_panel = panel.shape[1] // block_k
    n_qt, n_kt = -(-sq // block_q), n_panel + -(-skv // block_k)
    want = ((bp, n_qt, n_kt), (bp, n_qt + 1), (bp, n_kt, n_qt), (bp, n_kt + 1))
    for name, t, shape in zip(
        ("q_tiles", "q_steps", "k_tiles", "k_steps"), (q_tiles, q_steps, k_tiles, k_steps), want
    ):
        if t.dtype != torch.int32 or tuple(t.shape) != shape:
            raise ValueError(
                f"star_attention_triton: {name} must be int32 {shape} (tile_lists of the plan for these "
                f"block sizes and panel), got {t.dtype} {tuple(t.shape)}"
            )
    if topology not in (0, 1):
        raise ValueError(f"star_attention_triton: topology must be 0 (star) or 1 (group), got {topology}")
    if not abs(scale) <= _F32_MAX:  # NaN too: the kernels take a float32 (every output would be NaN)
        raise ValueError(f"star_attention_triton: scale must be a finite float32, got {scale}")
    if not (softcap == 0.0 or _F32_TINY <= softcap <= _F32_MAX):  # NaN fails both
        raise ValueError(
            "star_attention_triton: softcap must be 0 (no capping) or a positive normal float32, "
            f"got {softcap}"
        )
    for t in (k, v, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, *([] if panel is None else [panel])):
        if t.device != q.device:
            raise ValueError(f"star_attention_triton: all tensors must be on {q.device}")


_F32_TINY = torch.finfo(torch.float32).tiny
_F32_MAX = torch.finfo(torch.float32).max


def _cap_args(softcap: float) -> dict:
    """The kernels' soft-capping arguments (softcap 0: no capping, SOFTCAP False)."""
    on = softcap != 0.0
    return {"softcap": softcap, "inv_softcap": 1.0 / softcap if on else 0.0, "SOFTCAP": on}


def _panel_args(panel: torch.Tensor | None, groups: torch.Tensor, block_k: int) -> tuple:
    """(PANEL, s_pan, NP) of a launch. Without a panel (NP = 0: never read) PANEL is another int32
    tensor (groups), so the pointer argument is valid memory of the type the kernels compile for."""
    if panel is None or panel.shape[1] == 0:
        return groups, 0, 0
    panel = panel.contiguous()
    return panel, 0 if panel.shape[0] == 1 else panel.stride(0), panel.shape[1] // block_k


def _block_d(d) -> int:
    """D padded to a power of two, at least tl.dot's 16 (comparisons only: d may be a SymInt when
    torch.compile traces the op with dynamic shapes)."""
    block = 16
    while block < d:
        block *= 2
    return block


def _f32_dots(dtype: torch.dtype) -> bool:
    # Triton's interpreter (3.8) runs tl.dot on bf16 tiles as integer products of their bit patterns:
    # there (only), bf16 tiles are widened to fp32 before the dots (exact products either way).
    return dtype == torch.bfloat16 and interpreting()


def _prec(dtype: torch.dtype) -> str:
    # fp32: IEEE products and sums (no TF32) to hold the 1e-4 tolerance; 16-bit operands are exact
    # in any mode, "tf32" is Triton's default name for the tensor-core path.
    return "ieee" if dtype == torch.float32 else "tf32"


@torch.library.triton_op("htc::star_attention_triton", mutates_args=())
def star_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kinds: torch.Tensor,
    groups: torch.Tensor,
    q_tiles: torch.Tensor,
    q_steps: torch.Tensor,
    k_tiles: torch.Tensor,
    k_steps: torch.Tensor,
    block_q: int,
    block_k: int,
    topology: int,
    scale: float,
    softcap: float,
    panel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (fp32/bf16/fp16, any strides), kinds
    int8 / groups int32 ``[Bp, Skv]``, tile lists of the plan for (Sq, block_q, block_k) from
    :func:`tile_lists` -> out ``[B, Hq, Sq, D]`` (q's dtype), lse ``[B, Hq, Sq]`` float32 (natural
    log of the (capped) scores; -inf on PAD rows and on live rows whose output is NaN: _fwd_store).
    k_tiles/k_steps are unused here (the backward reads them). softcap c > 0: scores ``s`` become
    ``c * tanh(s / c)``; 0: no capping. panel: int32 ``[Bp, P]`` (:meth:`StarLayout.key_panel`) when
    the tile lists are of a key-panel plan, else None."""
    lists = (q_tiles, q_steps, k_tiles, k_steps)
    _check_args(q, k, v, kinds, groups, *lists, block_q, block_k, topology, scale, softcap, panel)
    kinds, groups, q_tiles, q_steps = (t.contiguous() for t in (kinds, groups, q_tiles, q_steps))
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    out = _new_output(q.shape, q.dtype, q.device)
    lse = _new_output((b, hq, sq), torch.float32, q.device)
    lay = 0 if kinds.shape[0] == 1 else kinds.stride(0)
    tb = 0 if q_tiles.shape[0] == 1 else q_tiles.stride(0)
    nb = 0 if q_steps.shape[0] == 1 else q_steps.stride(0)
    split = _work_split(q_tiles, q_steps, b, hq, tile_config(d, q.dtype, q.device, sq).persist, q.device)
    grid, work = split.pop("grid"), split.pop("WORK")
    pan, s_pan, n_panel = _panel_args(panel, groups, block_k)
    flags = torch.empty(grid, dtype=torch.int32, device=q.device)
    for exact in (False, True):  # the plain pass, then the exact one for the programs it flagged
        torch.library.wrap_triton(_star_fwd_kernel)[grid](
            q, k, v, out, lse, kinds, groups, pan, q_tiles, q_steps, flags, work,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0), lse.stride(1),
            lay, s_pan, n_panel, tb, q_tiles.stride(1), nb,
            hq, hq // hkv, sq, skv, d, qk_scale=scale * _LOG2E, topology=topology, **split,
            BLOCK_M=block_q, BLOCK_N=block_k,
            BLOCK_D=_block_d(d), PREC=_prec(q.dtype), F32_DOTS=_f32_dots(q.dtype), **_cap_args(softcap),
            EXACT=exact, **_launch(q.device, d, q.dtype, sq, backward=False, exact=exact),
        )  # fmt: skip
    return out, lse


@star_attention_triton.register_fake
def _(q, k, v, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, *args):
    # Explicit fake: under TRITON_INTERPRET=1 the traced body would interpret on FakeTensors.
    b, hq, sq, _d = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (b, hq, sq), dtype=torch.float32
    )


@torch.library.triton_op("htc::star_attention_triton_backward", mutates_args=())
def star_attention_triton_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    kinds: torch.Tensor,
    groups: torch.Tensor,
    q_tiles: torch.Tensor,
    q_steps: torch.Tensor,
    k_tiles: torch.Tensor,
    k_steps: torch.Tensor,
    block_q: int,
    block_k: int,
    topology: int,
    scale: float,
    softcap: float,
    panel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`star_attention_triton`: dout like out (any strides), out/lse from the
    forward, grad_lse ``[B, Hq, Sq]`` float32 or None (the gradient reaching lse directly), scale and
    softcap and panel the forward's -> dq, dk, dv (shapes and dtypes of q, k, v). Deterministic: no
    atomics."""
    lists = (q_tiles, q_steps, k_tiles, k_steps)
    _check_args(q, k, v, kinds, groups, *lists, block_q, block_k, topology, scale, softcap, panel)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (b, hq, sq):
        raise ValueError("star_attention_triton_backward: dout/out must be shaped like q and lse [B, Hq, Sq]")
    if grad_lse is not None and grad_lse.shape != lse.shape:
        raise ValueError("star_attention_triton_backward: grad_lse must be shaped like lse")
    lse = lse.float().contiguous()
    grad_lse = None if grad_lse is None else grad_lse.float().contiguous()
    kinds, groups, q_tiles, q_steps, k_tiles, k_steps = (
        t.contiguous() for t in (kinds, groups, q_tiles, q_steps, k_tiles, k_steps)
    )
    pan, s_pan, n_panel = _panel_args(panel, groups, block_k)
    dq = _new_output(q.shape, q.dtype, q.device)
    dk = _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    delta = _new_output((b, hq, sq), torch.float32, q.device)
    launch = _launch(q.device, d, q.dtype, sq, backward=True)  # the delta kernel's warps
    block_d = _block_d(d)
    lay = 0 if kinds.shape[0] == 1 else kinds.stride(0)
    glse = lse if grad_lse is None else grad_lse
    torch.library.wrap_triton(_star_bwd_delta_kernel)[(triton.cdiv(sq, block_q) * b * hq,)](
        out, dout, glse, delta, kinds,
        *out.stride(), *dout.stride(), glse.stride(0), glse.stride(1), lay,
        hq, sq, skv, d,
        HAS_GLSE=grad_lse is not None, BLOCK_M=block_q, BLOCK_D=block_d, num_warps=launch["num_warps"],
    )  # fmt: skip
    common = dict(
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, PREC=_prec(q.dtype),
        F32_DOTS=_f32_dots(q.dtype), **_cap_args(softcap),
    )  # fmt: skip
    tb = 0 if q_tiles.shape[0] == 1 else q_tiles.stride(0)
    nb = 0 if q_steps.shape[0] == 1 else q_steps.stride(0)
    persist = tile_config(d, q.dtype, q.device, sq).persist  # the dQ and dK/dV launches
    split = _work_split(q_tiles, q_steps, b, hq, persist, q.device)
    grid, work = split.pop("grid"), split.pop("WORK")
    flags = torch.empty(grid, dtype=torch.int32, device=q.device)
    for exact in (False, True):  # the plain pass, then the exact one for the programs it flagged
        torch.library.wrap_triton(_star_bwd_dq_kernel)[grid](
            q, k, v, dout, lse, delta, dq, kinds, groups, pan, q_tiles, q_steps, flags, work,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), lse.stride(0), lse.stride(1), *dq.stride(),
            lay, s_pan, n_panel, tb, q_tiles.stride(1), nb,
            hq, hq // hkv, sq, skv, d, qk_scale=scale * _LOG2E, scale=scale, topology=topology, **split,
            EXACT=exact, **_launch(q.device, d, q.dtype, sq, backward=True, exact=exact), **common,
        )  # fmt: skip
    tb = 0 if k_tiles.shape[0] == 1 else k_tiles.stride(0)
    nb = 0 if k_steps.shape[0] == 1 else k_steps.stride(0)
    split = _work_split(k_tiles, k_steps, b, hkv, persist, q.device, mult=hq // hkv)
    grid, work = split.pop("grid"), split.pop("WORK")
    flags = torch.empty(grid, dtype=torch.int32, device=q.device)
    for exact in (False, True):
        torch.library.wrap_triton(_star_bwd_dkdv_kernel)[grid](
            q, k, v, dout, lse, delta, dk, dv, kinds, groups, pan, k_tiles, k_steps, flags, work,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), lse.stride(0), lse.stride(1),
            *dk.stride(), *dv.stride(),
            lay, s_pan, n_panel, tb, k_tiles.stride(1), nb,
            hq, hkv, hq // hkv, sq, skv, d, qk_scale=scale * _LOG2E, scale=scale, topology=topology, **split,
            EXACT=exact, **_launch(q.device, d, q.dtype, sq, backward=True, exact=exact), **common,
        )  # fmt: skip
    return dq, dk, dv


@star_attention_triton_backward.register_fake
def _(dout, q, k, v, out, lse, grad_lse, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, *args):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    # args: block_q .. softcap
    q, k, v, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, *args, panel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, panel)
    ctx.args = tuple(args)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, panel = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.htc.star_attention_triton_backward(
        grad_out, q, k, v, out, lse, grad_lse, kinds, groups, q_tiles, q_steps, k_tiles, k_steps, *ctx.args,
        panel,
    )
    return dq, dk, dv, *([None] * 12)


# At import, not on first call: torch.compile cannot trace a registration, but it runs an import natively,
# so a first call inside a compiled region still compiles without a graph break.
torch.library.register_autograd("htc::star_attention_triton", _backward, setup_context=_setup_context)
