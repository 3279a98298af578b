// CPU star attention, forward and backward (DESIGN.md §2, §4): FlashAttention-2 style tiled online
// softmax over the block plan. Skipped tiles cost nothing; DIAG tiles (visual self-only) cost a row-wise
// dot; FULL/CAUSAL/MASKED tiles are fp32 micro-GEMMs over the key columns that can be attended (a MASKED
// tile is trimmed to its first..last allowed key), or for bf16 inputs under HTC_CPU_BF16_TILES GEMMs on bf16
// pairs ("bf16 tiles" below). Inputs fp32/bf16/fp16, accumulation in fp32. Only the
// log-sum-exp is saved for backward; scratch is O(tile) per task plus O(S*D) per task in backward.
// Optional logit soft-capping (softcap c > 0: scores s -> c tanh(s / c) before the mask) is a template
// parameter of both passes; the backward recomputes t = tanh(s / c) and scales dS by 1 - t^2.
//
// Layouts inside a task: the query tile is kept transposed (qT [D][BQp]) so that scores are produced
// key-major, sT[j][i] = k_j . q_i, with queries along the vector lanes; the online-softmax statistics of
// a whole query tile are then plain vector ops over i.
//
// This header holds the kernels; star_attention_cpu_uncapped_isa.cpp instantiates the uncapped ones and
// star_attention_cpu_capped_isa.cpp the soft-capped ones, each compiled once per CPU variant (setup.py,
// common/cpu_dispatch.h); star_attention_cpu.cpp (the op entry points) calls the variant chosen at load.
// Two translation units because GCC's inlining budget is per unit: instantiated in the same unit, the
// capped kernels changed how the uncapped backward was inlined (its task loop grew by 9% and ran 15-35%
// slower at the LLaVA shape). Everything stays in an anonymous namespace: each unit (and variant) has its
// own copy, inlined as before.
#pragma once
#include "common/vec.h"  // first: selects the at::vec ISA (see the header)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "common/cpu_kernels.h"
#include "common/gemm_tiles.h"
#include "star_attention/star_checks.h"
#include "star_attention/star_mask.h"
#include "star_attention/star_tile_math.h"
// In the variant's namespace (common/isa.h), so profiles and disassembly name the variant.
namespace htc::HTC_ISA_NS {
namespace {


using cpu::gemm;
using cpu::kVL;
using cpu::round_up;
using cpu::Vec;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

// dst[0:Dp] = src[0:D] * mul, zero padded.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t D, int64_t Dp, float mul) {
  for (int64_t d = 0; d < D; ++d) dst[d] = to_f(src[d]) * mul;
  for (int64_t d = D; d < Dp; ++d) dst[d] = 0.f;
}

// Software prefetch of one row a few rows ahead: DIAG tiles and tile loads stream rows from DRAM with
// only a short computation per row, too little for the hardware prefetcher to hide the latency.
constexpr int64_t kPrefetchRows = 8;
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// dst[0:D] = src[0:D] * mul in T. Output rows are written once and never read back here, so fp32
// rows that are whole aligned cache lines go out with streaming stores (no read-for-ownership of the
// destination lines: a third less DRAM traffic for the output).
template <typename T>
inline void store_row(T* dst, const float* src, int64_t D, float mul) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (D % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
      const __m512 m = _mm512_set1_ps(mul);
      for (int64_t d = 0; d < D; d += 16) _mm512_stream_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), m));
      return;
    }
  }
#endif
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

inline float dot(const float* a, const float* b, int64_t n) {  // n % kVL == 0
  Vec acc(0.f);
  for (int64_t d = 0; d < n; d += kVL) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
}

inline void axpby(float* y, float beta, float alpha, const float* x, int64_t n) {  // y = beta*y + alpha*x
  const Vec va(alpha), vb(beta);
  for (int64_t d = 0; d < n; d += kVL)
    at::vec::fmadd(va, Vec::loadu(x + d), vb * Vec::loadu(y + d)).store(y + d);
}

// Problem geometry shared by forward and backward.
struct Geometry {
  int64_t B, Hq, Hkv, Sq, Skv, D, Dp, bq, bk, BQp, n_qt, n_kt, q_off, plan_batch;
  int topology;
  float scale;
  float softcap, inv_softcap;  // kernels instantiated with kCap only (softcap > 0)
  Bf16Tiles bf16_tiles;        // HTC_CPU_BF16_TILES (common/cpu_kernels.h): bf16 inputs only

  // bf16 pairs along D (bf16 tiles): an odd D pairs its last element with a zero.
  int64_t Dh() const { return (D + 1) / 2; }

  // Parallel grain: problems below ~4M multiply-adds (typical decode steps) run on the calling
  // thread, where waking the thread pool would cost more than the work itself.
  int64_t grain(int64_t n_tasks) const {
    // In double: the product of five sizes can exceed int64 on huge (but valid) problems.
    const double work = static_cast<double>(B) * Hq * Sq * Skv * D;
    return work < static_cast<double>(int64_t{1} << 22) ? std::max<int64_t>(n_tasks, 1) : 1;
  }
};

// Per query tile: key-sequence position, kind and group of each row (rows past the end are PAD).
struct Rows {
  std::vector<int32_t> pos, kind, group;
  int64_t r0 = 0, m = 0;
  void fill(const Geometry& g, const int8_t* kinds, const int32_t* groups, int64_t qt) {
    pos.assign(g.BQp, -1);
    kind.assign(g.BQp, kPad);
    group.assign(g.BQp, -1);
    r0 = qt * g.bq;
    m = std::min(g.bq, g.Sq - r0);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t p = r0 + i + g.q_off;
      pos[i] = static_cast<int32_t>(p);
      kind[i] = kinds[p];
      group[i] = groups[p];
    }
  }
};

// The part of a tile that has work: keys [jlo, jhi) and query rows [ilo, ihi) with any allowed pair
// left for the GEMMs, whether some rows were handed to the row-wise diagonal path instead, and whether
// the GEMMs' rectangle holds masked pairs ("partial"): there a product with a masked operand is 0 only
// if that operand is finite (masked means never read: see forward_impl/backward_impl).
struct Span {
  int64_t jlo, jhi, ilo, ihi;
  bool diag_rows;
  bool partial;
  bool empty() const { return jhi <= jlo; }
};

// Allowed-key mask of one CAUSAL or MASKED tile (any other non-SKIP/FULL/DIAG value of a raw caller's
// plan is evaluated element-wise too), key-major: mask[j * BQp + i], and the span of the
// tile that has work (the GEMMs are trimmed to it). This is star_allowed (star_mask.h) specialised per
// key so the row loop vectorises; tests check it against the reference.
// Rows whose only allowed key in the tile is their own position (visual rows in a tile that also holds
// a <voco> or text row) are flagged in diag_only and removed from the mask: a row-wise dot handles
// them, as in DIAG tiles, instead of a GEMM lane each.
inline Span tile_mask(const Geometry& g, uint8_t tk, const int8_t* kinds, const int32_t* groups,
                      const Rows& rows, int64_t k0, int64_t nk, uint8_t* mask, int32_t* row_count,
                      uint8_t* diag_only) {
  std::fill(row_count, row_count + g.BQp, 0);
  std::fill(diag_only, diag_only + g.BQp, 0);
  const int32_t* pos = rows.pos.data();
  const int32_t* qkind = rows.kind.data();
  const int32_t* qgroup = rows.group.data();
  const int64_t n = g.BQp;
  for (int64_t j = 0; j < nk; ++j) {
    const int32_t pj = static_cast<int32_t>(k0 + j), kj = kinds[pj], gj = groups[pj];
    uint8_t* mj = mask + j * n;
    if (tk == kCausal) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) mj[i] = static_cast<uint8_t>(pj <= pos[i]);
    } else if (kj == kPad) {
      for (int64_t i = 0; i < n; ++i) mj[i] = 0;
    } else if (kj != kVisual) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) mj[i] = static_cast<uint8_t>((pj <= pos[i]) & (qkind[i] != kPad));
    } else {
      const int star = g.topology == kStar;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const int same = qgroup[i] == gj;
        const int vis = (qkind[i] == kVisual) & (star ? (pj == pos[i]) : same);
        mj[i] = static_cast<uint8_t>((pj <= pos[i]) & (vis | ((qkind[i] == kVoco) & same)));
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) row_count[i] += mj[i];
  }
  bool diag_rows = false;
  if (tk == kMasked) {
    for (int64_t i = 0; i < rows.m; ++i) {
      const int64_t j = pos[i] - k0;
      if (row_count[i] == 1 && j >= 0 && j < nk && mask[j * n + i]) {
        diag_only[i] = 1;
        mask[j * n + i] = 0;
        row_count[i] = 0;
        diag_rows = true;
      }
    }
  }
  int64_t ilo = 0, ihi = 0;
  while (ilo < rows.m && row_count[ilo] == 0) ++ilo;
  for (int64_t i = ilo; i < rows.m; ++i)
    if (row_count[i] != 0) ihi = i + 1;
  int64_t jlo = nk, jhi = 0;
  for (int64_t j = 0; j < nk && ihi > ilo; ++j) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t i = ilo; i < ihi; ++i) any |= mask[j * n + i];
    if (any) {
      jlo = std::min(jlo, j);
      jhi = j + 1;
    }
  }
  bool partial = false;
  for (int64_t j = jlo; j < jhi && !partial; ++j) {
    int all = 1;
#pragma omp simd reduction(& : all)
    for (int64_t i = ilo; i < ihi; ++i) all &= mask[j * n + i];
    partial = !all;
  }
  return {jlo, jhi, ilo, ihi, diag_rows, partial};
}

// Tile masks depend on the layout, not on the head: each thread computes a tile's mask once and reuses
// it for every head it processes (tasks run head-major, so the same tiles come back once per head).
// Bounded: past kMaxBytes of cached masks it recomputes instead of caching.
class TileMaskCache {
 public:
  explicit TileMaskCache(const Geometry& g)
      : g_(g), mask_(g.bk * g.BQp), diag_(g.BQp), row_count_(g.BQp) {}

  // The span of (CAUSAL or MASKED) tile kt of query tile qt; *mask points at its mask rows [jlo, jhi)
  // (row stride BQp) and *diag_only at the rows handed to the diagonal path.
  Span get(uint8_t tk, const int8_t* kinds, const int32_t* groups, const Rows& rows, int64_t bl,
           int64_t qt, int64_t kt, int64_t k0, int64_t nk, const uint8_t** mask,
           const uint8_t** diag_only) {
    const int64_t key = (bl * g_.n_qt + qt) * g_.n_kt + kt;
    const auto it = index_.find(key);
    if (it != index_.end()) {
      *diag_only = arena_.data() + it->second.offset;
      *mask = *diag_only + g_.BQp;
      return it->second.span;
    }
    const Span sp = tile_mask(g_, tk, kinds, groups, rows, k0, nk, mask_.data(), row_count_.data(),
                              diag_.data());
    const int64_t rows_bytes = sp.empty() ? 0 : (sp.jhi - sp.jlo) * g_.BQp;
    const int64_t bytes = g_.BQp + rows_bytes;
    if (static_cast<int64_t>(arena_.size()) + bytes > kMaxBytes) {
      *diag_only = diag_.data();
      *mask = mask_.data() + (sp.empty() ? 0 : sp.jlo * g_.BQp);
      return sp;
    }
    const size_t offset = arena_.size();
    arena_.insert(arena_.end(), diag_.begin(), diag_.end());
    if (rows_bytes) arena_.insert(arena_.end(), mask_.begin() + sp.jlo * g_.BQp, mask_.begin() + sp.jhi * g_.BQp);
    index_.emplace(key, Entry{sp, offset});
    *diag_only = arena_.data() + offset;
    *mask = *diag_only + g_.BQp;
    return sp;
  }

 private:
  static constexpr int64_t kMaxBytes = int64_t{16} << 20;
  struct Entry {
    Span span;
    size_t offset;
  };
  const Geometry& g_;
  std::vector<uint8_t> mask_, diag_;
  std::vector<int32_t> row_count_;
  std::vector<uint8_t> arena_;
  std::unordered_map<int64_t, Entry> index_;
};

// sT[j][i] = k_j . q_i for keys [0, nj) and rows [ilo, ihi) (at least those lanes): a GEMM over the
// vector-aligned row range, or dot products when only a few rows have work (e.g. one <voco> row
// against whole visual tiles), where a GEMM would compute a vector width of rows per useful one.
constexpr int64_t kThinRows = 2;
inline void scores(const Geometry& g, float* sT, const float* key, int64_t ldk, const float* qT,
                   const float* q_row, int64_t nj, const Span& sp, cpu::PrefetchStream* pf = nullptr) {
  if (sp.ihi - sp.ilo <= kThinRows) {
    for (int64_t i = sp.ilo; i < sp.ihi; ++i)
      for (int64_t j = 0; j < nj; ++j) sT[j * g.BQp + i] = dot(key + j * ldk, q_row + i * g.Dp, g.Dp);
    return;
  }
  const int64_t i0 = sp.ilo / kVL * kVL, i1 = round_up(sp.ihi, kVL);
  gemm(sT + i0, g.BQp, key, ldk, 1, qT + i0, g.BQp, nj, i1 - i0, g.D, false, pf);
}

inline void apply_mask(float* sT, const uint8_t* mask, int64_t nj, int64_t n) {
  for (int64_t j = 0; j < nj; ++j) {
    float* s = sT + j * n;
    const uint8_t* m = mask + j * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) s[i] = m[i] ? s[i] : kNegInf;
  }
}

// Logit soft-capping (Gemma2), s -> c tanh(s / c), on vectors of scores (ATen's vectorised tanh: SLEEF,
// 1 ulp). Callers apply it before the mask: a masked -inf must stay -inf, not become -c.
inline Vec cap_vec(const Geometry& g, const Vec& s) { return Vec(g.softcap) * (s * Vec(g.inv_softcap)).tanh(); }

// The scores sT[j][i] of keys [0, nj) and the vector lanes holding rows [ilo, ihi), capped in place.
inline void cap_scores(const Geometry& g, float* sT, int64_t nj, const Span& sp) {
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t i0 = sp.ilo / kVL * kVL; i0 < sp.ihi; i0 += kVL)
      cap_vec(g, Vec::loadu(sT + j * g.BQp + i0)).store(sT + j * g.BQp + i0);
}

// --- Masked means never read (DESIGN.md §2) -------------------------------------------------------
// Masked pairs are excluded by select (scores -> -inf, p = 0, dS -> 0), but inside a GEMM 0 * NaN =
// NaN: a non-finite K/V row that some row of the GEMM may not attend would still reach that row.
// PAD query rows are loaded as zeros (load_tile); FULL tiles have no masked pair; in the other tiles
// whose GEMM rectangle holds a masked pair (Span::partial) the K or V rows a GEMM multiplies by those
// zeros are checked for finiteness (each row once per head and thread), and a tile with a non-finite
// one takes gemm_except_bad: exact, and rare.

// Is row[0:D] all finite? Bit test of the exponent (integer ops only, so it vectorises).
template <typename T>
inline bool row_is_finite(const T* row, int64_t D) {
  int bad = 0;
  if constexpr (std::is_same_v<T, float>) {
    typedef uint32_t __attribute__((__may_alias__)) u32;
    const u32* u = reinterpret_cast<const u32*>(row);
    for (int64_t d = 0; d < D; ++d) bad |= (u[d] & 0x7f800000u) == 0x7f800000u;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t d = 0; d < D; ++d) bad |= (row[d].x & 0x7f80u) == 0x7f80u;
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    for (int64_t d = 0; d < D; ++d) bad |= (row[d].x & 0x7c00u) == 0x7c00u;
  }
  return !bad;
}

// Finiteness of the rows of one (batch, kv head) of K or V, computed on first use and remembered
// while the owner stays the same.
class FiniteRows {
 public:
  void own(int64_t owner, int64_t n_rows) {
    if (owner == owner_) return;
    owner_ = owner;
    state_.assign(n_rows, kUnknown);
  }
  // Rows [j0, j0 + n) of `base` (row stride `stride`, D elements): are they all finite?
  template <typename T>
  bool all_finite(const T* base, int64_t stride, int64_t D, int64_t j0, int64_t n) {
    bool ok = true;
    for (int64_t j = j0; j < j0 + n; ++j) {
      if (state_[j] == kUnknown) state_[j] = row_is_finite(base + j * stride, D) ? kFinite : kBad;
      ok &= state_[j] == kFinite;
    }
    return ok;
  }
  bool finite(int64_t j) const { return state_[j] == kFinite; }  // rows all_finite has seen

 private:
  static constexpr int8_t kUnknown = -1, kBad = 0, kFinite = 1;
  int64_t owner_ = -1;
  std::vector<int8_t> state_;
};

// C[i][:] += sum_j W[j * BQp + i] * R_j over rows i in [ilo, ihi) and keys j in [0, nj) (the forward's
// acc += P V and the backward's dq += dS K) in a partial tile where some R_j (row k0 + j of `base`) is
// not finite. W is 0 at masked pairs, but 0 * NaN = NaN: the GEMM runs on R with those rows zeroed,
// then each of them is added to the rows i that may attend it (mask[j * BQp + i]) only.
template <typename T>
inline void gemm_except_bad(const Geometry& g, float* C, const float* W, const uint8_t* mask, const T* base,
                            int64_t stride, int64_t k0, int64_t nj, int64_t ilo, int64_t ihi,
                            const FiniteRows& fin, float* buf, float* row) {
  for (int64_t j = 0; j < nj; ++j) {
    if (fin.finite(k0 + j))
      load_row(base + (k0 + j) * stride, buf + j * g.Dp, g.D, g.Dp, 1.f);
    else
      std::fill(buf + j * g.Dp, buf + (j + 1) * g.Dp, 0.f);
  }
  gemm(C + ilo * g.Dp, g.Dp, W + ilo, 1, g.BQp, buf, g.Dp, ihi - ilo, g.Dp, nj, true);
  for (int64_t j = 0; j < nj; ++j) {
    if (fin.finite(k0 + j)) continue;
    load_row(base + (k0 + j) * stride, row, g.D, g.Dp, 1.f);
    for (int64_t i = ilo; i < ihi; ++i)
      if (mask[j * g.BQp + i]) axpby(C + i * g.Dp, 1.f, W[j * g.BQp + i], row, g.Dp);
  }
}

// The key side of the same hazard, in the backward's dK += dSᵀ q and dV += Pᵀ dO: a live q or dO row
// holding an Inf/NaN (bad[i]) is multiplied by the zeros of every key it may not attend. Such rows enter
// those GEMMs as zeros; then C[j][:] += W[j][i] r_i (rows: row-major [BQp][Dp]) adds them, in fp32, to
// the keys j of the span they may attend: mask[j * BQp + i] (from the span's first key), or every key of
// a FULL span (mask null).
inline void add_bad_rows(const Geometry& g, float* C, const float* W, const uint8_t* mask, const Span& sp, int64_t nj,
                         const uint8_t* bad, const float* rows) {
  for (int64_t i = sp.ilo; i < sp.ihi; ++i) {
    if (!bad[i]) continue;
    for (int64_t j = 0; j < nj; ++j)
      if (!mask || mask[j * g.BQp + i]) axpby(C + j * g.Dp, 1.f, W[j * g.BQp + i], rows + i * g.Dp, g.Dp);
  }
}

// Rows [k0, k0+nk) of one head of K or V as fp32 rows of stride *ld: the tensor itself when it is
// fp32 with D a multiple of the vector width, else converted into `buf` (zero padded to Dp).
template <typename T>
inline const float* key_rows(const T* base, int64_t stride, const Geometry& g, int64_t k0, int64_t nk,
                             float* buf, int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (g.D == g.Dp) {
      *ld = stride;
      return base + k0 * stride;
    }
  }
  for (int64_t j = 0; j < nk; ++j) load_row(base + (k0 + j) * stride, buf + j * g.Dp, g.D, g.Dp, 1.f);
  *ld = g.Dp;
  return buf;
}

// The query tile (or dO tile) of `rows`, scaled by `mul`, row-major [BQp][Dp] and transposed [D][BQp]
// (unless `transposed` is null). Rows past rows.m keep stale finite values: they only feed lanes that are
// never read back. PAD rows are zeros whatever the tensor holds there: they share GEMMs with other rows
// (masked means never read).
template <typename T>
inline void load_tile(const T* base, int64_t stride, const Geometry& g, const Rows& rows, float mul,
                      float* row_major, float* transposed) {
  for (int64_t i = 0; i < rows.m; ++i) {
    if (i + kPrefetchRows < rows.m) prefetch_row(base + (rows.r0 + i + kPrefetchRows) * stride, g.D);
    if (rows.kind[i] == kPad)
      std::fill(row_major + i * g.Dp, row_major + (i + 1) * g.Dp, 0.f);
    else
      load_row(base + (rows.r0 + i) * stride, row_major + i * g.Dp, g.D, g.Dp, mul);
  }
  if (transposed)
    at::vec::transpose_mxn<float>(row_major, g.Dp, transposed, g.BQp, static_cast<int>(rows.m),
                                  static_cast<int>(g.D));
}

// kCap: logit soft-capping (a template parameter: the uncapped kernel has no trace of it).
#if defined(__AVX512F__)
// --- bf16 tiles (kTiles != kFp32; bf16 inputs, any D) -----------------------------------------------------
// The block GEMMs take bf16 operands as pairs along their reduction dimension (gemm_bf16), with fp32
// accumulation, as FlashAttention does on a GPU:
//   forward   S = Q·Kᵀ   pairs (d, d+1) of the raw q and k rows (exact products; the scale is applied to the
//                        fp32 scores), O += P·V with pairs (j, j+1) of P rounded to bf16 and of V;
//   backward  S = Q·Kᵀ and dP = dO·Vᵀ as the forward's S (the same function: the same scores, so the same
//             P as the forward); dV += Pᵀ·dO and dK += dSᵀ·Q with pairs (i, i+1) of P or dS rounded to bf16
//             and of the raw dO or q rows; dQ += dS·K with pairs (j, j+1) of dS rounded to bf16 and of K.
// An odd D pairs its last element with a zero (exact: a zero adds nothing), as do an odd count of rows
// or keys. Everything else (softmax statistics, delta, the accumulators, the row-wise diagonal path and
// the thin-row score dots) stays fp32.
constexpr bool kBf16TilesBuilt = true;

// qP[dp][i] = pair(q[i][2dp], q[i][2dp+1]) for the tile's rows (PAD rows and rows past rows.m: zeros; an
// odd D's last pair holds a zero high half).
inline void load_tile_pairs(const c10::BFloat16* base, int64_t stride, const Geometry& g, const Rows& rows,
                            uint32_t* rows_buf, uint32_t* qP) {
  const int64_t Dh = g.Dh(), whole = g.D / 2;
  std::fill(rows_buf, rows_buf + g.BQp * Dh, 0u);
  for (int64_t i = 0; i < rows.m; ++i) {
    if (rows.kind[i] == kPad) continue;
    const c10::BFloat16* row = base + (rows.r0 + i) * stride;
    std::memcpy(rows_buf + i * Dh, row, whole * sizeof(uint32_t));
    if (whole < Dh) rows_buf[i * Dh + whole] = row[g.D - 1].x;  // the odd last element, paired with a zero
  }
  // A transpose of 32-bit words (bit patterns moved, never computed on).
  at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(rows_buf), Dh, reinterpret_cast<float*>(qP),
                                g.BQp, static_cast<int>(g.BQp), static_cast<int>(Dh));
}

// Rows [k0, k0 + nk) of one head of K or V as rows of bf16 pairs along D, row stride *ld (in bf16 units): the
// tensor itself for an even D; for an odd one, copied into `buf` (nk rows of 2 Dh) with a zero after the last
// element, so that the odd pair never reads past the row (the next row's element, or past the tensor).
inline const uint16_t* key_pairs(const c10::BFloat16* base, int64_t stride, const Geometry& g, int64_t k0,
                                 int64_t nk, uint16_t* buf, int64_t* ld) {
  const uint16_t* rows = reinterpret_cast<const uint16_t*>(base + k0 * stride);
  if (g.D % 2 == 0) {
    *ld = stride;
    return rows;
  }
  const int64_t w = 2 * g.Dh();
  for (int64_t j = 0; j < nk; ++j) {
    std::memcpy(buf + j * w, rows + j * stride, g.D * sizeof(uint16_t));
    buf[j * w + g.D] = 0;
  }
  *ld = w;
  return buf;
}

// sT[j][i] = mul * (k_j . q_i) for keys [0, nj) and the vector lanes holding rows [ilo, ihi): `key` rows of
// pairs (key_pairs), qP the query (or dO) tile in pairs (load_tile_pairs). The forward's and the
// backward's scores (mul = scale) and the backward's dP (mul = 1).
template <Bf16Tiles kTiles>
inline void scores_bf16(const Geometry& g, float* sT, const uint16_t* key, int64_t ldk, const uint32_t* qP,
                        int64_t nj, const Span& sp, float mul, cpu::PrefetchStream* pf = nullptr) {
  const int64_t i0 = sp.ilo / kVL * kVL, i1 = round_up(sp.ihi, kVL);
  cpu::gemm_tiles<kTiles>(sT + i0, g.BQp, key, ldk, 2, qP + i0, g.BQp, nj, i1 - i0, g.Dh(), false, pf);
  if (mul == 1.f) return;
  const Vec m(mul);
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t i = i0; i < i1; i += kVL) (Vec::loadu(sT + j * g.BQp + i) * m).store(sT + j * g.BQp + i);
}

// acc[i][:] += sum_j p[j][i] v_j for rows [ilo, ihi) and keys [0, nj) (rows j0.. of the head): the forward's
// O += P V, and the backward's dQ += dS K (p: dS, v: K). P (sT) and V packed into pairs along j (an odd last
// key pairs with a zero row and p = 0). `fin` (partial tiles with a non-finite V row, else null): as
// gemm_except_bad, those rows enter the GEMM as zeros and are added afterwards (in fp32) to the rows that
// may attend them only, so every other row gets the bits it gets when the row is finite (masked means never
// read).
template <Bf16Tiles kTiles>
inline void pv_bf16(const Geometry& g, float* acc, const float* sT, const Span& sp, const c10::BFloat16* vh,
                    int64_t ldv, int64_t j0, int64_t nj, uint32_t* pP, uint32_t* vP, const FiniteRows* fin,
                    const uint8_t* mask, float* row, cpu::PrefetchStream* pf = nullptr) {
  const int64_t i0 = sp.ilo / kVL * kVL, i1 = round_up(sp.ihi, kVL), np = (nj + 1) / 2;
  const uint16_t* vb = reinterpret_cast<const uint16_t*>(vh + j0 * ldv);
  auto v_row = [&](int64_t j) -> const uint16_t* {  // null: a zero row
    return j >= nj || (fin && !fin->finite(j0 + j)) ? nullptr : vb + j * ldv;
  };
  for (int64_t jp = 0; jp < np; ++jp) {
    const bool pair = 2 * jp + 1 < nj;
    cpu::pack_pairs(pP + jp * g.BQp + i0, sT + 2 * jp * g.BQp + i0, pair ? sT + (2 * jp + 1) * g.BQp + i0 : nullptr,
                    i1 - i0);
    cpu::pack_pairs(vP + jp * g.Dp, v_row(2 * jp), v_row(2 * jp + 1), g.D, g.Dp);
  }
  cpu::gemm_tiles<kTiles>(acc + sp.ilo * g.Dp, g.Dp, reinterpret_cast<const uint16_t*>(pP + sp.ilo), 2,
                          2 * g.BQp, vP, g.Dp, sp.ihi - sp.ilo, g.Dp, np, true, pf);
  if (!fin) return;
  for (int64_t j = 0; j < nj; ++j) {
    if (fin->finite(j0 + j)) continue;
    load_row(vh + (j0 + j) * ldv, row, g.D, g.Dp, 1.f);
    for (int64_t i = sp.ilo; i < sp.ihi; ++i)
      if (mask[j * g.BQp + i]) axpby(acc + i * g.Dp, 1.f, sT[j * g.BQp + i], row, g.Dp);
  }
}

// rP[ip][:] = pair(r_{ilo+2ip}, r_{ilo+2ip+1}) for the tile's rows [ilo, ihi) of q or dO (raw bf16 rows; PAD
// rows, rows flagged in bad (when not null: add_bad_rows) and the odd row past ihi: zeros): the B operand of
// keys_bf16.
inline void row_pairs(const c10::BFloat16* base, int64_t stride, const Geometry& g, const Rows& rows, int64_t ilo,
                      int64_t ihi, const uint8_t* bad, uint32_t* rP) {
  auto row = [&](int64_t i) -> const uint16_t* {  // null: a zero row
    return i >= ihi || rows.kind[i] == kPad || (bad && bad[i])
               ? nullptr
               : reinterpret_cast<const uint16_t*>(base + (rows.r0 + i) * stride);
  };
  for (int64_t ip = 0; ilo + 2 * ip < ihi; ++ip)
    cpu::pack_pairs(rP + ip * g.Dp, row(ilo + 2 * ip), row(ilo + 2 * ip + 1), g.D, g.Dp);
}

// C[j][:] += sum_i w[j][i] r_i for keys [0, nj) and rows [ilo, ihi) (the backward's dV += Pᵀ dO and
// dK += dSᵀ q): W (sT layout: w[j][i] at W[j * BQp + i]) rounded to bf16 into wb (pairs along i, an odd
// last row paired with a zero), R in pairs along i (row_pairs). Rows outside [ilo, ihi) are not read.
template <Bf16Tiles kTiles>
inline void keys_bf16(const Geometry& g, float* C, const float* W, const Span& sp, int64_t nj, const uint32_t* rP,
                      uint16_t* wb) {
  const int64_t mi = sp.ihi - sp.ilo;
  for (int64_t j = 0; j < nj; ++j) cpu::to_bf16(wb + j * g.BQp, W + j * g.BQp + sp.ilo, mi);
  cpu::gemm_tiles<kTiles>(C, g.Dp, wb, g.BQp, 2, rP, g.Dp, nj, g.Dp, (mi + 1) / 2, true);
}
#else
constexpr bool kBf16TilesBuilt = false;
// Declared only: with_tiles instantiates the bf16 tiles (kTiles != kFp32) in AVX-512 variants alone, so
// here every call sits in a discarded `if constexpr` branch and the passes need no #if around them.
template <class... Args>
void load_tile_pairs(Args&&...);
template <class... Args>
const uint16_t* key_pairs(Args&&...);
template <Bf16Tiles, class... Args>
void scores_bf16(Args&&...);
template <Bf16Tiles, class... Args>
void pv_bf16(Args&&...);
template <class... Args>
void row_pairs(Args&&...);
template <Bf16Tiles, class... Args>
void keys_bf16(Args&&...);
#endif

// S (or dP) of a span: sT[j][i] = mul * (k_j . q_i) for keys [j0, j0 + nj) of head `kh` and the span's
// rows. With `pairs` (bf16 tiles, more than kThinRows rows) on bf16 pairs straight from K (qP: the tile
// in pairs, load_tile_pairs); else on fp32 key rows (key_rows into kbuf) against the fp32 tile (qT, q_row,
// already scaled: mul is the bf16 path's). The forward's and the backward's S (mul = scale) and the
// backward's dP (mul = 1) all come from here, so the backward recomputes the forward's P. Returns the
// fp32 key rows (row stride *ld), or null on the bf16 path.
template <Bf16Tiles kTiles, typename T>
inline const float* block_scores(const Geometry& g, float* sT, bool pairs, const T* kh, int64_t stride, int64_t j0,
                                 int64_t nj, const Span& sp, float mul, const uint32_t* qP, uint16_t* odd,
                                 const float* qT, const float* q_row, float* kbuf, int64_t* ld,
                                 cpu::PrefetchStream* pf = nullptr) {
  if constexpr (kTiles != Bf16Tiles::kFp32) {
    if (pairs) {
      int64_t ldp;
      const uint16_t* kp = key_pairs(kh, stride, g, j0, nj, odd, &ldp);
      scores_bf16<kTiles>(g, sT, kp, ldp, qP, nj, sp, mul, pf);
      return nullptr;
    }
  }
  const float* rows = key_rows(kh, stride, g, j0, nj, kbuf, ld);
  scores(g, sT, rows, *ld, qT, q_row, nj, sp, pf);
  return rows;
}

// kTiles: Bf16Tiles::kFp32 for every dtype; kDpbf16 / kEmulated / kAmx / kAmxEmulated (bf16 inputs, any D,
// an AVX-512 variant) run the two GEMMs on bf16 pairs (scores_bf16, pv_bf16; cpu::gemm_tiles).
template <typename T, bool kCap, Bf16Tiles kTiles = Bf16Tiles::kFp32>
void forward_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const int8_t* kinds, const int32_t* groups, const uint8_t* plan, at::Tensor& out,
                  at::Tensor& lse) {
  constexpr bool kBf16 = kTiles != Bf16Tiles::kFp32;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t group_size = g.Hq / g.Hkv;

  const int64_t n_tasks = g.B * g.Hq * g.n_qt;
  at::parallel_for(0, n_tasks, g.grain(n_tasks), [&](int64_t begin, int64_t end) {
    const int64_t BQp = g.BQp, Dp = g.Dp;
    std::vector<float> q_row(BQp * Dp), qT(g.D * BQp), acc(BQp * Dp), sT(g.bk * BQp);
    std::vector<float> kbuf(g.bk * Dp), vbuf(g.bk * Dp), m_i(BQp), l_i(BQp), alpha(BQp), s_diag(BQp);
    std::vector<float> bad_row(Dp);
    std::vector<uint8_t> diag_only(BQp);
    // bf16 tiles: the query tile in pairs, its rows before the transpose, P and V tiles in pairs, K rows
    // with a zero after an odd D.
    std::vector<uint32_t> qP(kBf16 ? g.Dh() * BQp : 0), q_pairs(kBf16 ? BQp * g.Dh() : 0);
    std::vector<uint32_t> pP(kBf16 ? (g.bk + 1) / 2 * BQp : 0), vP(kBf16 ? (g.bk + 1) / 2 * Dp : 0);
    std::vector<uint16_t> k_odd(kBf16 && g.D % 2 ? g.bk * 2 * g.Dh() : 0);
    TileMaskCache masks(g);
    FiniteRows v_finite;
    Rows rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (g.Hq * g.n_qt), h = (task / g.n_qt) % g.Hq, qt = task % g.n_qt;
      const int64_t hk = h / group_size, bl = g.plan_batch == 1 ? 0 : b;
      const int8_t* kin = kinds + bl * g.Skv;
      const int32_t* grp = groups + bl * g.Skv;
      v_finite.own(b * g.Hkv + hk, g.Skv);
      rows.fill(g, kin, grp, qt);
      const T* qh = qp + b * q.stride(0) + h * q.stride(1);
      const T* kh = kp + b * k.stride(0) + hk * k.stride(1);
      const T* vh = vp + b * v.stride(0) + hk * v.stride(1);
      load_tile(qh, q.stride(2), g, rows, g.scale, q_row.data(), qT.data());
      if constexpr (kBf16) load_tile_pairs(qh, q.stride(2), g, rows, q_pairs.data(), qP.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m_i.begin(), m_i.end(), kNegInf);
      std::fill(l_i.begin(), l_i.end(), 0.f);

      // Rows with sel[i] attend only their own key pos[i] within the current tile: one dot each, then
      // the online-softmax step for all of them as vector ops over the tile's rows, then one axpy each.
      auto diag_update = [&](const uint8_t* sel) {
        int64_t lo = rows.m, hi = 0;
        for (int64_t i = 0; i < BQp; ++i) {
          s_diag[i] = kNegInf;
          // Spread over this memory-bound loop: the next query tile's rows (usually the next task's).
          if (rows.r0 + g.bq + i < g.Sq && i < g.bq) prefetch_row(qh + (rows.r0 + g.bq + i) * q.stride(2), g.D);
          if (i >= rows.m || !sel[i]) continue;
          const int64_t p = rows.pos[i];
          if (i + kPrefetchRows < rows.m) prefetch_row(kh + (p + kPrefetchRows) * k.stride(2), g.D);
          int64_t ld;
          s_diag[i] = dot(q_row.data() + i * Dp, key_rows(kh, k.stride(2), g, p, 1, kbuf.data(), &ld), Dp);
          lo = std::min(lo, i);
          hi = i + 1;
        }
        if (hi == 0) return;
        for (int64_t i0 = lo / kVL * kVL; i0 < hi; i0 += kVL) {
          Vec sd = Vec::loadu(s_diag.data() + i0);
          const Vec m_old = Vec::loadu(m_i.data() + i0);
          if constexpr (kCap) sd = Vec::blendv(cap_vec(g, sd), sd, sd == Vec(kNegInf));  // unselected rows stay -inf
          const Vec mx = at::vec::maximum(m_old, sd);
          const Vec ref = Vec::blendv(mx, Vec(0.f), mx == Vec(kNegInf));
          const Vec a = (m_old - ref).exp_u20(), e = (sd - ref).exp_u20();
          (Vec::loadu(l_i.data() + i0) * a + e).store(l_i.data() + i0);
          mx.store(m_i.data() + i0);
          a.store(alpha.data() + i0);
          e.store(s_diag.data() + i0);
        }
        for (int64_t i = lo; i < hi; ++i) {
          if (!sel[i]) continue;
          const int64_t p = rows.pos[i];
          if (i + kPrefetchRows < rows.m) prefetch_row(vh + (p + kPrefetchRows) * v.stride(2), g.D);
          int64_t ld;
          axpby(acc.data() + i * Dp, alpha[i], s_diag[i], key_rows(vh, v.stride(2), g, p, 1, vbuf.data(), &ld), Dp);
        }
      };

      const uint8_t* tiles = plan + (bl * g.n_qt + qt) * g.n_kt;
      // The next task is usually the next query tile of this head. While this tile's GEMMs run, stream
      // in the K/V rows at its positions (its diagonal, read row by row from DRAM otherwise).
      const int64_t next_r0 = rows.r0 + g.bq, next_rows = std::max<int64_t>(0, std::min(g.bq, g.Sq - next_r0));
      cpu::PrefetchStream next_k(kh + (next_r0 + g.q_off) * k.stride(2), k.stride(2) * sizeof(T), next_rows,
                                 g.D * sizeof(T));
      cpu::PrefetchStream next_v(vh + (next_r0 + g.q_off) * v.stride(2), v.stride(2) * sizeof(T), next_rows,
                                 g.D * sizeof(T));
      for (int64_t kt = 0; kt < g.n_kt; ++kt) {
        const uint8_t tk = tiles[kt];
        if (tk == kSkip) continue;
        const int64_t k0 = kt * g.bk, nk = std::min(g.bk, g.Skv - k0);
        if (tk == kDiag) {
          for (int64_t i = 0; i < rows.m; ++i)
            diag_only[i] = rows.pos[i] >= k0 && rows.pos[i] < k0 + nk && rows.kind[i] != kPad;
          diag_update(diag_only.data());
          continue;
        }
        const uint8_t* tmask = nullptr;
        const uint8_t* tdiag = nullptr;
        const Span sp = tk == kFull ? Span{0, nk, 0, rows.m, false, false}
                                    : masks.get(tk, kin, grp, rows, bl, qt, kt, k0, nk, &tmask, &tdiag);
        if (sp.diag_rows) diag_update(tdiag);
        if (sp.empty()) continue;
        const int64_t nj = sp.jhi - sp.jlo, mi = sp.ihi - sp.ilo;
        // Scores of masked pairs are replaced by select (a non-finite K row is harmless there); the
        // P V GEMM multiplies V rows by p = 0 at masked pairs, so in partial tiles they must be finite.
        const bool v_ok = !sp.partial || v_finite.all_finite(vh, v.stride(2), g.D, k0 + sp.jlo, nj);
        // bf16 tiles: GEMMs on bf16 pairs straight from K and V (fp32 rows only for the thin-row dots).
        int64_t ldk = 0, ldv = 0;
        block_scores<kTiles>(g, sT.data(), kBf16 && mi > kThinRows, kh, k.stride(2), k0 + sp.jlo, nj, sp, g.scale,
                             qP.data(), k_odd.data(), qT.data(), q_row.data(), kbuf.data(), &ldk, &next_k);
        if constexpr (kCap) cap_scores(g, sT.data(), nj, sp);
        if (tk != kFull) apply_mask(sT.data(), tmask, nj, BQp);
        for (int64_t i0 = sp.ilo / kVL * kVL; i0 < sp.ihi; i0 += kVL) {
          const Vec m_old = Vec::loadu(m_i.data() + i0);
          Vec mx = m_old;
          for (int64_t j = 0; j < nj; ++j) mx = at::vec::maximum(mx, Vec::loadu(sT.data() + j * BQp + i0));
          // Rows with nothing allowed yet keep m = -inf; exponentiate against 0 so they stay at 0.
          const Vec ref = Vec::blendv(mx, Vec(0.f), mx == Vec(kNegInf));
          const Vec a = (m_old - ref).exp_u20();
          Vec sum(0.f);
          for (int64_t j = 0; j < nj; ++j) {
            const Vec e = (Vec::loadu(sT.data() + j * BQp + i0) - ref).exp_u20();
            e.store(sT.data() + j * BQp + i0);
            sum = sum + e;
          }
          (Vec::loadu(l_i.data() + i0) * a + sum).store(l_i.data() + i0);
          mx.store(m_i.data() + i0);
          a.store(alpha.data() + i0);
        }
        for (int64_t i = sp.ilo; i < sp.ihi; ++i) {
          if (alpha[i] == 1.f) continue;
          const Vec a(alpha[i]);
          for (int64_t d = 0; d < Dp; d += kVL) (Vec::loadu(acc.data() + i * Dp + d) * a).store(acc.data() + i * Dp + d);
        }
        // acc[i][:] += sum_j p[j][i] v_j
        if constexpr (kBf16)
          pv_bf16<kTiles>(g, acc.data(), sT.data(), sp, vh, v.stride(2), k0 + sp.jlo, nj, pP.data(), vP.data(),
                          v_ok ? nullptr : &v_finite, tmask, bad_row.data(), &next_v);
        else if (v_ok) {
          const float* vt_rows = key_rows(vh, v.stride(2), g, k0 + sp.jlo, nj, vbuf.data(), &ldv);
          gemm(acc.data() + sp.ilo * Dp, Dp, sT.data() + sp.ilo, 1, BQp, vt_rows, ldv, mi, Dp, nj, true, &next_v);
        } else
          gemm_except_bad(g, acc.data(), sT.data(), tmask, vh, v.stride(2), k0 + sp.jlo, nj, sp.ilo, sp.ihi,
                          v_finite, vbuf.data(), bad_row.data());
      }

      T* oh = op + ((b * g.Hq + h) * g.Sq + rows.r0) * g.D;
      float* lh = lp + (b * g.Hq + h) * g.Sq + rows.r0;
      for (int64_t i = 0; i < rows.m; ++i) {
        const bool live = rows.kind[i] != kPad, empty = !live || l_i[i] == 0.f;
        // Zeros by select, not acc * 0: a row with nothing to attend outputs 0 whatever acc holds (a PAD
        // row; a live one, whose allowed scores were all -inf, gets 0 * NaN = NaN: tile::row_inv).
        if (empty) std::fill(acc.begin() + i * Dp, acc.begin() + (i + 1) * Dp, 0.f);
        const float inv = tile::row_inv(l_i[i], live);
        store_row(oh + i * g.D, acc.data() + i * Dp, g.D, inv);
        lh[i] = empty ? kNegInf : m_i[i] + std::log(l_i[i]);
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // streaming stores of store_row are visible before the op returns
#endif
  });
}

// kTiles as in forward_impl: the bf16-tile modes (bf16 inputs) run the five block GEMMs on bf16 pairs
// (scores_bf16 for S and dP, keys_bf16 for dV and dK, pv_bf16 for dQ); dK then accumulates dSᵀ q of the raw
// q and is scaled once when written (FlashAttention-2), where the fp32 tiles accumulate dSᵀ (scale q).
template <typename T, bool kCap, Bf16Tiles kTiles = Bf16Tiles::kFp32>
void backward_impl(const Geometry& g, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const float* lse, const float* grad_lse,
                   const int8_t* kinds, const int32_t* groups, const uint8_t* plan, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv) {
  constexpr bool kBf16 = kTiles != Bf16Tiles::kFp32;
  const float dk_mul = kBf16 ? g.scale : 1.f;  // dk_acc holds dK / dk_mul
  const T* dop = dout.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t group_size = g.Hq / g.Hkv;

  // One task owns a (batch, kv head): all its query heads, so dq, dk and dv need no atomics. When there
  // are fewer tasks than threads (B * Hkv small: one image, few kv heads), each task's query tiles are
  // split into `splits` contiguous parts, one work item each: an item writes the dq rows of its tiles
  // and its own dK/dV partial (keys up to its last row: causal), and the partials are then summed in
  // part order (deterministic: the same bits whatever thread ran which item).
  const int64_t n_tasks = g.B * g.Hkv;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = n_tasks >= threads || g.grain(n_tasks) > 1
                             ? 1
                             : std::min<int64_t>(g.n_qt, (threads + n_tasks - 1) / n_tasks);
  const int64_t n_items = n_tasks * splits, part_size = g.Skv * g.Dp;
  // Per item: its dK partial, then its dV partial (uninitialised: each item zeroes the rows it covers).
  std::unique_ptr<float[]> parts(splits > 1 ? new float[2 * n_items * part_size] : nullptr);
  at::parallel_for(0, n_items, g.grain(n_items), [&](int64_t begin, int64_t end) {
    const int64_t BQp = g.BQp, Dp = g.Dp;
    // Transposed q and dO tiles: the fp32 score GEMMs only.
    std::vector<float> q_row(BQp * Dp), qT(kBf16 ? 0 : g.D * BQp), do_row(BQp * Dp), doT(kBf16 ? 0 : g.D * BQp);
    std::vector<float> sT(g.bk * BQp), dpT(g.bk * BQp), kbuf(g.bk * Dp), vbuf(g.bk * Dp);
    std::vector<float> dkv_own(splits == 1 ? 2 * part_size : 0), dq_acc(g.Sq * Dp);
    std::vector<float> lse_i(BQp), delta_i(BQp), o_row(Dp), bad_row(Dp), q_raw(kBf16 ? Dp : 0);
    // Tiles with a live q or dO row holding an Inf/NaN (add_bad_rows): the rows' flags (not to be
    // confused with bad_row, a row buffer), and, filled only for such tiles, the q and dO tiles with
    // those rows zeroed for the fp32 GEMMs, or (bf16 tiles) the unscaled q rows the add-back reads.
    std::vector<uint8_t> qdo_bad(BQp);
    std::vector<float> q_zeroed, do_zeroed, q_unscaled;
    // bf16 tiles: q and dO tiles in pairs along D (S, dP; pair_rows: before the transpose) and along rows
    // (dK, dV: of the rows [packed_lo, packed_hi)), P or dS in bf16 (dV, dK), dS and K in pairs along keys
    // (dQ), K and V rows with a zero after an odd D.
    const int64_t Dh = g.Dh(), bf16_n = kBf16 ? 1 : 0;
    std::vector<uint32_t> qP(bf16_n * Dh * BQp), doP(bf16_n * Dh * BQp), pair_rows(bf16_n * BQp * Dh);
    std::vector<uint32_t> qPi(bf16_n * (BQp + 1) / 2 * Dp), doPi(bf16_n * (BQp + 1) / 2 * Dp);
    std::vector<uint16_t> wb(bf16_n * g.bk * BQp), k_odd(bf16_n * (g.D % 2) * g.bk * 2 * Dh);
    std::vector<uint16_t> v_odd(k_odd.size());
    std::vector<uint32_t> dsP(bf16_n * (g.bk + 1) / 2 * BQp), kP(bf16_n * (g.bk + 1) / 2 * Dp);
    int64_t packed_lo = -1, packed_hi = -1;
    TileMaskCache masks(g);
    FiniteRows k_finite;
    Rows rows;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t task = item / splits, part = item % splits;
      const int64_t qt_lo = part * g.n_qt / splits, qt_hi = (part + 1) * g.n_qt / splits;
      const int64_t r_lo = qt_lo * g.bq, r_hi = std::min(g.Sq, qt_hi * g.bq);
      const int64_t k_hi = std::min(g.Skv, g.q_off + r_hi);  // keys past the item's last row: untouched
      float* dk_acc = splits == 1 ? dkv_own.data() : parts.get() + 2 * item * part_size;
      float* dv_acc = dk_acc + part_size;
      const int64_t b = task / g.Hkv, hk = task % g.Hkv, bl = g.plan_batch == 1 ? 0 : b;
      k_finite.own(task, g.Skv);
      const int8_t* kin = kinds + bl * g.Skv;
      const int32_t* grp = groups + bl * g.Skv;
      const T* kh = kp + b * k.stride(0) + hk * k.stride(1);
      const T* vh = vp + b * v.stride(0) + hk * v.stride(1);
      std::fill(dk_acc, dk_acc + k_hi * Dp, 0.f);
      std::fill(dv_acc, dv_acc + k_hi * Dp, 0.f);
      for (int64_t h = hk * group_size; h < (hk + 1) * group_size; ++h) {
        std::fill(dq_acc.begin() + r_lo * Dp, dq_acc.begin() + r_hi * Dp, 0.f);
        const T* qh = qp + b * q.stride(0) + h * q.stride(1);
        const T* doh = dop + b * dout.stride(0) + h * dout.stride(1);
        const float* lh = lse + (b * g.Hq + h) * g.Sq;
        const T* oh = op + b * out.stride(0) + h * out.stride(1);
        const float* glh = grad_lse ? grad_lse + (b * g.Hq + h) * g.Sq : nullptr;
        for (int64_t qt = qt_lo; qt < qt_hi; ++qt) {
          const uint8_t* tiles = plan + (bl * g.n_qt + qt) * g.n_kt;
          rows.fill(g, kin, grp, qt);
          load_tile(qh, q.stride(2), g, rows, g.scale, q_row.data(), kBf16 ? nullptr : qT.data());
          load_tile(doh, dout.stride(2), g, rows, 1.f, do_row.data(), kBf16 ? nullptr : doT.data());
          bool tile_bad = false;
          for (int64_t i = 0; i < BQp; ++i) {
            qdo_bad[i] = i < rows.m && rows.kind[i] != kPad &&
                         !(row_is_finite(q_row.data() + i * Dp, g.D) && row_is_finite(do_row.data() + i * Dp, g.D));
            tile_bad |= qdo_bad[i] != 0;
          }
          if (tile_bad) {  // rare: the unscaled q rows (bf16 tiles) or the zeroed copies (fp32 GEMMs)
            if constexpr (kBf16) {
              q_unscaled.resize(BQp * Dp);
              load_tile(qh, q.stride(2), g, rows, 1.f, q_unscaled.data(), nullptr);
            } else {
              q_zeroed = q_row;
              do_zeroed = do_row;
              for (int64_t i = 0; i < rows.m; ++i)
                if (qdo_bad[i]) {
                  std::fill(q_zeroed.begin() + i * Dp, q_zeroed.begin() + (i + 1) * Dp, 0.f);
                  std::fill(do_zeroed.begin() + i * Dp, do_zeroed.begin() + (i + 1) * Dp, 0.f);
                }
            }
          }
          const uint8_t* bad = tile_bad ? qdo_bad.data() : nullptr;
          if constexpr (kBf16) {
            load_tile_pairs(qh, q.stride(2), g, rows, pair_rows.data(), qP.data());
            load_tile_pairs(doh, dout.stride(2), g, rows, pair_rows.data(), doP.data());
            packed_lo = packed_hi = -1;
          }
          for (int64_t i = 0; i < BQp; ++i) {
            // PAD rows (lse = -inf) and rows past the end get p = exp(s - inf) = 0.
            const bool live = i < rows.m && rows.kind[i] != kPad && std::isfinite(lh[rows.r0 + i]);
            lse_i[i] = live ? lh[rows.r0 + i] : std::numeric_limits<float>::infinity();
            delta_i[i] = 0.f;
            if (!live) continue;
            // delta_i = dO_i . O_i (FlashAttention-2), minus the gradient reaching lse_i directly
            // (d lse_i / d s_ij = p_ij), so both outputs are differentiated exactly.
            load_row(oh + (rows.r0 + i) * out.stride(2), o_row.data(), g.D, Dp, 1.f);
            delta_i[i] = dot(do_row.data() + i * Dp, o_row.data(), Dp) - (glh ? glh[rows.r0 + i] : 0.f);
          }
          float* dq_tile = dq_acc.data() + rows.r0 * Dp;
          // Row i against its own key p only: p = exp(s - lse), then the five products as row updates.
          auto diag_row = [&](int64_t i, int64_t p) {
            if (!std::isfinite(lse_i[i])) return;
            int64_t ld;
            const float* krow = key_rows(kh, k.stride(2), g, p, 1, kbuf.data(), &ld);
            const float* vrow = key_rows(vh, v.stride(2), g, p, 1, vbuf.data(), &ld);
            float s = dot(q_row.data() + i * Dp, krow, Dp), dcap = 1.f;
            if constexpr (kCap) {
              const tile::Capped c = tile::softcap(s, g.softcap, g.inv_softcap);
              s = c.s;
              dcap = c.ds;
            }
            const float pr = std::exp(s - lse_i[i]);
            const float ds = pr * (dot(do_row.data() + i * Dp, vrow, Dp) - delta_i[i]) * dcap;
            axpby(dv_acc + p * Dp, 1.f, pr, do_row.data() + i * Dp, Dp);
            if constexpr (kBf16) {  // dk_acc in units of the raw q (scaled when written)
              load_row(qh + (rows.r0 + i) * q.stride(2), q_raw.data(), g.D, Dp, 1.f);
              axpby(dk_acc + p * Dp, 1.f, ds, q_raw.data(), Dp);
            } else {
              axpby(dk_acc + p * Dp, 1.f, ds, q_row.data() + i * Dp, Dp);
            }
            axpby(dq_tile + i * Dp, 1.f, ds, krow, Dp);
          };
          for (int64_t kt = 0; kt < g.n_kt; ++kt) {
            const uint8_t tk = tiles[kt];
            if (tk == kSkip) continue;
            const int64_t k0 = kt * g.bk, nk = std::min(g.bk, g.Skv - k0);
            if (tk == kDiag) {
              for (int64_t i = 0; i < rows.m; ++i)
                if (rows.pos[i] >= k0 && rows.pos[i] < k0 + nk) diag_row(i, rows.pos[i]);
              continue;
            }
            const uint8_t* tmask = nullptr;
            const uint8_t* tdiag = nullptr;
            const Span sp = tk == kFull ? Span{0, nk, 0, rows.m, false, false}
                                        : masks.get(tk, kin, grp, rows, bl, qt, kt, k0, nk, &tmask, &tdiag);
            if (sp.diag_rows)
              for (int64_t i = 0; i < rows.m; ++i)
                if (tdiag[i]) diag_row(i, rows.pos[i]);
            if (sp.empty()) continue;
            const int64_t nj = sp.jhi - sp.jlo, j0 = k0 + sp.jlo, mi = sp.ihi - sp.ilo;
            // bf16 tiles: S and dP as the forward's scores (bf16 pairs, or fp32 dots for thin spans), so
            // the recomputed P is the forward's; fp32 K and V rows only for those dots.
            const bool pairs = kBf16 && mi > kThinRows;
            int64_t ldk = 0, ldv = 0;
            const float* kt_rows = block_scores<kTiles>(g, sT.data(), pairs, kh, k.stride(2), j0, nj, sp, g.scale,
                                                        qP.data(), k_odd.data(), qT.data(), q_row.data(), kbuf.data(),
                                                        &ldk);
            if constexpr (kCap) cap_scores(g, sT.data(), nj, sp);  // sT: capped scores c t
            if (tk != kFull) apply_mask(sT.data(), tmask, nj, BQp);
            block_scores<kTiles>(g, dpT.data(), pairs, vh, v.stride(2), j0, nj, sp, 1.f, doP.data(), v_odd.data(),
                                 doT.data(), do_row.data(), vbuf.data(), &ldv);
            // Masked pairs (score -inf after apply_mask) get dS = 0 by select, not p * (dp - delta) = 0 *
            // (dO . v_j), which is NaN when v_j is not finite (masked means never read). Only partial
            // spans hold masked pairs among the rows and keys the GEMMs read.
            const bool select = sp.partial;
            for (int64_t j = 0; j < nj; ++j) {
              float* s = sT.data() + j * BQp;
              float* dpj = dpT.data() + j * BQp;
              for (int64_t i0 = sp.ilo / kVL * kVL; i0 < sp.ihi; i0 += kVL) {
                const Vec sv = Vec::loadu(s + i0);
                const Vec p = (sv - Vec::loadu(lse_i.data() + i0)).exp_u20();
                p.store(s + i0);  // sT now holds P^T
                Vec ds = p * (Vec::loadu(dpj + i0) - Vec::loadu(delta_i.data() + i0));
                if constexpr (kCap) {  // d(c t)/ds = 1 - t^2, t = sv / c (NaN at masked pairs: selected away)
                  const Vec t = sv * Vec(g.inv_softcap);
                  ds = ds * (Vec(1.f) - t * t);
                }
                (select ? Vec::blendv(ds, Vec(0.f), sv == Vec(kNegInf)) : ds).store(dpj + i0);  // dS^T
              }
            }
            // dv_j += sum_i p_ji do_i ; dk_j += sum_i ds_ji (scale q_i) ; dq_i += sum_j ds_ji k_j
            // The dq GEMM multiplies K rows by dS = 0 at masked pairs, so in partial tiles they must be finite
            // (the dv and dk GEMMs multiply by zeros only rows of dO and q: PAD rows are loaded as zeros, and
            // live rows holding an Inf/NaN are zeroed for them and added back: add_bad_rows).
            const bool k_ok = !sp.partial || k_finite.all_finite(kh, k.stride(2), g.D, j0, nj);
            if constexpr (kBf16) {
              if (sp.ilo != packed_lo || sp.ihi != packed_hi) {  // the tile's spans are mostly the same
                row_pairs(doh, dout.stride(2), g, rows, sp.ilo, sp.ihi, bad, doPi.data());
                row_pairs(qh, q.stride(2), g, rows, sp.ilo, sp.ihi, bad, qPi.data());
                packed_lo = sp.ilo;
                packed_hi = sp.ihi;
              }
              keys_bf16<kTiles>(g, dv_acc + j0 * Dp, sT.data(), sp, nj, doPi.data(), wb.data());
              keys_bf16<kTiles>(g, dk_acc + j0 * Dp, dpT.data(), sp, nj, qPi.data(), wb.data());
              if (bad) {  // dk_acc in units of the raw q
                add_bad_rows(g, dv_acc + j0 * Dp, sT.data(), tmask, sp, nj, bad, do_row.data());
                add_bad_rows(g, dk_acc + j0 * Dp, dpT.data(), tmask, sp, nj, bad, q_unscaled.data());
              }
              pv_bf16<kTiles>(g, dq_tile, dpT.data(), sp, kh, k.stride(2), j0, nj, dsP.data(), kP.data(),
                                k_ok ? nullptr : &k_finite, tmask, bad_row.data());
              continue;
            }
            const float* p_rows = sT.data() + sp.ilo;
            const float* ds_rows = dpT.data() + sp.ilo;
            gemm(dv_acc + j0 * Dp, Dp, p_rows, BQp, 1, (bad ? do_zeroed : do_row).data() + sp.ilo * Dp, Dp, nj, Dp, mi,
                 true);
            gemm(dk_acc + j0 * Dp, Dp, ds_rows, BQp, 1, (bad ? q_zeroed : q_row).data() + sp.ilo * Dp, Dp, nj, Dp, mi,
                 true);
            if (bad) {
              add_bad_rows(g, dv_acc + j0 * Dp, sT.data(), tmask, sp, nj, bad, do_row.data());
              add_bad_rows(g, dk_acc + j0 * Dp, dpT.data(), tmask, sp, nj, bad, q_row.data());
            }
            if (k_ok)
              gemm(dq_tile + sp.ilo * Dp, Dp, ds_rows, 1, BQp, kt_rows, ldk, mi, Dp, nj, true);
            else
              gemm_except_bad(g, dq_tile, dpT.data(), tmask, kh, k.stride(2), j0, nj, sp.ilo, sp.ihi, k_finite,
                              kbuf.data(), bad_row.data());
          }
        }
        T* dqh = dqp + (b * g.Hq + h) * g.Sq * g.D;
        for (int64_t i = r_lo; i < r_hi; ++i) {
          const bool pad = kin[i + g.q_off] == kPad;  // zero gradient by select, whatever q holds there
          for (int64_t d = 0; d < g.D; ++d)
            dqh[i * g.D + d] = pad ? static_cast<T>(0.f) : static_cast<T>(dq_acc[i * Dp + d] * g.scale);
        }
      }
      if (splits > 1) continue;  // summed below
      T* dkh = dkp + (b * g.Hkv + hk) * g.Skv * g.D;
      T* dvh = dvp + (b * g.Hkv + hk) * g.Skv * g.D;
      for (int64_t j = 0; j < g.Skv; ++j)
        for (int64_t d = 0; d < g.D; ++d) {
          dkh[j * g.D + d] = static_cast<T>(dk_acc[j * Dp + d] * dk_mul);
          dvh[j * g.D + d] = static_cast<T>(dv_acc[j * Dp + d]);
        }
    }
  });
  if (splits == 1) return;
  // dK/dV of each task: its parts' partials summed in part order, over blocks of key rows in parallel. A
  // part's partial covers keys [0, k_hi) only (zero beyond: not added).
  constexpr int64_t kRowsPerBlock = 64;
  const int64_t n_blocks = (g.Skv + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, n_tasks * n_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t Dp = g.Dp;
    std::vector<float> sum_k(Dp), sum_v(Dp);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t task = w / n_blocks, j0 = (w % n_blocks) * kRowsPerBlock;
      T* dkh = dkp + task * g.Skv * g.D;
      T* dvh = dvp + task * g.Skv * g.D;
      for (int64_t j = j0; j < std::min(g.Skv, j0 + kRowsPerBlock); ++j) {
        std::fill(sum_k.begin(), sum_k.end(), 0.f);
        std::fill(sum_v.begin(), sum_v.end(), 0.f);
        for (int64_t part = 0; part < splits; ++part) {
          const int64_t r_hi = std::min(g.Sq, (part + 1) * g.n_qt / splits * g.bq);
          if (j >= std::min(g.Skv, g.q_off + r_hi)) continue;
          const float* pk = parts.get() + 2 * (task * splits + part) * part_size + j * Dp;
          for (int64_t d = 0; d < Dp; ++d) {
            sum_k[d] += pk[d];
            sum_v[d] += pk[part_size + d];
          }
        }
        for (int64_t d = 0; d < g.D; ++d) {
          dkh[j * g.D + d] = static_cast<T>(sum_k[d] * dk_mul);
          dvh[j * g.D + d] = static_cast<T>(sum_v[d]);
        }
      }
    }
  });
}

Geometry make_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& plan,
                       int64_t block_q, int64_t block_k, int64_t topology, double scale, double softcap) {
  Geometry g;
  g.B = q.size(0);
  g.Hq = q.size(1);
  g.Sq = q.size(2);
  g.D = q.size(3);
  g.Hkv = k.size(1);
  g.Skv = k.size(2);
  g.Dp = round_up(g.D, kVL);
  g.bq = block_q;
  g.bk = block_k;
  g.BQp = round_up(block_q, kVL);
  g.n_qt = plan.size(1);
  g.n_kt = plan.size(2);
  g.q_off = g.Skv - g.Sq;
  g.plan_batch = plan.size(0);
  g.topology = static_cast<int>(topology);
  g.scale = static_cast<float>(scale);
  g.softcap = static_cast<float>(softcap);
  g.inv_softcap = softcap > 0 ? 1.f / g.softcap : 0.f;
  g.bf16_tiles = cpu_bf16_tiles();
  return g;
}

#define HTC_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)   \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// One call's forward (out, lse) or backward (dq, dk, dv) with the kernels of q's dtype; inputs as the
// op entry points prepare them (checked; last dimension contiguous; kinds, groups, plan, lse and
// grad_lse contiguous; grad_lse may be undefined).
// HTC_CPU_BF16_TILES (g.bf16_tiles) applies to bf16 inputs, forward and backward, every head dim: their
// block GEMMs run on bf16 pairs ("bf16 tiles" above). fp32 and fp16 inputs always use fp32 tiles (fp16 is
// widened with F16C: AVX512-FP16 has no fp32-accumulating dot product). The dispatcher refused, at load, a
// mode this variant cannot run; a mode that reaches here is run, never replaced by the fp32 tiles.
template <typename T, typename Run>
void with_tiles(const Geometry& g, Run&& run) {
  using BT = Bf16Tiles;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    switch (g.bf16_tiles) {
      case BT::kFp32: break;
#if defined(__AVX512F__)
      case BT::kEmulated: return run(std::integral_constant<BT, BT::kEmulated>{});
      case BT::kAmxEmulated: return run(std::integral_constant<BT, BT::kAmxEmulated>{});
#endif
#if defined(__AVX512BF16__)
      case BT::kDpbf16: return run(std::integral_constant<BT, BT::kDpbf16>{});
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
      case BT::kAmx: return run(std::integral_constant<BT, BT::kAmx>{});
#endif
      default:
        TORCH_CHECK(false, "star_attention (CPU): HTC_CPU_BF16_TILES mode ", static_cast<int>(g.bf16_tiles),
                    " is not built into this kernel variant");
    }
  }
  run(std::integral_constant<BT, BT::kFp32>{});
}

template <bool kCap>
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kinds,
                 const at::Tensor& groups, const at::Tensor& plan, int64_t block_q, int64_t block_k,
                 int64_t topology, double scale, double softcap, at::Tensor& out, at::Tensor& lse) {
  const Geometry g = make_geometry(q, k, plan, block_q, block_k, topology, scale, softcap);
  HTC_DISPATCH_KERNEL_TYPES(q.scalar_type(), "star_attention_cpu", [&] {
    with_tiles<scalar_t>(g, [&](auto tiles) {
      forward_impl<scalar_t, kCap, decltype(tiles)::value>(g, q, k, v, kinds.data_ptr<int8_t>(),
                                                           groups.data_ptr<int32_t>(), plan.data_ptr<uint8_t>(),
                                                           out, lse);
    });
  });
}

template <bool kCap>
void run_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& kinds,
                  const at::Tensor& groups, const at::Tensor& plan, int64_t block_q, int64_t block_k,
                  int64_t topology, double scale, double softcap, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const Geometry g = make_geometry(q, k, plan, block_q, block_k, topology, scale, softcap);
  HTC_DISPATCH_KERNEL_TYPES(q.scalar_type(), "star_attention_backward_cpu", [&] {
    with_tiles<scalar_t>(g, [&](auto tiles) {
      backward_impl<scalar_t, kCap, decltype(tiles)::value>(
          g, dout, q, k, v, out, lse.data_ptr<float>(), grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr,
          kinds.data_ptr<int8_t>(), groups.data_ptr<int32_t>(), plan.data_ptr<uint8_t>(), dq, dk, dv);
    });
  });
}

}  // namespace

}  // namespace htc::HTC_ISA_NS

// This variant's entry points (common/cpu_kernels.h), defined by the two *_isa.cpp units.
HTC_DECLARE_CPU_KERNELS(HTC_ISA_NS)
