// Star-graph mask rule and block-plan classification (DESIGN.md §2, §4).
// Torch-free and host/device: the CPU kernels, the CUDA kernels and the C++ unit tests all include
// this one header, so the rule every backend applies is written exactly once.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HTC_HD __host__ __device__ __forceinline__
#else
#define HTC_HD inline
#endif

namespace htc {

enum TokenKind : int8_t { kText = 0, kVisual = 1, kVoco = 2, kPad = 3 };
enum Topology : int { kStar = 0, kGroup = 1 };
// Per (query tile, key tile): what the kernel must do. Values are part of the op contract
// (htc_kernels/layout.py mirrors them).
enum TileKind : uint8_t { kSkip = 0, kFull = 1, kCausal = 2, kDiag = 3, kMasked = 4 };

// May query at key-sequence position i attend key j? (DESIGN.md §2, normative.)
HTC_HD bool star_allowed(int64_t i, int64_t j, int8_t ki, int32_t gi, int8_t kj, int32_t gj,
                         int topology) {
  if (j > i || ki == kPad || kj == kPad) return false;
  if (kj == kVisual) {
    if (ki == kVisual) return topology == kStar ? j == i : gj == gi;
    if (ki == kVoco) return gj == gi;
    return false;
  }
  return true;
}

// Classify one tile: query rows [r0, r1) (key-sequence positions r + q_offset) against keys [k0, k1).
// `kinds`/`groups` describe one sample's key sequence. Fast paths decide homogeneous tiles without
// touching every element; mixed tiles are decided element-wise with an early exit.
HTC_HD uint8_t classify_tile(const int8_t* kinds, const int32_t* groups, int64_t q_offset,
                             int64_t r0, int64_t r1, int64_t k0, int64_t k1, int topology) {
  const int64_t p0 = r0 + q_offset, p1 = r1 + q_offset;  // query positions [p0, p1)
  if (k0 > p1 - 1) return kSkip;                         // entirely above the diagonal

  bool q_pad = false, q_text_only = true, q_visual_only = true;
  for (int64_t p = p0; p < p1; ++p) {
    q_pad |= kinds[p] == kPad;
    q_text_only &= kinds[p] == kText;
    q_visual_only &= kinds[p] == kVisual;
  }
  bool k_plain = true, k_visual_only = true;  // plain: no VISUAL and no PAD keys
  for (int64_t j = k0; j < k1; ++j) {
    k_plain &= kinds[j] == kText || kinds[j] == kVoco;
    k_visual_only &= kinds[j] == kVisual;
  }
  if (k_plain && !q_pad) return k1 - 1 <= p0 ? kFull : kCausal;
  if (k_visual_only && q_text_only) return kSkip;
  if (k_visual_only && q_visual_only && topology == kStar) {
    if (k1 <= p0 || k0 >= p1) return kSkip;  // diagonal does not cross the tile
    return kDiag;
  }

  bool any = false, all = true, causal = true, diag = true;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t j = k0; j < k1; ++j) {
      const bool a = star_allowed(p, j, kinds[p], groups[p], kinds[j], groups[j], topology);
      any |= a;
      all &= a;
      causal &= a == (j <= p);
      diag &= !a || j == p;
    }
    if (any && !all && !causal && !diag) return kMasked;
  }
  if (!any) return kSkip;
  if (all) return kFull;
  if (causal) return kCausal;
  if (diag) return kDiag;
  return kMasked;
}

// The whole plan of one sample: out[qt * n_kt + kt] for query tiles of `block_q` rows (of q_len rows,
// bottom-right aligned to the seq_len keys) and key tiles of `block_k` keys.
inline void build_star_plan(const int8_t* kinds, const int32_t* groups, int64_t seq_len,
                            int64_t q_len, int64_t block_q, int64_t block_k, int topology,
                            uint8_t* out) {
  const int64_t n_qt = (q_len + block_q - 1) / block_q, n_kt = (seq_len + block_k - 1) / block_k;
  const int64_t q_offset = seq_len - q_len;
  for (int64_t qt = 0; qt < n_qt; ++qt) {
    const int64_t r0 = qt * block_q, r1 = r0 + block_q < q_len ? r0 + block_q : q_len;
    for (int64_t kt = 0; kt < n_kt; ++kt) {
      const int64_t k0 = kt * block_k, k1 = k0 + block_k < seq_len ? k0 + block_k : seq_len;
      out[qt * n_kt + kt] = classify_tile(kinds, groups, q_offset, r0, r1, k0, k1, topology);
    }
  }
}

}  // namespace htc
