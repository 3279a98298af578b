// AMX-BF16 tiles for the bf16-tile GEMMs (HTC_CPU_BF16_TILES=amx | amx_emulate):
//     C [M x N] fp32 (+)= A [M x 2Kp] * B [2Kp x N], bf16 operands in pairs along k, fp32 accumulation,
// with the operand layout of gemm_bf16 (common/gemm.h): A's pair (m, kp) at A + m*sar + kp*sac (uint16
// units), B = [Kp][ldb] pairs (the VNNI layout, which is exactly what an AMX B tile holds: row kp = the
// pairs (2kp, 2kp+1) of 16 columns). Unlike gemm_bf16, N need not be a multiple of 16.
//
// The kernel is written once against a tile-ops policy:
//   AmxTiles       the instructions (ldtilecfg, tileloadd, tdpbf16ps, tilestored, tilezero, tilerelease);
//                  compiled where the unit has AMX-TILE and AMX-BF16 (the `amx` variant), run only when
//                  the dispatcher chose that variant (CPUID, XCR0 tile state, Linux's arch_prctl grant).
//   EmulatedTiles  a per-thread tile register file in memory, TDPBF16PS done as Intel's pseudo-code
//                  states it: for each row m, pair k, column n,
//                      acc += fp32(a[m][2k]) * fp32(b[k][2n]);  acc += fp32(a[m][2k+1]) * fp32(b[k][2n+1])
//                  each step rounded once (a bf16 product is exact in fp32, so one FMA per step). Note the
//                  order: the LOW member first, where vdpbf16ps (gemm_bf16) adds the high one first.
//                  Unlike the hardware it does not flush subnormal inputs/outputs (DAZ/FTZ), and hardware
//                  may accumulate in another order internally: the two agree to rounding, not bit for bit.
// so that the tile code (blocking, tails, staging, the A gather, configuration) runs, and is tested, on
// CPUs without AMX (csrc/tests/test_gemm_amx.cpp; tests/test_cpu_isa.py runs star_attention on it).
//
// Tiles: every call configures palette 1 with all 8 tiles 16 rows x 64 bytes (16 fp32, or 16 bf16 pairs),
// and releases the tile state when done (other code on the thread, oneDNN's AMX kernels in torch for one,
// may configure tiles differently between our calls). C blocks are 2x2 tiles (32 x 32): C tiles tmm0-3,
// A tiles tmm4-5, B tiles tmm6-7. Tails (M, N, Kp not multiples of 16) go through a zero-padded staging
// tile: zero pairs along k add nothing; padded rows/columns of C are computed and never stored.
// A is loaded row-wise (16 pairs contiguous per row); an A with pairs not contiguous (sac != 2: P for P·V,
// stored [jp][i]) is first gathered into a per-thread panel [M][Kp].
//
// Torch-free (the C++ unit test includes it alone).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/isa.h"

namespace htc::cpu {
inline namespace HTC_ISA_NS {
namespace amx {

constexpr int kTiles = 8;
constexpr int kRows = 16;     // rows of every tile as configured (the palette-1 maximum)
constexpr int kRowBytes = 64;  // bytes per tile row: 16 fp32 or 16 bf16 pairs (the palette-1 maximum)
constexpr int kPairs = 16;     // pairs along k per A/B tile
constexpr int kCols = 16;      // fp32 columns per C tile

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

inline const TileConfig& full_config() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < kTiles; ++t) {
      c.colsb[t] = kRowBytes;
      c.rows[t] = kRows;
    }
    return c;
  }();
  return cfg;
}

// --- The emulated tile unit ----------------------------------------------------------------------------
struct EmulatedTiles {
  struct File {
    TileConfig cfg;
    bool configured = false;
    alignas(64) uint8_t tile[kTiles][kRows * kRowBytes];
  };
  static File& file() {
    static thread_local File f;
    return f;
  }
  static File& checked() {
    File& f = file();
    if (!f.configured) std::abort();  // a tile instruction without a configuration faults (#UD)
    return f;
  }

  // ldtilecfg: the configuration, and every tile zeroed.
  static void configure(const TileConfig& cfg) {
    File& f = file();
    f.cfg = cfg;
    std::memset(f.tile, 0, sizeof f.tile);
    f.configured = true;
  }
  static void release() {
    File& f = file();
    std::memset(f.tile, 0, sizeof f.tile);
    f.configured = false;
  }
  // tileloadd: rows[t] rows of colsb[t] bytes; the rest of the tile zeroed.
  template <int T>
  static void load(const void* base, int64_t stride) {
    File& f = checked();
    uint8_t* t = f.tile[T];
    std::memset(t, 0, sizeof f.tile[T]);
    for (int r = 0; r < f.cfg.rows[T]; ++r)
      std::memcpy(t + r * kRowBytes, static_cast<const uint8_t*>(base) + r * stride, f.cfg.colsb[T]);
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    File& f = checked();
    for (int r = 0; r < f.cfg.rows[T]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, f.tile[T] + r * kRowBytes, f.cfg.colsb[T]);
  }
  template <int T>
  static void zero() {
    File& f = checked();
    std::memset(f.tile[T], 0, sizeof f.tile[T]);
  }
  // tdpbf16ps tmm[C], tmm[A], tmm[B] (Intel SDM pseudo-code; no DAZ/FTZ).
  template <int C, int A, int B>
  static void dp() {
    File& f = checked();
    float* c = reinterpret_cast<float*>(f.tile[C]);
    const uint32_t* a = reinterpret_cast<const uint32_t*>(f.tile[A]);
    const uint32_t* b = reinterpret_cast<const uint32_t*>(f.tile[B]);
    const int M = f.cfg.rows[C], K = f.cfg.colsb[A] / 4, N = f.cfg.colsb[C] / 4;
    constexpr int kW = kRowBytes / 4;  // uint32/float per tile row
#if defined(__AVX512F__)
    if (N == 16) {
      const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
      for (int m = 0; m < M; ++m) {
        __m512 acc = _mm512_loadu_ps(c + m * kW);
        for (int k = 0; k < K; ++k) {
          const __m512i av = _mm512_set1_epi32(static_cast<int>(a[m * kW + k]));
          const __m512i bv = _mm512_loadu_si512(b + k * kW);
          acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(av, 16)),
                                _mm512_castsi512_ps(_mm512_slli_epi32(bv, 16)), acc);
          acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(av, hi_mask)),
                                _mm512_castsi512_ps(_mm512_and_si512(bv, hi_mask)), acc);
        }
        _mm512_storeu_ps(c + m * kW, acc);
      }
      return;
    }
#endif
    auto lo = [](uint32_t p) { return bits_to_float(p << 16); };
    auto hi = [](uint32_t p) { return bits_to_float(p & 0xffff0000u); };
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k)
        for (int n = 0; n < N; ++n) {
          float& acc = c[m * kW + n];
          const uint32_t x = a[m * kW + k], y = b[k * kW + n];
          acc = std::fma(lo(x), lo(y), acc);
          acc = std::fma(hi(x), hi(y), acc);
        }
  }
  static float bits_to_float(uint32_t u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
  }
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// --- The real tile unit ----------------------------------------------------------------------------------
// The intrinsics paste the tile number into the instruction text: it must be a literal, hence the chains.
#define HTC_AMX_TILE_CASES(OP, T, ...)                      \
  if constexpr (T == 0) OP(0 __VA_OPT__(, ) __VA_ARGS__);   \
  else if constexpr (T == 1) OP(1 __VA_OPT__(, ) __VA_ARGS__); \
  else if constexpr (T == 2) OP(2 __VA_OPT__(, ) __VA_ARGS__); \
  else if constexpr (T == 3) OP(3 __VA_OPT__(, ) __VA_ARGS__); \
  else if constexpr (T == 4) OP(4 __VA_OPT__(, ) __VA_ARGS__); \
  else if constexpr (T == 5) OP(5 __VA_OPT__(, ) __VA_ARGS__); \
  else if constexpr (T == 6) OP(6 __VA_OPT__(, ) __VA_ARGS__); \
  else OP(7 __VA_OPT__(, ) __VA_ARGS__)

struct AmxTiles {
  static void configure(const TileConfig& cfg) { _tile_loadconfig(&cfg); }
  static void release() { _tile_release(); }
  template <int T>
  static void load(const void* base, int64_t stride) {
    static_assert(T >= 0 && T < kTiles);
    HTC_AMX_TILE_CASES(_tile_loadd, T, base, stride);
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    static_assert(T >= 0 && T < kTiles);
    HTC_AMX_TILE_CASES(_tile_stored, T, base, stride);
  }
  template <int T>
  static void zero() {
    static_assert(T >= 0 && T < kTiles);
    HTC_AMX_TILE_CASES(_tile_zero, T);
  }
  // The four products of a 2x2 block of C tiles (tmm0-3) from A tiles tmm4-5 and B tiles tmm6-7.
  template <int C, int A, int B>
  static void dp() {
    static_assert(C == 2 * (A - 4) + (B - 6) && A >= 4 && A < 6 && B >= 6 && B < 8);
    if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
    else if constexpr (C == 1) _tile_dpbf16ps(1, 4, 7);
    else if constexpr (C == 2) _tile_dpbf16ps(2, 5, 6);
    else _tile_dpbf16ps(3, 5, 7);
  }
};
#undef HTC_AMX_TILE_CASES
#endif

// --- The kernel (any policy) ----------------------------------------------------------------------------
struct NoPrefetch {
  void next() {}
};

// Tile T from `rows` rows of `bytes` bytes at base (row stride `stride` bytes): straight from memory when
// the tile is whole, else through the zero-padded staging tile.
template <class Ops, int T>
inline void load_tile(const void* base, int64_t stride, int64_t rows, int64_t bytes, uint8_t* stage) {
  if (rows >= kRows && bytes >= kRowBytes) {
    Ops::template load<T>(base, stride);
    return;
  }
  std::memset(stage, 0, kRows * kRowBytes);
  const int64_t r_n = std::min<int64_t>(rows, kRows), b_n = std::min<int64_t>(bytes, kRowBytes);
  for (int64_t r = 0; r < r_n; ++r) std::memcpy(stage + r * kRowBytes, static_cast<const uint8_t*>(base) + r * stride, b_n);
  Ops::template load<T>(stage, kRowBytes);
}

// C tile T into rows x cols of C (ldc floats): whole tiles straight, else through the staging tile.
template <class Ops, int T>
inline void store_tile(float* C, int64_t ldc, int64_t rows, int64_t cols, uint8_t* stage) {
  if (rows >= kRows && cols >= kCols) {
    Ops::template store<T>(C, ldc * int64_t{sizeof(float)});
    return;
  }
  Ops::template store<T>(stage, kRowBytes);
  const int64_t r_n = std::min<int64_t>(rows, kRows), c_n = std::min<int64_t>(cols, kCols);
  for (int64_t r = 0; r < r_n; ++r) std::memcpy(C + r * ldc, stage + r * kRowBytes, c_n * sizeof(float));
}

// One block of MT x NT C tiles: rows [0, mr) and columns [0, nc) of C (mr <= 16 MT, nc <= 16 NT, and
// more than 16 (MT - 1), 16 (NT - 1)). A row-major pairs (row stride sar uint16), B as gemm_bf16's.
template <class Ops, int MT, int NT, class Pf>
inline void block(float* C, int64_t ldc, const uint16_t* A, int64_t sar, const uint32_t* B, int64_t ldb, int64_t mr,
                  int64_t nc, int64_t Kp, bool accumulate, Pf* pf, uint8_t* stage) {
  constexpr int64_t R = kRows, W = kCols;
  const int64_t r0 = std::min(mr, R), r1 = mr - R, c0 = std::min(nc, W), c1 = nc - W;
  const int64_t lda = sar * 2, ldbb = ldb * 4, ldcb = ldc * 4;
  auto c_init = [&]<int T>(const float* p, int64_t rows, int64_t cols) {
    if (accumulate)
      load_tile<Ops, T>(p, ldcb, rows, cols * 4, stage);
    else
      Ops::template zero<T>();
  };
  c_init.template operator()<0>(C, r0, c0);
  if constexpr (NT > 1) c_init.template operator()<1>(C + W, r0, c1);
  if constexpr (MT > 1) c_init.template operator()<2>(C + R * ldc, r1, c0);
  if constexpr (MT > 1 && NT > 1) c_init.template operator()<3>(C + R * ldc + W, r1, c1);
  for (int64_t k0 = 0; k0 < Kp; k0 += kPairs) {
    const int64_t kb = std::min<int64_t>(Kp - k0, kPairs) * 4;  // bytes of pairs along k in this step
    const uint16_t* a = A + k0 * 2;
    const uint32_t* b = B + k0 * ldb;
    load_tile<Ops, 4>(a, lda, r0, kb, stage);
    if constexpr (MT > 1) load_tile<Ops, 5>(a + R * sar, lda, r1, kb, stage);
    load_tile<Ops, 6>(b, ldbb, kb / 4, c0 * 4, stage);
    if constexpr (NT > 1) load_tile<Ops, 7>(b + W, ldbb, kb / 4, c1 * 4, stage);
    if (pf) pf->next();
    Ops::template dp<0, 4, 6>();
    if constexpr (NT > 1) Ops::template dp<1, 4, 7>();
    if constexpr (MT > 1) Ops::template dp<2, 5, 6>();
    if constexpr (MT > 1 && NT > 1) Ops::template dp<3, 5, 7>();
  }
  store_tile<Ops, 0>(C, ldc, r0, c0, stage);
  if constexpr (NT > 1) store_tile<Ops, 1>(C + W, ldc, r0, c1, stage);
  if constexpr (MT > 1) store_tile<Ops, 2>(C + R * ldc, ldc, r1, c0, stage);
  if constexpr (MT > 1 && NT > 1) store_tile<Ops, 3>(C + R * ldc + W, ldc, r1, c1, stage);
}

// A's pairs as rows [M][Kp] (per-thread panel) when they are not contiguous along k.
inline const uint16_t* gather_rows(const uint16_t* A, int64_t sar, int64_t sac, int64_t M, int64_t Kp) {
  static thread_local std::vector<uint32_t> panel;
  if (static_cast<int64_t>(panel.size()) < M * Kp) panel.resize(M * Kp);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kp = 0; kp < Kp; ++kp) std::memcpy(&panel[m * Kp + kp], A + m * sar + kp * sac, sizeof(uint32_t));
  return reinterpret_cast<const uint16_t*>(panel.data());
}

// C [M x N] (+)= A [M x 2Kp] * B [2Kp x N] in bf16 pairs on AMX tiles (policy Ops), any M, N, Kp.
template <class Ops, class Pf = NoPrefetch>
inline void gemm(float* C, int64_t ldc, const uint16_t* A, int64_t sar, int64_t sac, const uint32_t* B, int64_t ldb,
                 int64_t M, int64_t N, int64_t Kp, bool accumulate, Pf* pf = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (Kp <= 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.f);
    return;
  }
  if (sac != 2) {
    A = gather_rows(A, sar, sac, M, Kp);
    sar = 2 * Kp;
  }
  alignas(64) uint8_t stage[kRows * kRowBytes];
  Ops::configure(full_config());
  for (int64_t m0 = 0; m0 < M; m0 += 2 * kRows) {
    const int64_t mr = std::min<int64_t>(M - m0, 2 * kRows);
    for (int64_t n0 = 0; n0 < N; n0 += 2 * kCols) {
      const int64_t nc = std::min<int64_t>(N - n0, 2 * kCols);
      float* c = C + m0 * ldc + n0;
      const uint16_t* a = A + m0 * sar;
      const uint32_t* b = B + n0;
      if (mr > kRows) {
        if (nc > kCols)
          block<Ops, 2, 2>(c, ldc, a, sar, b, ldb, mr, nc, Kp, accumulate, pf, stage);
        else
          block<Ops, 2, 1>(c, ldc, a, sar, b, ldb, mr, nc, Kp, accumulate, pf, stage);
      } else if (nc > kCols) {
        block<Ops, 1, 2>(c, ldc, a, sar, b, ldb, mr, nc, Kp, accumulate, pf, stage);
      } else {
        block<Ops, 1, 1>(c, ldc, a, sar, b, ldb, mr, nc, Kp, accumulate, pf, stage);
      }
    }
  }
  Ops::release();
}

}  // namespace amx
}  // namespace HTC_ISA_NS
}  // namespace htc::cpu
