// CUDA star attention, torch-free (DESIGN.md §2, §4): the kernel bodies, written against
// common/simt.h so that nvcc compiles them for sm_80/sm_90 and the ctests run the same source on the
// host emulator (csrc/tests/simt_emulator.h). Included by star_attention_cuda.cu (torch glue), by the
// standalone ptxas report (csrc/tests/cuda_standalone.cu) and by csrc/tests/test_star_cuda_kernels.cpp.
//
// Forward (FlashAttention-2 structure, block plan driven):
//  - one CTA of 4 warps per (batch, query head, 64-row query tile[, split]); warp w owns rows
//    16w..16w+15, two rows per lane in the mma.m16n8k16 accumulator layout;
//  - the plan row of the tile is compacted in shared memory into the list of non-SKIP key tiles
//    (in windows of 256 entries), so skipped tiles cost one byte read and are never loaded;
//  - K/V tiles of BK keys stream through a cp.async pipeline (16-bit: as two items of BK/2 keys
//    through 4 stages; fp32: whole tiles through 2), 16-byte copies, rows of PAD keys and past the
//    end zero-filled: never read;
//  - FULL/CAUSAL/MASKED tiles: S = Q K^T and O += P V on tensor cores (bf16/fp16 operands; fp32 inputs
//    as three bf16 terms, star_tile_math.h), the mask applied per element by select (star_allowed
//    for MASKED), online softmax in registers; a warp whose rows see nothing in the tile skips it;
//  - DIAG tiles (visual rows that attend only themselves): a row-wise dot on CUDA cores, one quad of
//    lanes per row, no MMA;
//  - "masked means never read": masked scores are replaced (select), PAD query rows are zero-filled on
//    load, and in CAUSAL/MASKED tiles a V row holding Inf/NaN is zeroed in shared memory before the
//    P V product (0 * NaN would leak into every row) and added back exactly, from global memory, only
//    to the rows allowed to attend it;
//  - fp32 (three bf16 terms per operand): the split of an infinity has NaN terms (inf - inf), so no
//    Inf/NaN input may enter an MMA: V rows are zeroed and added back as above in every tile kind,
//    and the scores of K rows holding one are recomputed in IEEE fp32 (quad_dot), here and in dQ, dK/dV;
//  - split-K (decode, small B*H; prefill at small grids, its long query tiles only): a tile with
//    `parts` = split_parts(...) > 1 is computed by that many CTAs, each taking a contiguous share of
//    the tile list (balanced by count) and writing a normalised fp32 partial and its lse;
//    star_combine_thread merges them in split order (deterministic). A tile of one part is written
//    directly, and the combine leaves its rows alone.
//
// Backward (deterministic, no atomics; the same plan, read row-wise for dQ and column-wise for dK/dV):
//  - star_delta_warp: delta = dO.O - grad_lse per live row (0 on PAD rows);
//  - star_row_block<DqCfg>: the forward's structure per query tile; S, P = exp2(S - lse) and
//    dP = dO V^T on tensor cores, dS = P (dP - delta), dQ += dS K;
//  - star_key_block: per (batch, kv head, key tile), over the GQA group's heads and the plan column's
//    query tiles in a fixed order: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
//  DIAG tiles take the row-wise path in both. Non-finite K rows in dQ's dS K product are handled like
//  V rows in the forward (zeroed, exact contribution added back to the rows that may attend them), and
//  live Q/dO rows holding an Inf/NaN in dK/dV's products likewise (zeroed, kept out of the MMAs, their
//  pairs with the keys that may see them recomputed on CUDA cores).
//
// Soft-capping (softcap c > 0: scores s -> c tanh(s / c) before the mask) is the kCap parameter of the
// configurations (FwdCfg, DqCfg, DkvCfg): the uncapped kernels are compiled without it. The backward
// recomputes t = tanh(s / c) from its recomputed scores and scales dS by 1 - t^2.
#pragma once
#include <climits>
#include <cstdint>

#include "common/half_bits.h"
#include "common/simt.h"
#include "star_attention/star_mask.h"
#include "star_attention/star_tile_math.h"

#if defined(__CUDACC__)
#define HTC_PRAGMA_(x) _Pragma(#x)
#define HTC_UNROLL_N(n) HTC_PRAGMA_(unroll n)
#else
#define HTC_UNROLL_N(n)
#endif

namespace htc::star_cuda {

// ---------------------------------------------------------------------------------------------------
// Element types

enum class Elt : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

template <Elt E>
struct EltT;
template <>
struct EltT<Elt::kF32> {
  using Store = float;
  static constexpr int kTerms = 3;  // fp32 -> hi + mid + lo bf16 (star_tile_math.h: split3)
  static constexpr bool kFp16Mma = false;
};
template <>
struct EltT<Elt::kBF16> {
  using Store = uint16_t;
  static constexpr int kTerms = 1;
  static constexpr bool kFp16Mma = false;
};
template <>
struct EltT<Elt::kF16> {
  using Store = uint16_t;
  static constexpr int kTerms = 1;
  static constexpr bool kFp16Mma = true;
};

template <Elt E>
HTC_DEV float to_f(typename EltT<E>::Store x) {
  if constexpr (E == Elt::kF32) return x;
  else if constexpr (E == Elt::kBF16) return bits::bf16_to_float(x);
  else return bits::f16_to_float(x);
}
template <Elt E>
HTC_DEV typename EltT<E>::Store from_f(float x) {
  if constexpr (E == Elt::kF32) return x;
  else if constexpr (E == Elt::kBF16) return bits::float_to_bf16(x);
  else return bits::float_to_f16(x);
}

// Any Inf/NaN among the 16 bytes?
template <Elt E>
HTC_DEV bool nonfinite16(const simt::U128& v) {
  bool bad = false;
HTC_UNROLL
  for (int i = 0; i < 4; ++i) {
    if constexpr (E == Elt::kF32) {
      bad |= bits::nonfinite_f32(v.w[i]);
    } else if constexpr (E == Elt::kBF16) {
      bad |= bits::nonfinite_bf16(static_cast<uint16_t>(v.w[i])) | bits::nonfinite_bf16(static_cast<uint16_t>(v.w[i] >> 16));
    } else {
      bad |= bits::nonfinite_f16(static_cast<uint16_t>(v.w[i])) | bits::nonfinite_f16(static_cast<uint16_t>(v.w[i] >> 16));
    }
  }
  return bad;
}

// ---------------------------------------------------------------------------------------------------
// MMA fragments (per lane: g = lane/4, t = lane%4). A 16x16: rows g, g+8; cols 2t, 2t+1 (+8).
// B 16x8: k rows 2t, 2t+1 (+8), col g. C 16x8: rows g (c0, c1), g+8 (c2, c3); cols 2t, 2t+1.
// For fp32 every operand register exists kTerms = 3 times (hi, mid, lo).

template <Elt E>
HTC_DEV void pack_terms(uint32_t (&r)[EltT<E>::kTerms], float lo, float hi) {
  if constexpr (E == Elt::kF32) {
    const tile::Split3 a = tile::split3(lo), b = tile::split3(hi);
    r[0] = a.hi | (static_cast<uint32_t>(b.hi) << 16);
    r[1] = a.mid | (static_cast<uint32_t>(b.mid) << 16);
    r[2] = a.lo | (static_cast<uint32_t>(b.lo) << 16);
  } else if constexpr (E == Elt::kBF16) {
    r[0] = simt::pack_bf16(lo, hi);
  } else {
    r[0] = simt::pack_f16(lo, hi);
  }
}

// d += a * b, over the kept products of the terms (small ones first).
template <Elt E>
HTC_DEV void mma_terms(float (&d)[4], const uint32_t (&a)[EltT<E>::kTerms][4],
                       const uint32_t (&b)[EltT<E>::kTerms][2]) {
  constexpr bool h = EltT<E>::kFp16Mma;
  if constexpr (EltT<E>::kTerms == 3) {
    simt::mma16816<h>(d, a[1], b[1]);
    simt::mma16816<h>(d, a[0], b[2]);
    simt::mma16816<h>(d, a[2], b[0]);
    simt::mma16816<h>(d, a[0], b[1]);
    simt::mma16816<h>(d, a[1], b[0]);
    simt::mma16816<h>(d, a[0], b[0]);
  } else {
    simt::mma16816<h>(d, a[0], b[0]);
  }
}

// A operand: rows row0..row0+15, cols col0..col0+15 of a row-major shared matrix (row stride ld).
template <Elt E>
HTC_DEV void load_a(uint32_t (&a)[EltT<E>::kTerms][4], const typename EltT<E>::Store* s, int ld, int row0,
                    int col0, int lane) {
  if constexpr (E == Elt::kF32) {
    const int g = lane >> 2, t = lane & 3;
HTC_UNROLL
    for (int q = 0; q < 4; ++q) {
      const float* p = s + (row0 + g + (q & 1) * 8) * ld + col0 + 2 * t + (q >> 1) * 8;
      uint32_t r[3];
      pack_terms<E>(r, p[0], p[1]);
HTC_UNROLL
      for (int k = 0; k < 3; ++k) a[k][q] = r[k];
    }
  } else {
    simt::ldsm_x4(a[0], s + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8);
  }
}

// B operands of two n-fragments (n0..n0+7, n0+8..n0+15) for k = k0..k0+15 from a shared matrix stored
// [n][k] row-major (the right factor of A M^T: keys of S = Q K^T).
template <Elt E>
HTC_DEV void load_b_nk(uint32_t (&b0)[EltT<E>::kTerms][2], uint32_t (&b1)[EltT<E>::kTerms][2],
                       const typename EltT<E>::Store* s, int ld, int n0, int k0, int lane) {
  if constexpr (E == Elt::kF32) {
    const int g = lane >> 2, t = lane & 3;
HTC_UNROLL
    for (int f = 0; f < 2; ++f)
HTC_UNROLL
      for (int q = 0; q < 2; ++q) {
        const float* p = s + (n0 + f * 8 + g) * ld + k0 + 2 * t + q * 8;
        uint32_t r[3];
        pack_terms<E>(r, p[0], p[1]);
HTC_UNROLL
        for (int k = 0; k < 3; ++k) (f ? b1 : b0)[k][q] = r[k];
      }
  } else {
    uint32_t r[4];
    simt::ldsm_x4(r, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
    b0[0][0] = r[0];
    b0[0][1] = r[1];
    b1[0][0] = r[2];
    b1[0][1] = r[3];
  }
}

// B operands of two n-fragments (n0.., n0+8..) for k = k0..k0+15 from a shared matrix stored [k][n]
// row-major (the right factor of P M: values of O = P V).
template <Elt E>
HTC_DEV void load_b_kn(uint32_t (&b0)[EltT<E>::kTerms][2], uint32_t (&b1)[EltT<E>::kTerms][2],
                       const typename EltT<E>::Store* s, int ld, int k0, int n0, int lane) {
  if constexpr (E == Elt::kF32) {
    const int g = lane >> 2, t = lane & 3;
HTC_UNROLL
    for (int f = 0; f < 2; ++f)
HTC_UNROLL
      for (int q = 0; q < 2; ++q) {
        const float* p = s + (k0 + 2 * t + q * 8) * ld + n0 + f * 8 + g;
        uint32_t r[3];
        pack_terms<E>(r, p[0], p[ld]);
HTC_UNROLL
        for (int k = 0; k < 3; ++k) (f ? b1 : b0)[k][q] = r[k];
      }
  } else {
    uint32_t r[4];
    simt::ldsm_x4_t(r, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
    b0[0][0] = r[0];
    b0[0][1] = r[1];
    b1[0][0] = r[2];
    b1[0][1] = r[3];
  }
}

// One n-fragment (n0..n0+7) of the same, for slices with an odd number of 8-column fragments.
template <Elt E>
HTC_DEV void load_b_kn1(uint32_t (&b0)[EltT<E>::kTerms][2], const typename EltT<E>::Store* s, int ld, int k0,
                        int n0, int lane) {
  if constexpr (E == Elt::kF32) {
    const int g = lane >> 2, t = lane & 3;
HTC_UNROLL
    for (int q = 0; q < 2; ++q) {
      const float* p = s + (k0 + 2 * t + q * 8) * ld + n0 + g;
      uint32_t r[3];
      pack_terms<E>(r, p[0], p[ld]);
HTC_UNROLL
      for (int k = 0; k < 3; ++k) b0[k][q] = r[k];
    }
  } else {
    // x2: lanes 0-15 address rows k0..k0+15 (lanes 16-31 repeat them; their addresses are unused)
    uint32_t r[2];
    simt::ldsm_x2_t(r, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0);
    b0[0][0] = r[0];
    b0[0][1] = r[1];
  }
}

// A operand of P (16 rows x 16 keys) from the fp32 accumulators of n-fragments 2kk and 2kk+1: the
// C layout of two adjacent 8-column fragments is the A layout of one 16-column step.
template <Elt E>
HTC_DEV void pack_a_from_c(uint32_t (&a)[EltT<E>::kTerms][4], const float (&c0)[4], const float (&c1)[4]) {
  constexpr int T = EltT<E>::kTerms;
  uint32_t r[T];
  pack_terms<E>(r, c0[0], c0[1]);
HTC_UNROLL
  for (int k = 0; k < T; ++k) a[k][0] = r[k];
  pack_terms<E>(r, c0[2], c0[3]);
HTC_UNROLL
  for (int k = 0; k < T; ++k) a[k][1] = r[k];
  pack_terms<E>(r, c1[0], c1[1]);
HTC_UNROLL
  for (int k = 0; k < T; ++k) a[k][2] = r[k];
  pack_terms<E>(r, c1[2], c1[3]);
HTC_UNROLL
  for (int k = 0; k < T; ++k) a[k][3] = r[k];
}

// A compiler fence every N unrolled steps (N = 0: none). Fully unrolled loops over D let the compiler
// hoist every load of a row ahead of its use; at large D beside D/2 accumulator registers that
// spills. __syncwarp orders memory for the compiler, so loads stay within their group of N steps.
// Must be reached by the whole warp (callers keep their control flow warp-uniform).
template <int N>
HTC_DEV void fence_every(int step) {
  if constexpr (N > 0) {
    if (step % N == N - 1) simt::sync_warp();
  }
}

HTC_DEV float quad_sum(float x) {
  x += simt::shfl_xor(x, 1);
  x += simt::shfl_xor(x, 2);
  return x;
}
HTC_DEV float quad_max(float x) {
  x = fmaxf(x, simt::shfl_xor(x, 1));
  x = fmaxf(x, simt::shfl_xor(x, 2));
  return x;
}

// a . b of two shared rows of D elements in IEEE fp32, a quad of lanes (t = lane % 4) summing the
// columns 8n + 2t, 8n + 2t + 1 and the quad adding them up: the scores of fp32 keys holding an Inf/NaN,
// which the three-term split (mma_terms) turns into NaN (inf - inf terms) where IEEE gives +-inf.
template <Elt E, int D>
HTC_DEV float quad_dot(const typename EltT<E>::Store* a, const typename EltT<E>::Store* b, int t) {
  float part = 0.f;
  HTC_UNROLL_N(4)
  for (int n = 0; n < D / 8; ++n) {
    const int col = n * 8 + 2 * t;
    part += to_f<E>(a[col]) * to_f<E>(b[col]) + to_f<E>(a[col + 1]) * to_f<E>(b[col + 1]);
  }
  return quad_sum(part);
}

// Where ok, stores x as element (row hh, column col) of the lane's score fragments s[n][e4] (C layout:
// the lane of t = (col % 8) / 2 holds it, in fragment col / 8); other lanes keep theirs. Selected per
// fragment, never indexed at run time (a run-time index would move s to local memory).
template <int NF>
HTC_DEV void set_score(float (&s)[NF][4], int hh, int col, int t, bool ok, float x) {
  const bool lane_has = ok && t == ((col & 7) >> 1);
HTC_UNROLL
  for (int n = 0; n < NF; ++n) {
    const bool mine = lane_has && n == (col >> 3);
    if (col & 1) s[n][2 * hh + 1] = mine ? x : s[n][2 * hh + 1];
    else s[n][2 * hh] = mine ? x : s[n][2 * hh];
  }
}

// The elements (rows g and g + 8 of this lane, column col) of C fragments s[n][e4], fetched from the lane
// that holds them (t = (col % 8) / 2, fragment col / 8): every fragment's candidate is shuffled and the
// fragment selected after the shuffle (selecting by a run-time index first would move s to local memory).
template <int NF>
HTC_DEV void column_of(const float (&s)[NF][4], int col, int lane, float (&out)[2]) {
  const int owner = (lane & ~3) | ((col & 7) >> 1);
  out[0] = out[1] = 0.f;
HTC_UNROLL
  for (int n = 0; n < NF; ++n) {
    const float x0 = simt::shfl_idx((col & 1) ? s[n][1] : s[n][0], owner);
    const float x1 = simt::shfl_idx((col & 1) ? s[n][3] : s[n][2], owner);
    out[0] = n == (col >> 3) ? x0 : out[0];
    out[1] = n == (col >> 3) ? x1 : out[1];
  }
}

// acc[n][.] += w[hh] r[col0 + 8 n + 2 t (+1)] for this lane's rows hh = 0, 1 where ok[hh] (C layout): the
// exact contribution of a row that entered an MMA as zeros. Selected, not multiplied: a row that may not
// see it adds exactly 0. Control flow stays warp-uniform (the fences: every kFence columns, so that the
// row's loads are not all hoisted into registers at once).
template <Elt E, int kFence = 8, int NF>
HTC_DEV void add_row(float (&acc)[NF][4], const float (&w)[2], const bool (&ok)[2], const typename EltT<E>::Store* r,
                     int col0, int t) {
HTC_UNROLL
  for (int n = 0; n < NF; ++n) {
    const int col = col0 + n * 8 + 2 * t;
    const float v0 = to_f<E>(r[col]), v1 = to_f<E>(r[col + 1]);
    acc[n][0] += ok[0] ? w[0] * v0 : 0.f;
    acc[n][1] += ok[0] ? w[0] * v1 : 0.f;
    acc[n][2] += ok[1] ? w[1] * v0 : 0.f;
    acc[n][3] += ok[1] ? w[1] * v1 : 0.f;
    fence_every<kFence>(n);
  }
}

// ---------------------------------------------------------------------------------------------------
// Plan compaction: the non-SKIP entries of a plan row (forward: stride 1) or column (backward: stride
// n_kt), as entries (index << 3) | kind in shared memory. Kinds other than FULL/CAUSAL/DIAG are
// treated as MASKED, which evaluates the rule per element and is exact for any tile.

constexpr int kListWindow = 256;

HTC_DEV int entry_kind(uint8_t v) { return v <= kMasked ? static_cast<int>(v) : static_cast<int>(kMasked); }

// Number of non-SKIP entries among the n entries (block-uniform result).
template <int NT>
HTC_DEV int count_nonskip(const uint8_t* row, int64_t stride, int n, int tid) {
  int total = 0;
  for (int w0 = 0; w0 < n; w0 += NT) {
    const int x = w0 + tid;
    total += simt::sync_block_count(x < n && row[static_cast<int64_t>(x) * stride] != kSkip);
  }
  return total;
}

// Compacts the window [w0, w0 + kListWindow) of the n entries into `list`, keeping the entries whose
// rank among all non-SKIP entries is in [lo, hi); `seen` counts the non-SKIP entries before w0 and is
// advanced past the window. `counts` is shared scratch of kListWindow/32 ints. Returns the number of
// entries written (block-uniform); begins and ends with a block barrier.
template <int NT>
HTC_DEV int compact_window(const uint8_t* row, int64_t stride, int n, int w0, int lo, int hi, int& seen,
                           int* list, int* counts, int tid) {
  constexpr int R = kListWindow / NT, W = NT / 32;
  const int lane = tid & 31, warp = tid >> 5;
  int entry[R];
  unsigned bal[R];
  simt::sync_block();  // the previous window's list and counts are no longer read
HTC_UNROLL
  for (int r = 0; r < R; ++r) {
    const int x = w0 + r * NT + tid;
    const int v = x < n ? static_cast<int>(row[static_cast<int64_t>(x) * stride]) : static_cast<int>(kSkip);
    entry[r] = v != kSkip ? (x << 3) | entry_kind(static_cast<uint8_t>(v)) : -1;
    bal[r] = simt::ballot(v != kSkip);
    if (lane == 0) counts[r * W + warp] = simt::popc(bal[r]);
  }
  simt::sync_block();
  const int start = lo > seen ? lo : seen;
  int base = seen;
HTC_UNROLL
  for (int r = 0; r < R; ++r) {
    int before = base;
    for (int w = 0; w < warp; ++w) before += counts[r * W + w];
    const int rank = before + simt::popc(bal[r] & ((1u << lane) - 1u));
    if (entry[r] >= 0 && rank >= lo && rank < hi) list[rank - start] = entry[r];
    for (int w = 0; w < W; ++w) base += counts[r * W + w];
  }
  seen = base;
  const int end = base < hi ? base : hi;
  simt::sync_block();  // the list is visible to every warp
  return end > start ? end - start : 0;
}

// ---------------------------------------------------------------------------------------------------
// Parameters (element strides; the last dimension is contiguous, rows 16-byte aligned).

struct StarParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_ss;  // batch, head, sequence strides of q (elements)
  int64_t k_sb, k_sh, k_ss;
  int64_t v_sb, v_sh, v_ss;
  void* out;        // forward: [B, Hq, Sq, D] contiguous, q's dtype
  float* lse;       // forward: [B, Hq, Sq]
  float* o_part;    // split-K: [n_split, B, Hq, Sq, D] fp32 (normalised partial outputs)
  float* lse_part;  // split-K: [n_split, B, Hq, Sq]
  int32_t* n_parts;  // split-K: [B, Hq, n_qt], the parts of each query tile (split_parts; 1: written
                     // directly to out/lse by its only CTA, not combined)
  // backward
  const void* dout;  // [B, Hq, Sq, D], strides below
  int64_t do_sb, do_sh, do_ss;
  const void* o;     // the forward's output, strides below
  int64_t o_sb, o_sh, o_ss;
  const float* lse_in;    // the forward's lse [B, Hq, Sq] contiguous
  const float* grad_lse;  // [B, Hq, Sq] contiguous, or null
  float* delta;           // [B, Hq, Sq]: dO.O - grad_lse on live rows, 0 elsewhere
  void* dq;               // [B, Hq, Sq, D] contiguous
  void* dk;               // [B, Hkv, Skv, D] contiguous
  void* dv;
  const int8_t* kinds;    // [plan_batch, Skv]
  const int32_t* groups;  // [plan_batch, Skv]
  const uint8_t* plan;    // [plan_batch, n_qt, n_kt], tiles of 64 query rows x BK (mapped) keys
  const int32_t* panel;   // [plan_batch, panel_len]: the plan's key panel (star_mask.h KeyMap), or null
  int panel_len;          // 0 (identity key order) or a multiple of BK; n_kt counts its tiles first
  int B, Hq, Hkv, Sq, Skv, n_qt, n_kt, q_off, plan_batch, topology, n_split;
  int split_min;     // split-K: the fewest non-SKIP tiles a part takes (split_parts; >= 1)
  float scale;       // softmax scale
  float scale_log2;  // softmax scale * log2(e)
  float softcap, inv_softcap;  // the cap c and 1/c (read by the kCap kernels only)
};

// Split-K parts of a query tile with `total` non-SKIP key tiles: as many as the launch has splits, but
// no part with fewer than split_min tiles (and one for an empty tile). Parts take contiguous,
// count-balanced shares; splits past the tile's parts exit at once. Decode (split_min 1) splits every
// row; prefill splits only its long tiles (the `<voco>` query tile visits its whole image, the others
// two or three tiles), which would otherwise be the launch's critical path.
HTC_HD int split_parts(int total, int split_min, int n_split) {
  const int want = (total + split_min - 1) / split_min;
  return want < 1 ? 1 : (want < n_split ? want : n_split);
}

// A raw product x = q.k as a log2-domain score, soft-capped when kCap (star_tile_math.h), and
// d capped / d score for the backward's dS (1 without capping: the multiply folds away).
template <bool kCap>
HTC_DEV tile::Capped score_log2(const StarParams& p, float x) {
  if constexpr (kCap) {
    const tile::Capped c = tile::softcap(x * p.scale, p.softcap, p.inv_softcap);
    return {c.s * tile::kLog2e, c.ds};
  } else {
    return {x * p.scale_log2, 1.f};
  }
}

// Mapped key j of a sample's plan (star_mask.h mapped_key, in int: registers; the identity order
// without a panel): its position (no_position<int>(), after every row: an empty panel slot, or past
// the sequence), kind (PAD also for holes, empty slots and keys past the sequence: never read) and
// group.
using KeyAt = MappedKeyT<int>;

HTC_DEV KeyAt key_at(const StarParams& p, const int8_t* kin, const int32_t* grp, const int32_t* panel, int j) {
  if (j >= p.panel_len + p.Skv) return {no_position<int>(), static_cast<int8_t>(kPad), -1};
  return mapped_key(kin, grp, KeyMapT<int>{panel, p.panel_len, p.Skv}, j);
}

// Is query row i (< Sq or not) one to load: in the sequence and not PAD? Its kind is read at a clamped,
// always valid index and the answer selected: a load behind a branch is waited for inside it (SASS:
// a thread's rows then load one after the other), unconditional ones are in flight together.
HTC_DEV bool live_query(const StarParams& p, const int8_t* kin, int i) {
  const int8_t kind = kin[(i < p.Sq ? i : p.Sq - 1) + p.q_off];
  return (i < p.Sq) & (kind != kPad);
}

// A lane's mask bits over NF fragments of 8 columns from col0 (bit n * 4 + e4: fragment n, element e4,
// which is row e4 / 2 of the lane and column col0 + n * 8 + 2 t + e4 % 2), the tile kind decided once
// and each predicate branch-free (star_allowed_flat): with star_allowed's branches every question was
// a divergence region around dependent shared-memory loads, 32 of them in series per MASKED visit.
template <int NF, class Full, class Causal, class Masked>
HTC_DEV unsigned tile_mask_bits(int kind, int col0, int t, Full&& full, Causal&& causal, Masked&& masked) {
  auto fill = [&](auto&& ok) {
    unsigned b = 0;
HTC_UNROLL
    for (int n = 0; n < NF; ++n)
HTC_UNROLL
      for (int e4 = 0; e4 < 4; ++e4)
        b |= static_cast<unsigned>(ok(e4 >> 1, col0 + n * 8 + 2 * t + (e4 & 1))) << (n * 4 + e4);
    return b;
  };
  if (kind == kFull) return fill(full);
  if (kind == kCausal) return fill(causal);
  return fill(masked);
}

// ---------------------------------------------------------------------------------------------------
// cp.async.wait_group with a run-time count n in [0, NS): the count is an immediate of the instruction.
template <int NS>
HTC_DEV void cp_async_wait_upto(int n) {
  static_assert(NS >= 2 && NS <= 4, "pipeline stages");
  if (n <= 0) {
    simt::cp_async_wait<0>();
  } else if (NS == 2 || n == 1) {
    simt::cp_async_wait<1>();
  } else if constexpr (NS == 3) {
    simt::cp_async_wait<2>();
  } else if (n == 2) {
    simt::cp_async_wait<2>();
  } else {
    simt::cp_async_wait<3>();
  }
}

// The pipeline shared by every kernel: the non-SKIP entries of a plan line (a row, stride 1: the key
// tiles of a query tile; or a column, stride n_kt: the query tiles of a key tile) are compacted window
// by window; entry e expands to n_sub items (sub-tiles), streamed through an NS-stage cp.async
// pipeline (item it in stage it % NS).
//   fetch(entry, sub, stage): this thread's global loads of one item's metadata into registers (no
//     shared memory: every stage may still be read), by the threads the stage assigns them to (each
//     thread holds one item's, so the prologue's items load at once, not one after another). Called
//     for item it + NS - 1 before waiting for item it, so the loads are in flight during that wait
//     and the barrier after it;
//   issue(entry, sub, stage): stores what fetch loaded into `stage` and issues this thread's copies
//     of the item (no commit); called by every thread (it may hold a barrier of its own);
//   check(entry, sub, stage): a per-thread predicate on the landed item (e.g. "my V chunks hold
//     Inf/NaN"), OR-reduced over the block by the barrier that publishes the stage;
//   body(entry, sub, stage, any): the item's work, called by every thread (block-uniform).
// Only entries whose rank among all non-SKIP entries is in [lo, hi) are streamed (split-K).
// Items 0 .. NS-1 are all issued before the first wait (every stage is free: compact_window begins
// with a barrier). Item it + NS - 1 reuses the stage of item it - 1, so in steady state it is issued
// after the barrier of item it, when every warp is done with item it - 1; but the last stage had
// never been used, and issued that way its copies waited a whole global-memory latency for nothing.
// Most CTAs have 2-3 items (a visual query tile of LLaVA: its prefix tile and its diagonal), so with
// 2 stages that latency was a third of their copy time.
template <int NT, int NS, class Fetch, class Issue, class Check, class Body>
HTC_DEV void stream_items(const uint8_t* line, int64_t stride, int n, int lo, int hi, int n_sub, int* list,
                          int* counts, int tid, Fetch&& fetch, Issue&& issue, Check&& check, Body&& body) {
  int seen = 0;
  for (int w0 = 0; w0 < n && seen < hi; w0 += kListWindow) {
    const int n_list = compact_window<NT>(line, stride, n, w0, lo, hi, seen, list, counts, tid);
    const int items = n_list * n_sub;
    if (items == 0) continue;
    const int pre = items < NS ? items : NS;
    for (int it = 0; it < pre; ++it) fetch(list[it / n_sub], it % n_sub, it);
    for (int it = 0; it < pre; ++it) {
      issue(list[it / n_sub], it % n_sub, it);
      simt::cp_async_commit();
    }
    for (int it = 0; it < items; ++it) {
      const int e = it / n_sub, u = it - e * n_sub, st = it % NS;
      // Item nx still to issue, into the stage of item it - 1 (items < pre were issued above).
      const int nx = it + NS - 1;
      const bool next = it >= 1 && nx < items;
      if (next) fetch(list[nx / n_sub], nx % n_sub, nx % NS);
      // Item it landed (and what was committed before it). Committed after it: the prologue's later
      // items and this loop's groups (one per iteration, empty ones included), pre - 1 in all while
      // it < pre, then NS - 2.
      cp_async_wait_upto<NS>(it < pre ? pre - 1 : NS - 2);
      // Barrier: item `it` is visible to every thread, and every warp is done with item it - 1.
      const int any = simt::sync_block_or(check(list[e], u, st));
      if (next) issue(list[nx / n_sub], nx % n_sub, nx % NS);
      simt::cp_async_commit();
      body(list[e], u, st, any);
    }
  }
}

// 16-byte copies of `rows` rows of D elements from global into shared (row stride LD), for N tensors
// that share their rows (K and V; Q and dO): shared row r of tensor t from global row src(r) (at
// base[t] + src(r) * gstride[t]), zero-filled when src(r) < 0 (the copy then names base[t], a valid
// address, and reads nothing). One loop for the N tensors: src and the chunk's indices once per row.
template <int NT, int D, int LD, int N, class Store, class Src>
HTC_DEV void gather_rows(Store* const (&dst)[N], const Store* const (&base)[N], const int64_t (&gstride)[N],
                         int rows, int tid, Src&& src) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(Store)), kRowChunks = D / kChunk;
  // Not unrolled: with src a shared-memory read, the unrolled copies' addresses were all computed
  // ahead, +7-15 registers, and the D = 256 row kernels spilled on sm_90 (ptxas).
  HTC_UNROLL_N(1)
  for (int c = tid; c < rows * kRowChunks; c += NT) {
    const int r = c / kRowChunks, cc = c - r * kRowChunks;
    const int64_t row = src(r);
HTC_UNROLL
    for (int t = 0; t < N; ++t)
      simt::cp_async16(dst[t] + r * LD + cc * kChunk, row >= 0 ? base[t] + row * gstride[t] + cc * kChunk : base[t],
                       row >= 0 ? 16 : 0);
  }
}

// The same for consecutive rows row0 + r, each read only when ok(r).
template <int NT, int D, int LD, int N, class Store, class Ok>
HTC_DEV void copy_rows(Store* const (&dst)[N], const Store* const (&base)[N], const int64_t (&gstride)[N], int row0,
                       int rows, int tid, Ok&& ok) {
  gather_rows<NT, D, LD>(dst, base, gstride, rows, tid,
                         [&](int r) { return ok(r) ? static_cast<int64_t>(row0) + r : int64_t{-1}; });
}

// Inf/NaN among the chunks this thread copied with copy_rows (same partition of the work).
template <Elt E, int NT, int D, int LD>
HTC_DEV bool my_rows_nonfinite(const typename EltT<E>::Store* s, int rows, int tid) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(typename EltT<E>::Store)), kRowChunks = D / kChunk;
  bool bad = false;
  for (int c = tid; c < rows * kRowChunks; c += NT) {
    const int r = c / kRowChunks, cc = c - r * kRowChunks;
    bad |= nonfinite16<E>(simt::load16(s + r * LD + cc * kChunk));
  }
  return bad;
}

// Inf/NaN in a shared row of D elements?
template <Elt E, int D>
HTC_DEV bool row_nonfinite(const typename EltT<E>::Store* row) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(typename EltT<E>::Store));
  bool b = false;
  // One chunk at a time: callers run it beside every accumulator of their kernel (rare paths).
  HTC_UNROLL_N(1)
  for (int cc = 0; cc < D / kChunk; ++cc) b |= nonfinite16<E>(simt::load16(row + cc * kChunk));
  return b;
}

// Flags in bad[] the rows of N shared [rows][LD] tiles sharing their rows (K or V; Q and dO) where any of
// them holds an Inf/NaN (threads 0..rows-1, one row each) and, when zero, zeroes that row of every tile:
// the MMA would otherwise spread 0 * NaN over every output row.
template <Elt E, int D, int LD, int N>
HTC_DEV void flag_nonfinite_rows(typename EltT<E>::Store* const (&s)[N], int rows, int8_t* bad, int tid, bool zero) {
  if (tid >= rows) return;
  bool b = false;
HTC_UNROLL
  for (int k = 0; k < N; ++k) b |= row_nonfinite<E, D>(s[k] + tid * LD);
  bad[tid] = b;
  if (zero && b)
HTC_UNROLL
    for (int k = 0; k < N; ++k)
      for (int d = 0; d < D; ++d) s[k][tid * LD + d] = from_f<E>(0.f);
}

// ---------------------------------------------------------------------------------------------------
// Query-tile kernels: the forward and the backward's dQ. One CTA of kWarps warps per (batch, query
// head, BQ = 16 kWarps query rows[, split]); warp w owns rows 16w..16w+15, two rows per lane.

// kOSplit > 1: that many CTAs per row tile, each accumulating D / kOSplit output columns (scores are
// formed over the full D by each): halves the accumulator registers where they would not fit.
// kThree: the build for three CTAs per SM in sm_90's 228 KB of shared memory (three_ctas_built says
// which exist; the host launches one only when HTC_CUDA_THREE_CTAS=1 asks for it and the device holds
// three): at most 168 registers (65536 / 384), so less unrolling where registers need it
// (star_row_block), and fewer pipeline stages where shared memory does (kStages).
template <Elt E, int D_, int BK_, int kWarps_, bool kDq_, int kOSplit_ = 1, bool kCap_ = false, bool kThree_ = false>
struct RowCfg {
  static constexpr Elt kElt = E;
  static constexpr bool kCap = kCap_;  // logit soft-capping
  static constexpr bool kThree = kThree_;
  using Store = typename EltT<E>::Store;
  static constexpr int kTerms = EltT<E>::kTerms;
  static constexpr bool kDq = kDq_;
  static constexpr int D = D_, BK = BK_, kWarps = kWarps_, kThreads = 32 * kWarps_, BQ = 16 * kWarps_;
  static constexpr int kOSplit = kOSplit_, DO = D_ / kOSplit_;
  // CTAs per SM the kernel is compiled for (__launch_bounds__, star_row_kernel): 3 for the forward at
  // D = 64, whose 38-49 KB of shared memory allow 3 and whose registers fit 168 (65536 / 384, in units
  // of 8) without a spill (ptxas, sm_80 / sm_90: 16-bit 167 / 167, fp32 160 / 167; unbounded the
  // 16-bit one drifted to 173 on 2026-11-24, the fp32 one uses 197 on sm_90): 12 warps per SM instead
  // of 8. From D = 80 three need more shared memory than sm_80's 164 KB (and at D = 96 this unrolling
  // spills at 168), so those default builds allow 2; their kThree builds (below) allow 3 on sm_90.
  static constexpr int kMinBlocks = (kThree_ || (!kDq_ && D_ <= 64)) ? 3 : 1;
  // The shared memory kMinBlocks CTAs must fit in (with the 1 KB the driver reserves per CTA).
  static constexpr size_t kSmemPerSm = (kThree_ ? 228 : 164) * size_t{1024};
  // A plan tile of BK keys is streamed as kSub items of BKI keys through 2 kSub stages: the shared
  // memory of two whole tiles, but with 16-bit tiles in halves three copies are in flight during a
  // body instead of one (a visual query tile of LLaVA: all four of its items before its first wait).
  // fp32 tiles (16 keys) are not split (an MMA takes 16 keys). kThree builds take as many stages as
  // let three CTAs fit (bf16 D = 128: 3 in the forward, 2 in dq).
  static constexpr int kSub = E == Elt::kF32 ? 1 : 2, BKI = BK_ / kSub;
  // Keys per compute sub-block: the whole item in the forward; at most 32 (16 at D >= 128) for dq,
  // whose scores and dP are live together.
  static constexpr int KS = !kDq_ ? BKI : (D_ >= 128 ? 16 : (BKI < 32 ? BKI : 32));
  static_assert(D % 16 == 0 && BK % 16 == 0 && BK <= 64 && 64 % BQ == 0 && DO % 16 == 0, "tile shape");
  static_assert(KS % 16 == 0 && BKI % KS == 0 && BK % kSub == 0, "key sub-block");
  // Shared rows padded by 16 bytes (bf16/fp16) or 32 bytes (fp32): the 8 rows of an ldmatrix, and
  // the float2 fragment loads of a half-warp, hit distinct banks.
  static constexpr int kLd = D + 8;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(Store));
  static constexpr int kRowChunks = D / kChunk;
  static constexpr size_t kQBytes = size_t{BQ} * kLd * sizeof(Store);
  static constexpr size_t kTileBytes = size_t{BKI} * kLd * sizeof(Store);  // K or V of one item
  // Layout: Q | dO (dq only) | K0 V0 | .. | K[NS-1] V[NS-1] | key kinds [NS][BKI] | key groups
  // [NS][BKI] | key positions [NS][BKI] | key source rows [NS][BKI] | bad [BKI] (the item's non-finite
  // rows of V, forward, or K, dq) | bad K [BKI] (fp32: keys whose scores are recomputed) | list | counts
  static constexpr size_t smem_bytes(int ns) {
    return (kQBytes * (kDq ? 2 : 1) + 2 * ns * kTileBytes + 13 * ns * BKI + 2 * BKI + 15) / 16 * 16 +
           (kListWindow + 16) * sizeof(int);
  }
  static constexpr bool fits(int ns) { return kMinBlocks * (smem_bytes(ns) + 1024) <= kSmemPerSm; }
  static constexpr int kStages = !kThree_ || fits(2 * kSub) ? 2 * kSub : fits(3) ? 3 : 2;
  static constexpr size_t kOffDo = kQBytes;
  static constexpr size_t kOffK = kQBytes * (kDq ? 2 : 1);
  static constexpr size_t kOffMeta = kOffK + 2 * kStages * kTileBytes;
  static constexpr size_t kOffGroups = kOffMeta + kStages * BKI;
  static constexpr size_t kOffKeyPos = kOffGroups + kStages * BKI * sizeof(int32_t);
  static constexpr size_t kOffSrc = kOffKeyPos + kStages * BKI * sizeof(int32_t);
  static constexpr size_t kOffBad = kOffSrc + kStages * BKI * sizeof(int32_t);
  static constexpr size_t kOffBadK = kOffBad + BKI;
  static constexpr size_t kOffList = (kOffBadK + BKI + 15) / 16 * 16;
  static constexpr size_t kOffCounts = kOffList + kListWindow * sizeof(int);
  static constexpr size_t kSmemBytes = kOffCounts + 16 * sizeof(int);
  static_assert(kSmemBytes == smem_bytes(kStages), "shared memory layout");
  static_assert(fits(kStages), "kMinBlocks CTAs do not fit an SM's shared memory");
};

// Head dims and key-tile sizes the CUDA kernels are built for (the Python backend mirrors this table:
// htc_kernels/star_attention.py, _cuda_block_k). Plans always have 64-row query tiles.
constexpr int fwd_block_k(Elt e, int d) {
  if (e == Elt::kF32) return 16;  // three bf16 terms per operand: small key tiles fit 255 registers
  return d <= 128 ? 64 : 32;
}
constexpr bool supported_head_dim(int d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }
// fp32 at D = 256: output columns in two halves (128 accumulators and three-term operands exceed 255
// registers); the dQ kernel also keeps Q and dO tiles of 32 rows (two warps) to fit sm_80's 163 KB.
// The kThree builds that exist (ptxas, sm_80 and sm_90: spill-free at 168 registers with the unrolling
// star_row_block gives them). Not fp32 (three-term operands: 240-255 registers), not D = 256; the D = 64
// forward is built for three CTAs anyway, the dq kernel at D = 96 spills 8-16 B at 168 registers.
constexpr bool three_ctas_built(Elt e, int d, bool dq) {
  return e != Elt::kF32 && (dq ? (d == 64 || d == 80 || d == 128) : (d == 80 || d == 96 || d == 128));
}
// kThree asks for the three-CTA build; where none exists (three_ctas_built) it is the default one.
template <Elt E, int D, bool kCap = false, bool kThree = false>
using FwdCfg = RowCfg<E, D, fwd_block_k(E, D), 4, false, (E == Elt::kF32 && D > 128) ? 2 : 1, kCap,
                      kThree && three_ctas_built(E, D, false)>;
template <Elt E, int D, bool kCap = false, bool kThree = false>
using DqCfg = RowCfg<E, D, fwd_block_k(E, D), (E == Elt::kF32 && D > 128) ? 2 : 4, true,
                     (E == Elt::kF32 && D > 128) ? 2 : 1, kCap, kThree && three_ctas_built(E, D, true)>;

template <class C>
HTC_DEV void star_row_block(const StarParams& p, unsigned char* smem, int tid, int64_t bid) {
  using Store = typename C::Store;
  constexpr Elt E = C::kElt;
  constexpr bool kDq = C::kDq;
  constexpr int T = C::kTerms, D = C::D, BK = C::BK, BKI = C::BKI, BQ = C::BQ, LD = C::kLd, NT = C::kThreads;
  constexpr int KS = C::KS, NF_S = KS / 8, NF_O = C::DO / 8, NF_FULL = D / 8;
  // Unrolling limits where registers are tight (fp32 carries every operand as three bf16 terms). The
  // 16-bit forward at D = 128 unrolls its QK^T loop 4 times, not 8: 252 -> 205 registers on sm_80
  // (ptxas; the full unroll spilled once the key panel added its gathers).
  // The kThree builds (168 registers) unroll less: the forward's QK^T loop not at all at D = 128 and
  // twice at D = 96, dq's twice from D = 80, and dq at D = 128 splits its DIAG dot and update loops
  // like the large-D kernels (ptxas: the most unrolling tried that spills on neither sm_80 nor sm_90).
  [[maybe_unused]] constexpr int kUnrollK =
      E == Elt::kF32                             ? 1
      : (D >= 256 || (kDq && D >= 128))          ? 2
      : C::kThree                                ? (kDq ? (D >= 80 ? 2 : D / 16) : (D >= 128 ? 1 : D >= 96 ? 2 : D / 16))
      : D >= 128                                 ? 4
                                                 : D / 16;
  constexpr bool kTight = E == Elt::kF32 && D >= 256;  // the most registers: 128 accumulators, 3 terms
  constexpr bool kWide = D >= 256 || E == Elt::kF32 || (C::kThree && kDq && D >= 128);
  [[maybe_unused]] constexpr int kUnrollDot = kTight ? 2 : kWide ? 4 : NF_FULL;
  constexpr int kFence = kTight ? 4 : kWide ? 8 : 0;
  constexpr int kFenceProd = kTight ? 1 : E == Elt::kF32 ? 2 : (D >= 256 ? 4 : 0);  // second product's loop
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

  const int n_rt = (p.Sq + BQ - 1) / BQ;  // row tiles of this kernel (BQ may be half a plan tile)
  const int o0 = static_cast<int>(bid % C::kOSplit) * C::DO;  // this CTA's output columns [o0, o0 + DO)
  int64_t rest = bid / C::kOSplit;
  const int split = static_cast<int>(rest % p.n_split);
  rest /= p.n_split;
  const int rt = static_cast<int>(rest % n_rt);
  rest /= n_rt;
  const int h = static_cast<int>(rest % p.Hq);
  const int b = static_cast<int>(rest / p.Hq);
  const int hk = h / (p.Hq / p.Hkv);
  const int bl = p.plan_batch == 1 ? 0 : b;
  const int r0 = rt * BQ;
  const int8_t* kin = p.kinds + static_cast<int64_t>(bl) * p.Skv;
  const int32_t* grp = p.groups + static_cast<int64_t>(bl) * p.Skv;
  // A plan tile's kind holds for any subset of its rows, so a BQ < 64 row tile uses its tile's row.
  const uint8_t* plan_row = p.plan + (static_cast<int64_t>(bl) * p.n_qt + r0 / 64) * p.n_kt;
  // The plan row's lines into L1 now, in flight with the Q rows' lookups: compact_window reads the row
  // after their barrier, so its read was one more L2 latency in series before the first lookups.
  for (int x = tid * 64; x < p.n_kt + 63; x += NT * 64) simt::prefetch_l1(plan_row + (x < p.n_kt ? x : p.n_kt - 1));

  Store* sQ = reinterpret_cast<Store*>(smem);
  Store* sDo = reinterpret_cast<Store*>(smem + C::kOffDo);
  // Stage st: K at kOffK + 2 st kTileBytes, V right after (computed, not an array of pointers: a
  // run-time index into one would live in local memory).
  auto sK = [&](int st) { return reinterpret_cast<Store*>(smem + C::kOffK + 2 * st * C::kTileBytes); };
  auto sV = [&](int st) { return reinterpret_cast<Store*>(smem + C::kOffK + (2 * st + 1) * C::kTileBytes); };
  int8_t* sKind = reinterpret_cast<int8_t*>(smem + C::kOffMeta);
  int32_t* sGrp = reinterpret_cast<int32_t*>(smem + C::kOffGroups);
  int32_t* sKeyPos = reinterpret_cast<int32_t*>(smem + C::kOffKeyPos);
  int32_t* sSrc = reinterpret_cast<int32_t*>(smem + C::kOffSrc);
  int8_t* sBad = reinterpret_cast<int8_t*>(smem + C::kOffBad);
  [[maybe_unused]] int8_t* sBadK = reinterpret_cast<int8_t*>(smem + C::kOffBadK);
  int* sList = reinterpret_cast<int*>(smem + C::kOffList);
  int* sCounts = reinterpret_cast<int*>(smem + C::kOffCounts);

  const Store* qg = static_cast<const Store*>(p.q) + b * p.q_sb + h * p.q_sh;
  const Store* kg = static_cast<const Store*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const Store* vg = static_cast<const Store*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Sq;

  // Split-K (forward only): this CTA's part of the tile's non-SKIP tiles [lo, hi), before any copy:
  // a split past the tile's parts exits here (block-uniform), reading nothing.
  int lo = 0, hi = INT_MAX, parts = 1;
  if (p.n_split > 1) {
    const int total = count_nonskip<NT>(plan_row, 1, p.n_kt, tid);
    parts = split_parts(total, p.split_min, p.n_split);
    if (split == 0 && o0 == 0 && tid == 0) p.n_parts[(static_cast<int64_t>(b) * p.Hq + h) * p.n_qt + r0 / 64] = parts;
    if (split >= parts) return;
    lo = static_cast<int>(static_cast<int64_t>(total) * split / parts);
    hi = static_cast<int>(static_cast<int64_t>(total) * (split + 1) / parts);
  }

  // Query (and dO) rows -> shared; rows past Sq and PAD rows are zero-filled, never read: a PAD
  // row's q, and its grad_out, may hold anything (DESIGN.md §2). Row r's source (r0 + r, or -1) is
  // read once, by thread r, into the list's shared memory (free until compact_window's first barrier);
  // read per copied chunk instead, a thread's 8 kind loads ran one after another, each waited for by
  // its cp.async before the next was issued (sm_90 SASS).
  static_assert(BQ <= kListWindow, "the query rows borrow the list's shared memory");
  if (tid < BQ) sList[tid] = live_query(p, kin, r0 + tid) ? r0 + tid : -1;
  simt::sync_block();
  auto row_src = [&](int r) { return static_cast<int64_t>(sList[r]); };
  if constexpr (kDq) {
    const Store* dog = static_cast<const Store*>(p.dout) + b * p.do_sb + h * p.do_sh;
    Store* const dst[2] = {sQ, sDo};
    const Store* const src[2] = {qg, dog};
    const int64_t stride[2] = {p.q_ss, p.do_ss};
    gather_rows<NT, D, LD>(dst, src, stride, BQ, tid, row_src);
  } else {
    Store* const dst[1] = {sQ};
    const Store* const src[1] = {qg};
    const int64_t stride[1] = {p.q_ss};
    gather_rows<NT, D, LD>(dst, src, stride, BQ, tid, row_src);
  }
  simt::cp_async_commit();

  // This lane's two rows: local rows warp*16 + g (+8).
  int pos[2], rgrp[2];
  int8_t rkind[2];
  bool alive[2];
  float lse2[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};  // dq: lse * log2(e) and delta of the rows
HTC_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    const int i = r0 + warp * 16 + g + 8 * hh;
    pos[hh] = i + p.q_off;
    const bool in = i < p.Sq;
    rkind[hh] = in ? kin[pos[hh]] : static_cast<int8_t>(kPad);
    rgrp[hh] = in ? grp[pos[hh]] : -1;
    alive[hh] = in && rkind[hh] != kPad;
    if constexpr (kDq) {
      if (alive[hh]) {
        lse2[hh] = p.lse_in[row_base + i] * tile::kLog2e;
        delta[hh] = p.delta[row_base + i];
      }
    }
  }

  // Forward: the output accumulator; dq: the dQ accumulator.
  float acc[NF_O][4];
HTC_UNROLL
  for (int n = 0; n < NF_O; ++n)
HTC_UNROLL
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  float m_run[2] = {tile::neg_inf(), tile::neg_inf()}, l_run[2] = {0.f, 0.f};

  // Key tile `kt` (of the plan's key order) -> stage `st`, its rows gathered by position (PAD keys,
  // holes, empty slots and keys past Skv zero-filled), with its keys' kinds, groups and positions.
  // Key j of the tile is looked up by thread j (fetch: 2-3 dependent global loads, in flight while
  // the block waits for the current tile), stored to shared memory (issue), and after a barrier the
  // copies read their rows from there. Looked up by every copying thread (until 2026-11-24), a thread
  // ran 16 chains of 2-3 dependent global loads in series per tile (sm_90 bf16 D=128 SASS: each
  // chain behind a branch and behind the previous cp.async), before the tile's compute could start.
  KeyAt next_key{no_position<int>(), static_cast<int8_t>(kPad), -1};  // thread tid < BKI: its key
  // Key j of stage st's item is looked up by thread st * BKI + j: the prologue's items by distinct
  // threads, so their lookups are in flight together (stream_items).
  static_assert(C::kStages * BKI <= NT, "a thread per key of every stage");
  auto fetch = [&](int entry, int sub, int st) {
    // The sample's panel, recomputed per tile from kin (its sample index is kin's row): nothing more
    // kept live across the tile loop, where the fp32 D=256 dQ and bf16 D=128 forward kernels use
    // 254-255 registers (any more spills).
    const int32_t* pan = p.panel ? p.panel + (kin - p.kinds) / p.Skv * p.panel_len : nullptr;
    const int j = tid - st * BKI;
    if (j >= 0 && j < BKI) next_key = key_at(p, kin, grp, pan, (entry >> 3) * BK + sub * BKI + j);
  };
  auto issue = [&](int /*entry*/, int /*sub*/, int st) {
    const int j = tid - st * BKI;
    if (j >= 0 && j < BKI) {
      sKind[st * BKI + j] = next_key.kind;
      sGrp[st * BKI + j] = next_key.group;
      sKeyPos[st * BKI + j] = next_key.pos;
      sSrc[st * BKI + j] = next_key.kind != kPad ? next_key.pos : -1;
    }
    simt::sync_block();  // the stage's keys are visible to every thread (bodies read other stages)
    // One shared load per copied row (its source row, -1: zero-fill), K and V in one loop.
    const int32_t* rsrc = sSrc + st * BKI;
    Store* const dst[2] = {sK(st), sV(st)};
    const Store* const src[2] = {kg, vg};
    const int64_t stride[2] = {p.k_ss, p.v_ss};
    gather_rows<NT, D, LD>(dst, src, stride, BKI, tid, [&](int r) { return static_cast<int64_t>(rsrc[r]); });
  };
  // Tiles where some row may not attend some key can meet non-finite values that must stay unread:
  // V in the forward's P V, K in the dq's dS K (scores are masked by select, which needs nothing).
  // fp32 looks at them in every tensor-core tile, and at K in the forward too: the three-term split of
  // an infinity has NaN terms (inf - inf), so an attended one must not enter an MMA either; such rows
  // are zeroed and added back exactly, and K's scores recomputed in IEEE fp32 (body).
  auto check = [&](int entry, int /*sub*/, int st) {
    const int kind = entry & 7;
    const bool split = E == Elt::kF32 && kind != kDiag;
    bool bad = false;
    if (kind == kCausal || kind == kMasked || split) bad = my_rows_nonfinite<E, NT, D, LD>(kDq ? sK(st) : sV(st), BKI, tid);
    if (!kDq && split) bad |= my_rows_nonfinite<E, NT, D, LD>(sK(st), BKI, tid);
    return bad;
  };

  auto body = [&](int entry, int sub, int st, int any_bad) {
    // k0: first position of this item of a sequence tile (DIAG tiles are sequence tiles; a panel
    // tile's k0 < 0 leaves nk = BKI, its empty slots being PAD; nk <= 0: past the sequence).
    const int kind = entry & 7, k0 = ((entry >> 3) - p.panel_len / BK) * BK + sub * BKI;
    const int nk = p.Skv - k0 < BKI ? p.Skv - k0 : BKI;
    Store* tK = sK(st);
    Store* tV = sV(st);
    const int8_t* tKind = sKind + st * BKI;
    const int32_t* tGrp = sGrp + st * BKI;
    const int32_t* tKeyPos = sKeyPos + st * BKI;
    if (any_bad && (!kDq || E == Elt::kF32)) {
      if (!kDq) flag_nonfinite_rows<E, D, LD>({tV}, BKI, sBad, tid, true);
      if constexpr (E == Elt::kF32) flag_nonfinite_rows<E, D, LD>({tK}, BKI, sBadK, tid, false);
      simt::sync_block();
    }

    if (kind == kDiag) {
      // Each live row whose own key lies in this item: one score (row-wise dot on CUDA cores, a quad
      // of lanes per row), then one online-softmax step (forward) or one gradient step (dq). A warp
      // none of whose rows has its key here skips the item (warp-uniform): with aligned query and
      // key tiles, half of the warps for each half of a tile.
      bool on_row[2];
HTC_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        const int jl = pos[hh] - k0;
        // With a panel a TEXT/VOCO row's own key is a hole here (its panel slot computes it).
        on_row[hh] = alive[hh] && jl >= 0 && jl < nk && (p.panel_len == 0 || rkind[hh] == kVisual);
      }
      if (!simt::any_warp(on_row[0] || on_row[1])) return;
HTC_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        const int jl = pos[hh] - k0;
        const bool on = on_row[hh];
        const int jr = on ? jl : 0;
        const Store* qrow = sQ + (warp * 16 + g + 8 * hh) * LD;
        const Store* krow = tK + jr * LD;
        const Store* vrow = tV + jr * LD;
        float part = 0.f, part_dp = 0.f;
        HTC_UNROLL_N(kUnrollDot)
        for (int n = 0; n < NF_FULL; ++n) {
          const int col = n * 8 + 2 * t;
          part += to_f<E>(qrow[col]) * to_f<E>(krow[col]) + to_f<E>(qrow[col + 1]) * to_f<E>(krow[col + 1]);
          if constexpr (kDq) {
            const Store* dorow = sDo + (warp * 16 + g + 8 * hh) * LD;
            part_dp += to_f<E>(dorow[col]) * to_f<E>(vrow[col]) + to_f<E>(dorow[col + 1]) * to_f<E>(vrow[col + 1]);
          }
        }
        const tile::Capped sc = score_log2<C::kCap>(p, quad_sum(part));
        const float s = sc.s;
        // The updates select (rows not on the diagonal keep acc; what they read is never used), so
        // control flow stays warp-uniform for the fences.
        if constexpr (kDq) {
          const float dpv = quad_sum(part_dp);
          const float pr = exp2f(s - lse2[hh]);
          const float ds = pr * (dpv - delta[hh]) * sc.ds;
HTC_UNROLL
          for (int n = 0; n < NF_O; ++n) {
            const int col = o0 + n * 8 + 2 * t;
            const float k0v = to_f<E>(krow[col]), k1v = to_f<E>(krow[col + 1]);
            acc[n][2 * hh] = on ? acc[n][2 * hh] + ds * k0v : acc[n][2 * hh];
            acc[n][2 * hh + 1] = on ? acc[n][2 * hh + 1] + ds * k1v : acc[n][2 * hh + 1];
            fence_every<kFence>(n);
          }
        } else {
          (void)part_dp;
          const tile::RowStep u = tile::row_step(m_run[hh], s);
          const float pr = exp2f(s - u.ref);
          if (on) {
            l_run[hh] = l_run[hh] * u.alpha + (t == 0 ? pr : 0.f);
            m_run[hh] = u.m_new;
          }
HTC_UNROLL
          for (int n = 0; n < NF_O; ++n) {
            const int col = o0 + n * 8 + 2 * t;
            const float v0 = to_f<E>(vrow[col]), v1 = to_f<E>(vrow[col + 1]);
            acc[n][2 * hh] = on ? acc[n][2 * hh] * u.alpha + pr * v0 : acc[n][2 * hh];
            acc[n][2 * hh + 1] = on ? acc[n][2 * hh + 1] * u.alpha + pr * v1 : acc[n][2 * hh + 1];
            fence_every<kFence>(n);
          }
        }
      }
      return;
    }

    // May row hh of this lane attend column `col` of the tile? (star_mask.h rule, by tile kind;
    // tile_mask_bits says why without branches.) The rows' kinds and liveness as one opaque word per
    // sub-block: what the rule derives from them is recomputed per sub-block, not kept live across the
    // tile loop (the fp32 D=256 dq kernel spilled).
    unsigned rows_word = 0;
    auto row_kind = [&](int hh) { return static_cast<int8_t>((rows_word >> (8 * hh)) & 0xffu); };
    auto row_alive = [&](int hh) { return ((rows_word >> (16 + hh)) & 1u) != 0; };
    auto full_ok = [&](int hh, int col) { return row_alive(hh) & (col < nk); };
    // An empty panel slot's position is no_position: after every row.
    auto causal_ok = [&](int hh, int col) { return full_ok(hh, col) & (tKeyPos[col] <= pos[hh]); };
    auto masked_ok = [&](int hh, int col) {
      return full_ok(hh, col) &
             star_allowed_flat<int>(pos[hh], tKeyPos[col], row_kind(hh), rgrp[hh], tKind[col], tGrp[col], p.topology);
    };
    auto allowed = [&](int hh, int col) {
      return kind == kFull ? full_ok(hh, col) : kind == kCausal ? causal_ok(hh, col) : masked_ok(hh, col);
    };

    // The tile in sub-blocks of KS keys (dq: fewer score and dP registers live at once); not
    // unrolled, or the compiler interleaves the sub-blocks and the saving is gone.
    HTC_UNROLL_N(1)
    for (int c0 = 0; c0 < BKI; c0 += KS) {
      rows_word = static_cast<uint8_t>(rkind[0]) | (static_cast<unsigned>(static_cast<uint8_t>(rkind[1])) << 8) |
                  (static_cast<unsigned>(alive[0]) << 16) | (static_cast<unsigned>(alive[1]) << 17);
      simt::opaque(rows_word);
      unsigned bits = tile_mask_bits<NF_S>(kind, c0, t, full_ok, causal_ok, masked_ok);
      simt::opaque(bits);  // one register across the MMAs, not its ingredients (spills otherwise)
      const bool active = simt::any_warp(bits != 0);  // does any row of this warp see these keys?
      auto bit = [&](int n, int e4) { return ((bits >> (n * 4 + e4)) & 1u) != 0; };

      // S = Q K^T (and dP = dO V^T for dq) over the sub-block's keys
      float s[NF_S][4], dp[kDq ? NF_S : 1][4];
      if (active) {
HTC_UNROLL
        for (int n = 0; n < NF_S; ++n)
HTC_UNROLL
          for (int e4 = 0; e4 < 4; ++e4) {
            s[n][e4] = 0.f;
            if constexpr (kDq) dp[n][e4] = 0.f;
          }
        // Partial unrolling at large D: a fully unrolled k loop keeps many fragments in flight, which
        // at D = 256 (128 accumulator registers) pushes the kernel past 255 registers.
        HTC_UNROLL_N(kUnrollK)
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t a[T][4], ad[T][4];
          load_a<E>(a, sQ, LD, warp * 16, kk * 16, lane);
          if constexpr (kDq) load_a<E>(ad, sDo, LD, warp * 16, kk * 16, lane);
HTC_UNROLL
          for (int np = 0; np < NF_S / 2; ++np) {
            uint32_t b0[T][2], b1[T][2];
            load_b_nk<E>(b0, b1, tK, LD, c0 + np * 16, kk * 16, lane);
            mma_terms<E>(s[2 * np], a, b0);
            mma_terms<E>(s[2 * np + 1], a, b1);
            if constexpr (kDq) {
              load_b_nk<E>(b0, b1, tV, LD, c0 + np * 16, kk * 16, lane);
              mma_terms<E>(dp[2 * np], ad, b0);
              mma_terms<E>(dp[2 * np + 1], ad, b1);
            }
          }
        }
        if constexpr (E == Elt::kF32) {
          // The scores of keys holding an Inf/NaN (sBadK: block-uniform), in IEEE fp32: a quad of lanes
          // per row, kept by the lane that holds the column.
          if (any_bad) {
            for (int jl = 0; jl < KS; ++jl) {
              if (!sBadK[c0 + jl]) continue;
HTC_UNROLL
              for (int hh = 0; hh < 2; ++hh)
                set_score(s, hh, jl, t, true, quad_dot<E, D>(sQ + (warp * 16 + g + 8 * hh) * LD, tK + (c0 + jl) * LD, t));
            }
          }
        }
        if constexpr (kDq) {
          // dS = P (dP - delta), P = exp2(s - lse2); masked pairs are 0 by select.
HTC_UNROLL
          for (int n = 0; n < NF_S; ++n)
HTC_UNROLL
            for (int e4 = 0; e4 < 4; ++e4) {
              const int hh = e4 >> 1;
              const tile::Capped sc = score_log2<C::kCap>(p, s[n][e4]);
              const float pr = exp2f(sc.s - lse2[hh]);
              s[n][e4] = bit(n, e4) ? pr * (dp[n][e4] - delta[hh]) * sc.ds : 0.f;
            }
        } else {
          // Online softmax (log2 domain); masked scores never reach exp or a product.
HTC_UNROLL
          for (int hh = 0; hh < 2; ++hh) {
            float mx = tile::neg_inf();
HTC_UNROLL
            for (int n = 0; n < NF_S; ++n)
HTC_UNROLL
              for (int c = 0; c < 2; ++c) {
                const int e4 = 2 * hh + c;
                const float x = bit(n, e4) ? score_log2<C::kCap>(p, s[n][e4]).s : tile::neg_inf();
                s[n][e4] = x;
                mx = fmaxf(mx, x);
              }
            const tile::RowStep u = tile::row_step(m_run[hh], quad_max(mx));
            float sum = 0.f;
HTC_UNROLL
            for (int n = 0; n < NF_S; ++n)
HTC_UNROLL
              for (int c = 0; c < 2; ++c) {
                const int e4 = 2 * hh + c;
                const float pr = bit(n, e4) ? exp2f(s[n][e4] - u.ref) : 0.f;
                s[n][e4] = pr;
                sum += pr;
              }
            l_run[hh] = l_run[hh] * u.alpha + sum;
            m_run[hh] = u.m_new;
HTC_UNROLL
            for (int n = 0; n < NF_O; ++n) {
              acc[n][2 * hh] *= u.alpha;
              acc[n][2 * hh + 1] *= u.alpha;
            }
          }
        }
      }

      // The right factor of the second product: V (forward) or K (dq). For dq, the sub-block's
      // non-finite K rows are zeroed only now that every warp has used them for its scores.
      Store* tR = kDq ? tK : tV;
      if (kDq && any_bad) {
        simt::sync_block();
        flag_nonfinite_rows<E, D, LD>({tK + c0 * LD}, KS, sBad + c0, tid, true);
        simt::sync_block();
      }
      if (!active) continue;

      if (any_bad) {
        // Exact contribution of the zeroed non-finite rows of the right factor, to the rows allowed
        // to attend them (before the product: s is then consumed by it, not kept alive across it).
        const Store* rg = kDq ? kg : vg;
        const int64_t rs = kDq ? p.k_ss : p.v_ss;
        for (int jl = 0; jl < KS && c0 + jl < nk; ++jl) {
          const int j = c0 + jl;
          if (!sBad[j]) continue;
          float pj[2];
          column_of(s, jl, lane, pj);  // the coefficients of (this lane's rows, j)
          const bool ok[2] = {allowed(0, j) != 0, allowed(1, j) != 0};
          add_row<E>(acc, pj, ok, rg + static_cast<int64_t>(tKeyPos[j]) * rs, o0, t);
        }
      }

      // acc += P V (forward) or dS K (dq) over the sub-block's keys
HTC_UNROLL
      for (int kk = 0; kk < KS / 16; ++kk) {
        uint32_t a[T][4];
        pack_a_from_c<E>(a, s[2 * kk], s[2 * kk + 1]);
HTC_UNROLL
        for (int np = 0; np < NF_O / 2; ++np) {
          uint32_t b0[T][2], b1[T][2];
          load_b_kn<E>(b0, b1, tR, LD, c0 + kk * 16, o0 + np * 16, lane);
          mma_terms<E>(acc[2 * np], a, b0);
          mma_terms<E>(acc[2 * np + 1], a, b1);
          fence_every<kFenceProd>(np);
        }
      }
    }
  };

  stream_items<NT, C::kStages>(plan_row, 1, p.n_kt, lo, hi, C::kSub, sList, sCounts, tid, fetch, issue, check, body);

  // Epilogue. The Q rows of this warp become its output staging area (after the Q copies landed:
  // a tile with no work never waited for them).
  simt::cp_async_wait<0>();
  simt::sync_block();
  float inv[2] = {1.f, 1.f}, lse[2] = {0.f, 0.f};
  if constexpr (!kDq) {
HTC_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      const float l = quad_sum(l_run[hh]);
      inv[hh] = tile::row_inv(l, alive[hh]);  // NaN: a live row whose allowed scores were all -inf
      lse[hh] = alive[hh] ? tile::row_lse(m_run[hh], l) : tile::neg_inf();
    }
  } else {
    inv[0] = inv[1] = p.scale;  // dQ = scale * sum_j dS_ij k_j
  }
  if (kDq || parts == 1) {
HTC_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      Store* srow = sQ + (warp * 16 + g + 8 * hh) * LD;
HTC_UNROLL
      for (int n = 0; n < NF_O; ++n) {
        const int col = o0 + n * 8 + 2 * t;
        // Rows past Sq and PAD rows: exact zeros by select (a factor 0 would keep a NaN).
        srow[col] = from_f<E>(alive[hh] ? acc[n][2 * hh] * inv[hh] : 0.f);
        srow[col + 1] = from_f<E>(alive[hh] ? acc[n][2 * hh + 1] * inv[hh] : 0.f);
      }
    }
    simt::sync_warp();
    Store* out = static_cast<Store*>(kDq ? p.dq : p.out);
    constexpr int kOutChunks = C::DO / C::kChunk;
    for (int c = lane; c < 16 * kOutChunks; c += 32) {
      const int r = c / kOutChunks, col = o0 + (c % kOutChunks) * C::kChunk, i = r0 + warp * 16 + r;
      if (i < p.Sq) simt::copy16(out + (row_base + i) * D + col, sQ + (warp * 16 + r) * LD + col);
    }
    if constexpr (!kDq) {
HTC_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        const int i = r0 + warp * 16 + g + 8 * hh;
        if (t == 0 && o0 == 0 && i < p.Sq) p.lse[row_base + i] = lse[hh];
      }
    }
  } else {
    const int64_t part = static_cast<int64_t>(split) * p.B * p.Hq * p.Sq;
HTC_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      const int i = r0 + warp * 16 + g + 8 * hh;
      if (i >= p.Sq) continue;
      float* orow = p.o_part + (part + row_base + i) * D;
HTC_UNROLL
      for (int n = 0; n < NF_O; ++n) {
        const int col = o0 + n * 8 + 2 * t;
        orow[col] = alive[hh] ? acc[n][2 * hh] * inv[hh] : 0.f;
        orow[col + 1] = alive[hh] ? acc[n][2 * hh + 1] * inv[hh] : 0.f;
      }
      if (t == 0 && o0 == 0) p.lse_part[part + row_base + i] = lse[hh];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, key-tile kernel: dK and dV of BK keys of one (batch, kv head), owning every query head of
// its GQA group and every query tile that sees these keys (the plan's column), in a fixed order: no
// atomics, deterministic. Warps: BK/16 key groups x kDSplit slices of D (every warp forms the full
// S^T and dP^T of its 16 keys; it accumulates dK, dV for its D slice). Query tiles are streamed in
// sub-tiles of QS rows.

template <Elt E, int D_, int BK_, int QS_, bool kCap_ = false>
struct KeyCfg {
  static constexpr Elt kElt = E;
  static constexpr bool kCap = kCap_;  // logit soft-capping
  using Store = typename EltT<E>::Store;
  static constexpr int kTerms = EltT<E>::kTerms;
  // Up to 4 warps: BK/16 key groups x kDSplit slices of D (slices of whole 8-column fragments).
  static constexpr int D = D_, BK = BK_, QS = QS_;
  static constexpr int kKeyGroups = BK / 16;
  static constexpr int kDSplit = 4 / kKeyGroups >= 4 && D % 32 == 0 ? 4 : (4 / kKeyGroups >= 2 && D % 16 == 0 ? 2 : 1);
  static constexpr int kWarps = kKeyGroups * kDSplit, kThreads = 32 * kWarps, DS = D / kDSplit;
  static_assert(BK % 16 == 0 && kWarps <= 4 && DS % 8 == 0, "tile shape");
  static_assert(QS % 16 == 0 && 64 % QS == 0, "query sub-tile");
  static constexpr int kLd = D + 8;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(Store));
  static constexpr int kRowChunks = D / kChunk;
  static constexpr size_t kKeyBytes = size_t{BK} * kLd * sizeof(Store);
  static constexpr size_t kSubBytes = size_t{QS} * kLd * sizeof(Store);
  // Layout: K | V | (Q0 dO0) .. (Q[NS-1] dO[NS-1]) | row meta [NS][QS]: pos, group, lse2, delta (4 B
  // each), kind (1 B) | bad [QS] (the item's live Q/dO rows holding an Inf/NaN) | list | counts
  static constexpr size_t kOffSub = 2 * kKeyBytes;
  static constexpr size_t smem_bytes(int ns) {
    return (2 * kKeyBytes + 2 * ns * kSubBytes + 17 * ns * QS + QS + 15) / 16 * 16 + (kListWindow + 16) * sizeof(int);
  }
  // Pipeline stages of query sub-tiles: as many as fit (at most 4) while two CTAs still fit sm_80's
  // 164 KB per SM (the registers allow two): a sub-tile is 16 or 32 rows, its body short beside a
  // global-memory latency, so with 2 stages (one copy in flight during a body) the loads were the
  // critical path of every item. D = 256 and fp32 D >= 128 keep 2 or 3.
  static constexpr int kStages =
      smem_bytes(4) + 1024 <= 82 * 1024 ? 4 : (smem_bytes(3) + 1024 <= 82 * 1024 ? 3 : 2);
  static constexpr size_t kOffMeta = kOffSub + 2 * kStages * kSubBytes;
  static constexpr size_t kOffKind = kOffMeta + 4 * kStages * QS * 4;
  static constexpr size_t kOffBad = kOffKind + kStages * QS;
  static constexpr size_t kOffList = (kOffBad + QS + 15) / 16 * 16;
  static constexpr size_t kOffCounts = kOffList + kListWindow * sizeof(int);
  static constexpr size_t kSmemBytes = kOffCounts + 16 * sizeof(int);
  static_assert(kSmemBytes == smem_bytes(kStages), "shared memory layout");
};
// Query sub-tiles of 16 rows where registers are tight (fp32's three-term operands; D >= 96).
template <Elt E, int D, bool kCap = false>
using DkvCfg = KeyCfg<E, D, fwd_block_k(E, D), (E == Elt::kF32 || D >= 96) ? 16 : 32, kCap>;

template <class C>
HTC_DEV void star_key_block(const StarParams& p, unsigned char* smem, int tid, int64_t bid) {
  using Store = typename C::Store;
  constexpr Elt E = C::kElt;
  constexpr int T = C::kTerms, D = C::D, BK = C::BK, QS = C::QS, LD = C::kLd, NT = C::kThreads;
  constexpr int DS = C::DS, NF_Q = QS / 8, NF_D = DS / 8, NF_FULL = D / 8;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  [[maybe_unused]] constexpr int kUnrollK = E == Elt::kF32 ? 1 : D >= 128 ? 2 : D / 16;
  constexpr int kFenceProd = E == Elt::kF32 ? 2 : 0;
  const int kgrp = warp / C::kDSplit, d0 = (warp % C::kDSplit) * DS;

  const int kt = static_cast<int>(bid % p.n_kt);
  int64_t rest = bid / p.n_kt;
  const int hk = static_cast<int>(rest % p.Hkv);
  const int b = static_cast<int>(rest / p.Hkv);
  const int group = p.Hq / p.Hkv;
  const int bl = p.plan_batch == 1 ? 0 : b;
  const int j0 = kt * BK;  // first mapped key of this tile
  const int8_t* kin = p.kinds + static_cast<int64_t>(bl) * p.Skv;
  const int32_t* grp = p.groups + static_cast<int64_t>(bl) * p.Skv;
  const int32_t* pan = p.panel ? p.panel + static_cast<int64_t>(bl) * p.panel_len : nullptr;
  const uint8_t* plan_col = p.plan + static_cast<int64_t>(bl) * p.n_qt * p.n_kt + kt;
  // The plan column's entries into L1, in flight with the key lookups below (star_row_block says why).
  for (int x = tid; x < p.n_qt && x < kListWindow; x += NT) simt::prefetch_l1(plan_col + static_cast<int64_t>(x) * p.n_kt);

  Store* sK = reinterpret_cast<Store*>(smem);
  Store* sV = reinterpret_cast<Store*>(smem + C::kKeyBytes);
  auto sQ = [&](int st) { return reinterpret_cast<Store*>(smem + C::kOffSub + 2 * st * C::kSubBytes); };
  auto sDo = [&](int st) { return reinterpret_cast<Store*>(smem + C::kOffSub + (2 * st + 1) * C::kSubBytes); };
  constexpr int NS = C::kStages;
  int32_t* mPos = reinterpret_cast<int32_t*>(smem + C::kOffMeta);  // [NS][QS]
  int32_t* mGrp = mPos + NS * QS;                                  // [NS][QS]
  float* mLse2 = reinterpret_cast<float*>(mGrp + NS * QS);         // [NS][QS]
  float* mDelta = mLse2 + NS * QS;                                 // [NS][QS]
  int8_t* mKind = reinterpret_cast<int8_t*>(smem + C::kOffKind);   // [NS][QS]
  int8_t* sBad = reinterpret_cast<int8_t*>(smem + C::kOffBad);     // [QS]
  int* sList = reinterpret_cast<int*>(smem + C::kOffList);
  int* sCounts = reinterpret_cast<int*>(smem + C::kOffCounts);

  const Store* kg = static_cast<const Store*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const Store* vg = static_cast<const Store*>(p.v) + b * p.v_sb + hk * p.v_sh;
  // Keys gathered by position (PAD keys, holes, empty slots and keys past Skv zero-filled), each looked
  // up once into the list's shared memory (free until the first compact_window, which begins with a
  // barrier); the copies read their rows there (star_row_block's issue says why).
  static_assert(BK <= kListWindow, "the key rows borrow the list's shared memory");
  if (tid < BK) {
    const KeyAt a = key_at(p, kin, grp, pan, j0 + tid);
    sList[tid] = a.kind != kPad ? a.pos : -1;
  }
  simt::sync_block();
  {
    Store* const dst[2] = {sK, sV};
    const Store* const src[2] = {kg, vg};
    const int64_t stride[2] = {p.k_ss, p.v_ss};
    gather_rows<NT, D, LD>(dst, src, stride, BK, tid, [&](int r) { return static_cast<int64_t>(sList[r]); });
  }
  simt::cp_async_commit();

  // This lane's two keys: kgrp*16 + g (+8) of the tile.
  int kpos[2], kgr[2];
  int8_t kkind[2];
  bool kalive[2];
HTC_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    const KeyAt a = key_at(p, kin, grp, pan, j0 + kgrp * 16 + g + 8 * hh);
    kpos[hh] = a.pos;
    kkind[hh] = a.kind;
    kgr[hh] = a.group;
    kalive[hh] = a.kind != kPad;
  }

  float dk[NF_D][4], dv[NF_D][4];
HTC_UNROLL
  for (int n = 0; n < NF_D; ++n)
HTC_UNROLL
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  // fp32 (check, body): -1 until the first item; then 0, or bit 0 (a key of the tile holds an Inf/NaN:
  // block-uniform) with bits 1, 2 (this lane's keys hh = 0, 1 do).
  [[maybe_unused]] int k_nonfinite = -1;

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const Store* qg = static_cast<const Store*>(p.q) + b * p.q_sb + h * p.q_sh;
    const Store* dog = static_cast<const Store*>(p.dout) + b * p.do_sb + h * p.do_sh;
    const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Sq;
    // Thread st * QS + r: row r of stage st's sub-tile (fetch loads, issue stores).
    int8_t pend_kind = kPad;
    int32_t pend_group = -1;
    float pend_lse2 = 0.f, pend_delta = 0.f;

    // Sub-tile `sub` of query tile entry>>3 -> stage st: Q and dO rows (PAD rows and rows past Sq
    // zero-filled: never read) and the rows' position, kind, group, lse (log2) and delta. As in the
    // row kernel, row r's metadata is loaded by thread r (fetch: lse and delta come from L2 or HBM,
    // in flight while the block waits for the current sub-tile) and stored to shared memory (issue);
    // the copies take the kinds from there after a barrier.
    // Row r of stage st's sub-tile is looked up by thread st * QS + r (stream_items: the prologue's
    // lookups in flight together).
    static_assert(C::kStages * QS <= NT, "a thread per row of every stage");
    auto fetch = [&](int entry, int sub, int st) {
      const int r = tid - st * QS;
      if (r >= 0 && r < QS) {
        // Read at a clamped, always valid row and selected: four independent loads (live_query).
        const int i = (entry >> 3) * 64 + sub * QS + r, ic = i < p.Sq ? i : p.Sq - 1;
        const bool in = i < p.Sq;
        const int8_t kind = kin[ic + p.q_off];
        const float lse = p.lse_in[row_base + ic], delta = p.delta[row_base + ic];
        const int32_t group = grp[ic + p.q_off];
        pend_kind = in ? kind : static_cast<int8_t>(kPad);
        const bool ok = pend_kind != kPad;
        pend_lse2 = ok ? lse * tile::kLog2e : 0.f;
        pend_delta = ok ? delta : 0.f;
        pend_group = in ? group : -1;
      }
    };
    auto issue = [&](int entry, int sub, int st) {
      const int i0 = (entry >> 3) * 64 + sub * QS, r = tid - st * QS;
      if (r >= 0 && r < QS) {
        mPos[st * QS + r] = i0 + r + p.q_off;
        mKind[st * QS + r] = pend_kind;
        mGrp[st * QS + r] = pend_group;
        mLse2[st * QS + r] = pend_lse2;
        mDelta[st * QS + r] = pend_delta;
      }
      simt::sync_block();  // the stage's row kinds are visible to every thread
      const int8_t* kind = mKind + st * QS;
      auto live = [&](int r) { return kind[r] != kPad; };
      Store* const dst[2] = {sQ(st), sDo(st)};
      const Store* const src[2] = {qg, dog};
      const int64_t stride[2] = {p.q_ss, p.do_ss};
      copy_rows<NT, D, LD>(dst, src, stride, i0, QS, tid, live);
    };
    // CAUSAL/MASKED items: do their Q or dO rows hold an Inf/NaN (zeroed and added back in body)? And
    // fp32: do this tile's keys? Asked once, at the CTA's first item (K has landed with it): their
    // scores are then recomputed in IEEE fp32 (body), the three-term split of an infinity having NaN
    // terms.
    auto check = [&](int entry, int, int st) {
      const int kind = entry & 7;
      bool bad = E == Elt::kF32 && k_nonfinite < 0 && my_rows_nonfinite<E, NT, D, LD>(sK, BK, tid);
      if (kind != kFull && kind != kDiag)
        bad |= my_rows_nonfinite<E, NT, D, LD>(sQ(st), QS, tid) || my_rows_nonfinite<E, NT, D, LD>(sDo(st), QS, tid);
      return bad;
    };

    auto body = [&](int entry, int sub, int st, int any) {
      if constexpr (E == Elt::kF32) {
        if (k_nonfinite < 0) {  // `any` may also be the Q/dO rows': the block decides on its keys alone
          int mine = 0;
          if (any)
HTC_UNROLL
            for (int hh = 0; hh < 2; ++hh)
              mine |= row_nonfinite<E, D>(sK + (kgrp * 16 + g + 8 * hh) * LD) ? 2 << hh : 0;
          k_nonfinite = mine | (any && simt::sync_block_or(mine != 0) ? 1 : 0);
        }
      }
      const int kind = entry & 7, i0 = (entry >> 3) * 64 + sub * QS;
      if (i0 >= p.Sq) return;  // a sub-tile past the last query row
      const Store* tQ = sQ(st);
      const Store* tDo = sDo(st);
      const int32_t* tPos = mPos + st * QS;
      const int32_t* tGrp = mGrp + st * QS;
      const int8_t* tKind = mKind + st * QS;
      const float* tLse2 = mLse2 + st * QS;
      const float* tDelta = mDelta + st * QS;

      if (kind == kDiag) {
        // Each live key whose own query row lies in this sub-tile: p, dp by row-wise dots over D (a
        // quad of lanes per key), then dV += p dO, dK += dS q on this warp's slice of D. A warp none
        // of whose keys has its row here skips the sub-tile (warp-uniform): with aligned tiles, all
        // but the warps of one key group of 16 per sub-tile of 16 rows.
        bool on_key[2];
HTC_UNROLL
        for (int hh = 0; hh < 2; ++hh) {
          const int il = kpos[hh] - p.q_off - i0;
          on_key[hh] = kalive[hh] && il >= 0 && il < QS && tKind[il >= 0 && il < QS ? il : 0] != kPad;
        }
        if (!simt::any_warp(on_key[0] || on_key[1])) return;
HTC_UNROLL
        for (int hh = 0; hh < 2; ++hh) {
          const int il = kpos[hh] - p.q_off - i0;
          const bool on = on_key[hh];
          const int ir = on ? il : 0;
          const Store* qrow = tQ + ir * LD;
          const Store* dorow = tDo + ir * LD;
          const Store* krow = sK + (kgrp * 16 + g + 8 * hh) * LD;
          const Store* vrow = sV + (kgrp * 16 + g + 8 * hh) * LD;
          float ps = 0.f, pd = 0.f;
HTC_UNROLL
          for (int n = 0; n < NF_FULL; ++n) {
            const int col = n * 8 + 2 * t;
            ps += to_f<E>(qrow[col]) * to_f<E>(krow[col]) + to_f<E>(qrow[col + 1]) * to_f<E>(krow[col + 1]);
            pd += to_f<E>(dorow[col]) * to_f<E>(vrow[col]) + to_f<E>(dorow[col + 1]) * to_f<E>(vrow[col + 1]);
          }
          const tile::Capped sc = score_log2<C::kCap>(p, quad_sum(ps));
          const float dpv = quad_sum(pd);
          if (on) {
            const float pr = exp2f(sc.s - tLse2[ir]);
            const float ds = pr * (dpv - tDelta[ir]) * sc.ds;
HTC_UNROLL
            for (int n = 0; n < NF_D; ++n) {
              const int col = d0 + n * 8 + 2 * t;
              dv[n][2 * hh] += pr * to_f<E>(dorow[col]);
              dv[n][2 * hh + 1] += pr * to_f<E>(dorow[col + 1]);
              dk[n][2 * hh] += ds * to_f<E>(qrow[col]);
              dk[n][2 * hh + 1] += ds * to_f<E>(qrow[col + 1]);
            }
          }
        }
        return;
      }

      // May key hh of this lane be attended by query column `col` of the sub-tile? (tile_mask_bits)
      auto full_ok = [&](int hh, int col) { return kalive[hh] & (tKind[col] != kPad); };
      auto causal_ok = [&](int hh, int col) { return full_ok(hh, col) & (kpos[hh] <= tPos[col]); };
      auto masked_ok = [&](int hh, int col) {
        return kalive[hh] &
               star_allowed_flat<int>(tPos[col], kpos[hh], tKind[col], tGrp[col], kkind[hh], kgr[hh], p.topology);
      };
      auto allowed = [&](int hh, int col) {
        return kind == kFull ? full_ok(hh, col) : kind == kCausal ? causal_ok(hh, col) : masked_ok(hh, col);
      };
      unsigned bits = tile_mask_bits<NF_Q>(kind, 0, t, full_ok, causal_ok, masked_ok);
      // An item whose Q or dO rows may hold an Inf/NaN (check; CAUSAL/MASKED items only). dV += P^T dO and
      // dK += dS^T Q multiply every row of the item by the zeros of the keys it may not attend, and
      // 0 * Inf/NaN = NaN: such a row is zeroed before any warp reads it, kept out of every MMA (its
      // columns of P^T and dS^T selected to 0), and its pairs with the keys that may see it are computed
      // on CUDA cores afterwards (below), exactly. Rare: non-finite activations or gradients.
      const bool fix = any && kind != kFull;
      if (fix) {
        flag_nonfinite_rows<E, D, LD>({sQ(st), sDo(st)}, QS, sBad, tid, true);
        simt::sync_block();
        unsigned out = 0;
HTC_UNROLL
        for (int n = 0; n < NF_Q; ++n)
HTC_UNROLL
          for (int e4 = 0; e4 < 4; ++e4) out |= (sBad[n * 8 + 2 * t + (e4 & 1)] ? 1u : 0u) << (n * 4 + e4);
        bits &= ~out;
      }
      simt::opaque(bits);  // one register across the MMAs, not its ingredients (spills otherwise)

      if (simt::any_warp(bits != 0)) {  // does any key of this warp see these rows?
        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys (full D).
        float s[NF_Q][4], dp[NF_Q][4];
HTC_UNROLL
        for (int n = 0; n < NF_Q; ++n)
HTC_UNROLL
          for (int e4 = 0; e4 < 4; ++e4) s[n][e4] = dp[n][e4] = 0.f;
        HTC_UNROLL_N(kUnrollK)
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ak[T][4], av[T][4];
          load_a<E>(ak, sK, LD, kgrp * 16, kk * 16, lane);
          load_a<E>(av, sV, LD, kgrp * 16, kk * 16, lane);
HTC_UNROLL
          for (int np = 0; np < NF_Q / 2; ++np) {
            uint32_t b0[T][2], b1[T][2];
            load_b_nk<E>(b0, b1, tQ, LD, np * 16, kk * 16, lane);
            mma_terms<E>(s[2 * np], ak, b0);
            mma_terms<E>(s[2 * np + 1], ak, b1);
            load_b_nk<E>(b0, b1, tDo, LD, np * 16, kk * 16, lane);
            mma_terms<E>(dp[2 * np], av, b0);
            mma_terms<E>(dp[2 * np + 1], av, b1);
          }
        }
        if constexpr (E == Elt::kF32) {
          // The scores of this lane's keys holding an Inf/NaN, in IEEE fp32 (a quad of lanes per key).
          if (k_nonfinite > 0) {
            for (int il = 0; il < QS; ++il)
HTC_UNROLL
              for (int hh = 0; hh < 2; ++hh)
                set_score(s, hh, il, t, (k_nonfinite & (2 << hh)) != 0,
                          quad_dot<E, D>(sK + (kgrp * 16 + g + 8 * hh) * LD, tQ + il * LD, t));
          }
        }
        // P^T and dS^T (masked pairs: 0 by select, so NaN/Inf in masked scores goes nowhere).
HTC_UNROLL
        for (int n = 0; n < NF_Q; ++n)
HTC_UNROLL
          for (int e4 = 0; e4 < 4; ++e4) {
            const int col = n * 8 + 2 * t + (e4 & 1);
            const tile::Capped sc = score_log2<C::kCap>(p, s[n][e4]);
            const float pr = exp2f(sc.s - tLse2[col]);
            const bool a = ((bits >> (n * 4 + e4)) & 1u) != 0;
            s[n][e4] = a ? pr : 0.f;
            dp[n][e4] = a ? pr * (dp[n][e4] - tDelta[col]) * sc.ds : 0.f;
          }
        // dV += P^T dO, dK += dS^T Q on this warp's slice of D.
HTC_UNROLL
        for (int kk = 0; kk < QS / 16; ++kk) {
          uint32_t ap[T][4], as[T][4];
          pack_a_from_c<E>(ap, s[2 * kk], s[2 * kk + 1]);
          pack_a_from_c<E>(as, dp[2 * kk], dp[2 * kk + 1]);
HTC_UNROLL
          for (int np = 0; np < NF_D / 2; ++np) {
            uint32_t b0[T][2], b1[T][2];
            load_b_kn<E>(b0, b1, tDo, LD, kk * 16, d0 + np * 16, lane);
            mma_terms<E>(dv[2 * np], ap, b0);
            mma_terms<E>(dv[2 * np + 1], ap, b1);
            load_b_kn<E>(b0, b1, tQ, LD, kk * 16, d0 + np * 16, lane);
            mma_terms<E>(dk[2 * np], as, b0);
            mma_terms<E>(dk[2 * np + 1], as, b1);
            fence_every<kFenceProd>(np);
          }
          if constexpr (NF_D % 2 == 1) {  // an odd number of 8-column fragments in the slice
            uint32_t b0[T][2];
            load_b_kn1<E>(b0, tDo, LD, kk * 16, d0 + (NF_D - 1) * 8, lane);
            mma_terms<E>(dv[NF_D - 1], ap, b0);
            load_b_kn1<E>(b0, tQ, LD, kk * 16, d0 + (NF_D - 1) * 8, lane);
            mma_terms<E>(dk[NF_D - 1], as, b0);
          }
        }
      }
      if (fix) {
        // Each zeroed row's P^T and dS^T with this lane's keys, recomputed from its raw q
        // and dO (global memory) in fp32 (a quad of lanes per key), added where the key may see the row.
        HTC_UNROLL_N(1)
        for (int il = 0; il < QS; ++il) {
          if (!sBad[il]) continue;  // block-uniform
          const Store* qrow = qg + static_cast<int64_t>(i0 + il) * p.q_ss;
          const Store* dorow = dog + static_cast<int64_t>(i0 + il) * p.do_ss;
          float pr[2], ds[2];
          bool ok[2];
HTC_UNROLL
          for (int hh = 0; hh < 2; ++hh) {
            const int r = kgrp * 16 + g + 8 * hh;
            const tile::Capped sc = score_log2<C::kCap>(p, quad_dot<E, D>(sK + r * LD, qrow, t));
            pr[hh] = exp2f(sc.s - tLse2[il]);
            ds[hh] = pr[hh] * (quad_dot<E, D>(sV + r * LD, dorow, t) - tDelta[il]) * sc.ds;
            ok[hh] = allowed(hh, il);
          }
          add_row<E, 1>(dv, pr, ok, dorow, d0, t);
          add_row<E, 1>(dk, ds, ok, qrow, d0, t);
        }
      }
    };
    stream_items<NT, C::kStages>(plan_col, p.n_kt, p.n_qt, 0, INT_MAX, 64 / QS, sList, sCounts, tid, fetch, issue, check, body);
  }

  // Epilogue: stage dK (x scale) and dV in the K / V tiles (each warp its own keys and D slice), then
  // 16-byte stores of the rows inside the sequence.
  simt::cp_async_wait<0>();
  simt::sync_block();
HTC_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    const int r = kgrp * 16 + g + 8 * hh;
HTC_UNROLL
    for (int n = 0; n < NF_D; ++n) {
      const int col = d0 + n * 8 + 2 * t;
      // Keys nobody attends (PAD, past the end) get exact zeros by select.
      sK[r * LD + col] = from_f<E>(kalive[hh] ? dk[n][2 * hh] * p.scale : 0.f);
      sK[r * LD + col + 1] = from_f<E>(kalive[hh] ? dk[n][2 * hh + 1] * p.scale : 0.f);
      sV[r * LD + col] = from_f<E>(kalive[hh] ? dv[n][2 * hh] : 0.f);
      sV[r * LD + col + 1] = from_f<E>(kalive[hh] ? dv[n][2 * hh + 1] : 0.f);
    }
  }
  simt::sync_block();
  // Rows stored from each key's one slot (star_mask.h mapped_owner): not from holes, empty slots or
  // past the sequence; one writer per dK/dV row.
  Store* dkg = static_cast<Store*>(p.dk) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Skv * D;
  Store* dvg = static_cast<Store*>(p.dv) + (static_cast<int64_t>(b) * p.Hkv + hk) * p.Skv * D;
  const KeyMap map{pan, p.panel_len, p.Skv};
  for (int c = tid; c < BK * C::kRowChunks; c += NT) {
    const int r = c / C::kRowChunks, cc = c % C::kRowChunks;
    const int j = j0 + r;
    if (j >= p.panel_len + p.Skv || !mapped_owner(kin, map, int64_t{j})) continue;
    const int64_t row = key_at(p, kin, grp, pan, j).pos;
    simt::copy16(dkg + row * D + cc * C::kChunk, sK + r * LD + cc * C::kChunk);
    simt::copy16(dvg + row * D + cc * C::kChunk, sV + r * LD + cc * C::kChunk);
  }
}

// Backward preprocessing: delta_i = dO_i . O_i - grad_lse_i on live rows (FlashAttention-2, plus the
// gradient reaching lse directly), 0 on PAD rows whatever their dO holds. One warp per row.
template <Elt E, int D>
HTC_DEV void star_delta_warp(const StarParams& p, int64_t row, int lane) {
  using Store = typename EltT<E>::Store;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Sq;
  if (row >= rows) return;
  const int i = static_cast<int>(row % p.Sq);
  const int h = static_cast<int>((row / p.Sq) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Sq) * p.Hq));
  const int bl = p.plan_batch == 1 ? 0 : b;
  const bool live = p.kinds[static_cast<int64_t>(bl) * p.Skv + i + p.q_off] != kPad;
  const Store* dorow = static_cast<const Store*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_ss;
  const Store* orow = static_cast<const Store*>(p.o) + b * p.o_sb + h * p.o_sh + i * p.o_ss;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_f<E>(dorow[d]) * to_f<E>(orow[d]);
  for (int m = 16; m >= 1; m >>= 1) acc += simt::shfl_xor(acc, m);
  if (lane == 0) p.delta[row] = live ? acc - (p.grad_lse ? p.grad_lse[row] : 0.f) : 0.f;
}

// Split-K combine: one thread per (row, 4 columns) of [rows = B*Hq*Sq, D]; partials in split order.
template <Elt E, int D>
HTC_DEV void star_combine_thread(const StarParams& p, int64_t idx) {
  using Store = typename EltT<E>::Store;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Sq;
  if (idx >= rows * (D / 4)) return;
  const int64_t row = idx / (D / 4);
  const int c0 = static_cast<int>(idx % (D / 4)) * 4;
  // The row's query tile (plan tiles of 64 rows): one part was written to out/lse by its CTA.
  const int parts = p.n_parts[row / p.Sq * p.n_qt + static_cast<int>(row % p.Sq) / 64];
  if (parts <= 1) return;
  const float lse = tile::combine_lse(p.lse_part + row, rows, parts);
  float o[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k = 0; k < parts; ++k) {
    const float w = tile::combine_weight(p.lse_part[k * rows + row], lse);
    if (w == 0.f) continue;  // a split that saw nothing (its partial is 0; skip 0 * anything)
    const float* src = p.o_part + (k * rows + row) * D + c0;
HTC_UNROLL
    for (int d = 0; d < 4; ++d) o[d] += w * src[d];
  }
  Store* out = static_cast<Store*>(p.out) + row * D + c0;
HTC_UNROLL
  for (int d = 0; d < 4; ++d) out[d] = from_f<E>(o[d]);
  if (c0 == 0) p.lse[row] = lse;
}

#if defined(__CUDACC__)
// The __global__ entry points (1-D grids; the bodies above take thread and block indices).
// Forward (C = FwdCfg) and dQ (C = DqCfg): grid B * Hq * ceil(Sq / C::BQ) * n_split * C::kOSplit.
template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) star_row_kernel(const StarParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  star_row_block<C>(p, smem, static_cast<int>(threadIdx.x), static_cast<int64_t>(blockIdx.x));
}
// dK, dV (C = DkvCfg): grid B * Hkv * n_kt.
template <class C>
__global__ void __launch_bounds__(C::kThreads, 1) star_key_kernel(const StarParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  star_key_block<C>(p, smem, static_cast<int>(threadIdx.x), static_cast<int64_t>(blockIdx.x));
}
// Split-K combine: grid ceil(B * Hq * Sq * D / 4 / 256) x 256 threads.
template <Elt E, int D>
__global__ void __launch_bounds__(256) star_combine_kernel(const StarParams p) {
  star_combine_thread<E, D>(p, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}
// delta: one warp per row, 8 warps per block.
template <Elt E, int D>
__global__ void __launch_bounds__(256) star_delta_kernel(const StarParams p) {
  star_delta_warp<E, D>(p, static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32, static_cast<int>(threadIdx.x % 32));
}
#endif

}  // namespace htc::star_cuda
