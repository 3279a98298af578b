// Small fp32 GEMM micro-kernels for cache-resident tiles (the star-attention CPU kernels' only GEMM).
// One shape serves every product of forward and backward:
//     C[m][n] (+)= sum_k A[m * sar + k * sac] * B[k * ldb + n]
// A is read as scalars (broadcast), so A may be a transposed view (sar/sac); B and C rows are read as
// vectors, so N must be a multiple of the vector width (callers pad their scratch tiles).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/vec.h"

// In the variant's namespace (common/isa.h): each variant's copy of these inline functions stays its own.
namespace htc::cpu {
inline namespace HTC_ISA_NS {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVL = Vec::size();
// Register blocking: rows x vectors of accumulators, sized to the register file (32 zmm / 16 ymm).
constexpr int kRows = kVL >= 16 ? 6 : 3;
constexpr int kMaxNV = kVL >= 16 ? 4 : 2;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Cache lines to prefetch one at a time from inside a compute-bound loop (one per GEMM k-step): the
// data a later, memory-bound step needs arrives during the arithmetic. A burst of prefetches instead
// fills the load queue and stalls.
struct PrefetchStream {
  const char* row = nullptr;
  int64_t stride = 0, rows = 0, lines_per_row = 0, line = 0;

  PrefetchStream() = default;
  PrefetchStream(const void* first_row, int64_t row_stride_bytes, int64_t n_rows, int64_t row_bytes)
      : row(static_cast<const char*>(first_row)),
        stride(row_stride_bytes),
        rows(n_rows),
        lines_per_row((row_bytes + 63) / 64) {}

  void next() {
    if (rows <= 0) return;
    __builtin_prefetch(row + line * 64);
    if (++line == lines_per_row) {
      line = 0;
      row += stride;
      --rows;
    }
  }
};

template <int R, int NV>
inline void gemm_block(float* C, int64_t ldc, const float* A, int64_t sar, int64_t sac,
                       const float* B, int64_t ldb, int64_t K, bool accumulate, PrefetchStream* pf) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * kVL) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    if (pf) pf->next();
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * kVL);
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * sar + k * sac]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * kVL);
}

// Register blocks of C [M x N]: calls tile(IntC<R>{}, IntC<NV>{}, m, n) for rows [m, m + R) and columns
// [n, n + NV * kVL), R <= kRows and NV <= kMaxNV (a compile-time block shape: the accumulators stay in
// registers), column panels outside, row blocks inside. N % kVL == 0. Shared by the fp32 and bf16 GEMMs.
template <int V>
using IntC = std::integral_constant<int, V>;

template <class Tile>
inline void for_each_block(int64_t M, int64_t N, Tile&& tile) {
  auto panel = [&](auto nv, int64_t n) {
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) tile(IntC<kRows>{}, nv, m, n);
    switch (M - m) {
      case 0: break;
      case 1: tile(IntC<1>{}, nv, m, n); break;
      case 2: tile(IntC<2>{}, nv, m, n); break;
      case 3: tile(IntC<3>{}, nv, m, n); break;
      case 4: tile(IntC<4>{}, nv, m, n); break;
      default: tile(IntC<5>{}, nv, m, n); break;
    }
  };
  int64_t n = 0;
  for (; n + kMaxNV * kVL <= N; n += kMaxNV * kVL) panel(IntC<kMaxNV>{}, n);
  switch ((N - n) / kVL) {
    case 0: break;
    case 1: panel(IntC<1>{}, n); break;
    case 2: panel(IntC<2>{}, n); break;
    default: panel(IntC<3>{}, n); break;
  }
}

// The degenerate shapes of every GEMM here: true when there is nothing (more) to compute (C zeroed for
// an empty K unless accumulating).
inline bool gemm_trivial(float* C, int64_t ldc, int64_t M, int64_t N, int64_t K, bool accumulate) {
  if (M <= 0) return true;
  if (K > 0) return false;
  if (!accumulate)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = 0.f;
  return true;
}

// C [M x N] (+)= A [M x K] * B [K x N]; N % kVL == 0. `pf`, if given, advances one line per k-step.
inline void gemm(float* C, int64_t ldc, const float* A, int64_t sar, int64_t sac, const float* B,
                 int64_t ldb, int64_t M, int64_t N, int64_t K, bool accumulate,
                 PrefetchStream* pf = nullptr) {
  if (gemm_trivial(C, ldc, M, N, K, accumulate)) return;
  for_each_block(M, N, [&](auto r, auto nv, int64_t m, int64_t n) {
    gemm_block<decltype(r)::value, decltype(nv)::value>(C + m * ldc + n, ldc, A + m * sar, sar, sac, B + n, ldb, K,
                                                        accumulate, pf);
  });
}

#if defined(__AVX512F__)
// --- bf16 tiles (HTC_CPU_BF16_TILES): C fp32 (+)= A * B with bf16 operands, fp32 accumulation -------------
// Operands are bf16 *pairs* along the reduction dimension k (the VNNI layout of AVX512-BF16): one uint32
// holds elements 2kp (low half) and 2kp + 1 (high half). A's pair (m, kp) is read at A + m*sar + kp*sac
// (A in uint16 units: a pair may sit at any bf16 offset); B is [Kp][ldb] pairs, N columns per row.
// kEmulate: the dot product done with AVX-512F FMAs instead of vdpbf16ps; the same arithmetic (a bf16
// product is exact in fp32; the high pair member is added first, then the low one, each rounded once as
// the instruction does), except that the instruction also flushes subnormals (DAZ/FTZ). It lets the tile
// code run, and be tested, on CPUs without AVX512-BF16.
template <bool kEmulate>
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  if constexpr (kEmulate) {
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)),
                          acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                           _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
  } else {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
#else
    static_assert(kEmulate, "vdpbf16ps needs a variant compiled with AVX512-BF16");
    return acc;
#endif
  }
}

template <int R, int NV, bool kEmulate>
inline void gemm_bf16_block(float* C, int64_t ldc, const uint16_t* A, int64_t sar, int64_t sac, const uint32_t* B,
                            int64_t ldb, int64_t Kp, bool accumulate, PrefetchStream* pf) {
  static_assert(kVL == 16);
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Kp; ++kp) {
    if (pf) pf->next();
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + kp * ldb + v * 16);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, A + r * sar + kp * sac, sizeof pair);
      const __m512i a = _mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = dot_pairs<kEmulate>(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, acc[r][v]);
}

// C [M x N] (+)= A [M x 2Kp] * B [2Kp x N] in bf16 pairs (layout above); N % 16 == 0.
template <bool kEmulate>
inline void gemm_bf16(float* C, int64_t ldc, const uint16_t* A, int64_t sar, int64_t sac, const uint32_t* B,
                      int64_t ldb, int64_t M, int64_t N, int64_t Kp, bool accumulate, PrefetchStream* pf = nullptr) {
  if (gemm_trivial(C, ldc, M, N, Kp, accumulate)) return;
  for_each_block(M, N, [&](auto r, auto nv, int64_t m, int64_t n) {
    gemm_bf16_block<decltype(r)::value, decltype(nv)::value, kEmulate>(C + m * ldc + n, ldc, A + m * sar, sar, sac,
                                                                       B + n, ldb, Kp, accumulate, pf);
  });
}

// 16 fp32 values rounded to bf16 (round to nearest even, as vcvtneps2bf16; the values are finite), in the
// low 16 bits of each 32-bit lane.
inline __m512i bf16_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}

// out[0:round_up(n, 16)) = bf16(x[0:n]) (bf16_bits), zeros past n (x is not read there). As uint16 in
// memory, consecutive values are pairs (2kp, 2kp + 1): the A operand of gemm_bf16 with sac = 2 (an odd n
// pairs its last value with a zero).
inline void to_bf16(uint16_t* out, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtepi32_epi16(bf16_bits(_mm512_maskz_loadu_ps(m, x + i))));
  }
}

// out[n] = pair(bf16(lo[n]), bf16(hi[n])) for n in [0, N), N % 16 == 0 (hi == nullptr: zeros).
inline void pack_pairs(uint32_t* out, const float* lo, const float* hi, int64_t N) {
  for (int64_t n = 0; n < N; n += 16) {
    const __m512i l = bf16_bits(_mm512_loadu_ps(lo + n));
    const __m512i h = hi ? _mm512_slli_epi32(bf16_bits(_mm512_loadu_ps(hi + n)), 16) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + n, _mm512_or_si512(l, h));
  }
}

// out[d] = pair(lo[d], hi[d]) for d in [0, D) from two rows of bf16 bits (a null row: zeros), zeros in
// [D, Dp).
inline void pack_pairs(uint32_t* out, const uint16_t* lo, const uint16_t* hi, int64_t D, int64_t Dp) {
  auto half = [](const uint16_t* row, int64_t d) {
    return row ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d)))
               : _mm512_setzero_si512();
  };
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_si512(out + d, _mm512_or_si512(half(lo, d), _mm512_slli_epi32(half(hi, d), 16)));
  for (; d < D; ++d) out[d] = (lo ? uint32_t{lo[d]} : 0u) | (hi ? uint32_t{hi[d]} << 16 : 0u);
  for (; d < Dp; ++d) out[d] = 0;
}
#endif  // __AVX512F__

}  // namespace HTC_ISA_NS
}  // namespace htc::cpu
