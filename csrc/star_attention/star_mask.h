// Star-graph mask rule and block-plan classification (DESIGN.md §2, §4).
// Torch-free and host/device: the CPU kernels, the CUDA kernels and the C++ unit tests all include
// this one header, so the rule every backend applies is written exactly once.
#pragma once
#include <climits>
#include <cstdint>
#include <vector>

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

// Largest block size any entry point accepts (star_checks.h and htc_kernels/layout.py check it).
constexpr int64_t kMaxBlock = 1024;

// ceil(a / b) for a >= 0, b >= 1 without forming a + b - 1 (which overflows for b near INT64_MAX).
HTC_HD int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// min(begin + len, end) for begin <= end, len >= 0, without forming begin + len when it would overflow.
HTC_HD int64_t clamp_end(int64_t begin, int64_t len, int64_t end) { return len < end - begin ? begin + len : end; }

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

// What a contiguous run of positions holds, for the fast paths of classify_tile.
struct RangeSummary {
  bool pad = false, text_only = true, visual_only = true;
  bool plain = true;                                  // no VISUAL and no PAD token
  int32_t gmin = INT32_MAX, gmax = INT32_MIN;         // groups of all tokens (-1: TEXT/PAD)
  int32_t voco_gmin = INT32_MAX, voco_gmax = INT32_MIN;  // groups of the VOCO tokens
  int32_t img_gmin = INT32_MAX, img_gmax = INT32_MIN;    // groups of the VISUAL and VOCO tokens
};

HTC_HD RangeSummary summarize(const int8_t* kinds, const int32_t* groups, int64_t begin, int64_t end) {
  RangeSummary r;
  for (int64_t p = begin; p < end; ++p) {
    r.pad |= kinds[p] == kPad;
    r.text_only &= kinds[p] == kText;
    r.visual_only &= kinds[p] == kVisual;
    r.plain &= kinds[p] == kText || kinds[p] == kVoco;
    r.gmin = groups[p] < r.gmin ? groups[p] : r.gmin;
    r.gmax = groups[p] > r.gmax ? groups[p] : r.gmax;
    if (kinds[p] == kVoco) {
      r.voco_gmin = groups[p] < r.voco_gmin ? groups[p] : r.voco_gmin;
      r.voco_gmax = groups[p] > r.voco_gmax ? groups[p] : r.voco_gmax;
    }
    if (kinds[p] == kVoco || kinds[p] == kVisual) {
      r.img_gmin = groups[p] < r.img_gmin ? groups[p] : r.img_gmin;
      r.img_gmax = groups[p] > r.img_gmax ? groups[p] : r.img_gmax;
    }
  }
  return r;
}

// Classify one tile: query rows [r0, r1) (key-sequence positions r + q_offset) against keys [k0, k1),
// given the summaries of both ranges. `kinds`/`groups` describe one sample's key sequence. Fast paths
// decide homogeneous tiles from the summaries; mixed tiles are decided element-wise with an early exit.
HTC_HD uint8_t classify_tile(const int8_t* kinds, const int32_t* groups, int64_t q_offset, int64_t r0,
                             int64_t r1, int64_t k0, int64_t k1, int topology, const RangeSummary& q,
                             const RangeSummary& k) {
  const int64_t p0 = r0 + q_offset, p1 = r1 + q_offset;  // query positions [p0, p1)
  if (k0 > p1 - 1) return kSkip;                         // entirely above the diagonal
  if (k.plain && !q.pad) return k1 - 1 <= p0 ? kFull : kCausal;
  if (k.visual_only && q.text_only) return kSkip;
  if (k.visual_only && q.visual_only && topology == kStar) {
    if (k1 <= p0 || k0 >= p1) return kSkip;  // diagonal does not cross the tile
    return kDiag;
  }
  if (k.visual_only && q.visual_only) {  // group topology: visual tokens see their own image
    if (q.gmax < k.gmin || k.gmax < q.gmin) return kSkip;
    if (q.gmin == q.gmax && k.gmin == k.gmax) return k1 - 1 <= p0 ? kFull : kCausal;
  }
  if (k.visual_only) {
    // Only VISUAL rows (their diagonal in "star", their image in "group") and VOCO rows of the same
    // image can see visual keys: skip when no such row overlaps the keys' images.
    const bool diagonal_crosses = k1 > p0 && k0 < p1;
    const bool voco_hit = !(q.voco_gmax < k.gmin || k.gmax < q.voco_gmin);
    const bool image_hit = !(q.img_gmax < k.gmin || k.gmax < q.img_gmin);
    if (topology == kStar ? !diagonal_crosses && !voco_hit : !image_hit) return kSkip;
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

// The same, summarising both ranges first (one tile on its own, e.g. one CUDA thread per tile).
HTC_HD uint8_t classify_tile(const int8_t* kinds, const int32_t* groups, int64_t q_offset, int64_t r0,
                             int64_t r1, int64_t k0, int64_t k1, int topology) {
  return classify_tile(kinds, groups, q_offset, r0, r1, k0, k1, topology,
                       summarize(kinds, groups, r0 + q_offset, r1 + q_offset), summarize(kinds, groups, k0, k1));
}

// Row qt of one sample's plan: out[kt] for every key tile, with query tiles of `block_q` rows (of
// q_len rows, bottom-right aligned to the seq_len keys) and key tiles of `block_k` keys.
// `key_summaries` holds summarize() of every key tile (computed once per sample by the caller).
inline void plan_row(const int8_t* kinds, const int32_t* groups, int64_t seq_len, int64_t q_len,
                     int64_t block_q, int64_t block_k, int topology, const RangeSummary* key_summaries,
                     int64_t qt, uint8_t* out) {
  const int64_t n_kt = ceil_div(seq_len, block_k), q_offset = seq_len - q_len;
  const int64_t r0 = qt * block_q, r1 = clamp_end(r0, block_q, q_len);
  const RangeSummary q = summarize(kinds, groups, r0 + q_offset, r1 + q_offset);
  for (int64_t kt = 0; kt < n_kt; ++kt) {
    const int64_t k0 = kt * block_k, k1 = clamp_end(k0, block_k, seq_len);
    out[kt] = classify_tile(kinds, groups, q_offset, r0, r1, k0, k1, topology, q, key_summaries[kt]);
  }
}

inline void summarize_key_tiles(const int8_t* kinds, const int32_t* groups, int64_t seq_len, int64_t block_k,
                                RangeSummary* out) {
  const int64_t n_kt = ceil_div(seq_len, block_k);
  for (int64_t kt = 0; kt < n_kt; ++kt)
    out[kt] = summarize(kinds, groups, kt * block_k, clamp_end(kt * block_k, block_k, seq_len));
}

// The whole plan of one sample: out[qt * n_kt + kt]. Needs seq_len >= q_len >= 1 and block sizes >= 1.
inline void build_star_plan(const int8_t* kinds, const int32_t* groups, int64_t seq_len,
                            int64_t q_len, int64_t block_q, int64_t block_k, int topology,
                            uint8_t* out) {
  const int64_t n_qt = ceil_div(q_len, block_q), n_kt = ceil_div(seq_len, block_k);
  std::vector<RangeSummary> keys(n_kt);
  summarize_key_tiles(kinds, groups, seq_len, block_k, keys.data());
  for (int64_t qt = 0; qt < n_qt; ++qt)
    plan_row(kinds, groups, seq_len, q_len, block_q, block_k, topology, keys.data(), qt, out + qt * n_kt);
}

}  // namespace htc
