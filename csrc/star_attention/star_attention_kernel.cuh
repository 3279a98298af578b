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
//  - K/V tiles of BK keys stream through a 2-stage cp.async pipeline (16-byte copies, rows of PAD keys
//    and past the end zero-filled: never read);
//  - FULL/CAUSAL/MASKED tiles: S = Q K^T and O += P V on tensor cores (bf16/fp16 operands; fp32 inputs
//    as three bf16 terms, star_tile_math.h), the mask applied per element by select (star_allowed
//    for MASKED), online softmax in registers; a warp whose rows see nothing in the tile skips it;
//  - DIAG tiles (visual rows that attend only themselves): a row-wise dot on CUDA cores, one quad of
//    lanes per row, no MMA;
//  - "masked means never read": masked scores are replaced (select), PAD query rows are zero-filled on
//    load, and in CAUSAL/MASKED tiles a V row holding Inf/NaN is zeroed in shared memory before the
//    P V product (0 * NaN would leak into every row) and added back exactly, from global memory, only
//    to the rows allowed to attend it;
//  - split-K (decode, small B*H): CTA `split` of n_split takes a contiguous share of the tile list
//    (balanced by count) and writes a normalised fp32 partial and its lse; star_combine_block merges
//    them in split order (deterministic).
#pragma once
#include <climits>
#include <cstdint>

#include "common/half_bits.h"
#include "common/simt.h"
#include "star_attention/star_mask.h"
#include "star_attention/star_tile_math.h"

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
  void* out;       // [B, Hq, Sq, D] contiguous, q's dtype
  float* lse;      // [B, Hq, Sq]
  float* o_part;   // split-K: [n_split, B, Hq, Sq, D] fp32 (normalised partial outputs)
  float* lse_part; // split-K: [n_split, B, Hq, Sq]
  const int8_t* kinds;   // [plan_batch, Skv]
  const int32_t* groups; // [plan_batch, Skv]
  const uint8_t* plan;   // [plan_batch, n_qt, n_kt]
  int B, Hq, Hkv, Sq, Skv, n_qt, n_kt, q_off, plan_batch, topology, n_split;
  float scale_log2;  // softmax scale * log2(e)
};

// ---------------------------------------------------------------------------------------------------
// Forward

template <Elt E, int D_, int BK_>
struct FwdCfg {
  static constexpr Elt kElt = E;
  using Store = typename EltT<E>::Store;
  static constexpr int kTerms = EltT<E>::kTerms;
  static constexpr int D = D_, BK = BK_, BQ = 64, kWarps = 4, kThreads = 128;
  static_assert(D % 16 == 0 && BK % 16 == 0 && BK <= 64, "tile shape");
  // Shared rows padded by 16 bytes (bf16/fp16) or 32 bytes (fp32): the 8 rows of an ldmatrix, and
  // the float2 fragment loads of a half-warp, hit distinct banks.
  static constexpr int kLd = D + 8;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(Store));  // elements per 16-byte copy
  static constexpr int kRowChunks = D / kChunk;
  static constexpr size_t kQBytes = size_t{BQ} * kLd * sizeof(Store);
  static constexpr size_t kTileBytes = size_t{BK} * kLd * sizeof(Store);
  // Layout: Q | K0 V0 | K1 V1 | key kinds [2][BK] | key groups [2][BK] | vbad [BK] | list | counts
  static constexpr size_t kOffK = kQBytes;
  static constexpr size_t kOffMeta = kOffK + 4 * kTileBytes;
  static constexpr size_t kOffGroups = kOffMeta + 2 * BK;
  static constexpr size_t kOffBad = kOffGroups + 2 * BK * sizeof(int32_t);
  static constexpr size_t kOffList = (kOffBad + BK + 15) / 16 * 16;
  static constexpr size_t kOffCounts = kOffList + kListWindow * sizeof(int);
  static constexpr size_t kSmemBytes = kOffCounts + 16 * sizeof(int);
};

template <class C>
HTC_DEV void star_fwd_block(const StarParams& p, unsigned char* smem, int tid, int64_t bid) {
  using Store = typename C::Store;
  constexpr Elt E = C::kElt;
  constexpr int T = C::kTerms, D = C::D, BK = C::BK, BQ = C::BQ, LD = C::kLd, NT = C::kThreads;
  constexpr int NF_S = BK / 8, NF_O = D / 8;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

  const int split = static_cast<int>(bid % p.n_split);
  int64_t rest = bid / p.n_split;
  const int qt = static_cast<int>(rest % p.n_qt);
  rest /= p.n_qt;
  const int h = static_cast<int>(rest % p.Hq);
  const int b = static_cast<int>(rest / p.Hq);
  const int hk = h / (p.Hq / p.Hkv);
  const int bl = p.plan_batch == 1 ? 0 : b;
  const int8_t* kin = p.kinds + static_cast<int64_t>(bl) * p.Skv;
  const int32_t* grp = p.groups + static_cast<int64_t>(bl) * p.Skv;
  const uint8_t* plan_row = p.plan + (static_cast<int64_t>(bl) * p.n_qt + qt) * p.n_kt;
  const int r0 = qt * BQ;

  Store* sQ = reinterpret_cast<Store*>(smem);
  // Stage st: K at kOffK + 2 st kTileBytes, V right after it (computed, not an array: a run-time
  // index into an array of pointers would live in local memory).
  auto sK = [&](int st) { return reinterpret_cast<Store*>(smem + C::kOffK + 2 * st * C::kTileBytes); };
  auto sV = [&](int st) { return reinterpret_cast<Store*>(smem + C::kOffK + (2 * st + 1) * C::kTileBytes); };
  int8_t* sKind = reinterpret_cast<int8_t*>(smem + C::kOffMeta);
  int32_t* sGrp = reinterpret_cast<int32_t*>(smem + C::kOffGroups);
  int8_t* sBad = reinterpret_cast<int8_t*>(smem + C::kOffBad);
  int* sList = reinterpret_cast<int*>(smem + C::kOffList);
  int* sCounts = reinterpret_cast<int*>(smem + C::kOffCounts);

  const Store* qg = static_cast<const Store*>(p.q) + b * p.q_sb + h * p.q_sh;
  const Store* kg = static_cast<const Store*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const Store* vg = static_cast<const Store*>(p.v) + b * p.v_sb + hk * p.v_sh;

  // Query tile -> shared; rows past Sq and PAD rows are zero-filled (never read from memory).
  for (int c = tid; c < BQ * C::kRowChunks; c += NT) {
    const int r = c / C::kRowChunks, cc = c % C::kRowChunks, i = r0 + r;
    const bool ok = i < p.Sq && kin[i + p.q_off] != kPad;
    simt::cp_async16(sQ + r * LD + cc * C::kChunk, ok ? qg + i * p.q_ss + cc * C::kChunk : qg, ok ? 16 : 0);
  }
  simt::cp_async_commit();

  // This lane's two rows: local rows warp*16 + g (+8).
  int pos[2], rgrp[2];
  int8_t rkind[2];
  bool alive[2];
HTC_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    const int i = r0 + warp * 16 + g + 8 * hh;
    pos[hh] = i + p.q_off;
    const bool in = i < p.Sq;
    rkind[hh] = in ? kin[pos[hh]] : static_cast<int8_t>(kPad);
    rgrp[hh] = in ? grp[pos[hh]] : -1;
    alive[hh] = in && rkind[hh] != kPad;
  }

  float acc[NF_O][4];
HTC_UNROLL
  for (int n = 0; n < NF_O; ++n)
HTC_UNROLL
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  float m_run[2] = {tile::neg_inf(), tile::neg_inf()}, l_run[2] = {0.f, 0.f};

  // Issues the copies of key tile `kt` into stage `st` (PAD keys and keys past Skv zero-filled).
  auto issue_kv = [&](int kt, int st) {
    const int k0 = kt * BK;
    for (int c = tid; c < BK * C::kRowChunks; c += NT) {
      const int r = c / C::kRowChunks, cc = c % C::kRowChunks, j = k0 + r;
      const bool ok = j < p.Skv && kin[j] != kPad;
      const int64_t off = ok ? j * p.k_ss + cc * C::kChunk : 0;
      const int64_t voff = ok ? j * p.v_ss + cc * C::kChunk : 0;
      simt::cp_async16(sK(st) + r * LD + cc * C::kChunk, kg + off, ok ? 16 : 0);
      simt::cp_async16(sV(st) + r * LD + cc * C::kChunk, vg + voff, ok ? 16 : 0);
    }
    if (tid < BK) {
      const int j = k0 + tid;
      sKind[st * BK + tid] = j < p.Skv ? kin[j] : static_cast<int8_t>(kPad);
      sGrp[st * BK + tid] = j < p.Skv ? grp[j] : -1;
    }
  };
  // Does any V chunk this thread copied into stage `st` hold an Inf/NaN?
  auto my_v_bad = [&](int st) {
    bool bad = false;
    for (int c = tid; c < BK * C::kRowChunks; c += NT) {
      const int r = c / C::kRowChunks, cc = c % C::kRowChunks;
      bad |= nonfinite16<E>(simt::load16(sV(st) + r * LD + cc * C::kChunk));
    }
    return bad;
  };

  // Split-K share of the non-SKIP tiles (balanced by count).
  int lo = 0, hi = INT_MAX;
  if (p.n_split > 1) {
    const int total = count_nonskip<NT>(plan_row, 1, p.n_kt, tid);
    lo = static_cast<int>(static_cast<int64_t>(total) * split / p.n_split);
    hi = static_cast<int>(static_cast<int64_t>(total) * (split + 1) / p.n_split);
  }

  int seen = 0;
  for (int w0 = 0; w0 < p.n_kt && seen < hi; w0 += kListWindow) {
    const int n_list = compact_window<NT>(plan_row, 1, p.n_kt, w0, lo, hi, seen, sList, sCounts, tid);
    if (n_list == 0) continue;
    issue_kv(sList[0] >> 3, 0);
    simt::cp_async_commit();
    for (int e = 0; e < n_list; ++e) {
      const int entry = sList[e], kind = entry & 7, kt = entry >> 3, st = e & 1;
      const int k0 = kt * BK, nk = p.Skv - k0 < BK ? p.Skv - k0 : BK;
      const bool masked_tile = kind == kCausal || kind == kMasked;
      simt::cp_async_wait<0>();
      // Barrier: this tile (and Q) visible to all; every warp is done with the other stage.
      const int any_bad = simt::sync_block_or(masked_tile && my_v_bad(st));
      if (e + 1 < n_list) issue_kv(sList[e + 1] >> 3, st ^ 1);
      simt::cp_async_commit();
      const Store* tK = sK(st);
      const Store* tV = sV(st);
      const int8_t* tKind = sKind + st * BK;
      const int32_t* tGrp = sGrp + st * BK;
      if (any_bad) {
        // Zero the V rows holding Inf/NaN (the MMA would spread 0 * NaN over every row); the rows
        // allowed to attend them get their exact contribution below, from global memory.
        if (tid < BK) {
          bool bad = false;
          for (int cc = 0; cc < C::kRowChunks; ++cc) bad |= nonfinite16<E>(simt::load16(sV(st) + tid * LD + cc * C::kChunk));
          sBad[tid] = bad;
          if (bad)
            for (int d = 0; d < D; ++d) sV(st)[tid * LD + d] = from_f<E>(0.f);
        }
        simt::sync_block();
      }

      if (kind == kDiag) {
        // Each live row whose own key lies in this tile: s = q.k, then one online-softmax step.
HTC_UNROLL
        for (int hh = 0; hh < 2; ++hh) {
          const int jl = pos[hh] - k0;
          const bool on = alive[hh] && jl >= 0 && jl < nk;
          const int jr = on ? jl : 0;
          const Store* qrow = sQ + (warp * 16 + g + 8 * hh) * LD;
          const Store* krow = tK + jr * LD;
          float part = 0.f;
HTC_UNROLL
          for (int n = 0; n < NF_O; ++n) {
            const int col = n * 8 + 2 * t;
            part += to_f<E>(qrow[col]) * to_f<E>(krow[col]) + to_f<E>(qrow[col + 1]) * to_f<E>(krow[col + 1]);
          }
          const float s = quad_sum(part) * p.scale_log2;
          if (on) {
            const tile::RowStep u = tile::row_step(m_run[hh], s);
            const float pr = exp2f(s - u.ref);
            l_run[hh] = l_run[hh] * u.alpha + (t == 0 ? pr : 0.f);
            m_run[hh] = u.m_new;
            const Store* vrow = tV + jr * LD;
HTC_UNROLL
            for (int n = 0; n < NF_O; ++n) {
              const int col = n * 8 + 2 * t;
              acc[n][2 * hh] = acc[n][2 * hh] * u.alpha + pr * to_f<E>(vrow[col]);
              acc[n][2 * hh + 1] = acc[n][2 * hh + 1] * u.alpha + pr * to_f<E>(vrow[col + 1]);
            }
          }
        }
        continue;
      }

      // May row hh of this lane attend column `col` of the tile? (star_mask.h rule, by tile kind)
      auto allowed = [&](int hh, int col) {
        const int j = k0 + col;
        if (!alive[hh] || col >= nk) return false;
        if (kind == kFull) return true;
        if (kind == kCausal) return j <= pos[hh];
        return star_allowed(pos[hh], j, rkind[hh], rgrp[hh], tKind[col], tGrp[col], p.topology);
      };
      unsigned bits = 0;
HTC_UNROLL
      for (int n = 0; n < NF_S; ++n)
HTC_UNROLL
        for (int e4 = 0; e4 < 4; ++e4)
          bits |= static_cast<unsigned>(allowed(e4 >> 1, n * 8 + 2 * t + (e4 & 1))) << (n * 4 + e4);
      if (!simt::any_warp(bits != 0)) continue;  // none of this warp's rows sees this tile

      // S = Q K^T
      float s[NF_S][4];
HTC_UNROLL
      for (int n = 0; n < NF_S; ++n)
HTC_UNROLL
        for (int e4 = 0; e4 < 4; ++e4) s[n][e4] = 0.f;
HTC_UNROLL
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[T][4];
        load_a<E>(a, sQ, LD, warp * 16, kk * 16, lane);
HTC_UNROLL
        for (int np = 0; np < NF_S / 2; ++np) {
          uint32_t b0[T][2], b1[T][2];
          load_b_nk<E>(b0, b1, tK, LD, np * 16, kk * 16, lane);
          mma_terms<E>(s[2 * np], a, b0);
          mma_terms<E>(s[2 * np + 1], a, b1);
        }
      }

      // Online softmax (log2 domain); masked scores never reach exp or a product.
HTC_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        float mx = tile::neg_inf();
HTC_UNROLL
        for (int n = 0; n < NF_S; ++n)
HTC_UNROLL
          for (int c = 0; c < 2; ++c) {
            const int e4 = 2 * hh + c;
            const float x = (bits >> (n * 4 + e4)) & 1u ? s[n][e4] * p.scale_log2 : tile::neg_inf();
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
            const float pr = (bits >> (n * 4 + e4)) & 1u ? exp2f(s[n][e4] - u.ref) : 0.f;
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

      // O += P V
HTC_UNROLL
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t a[T][4];
        pack_a_from_c<E>(a, s[2 * kk], s[2 * kk + 1]);
HTC_UNROLL
        for (int np = 0; np < NF_O / 2; ++np) {
          uint32_t b0[T][2], b1[T][2];
          load_b_kn<E>(b0, b1, tV, LD, kk * 16, np * 16, lane);
          mma_terms<E>(acc[2 * np], a, b0);
          mma_terms<E>(acc[2 * np + 1], a, b1);
        }
      }

      if (any_bad) {
        // Exact contribution of the zeroed non-finite V rows, to the rows allowed to attend them.
        for (int j = 0; j < nk; ++j) {
          if (!sBad[j]) continue;
          // p of (row, j) is held by lane (g, (j%8)/2) in fragment j/8. Shuffle every fragment's
          // candidate and select after the shuffle: selecting a register by a run-time index first
          // would move s[][] to local memory.
          float pj[2] = {0.f, 0.f};
          const int owner = (lane & ~3) | ((j & 7) >> 1);
HTC_UNROLL
          for (int n = 0; n < NF_S; ++n) {
            const float c0 = simt::shfl_idx((j & 1) ? s[n][1] : s[n][0], owner);
            const float c1 = simt::shfl_idx((j & 1) ? s[n][3] : s[n][2], owner);
            pj[0] = n == (j >> 3) ? c0 : pj[0];
            pj[1] = n == (j >> 3) ? c1 : pj[1];
          }
          const Store* vrow = vg + static_cast<int64_t>(k0 + j) * p.v_ss;
HTC_UNROLL
          for (int hh = 0; hh < 2; ++hh) {
            if (!allowed(hh, j)) continue;
HTC_UNROLL
            for (int n = 0; n < NF_O; ++n) {
              const int col = n * 8 + 2 * t;
              acc[n][2 * hh] += pj[hh] * to_f<E>(vrow[col]);
              acc[n][2 * hh + 1] += pj[hh] * to_f<E>(vrow[col + 1]);
            }
          }
        }
      }
    }
  }

  // Epilogue. Q's shared rows of this warp become its output staging area.
  simt::cp_async_wait<0>();
  simt::sync_block();
  float inv[2], lse[2];
HTC_UNROLL
  for (int hh = 0; hh < 2; ++hh) {
    const float l = quad_sum(l_run[hh]);
    const bool ok = alive[hh] && l > 0.f;
    inv[hh] = ok ? 1.f / l : 0.f;
    lse[hh] = ok ? tile::row_lse(m_run[hh], l) : tile::neg_inf();
  }
  const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Sq;
  if (p.n_split == 1) {
HTC_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      Store* srow = sQ + (warp * 16 + g + 8 * hh) * LD;
HTC_UNROLL
      for (int n = 0; n < NF_O; ++n) {
        const int col = n * 8 + 2 * t;
        // PAD rows: exact zeros by select (inv = 0 would keep a NaN).
        srow[col] = from_f<E>(alive[hh] ? acc[n][2 * hh] * inv[hh] : 0.f);
        srow[col + 1] = from_f<E>(alive[hh] ? acc[n][2 * hh + 1] * inv[hh] : 0.f);
      }
    }
    simt::sync_warp();
    Store* out = static_cast<Store*>(p.out);
    for (int c = lane; c < 16 * C::kRowChunks; c += 32) {
      const int r = c / C::kRowChunks, cc = c % C::kRowChunks, i = r0 + warp * 16 + r;
      if (i < p.Sq) simt::copy16(out + (row_base + i) * D + cc * C::kChunk, sQ + (warp * 16 + r) * LD + cc * C::kChunk);
    }
HTC_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      const int i = r0 + warp * 16 + g + 8 * hh;
      if (t == 0 && i < p.Sq) p.lse[row_base + i] = lse[hh];
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
        const int col = n * 8 + 2 * t;
        orow[col] = alive[hh] ? acc[n][2 * hh] * inv[hh] : 0.f;
        orow[col + 1] = alive[hh] ? acc[n][2 * hh + 1] * inv[hh] : 0.f;
      }
      if (t == 0) p.lse_part[part + row_base + i] = lse[hh];
    }
  }
}

// Split-K combine: one thread per (row, 4 columns) of [rows = B*Hq*Sq, D]; partials in split order.
template <Elt E, int D>
HTC_DEV void star_combine_thread(const StarParams& p, int64_t idx) {
  using Store = typename EltT<E>::Store;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Sq;
  if (idx >= rows * (D / 4)) return;
  const int64_t row = idx / (D / 4);
  const int c0 = static_cast<int>(idx % (D / 4)) * 4;
  const float lse = tile::combine_lse(p.lse_part + row, rows, p.n_split);
  float o[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k = 0; k < p.n_split; ++k) {
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

// Head dims and key-tile sizes the CUDA kernels are built for (the Python backend mirrors this table:
// htc_kernels/star_attention.py, _CudaStar). block_q is always 64.
constexpr int fwd_block_k(Elt e, int d) {
  if (e == Elt::kF32) return d <= 128 ? 32 : 16;
  return d <= 128 ? 64 : 32;
}
constexpr bool supported_head_dim(int d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

#if defined(__CUDACC__)
template <class C>
__global__ void __launch_bounds__(128) star_fwd_kernel(const StarParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  star_fwd_block<C>(p, smem, static_cast<int>(threadIdx.x), static_cast<int64_t>(blockIdx.x));
}
template <Elt E, int D>
__global__ void __launch_bounds__(256) star_combine_kernel(const StarParams p) {
  star_combine_thread<E, D>(p, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}
#endif

}  // namespace htc::star_cuda
