// ctest: the AMX-BF16 tile GEMM (common/gemm_amx.h) on its emulated tile unit, against a scalar
// reference of TDPBF16PS's pseudo-code, on sizes that are not multiples of the tile (M, N, Kp tails),
// both A layouts (pairs contiguous along k, and the gathered P-style layout), overwrite and accumulate,
// leading dimensions wider than the block. Only the C block may be written. Where this CPU has AMX (and
// the test is compiled with it) the real tiles run the same cases and must agree to fp32 rounding.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

// GCC 12 warns about _mm512_undefined_epi32 inside the AVX-512 shift intrinsics (a false positive;
// setup.py builds with -Wno-maybe-uninitialized).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common/gemm_amx.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using htc::cpu::amx::EmulatedTiles;

int failures = 0;

float f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

uint16_t bf16(float x) {  // round to nearest even (finite x)
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

struct Case {
  int64_t M, N, Kp;
  bool accumulate, gathered;
};

// The reference: per element, k ascending, the low pair member then the high one, each step rounded
// once (fma: the bf16 product is exact). high_first: the vdpbf16ps order instead (must differ somewhere).
void reference(std::vector<float>& C, int64_t ldc, const std::vector<uint32_t>& Arows, const std::vector<uint32_t>& B,
               int64_t ldb, const Case& c, bool high_first) {
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      float acc = c.accumulate ? C[m * ldc + n] : 0.f;
      for (int64_t k = 0; k < c.Kp; ++k) {
        const uint32_t a = Arows[m * c.Kp + k], b = B[k * ldb + n];
        const float alo = f32(a << 16), blo = f32(b << 16), ahi = f32(a & 0xffff0000u), bhi = f32(b & 0xffff0000u);
        if (high_first) {
          acc = std::fma(ahi, bhi, acc);
          acc = std::fma(alo, blo, acc);
        } else {
          acc = std::fma(alo, blo, acc);
          acc = std::fma(ahi, bhi, acc);
        }
      }
      C[m * ldc + n] = acc;
    }
}

template <class Ops>
void run_case(const Case& c, std::mt19937& rng, const char* policy, double tol) {
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t ldc = c.N + 5, ldb = c.N + 3;
  // A's pairs as rows [M][Kp] (what the product means), stored either with row stride sar (contiguous
  // pairs) or transposed [Kp][M + 2] (pairs along k strided: gathered by the kernel).
  std::vector<uint32_t> Arows(c.M * c.Kp), B(c.Kp * ldb, 0xdeadbeefu);
  for (auto& p : Arows) p = bf16(normal(rng)) | uint32_t{bf16(normal(rng))} << 16;
  for (int64_t k = 0; k < c.Kp; ++k)
    for (int64_t n = 0; n < c.N; ++n) B[k * ldb + n] = bf16(normal(rng)) | uint32_t{bf16(normal(rng))} << 16;
  std::vector<uint16_t> Astore;
  int64_t sar, sac;
  if (!c.gathered) {
    const int64_t row = 2 * c.Kp + 3;  // uint16 per row: pairs at odd bf16 offsets allowed
    Astore.assign(c.M * row + 1, 0xffff);
    for (int64_t m = 0; m < c.M; ++m) std::memcpy(&Astore[m * row + 1], &Arows[m * c.Kp], c.Kp * 4);
    sar = row;
    sac = 2;
  } else {
    const int64_t ldm = c.M + 2;  // pairs per k row
    Astore.assign(2 * c.Kp * ldm, 0xffff);
    for (int64_t k = 0; k < c.Kp; ++k)
      for (int64_t m = 0; m < c.M; ++m) std::memcpy(&Astore[2 * (k * ldm + m)], &Arows[m * c.Kp + k], 4);
    sar = 2;
    sac = 2 * ldm;
  }
  const int64_t skip = c.gathered ? 0 : 1;
  std::vector<float> C((c.M + 1) * ldc), want, other;
  for (auto& x : C) x = normal(rng);
  const float sentinel = 12345.f;
  for (int64_t m = 0; m <= c.M; ++m)
    for (int64_t n = 0; n < ldc; ++n)
      if (m == c.M || n >= c.N) C[m * ldc + n] = sentinel;
  want = other = C;
  reference(want, ldc, Arows, B, ldb, c, false);
  reference(other, ldc, Arows, B, ldb, c, true);
  htc::cpu::amx::gemm<Ops>(C.data(), ldc, Astore.data() + skip, sar, sac, B.data(), ldb, c.M, c.N, c.Kp,
                           c.accumulate);
  int64_t bad = 0, differs = 0;
  double worst = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(C.size()); ++i) {
    const double err = std::fabs(double(C[i]) - want[i]) / (1.0 + std::fabs(double(want[i])));
    worst = std::max(worst, err);
    bad += !(err <= tol);  // NaN fails
    differs += other[i] != want[i];
  }
  if (bad) {
    std::printf("FAIL %s M=%lld N=%lld Kp=%lld acc=%d gathered=%d: %lld elements off (worst %.3g)\n", policy,
                (long long)c.M, (long long)c.N, (long long)c.Kp, c.accumulate, c.gathered, (long long)bad, worst);
    ++failures;
  }
  // The reference itself must see the order: with Kp >= 2 and random data, the vdpbf16ps order gives
  // other bits somewhere (else bit equality would not show that the emulation follows TDPBF16PS).
  if (tol == 0 && c.Kp >= 4 && c.M * c.N >= 64 && differs == 0) {
    std::printf("FAIL the low-first and high-first orders agree everywhere (M=%lld N=%lld Kp=%lld)\n",
                (long long)c.M, (long long)c.N, (long long)c.Kp);
    ++failures;
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
  return false;
#endif
}
#endif

}  // namespace

int main() {
  std::mt19937 rng(13);
  std::vector<Case> cases;
  const int64_t Ms[] = {1, 7, 16, 17, 33, 64}, Ns[] = {1, 5, 16, 31, 48, 64}, Ks[] = {1, 3, 16, 20, 40};
  for (int64_t M : Ms)
    for (int64_t N : Ns)
      for (int64_t Kp : Ks) cases.push_back({M, N, Kp, ((M + N + Kp) & 1) != 0, ((M * 3 + N + Kp) & 2) != 0});
  cases.push_back({5, 3, 0, false, false});  // Kp == 0: zeros
  cases.push_back({5, 3, 0, true, true});    // Kp == 0, accumulate: C unchanged
  for (const Case& c : cases) run_case<EmulatedTiles>(c, rng, "emulated", 0.0);
  // Tile state released after every call.
  if (EmulatedTiles::file().configured) {
    std::printf("FAIL tile state not released\n");
    ++failures;
  }
  int ran_amx = 0;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (amx_usable()) {
    for (const Case& c : cases) run_case<htc::cpu::amx::AmxTiles>(c, rng, "amx", 1e-5);
    ran_amx = 1;
  }
#endif
  std::printf("%zu cases (emulated tiles%s)\n", cases.size(), ran_amx ? ", AMX tiles" : "; AMX tiles not run here");
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
