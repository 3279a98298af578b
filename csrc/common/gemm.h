// Small fp32 GEMM micro-kernels for cache-resident tiles (the star-attention CPU kernels' only GEMM).
// One shape serves every product of forward and backward:
//     C[m][n] (+)= sum_k A[m * sar + k * sac] * B[k * ldb + n]
// A is read as scalars (broadcast), so A may be a transposed view (sar/sac); B and C rows are read as
// vectors, so N must be a multiple of the vector width (callers pad their scratch tiles).
#pragma once
#include <cstdint>

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

template <int NV>
inline void gemm_rows(float* C, int64_t ldc, const float* A, int64_t sar, int64_t sac,
                      const float* B, int64_t ldb, int64_t M, int64_t K, bool accumulate,
                      PrefetchStream* pf) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows)
    gemm_block<kRows, NV>(C + m * ldc, ldc, A + m * sar, sar, sac, B, ldb, K, accumulate, pf);
  const int64_t rest = M - m;
  C += m * ldc;
  A += m * sar;
  switch (rest) {
    case 0: break;
    case 1: gemm_block<1, NV>(C, ldc, A, sar, sac, B, ldb, K, accumulate, pf); break;
    case 2: gemm_block<2, NV>(C, ldc, A, sar, sac, B, ldb, K, accumulate, pf); break;
    case 3: gemm_block<3, NV>(C, ldc, A, sar, sac, B, ldb, K, accumulate, pf); break;
    case 4: gemm_block<4, NV>(C, ldc, A, sar, sac, B, ldb, K, accumulate, pf); break;
    default: gemm_block<5, NV>(C, ldc, A, sar, sac, B, ldb, K, accumulate, pf); break;
  }
}

// C [M x N] (+)= A [M x K] * B [K x N]; N % kVL == 0. `pf`, if given, advances one line per k-step.
inline void gemm(float* C, int64_t ldc, const float* A, int64_t sar, int64_t sac, const float* B,
                 int64_t ldb, int64_t M, int64_t N, int64_t K, bool accumulate,
                 PrefetchStream* pf = nullptr) {
  if (M <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = 0.f;
    return;
  }
  int64_t n = 0;
  for (; n + kMaxNV * kVL <= N; n += kMaxNV * kVL)
    gemm_rows<kMaxNV>(C + n, ldc, A, sar, sac, B + n, ldb, M, K, accumulate, pf);
  switch ((N - n) / kVL) {
    case 0: break;
    case 1: gemm_rows<1>(C + n, ldc, A, sar, sac, B + n, ldb, M, K, accumulate, pf); break;
    case 2: gemm_rows<2>(C + n, ldc, A, sar, sac, B + n, ldb, M, K, accumulate, pf); break;
    default: gemm_rows<3>(C + n, ldc, A, sar, sac, B + n, ldb, M, K, accumulate, pf); break;
  }
}

}  // namespace HTC_ISA_NS
}  // namespace htc::cpu
