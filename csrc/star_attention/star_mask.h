// Star-graph mask rule and block-plan classification (DESIGN.md §2, §4).
// Torch-free and host/device: the CPU kernels, the CUDA kernels and the C++ unit tests all include
// this one header, so the rule every backend applies is written exactly once.
#pragma once
#include <climits>
#include <cstdint>
#include <limits>
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

// star_allowed without branches (bitwise, no short-circuit), in the kernels' integer type: the CUDA
// kernels evaluate it for 32 (row, key) pairs per thread and tile, where star_allowed's branches made
// each call a divergence region (BSSY/BSYNC) around up to three dependent shared-memory loads, one
// call after another (sm_90 SASS, 2026-11-24). Equal to star_allowed for every input (test_star_plan
// checks all kinds, topologies, orders and group relations).
template <class I>
HTC_HD bool star_allowed_flat(I i, I j, int8_t ki, int32_t gi, int8_t kj, int32_t gj, int topology) {
  const bool live = (j <= i) & (ki != kPad) & (kj != kPad);
  const bool self_only = (topology == kStar) & (ki == kVisual);  // a visual row under "star"
  const bool by_group = ((ki == kVisual) | (ki == kVoco)) & !self_only & (gj == gi);
  return live & ((kj != kVisual) | (self_only & (j == i)) | by_group);
}

// The key order of a plan. Identity (panel_len 0): key index j is position j. With a key panel
// (CUDA_NOTES.md "the TEXT/VOCO key panel"): indices j < panel_len are the panel, position panel[j]
// (-1: an empty slot), and j >= panel_len is position j - panel_len, where TEXT/VOCO keys are holes
// (they live in the panel). Holes and empty slots are PAD for the rule; an empty slot's position lies
// after every query, so a partly filled panel tile can be CAUSAL but never FULL.
template <class I>  // int64_t on the host; the CUDA kernels use int (registers)
struct KeyMapT {
  const int32_t* panel = nullptr;  // one sample's panel, panel_len entries
  I panel_len = 0;                 // a multiple of the plan's block_k
  I seq_len = 0;                   // panel entries outside [0, seq_len) count as empty slots
};
using KeyMap = KeyMapT<int64_t>;

// An empty slot's position: after every query position (and no overflow when compared).
template <class I>
HTC_HD constexpr I no_position() {
  return std::numeric_limits<I>::max() / 2;
}
constexpr int64_t kNoPosition = no_position<int64_t>();

template <class I>
struct MappedKeyT {
  I pos;
  int8_t kind;
  int32_t group;
};
using MappedKey = MappedKeyT<int64_t>;

// Is a sequence key of this kind a hole (its slot is in the panel)?
template <class I>
HTC_HD bool is_hole(const KeyMapT<I>& m, int8_t kind) {
  return m.panel_len > 0 && (kind == kText || kind == kVoco);
}

// Mapped key j < panel_len + seq_len.
template <class I>
HTC_HD MappedKeyT<I> mapped_key(const int8_t* kinds, const int32_t* groups, const KeyMapT<I>& m, I j) {
  if (j < m.panel_len) {
    const I p = m.panel[j];
    if (p < 0 || p >= m.seq_len) return {no_position<I>(), kPad, -1};
    return {p, kinds[p], groups[p]};
  }
  const I p = j - m.panel_len;
  const int8_t kind = kinds[p];
  if (is_hole(m, kind)) return {p, kPad, -1};
  return {p, kind, groups[p]};
}

// Is mapped key j (< panel_len + seq_len) its key's one slot? A filled panel slot, or a sequence key
// that is not a hole (PAD keys included: their gradient rows are zeros, written from here). Backward
// kernels store a key's dK/dV rows from this slot only: one writer per row.
HTC_HD bool mapped_owner(const int8_t* kinds, const KeyMap& m, int64_t j) {
  if (j < m.panel_len) return m.panel[j] >= 0 && m.panel[j] < m.seq_len;
  return !is_hole(m, kinds[j - m.panel_len]);
}

// Number of key tiles of a plan: the panel's, then the sequence's.
HTC_HD int64_t key_tiles(int64_t seq_len, int64_t block_k, const KeyMap& m) {
  return m.panel_len / block_k + ceil_div(seq_len, block_k);
}

// What a run of (mapped) keys or of query positions holds, for the fast paths of classify_tile.
struct RangeSummary {
  bool pad = false, text_only = true, visual_only = true;
  bool visual_or_pad = true;                          // every token VISUAL or PAD (holes, empty slots)
  bool plain = true;                                  // no VISUAL and no PAD token
  int64_t pmin = kNoPosition, pmax = -1;              // positions (empty slots: kNoPosition)
  int32_t gmin = INT32_MAX, gmax = INT32_MIN;         // groups of all tokens (-1: TEXT/PAD)
  int32_t voco_gmin = INT32_MAX, voco_gmax = INT32_MIN;  // groups of the VOCO tokens
  int32_t img_gmin = INT32_MAX, img_gmax = INT32_MIN;    // groups of the VISUAL and VOCO tokens
};

// Summary of mapped keys [begin, end) (with the identity map: of positions [begin, end)).
HTC_HD RangeSummary summarize(const int8_t* kinds, const int32_t* groups, int64_t begin, int64_t end,
                              const KeyMap& m = KeyMap{}) {
  RangeSummary r;
  for (int64_t j = begin; j < end; ++j) {
    const MappedKey t = mapped_key(kinds, groups, m, j);
    r.pad |= t.kind == kPad;
    r.text_only &= t.kind == kText;
    r.visual_only &= t.kind == kVisual;
    r.visual_or_pad &= t.kind == kVisual || t.kind == kPad;
    r.plain &= t.kind == kText || t.kind == kVoco;
    r.pmin = t.pos < r.pmin ? t.pos : r.pmin;
    r.pmax = t.pos > r.pmax ? t.pos : r.pmax;
    r.gmin = t.group < r.gmin ? t.group : r.gmin;
    r.gmax = t.group > r.gmax ? t.group : r.gmax;
    if (t.kind == kVoco) {
      r.voco_gmin = t.group < r.voco_gmin ? t.group : r.voco_gmin;
      r.voco_gmax = t.group > r.voco_gmax ? t.group : r.voco_gmax;
    }
    if (t.kind == kVoco || t.kind == kVisual) {
      r.img_gmin = t.group < r.img_gmin ? t.group : r.img_gmin;
      r.img_gmax = t.group > r.img_gmax ? t.group : r.img_gmax;
    }
  }
  return r;
}

// Classify one tile: query rows [r0, r1) (key-sequence positions r + q_offset) against mapped keys
// [k0, k1) of `m`, given the summaries of both ranges. `kinds`/`groups` describe one sample's key
// sequence. Fast paths decide homogeneous tiles from the summaries (key positions, not indices: a
// panel tile's keys are not contiguous); mixed tiles are decided element-wise with an early exit.
// A panel tile is never DIAG (the kernels' DIAG path reads each row's own position, which only the
// sequence's tiles hold): it is MASKED instead.
HTC_HD uint8_t classify_tile(const int8_t* kinds, const int32_t* groups, int64_t q_offset, int64_t r0,
                             int64_t r1, int64_t k0, int64_t k1, int topology, const RangeSummary& q,
                             const RangeSummary& k, const KeyMap& m = KeyMap{}) {
  const int64_t p0 = r0 + q_offset, p1 = r1 + q_offset;  // query positions [p0, p1)
  if (k.pmin > p1 - 1) return kSkip;                     // entirely above the diagonal
  if (k.plain && !q.pad) return k.pmax <= p0 ? kFull : kCausal;
  // Below, keys that are VISUAL or PAD (no row attends a PAD key, a hole or an empty slot): only the
  // visual part of the rule can allow anything, and it concerns the VISUAL keys' images (img_g*).
  if (k.visual_or_pad && q.text_only) return kSkip;
  if (k.visual_or_pad && q.visual_only && topology == kStar) {
    // A row's own key is the row's VISUAL token: never PAD, so a crossing diagonal is an allowed pair.
    if (k.pmax < p0 || k.pmin >= p1) return kSkip;  // diagonal does not cross the tile
    return kDiag;
  }
  if (k.visual_or_pad && q.visual_only) {  // group topology: visual tokens see their own image
    if (q.gmax < k.img_gmin || k.img_gmax < q.gmin) return kSkip;
    if (k.visual_only && q.gmin == q.gmax && k.gmin == k.gmax) return k.pmax <= p0 ? kFull : kCausal;
  }
  if (k.visual_or_pad) {
    // Only VISUAL rows (their diagonal in "star", their image in "group") and VOCO rows of the same
    // image can see visual keys: skip when no such row overlaps the keys' images.
    const bool diagonal_crosses = k.pmax >= p0 && k.pmin < p1;
    const bool voco_hit = !(q.voco_gmax < k.img_gmin || k.img_gmax < q.voco_gmin);
    const bool image_hit = !(q.img_gmax < k.img_gmin || k.img_gmax < q.img_gmin);
    if (topology == kStar ? !diagonal_crosses && !voco_hit : !image_hit) return kSkip;
  }

  const bool panel_tile = k0 < m.panel_len;
  bool any = false, all = true, causal = true, diag = true;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t j = k0; j < k1; ++j) {
      const MappedKey t = mapped_key(kinds, groups, m, j);
      const bool a = star_allowed(p, t.pos, kinds[p], groups[p], t.kind, t.group, topology);
      any |= a;
      all &= a;
      causal &= a == (t.pos <= p);
      diag &= !a || t.pos == p;
    }
    if (any && !all && !causal && (!diag || panel_tile)) return kMasked;
  }
  if (!any) return kSkip;
  if (all) return kFull;
  if (causal) return kCausal;
  if (diag && !panel_tile) return kDiag;
  return kMasked;
}

// The same, summarising both ranges first (one tile on its own, e.g. one CUDA thread per tile).
HTC_HD uint8_t classify_tile(const int8_t* kinds, const int32_t* groups, int64_t q_offset, int64_t r0,
                             int64_t r1, int64_t k0, int64_t k1, int topology, const KeyMap& m = KeyMap{}) {
  return classify_tile(kinds, groups, q_offset, r0, r1, k0, k1, topology,
                       summarize(kinds, groups, r0 + q_offset, r1 + q_offset),
                       summarize(kinds, groups, k0, k1, m), m);
}

// Row qt of one sample's plan: out[kt] for every key tile (key_tiles(seq_len, block_k, m) of them),
// with query tiles of `block_q` rows (of q_len rows, bottom-right aligned to the seq_len keys) and key
// tiles of `block_k` mapped keys. `key_summaries` holds summarize() of every key tile (computed once
// per sample by the caller, summarize_key_tiles).
inline void plan_row(const int8_t* kinds, const int32_t* groups, int64_t seq_len, int64_t q_len,
                     int64_t block_q, int64_t block_k, int topology, const RangeSummary* key_summaries,
                     int64_t qt, uint8_t* out, const KeyMap& m = KeyMap{}) {
  const int64_t n_kt = key_tiles(seq_len, block_k, m), n_keys = m.panel_len + seq_len;
  const int64_t q_offset = seq_len - q_len;
  const int64_t r0 = qt * block_q, r1 = clamp_end(r0, block_q, q_len);
  const RangeSummary q = summarize(kinds, groups, r0 + q_offset, r1 + q_offset);
  for (int64_t kt = 0; kt < n_kt; ++kt) {
    const int64_t k0 = kt * block_k, k1 = clamp_end(k0, block_k, n_keys);
    out[kt] = classify_tile(kinds, groups, q_offset, r0, r1, k0, k1, topology, q, key_summaries[kt], m);
  }
}

inline void summarize_key_tiles(const int8_t* kinds, const int32_t* groups, int64_t seq_len, int64_t block_k,
                                RangeSummary* out, const KeyMap& m = KeyMap{}) {
  const int64_t n_kt = key_tiles(seq_len, block_k, m), n_keys = m.panel_len + seq_len;
  for (int64_t kt = 0; kt < n_kt; ++kt)
    out[kt] = summarize(kinds, groups, kt * block_k, clamp_end(kt * block_k, block_k, n_keys), m);
}

// The whole plan of one sample: out[qt * n_kt + kt], n_kt = key_tiles(seq_len, block_k, m). Needs
// seq_len >= q_len >= 1, block sizes >= 1 and m.panel_len a multiple of block_k.
inline void build_star_plan(const int8_t* kinds, const int32_t* groups, int64_t seq_len,
                            int64_t q_len, int64_t block_q, int64_t block_k, int topology,
                            uint8_t* out, const KeyMap& m = KeyMap{}) {
  const int64_t n_qt = ceil_div(q_len, block_q), n_kt = key_tiles(seq_len, block_k, m);
  std::vector<RangeSummary> keys(n_kt);
  summarize_key_tiles(kinds, groups, seq_len, block_k, keys.data(), m);
  for (int64_t qt = 0; qt < n_qt; ++qt)
    plan_row(kinds, groups, seq_len, q_len, block_q, block_k, topology, keys.data(), qt, out + qt * n_kt, m);
}

}  // namespace htc
