// Torch-free unit test of the MGVQ lookup CPU core (mgvq_cpu_core.h) against a scalar brute force
// built from the shared math (mgvq_math.h): same fmaf chains, so indices must match exactly.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "mgvq_lookup/mgvq_cpu_core.h"

using namespace htc::mgvq;

static int failures = 0;
#define EXPECT(cond, ...)                      \
  do {                                         \
    if (!(cond)) {                             \
      ++failures;                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                \
      std::printf("\n");                       \
    }                                          \
  } while (0)

static void brute(const std::vector<float>& z, const std::vector<float>& cb, int64_t N, int G,
                  int64_t K, int d, bool normalize, std::vector<int64_t>& idx) {
  idx.assign(N * G, kNoCode);
  std::vector<float> zt(d), c(d + 1), scale(G);
  l2_group_scales(cb.data(), G, K, d, scale.data());
  for (int64_t n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g) {
      const float* zp = &z[(n * G + g) * d];
      const UnitScale u = unit_scale(zp, d);
      bool ok = true;
      for (int j = 0; j < d; ++j) {
        zt[j] = normalize ? unit_elem(zp[j], u) : zp[j] * scale[g];
        ok &= normalize || std::fabs(zt[j]) <= l2_token_limit(d);
      }
      float bv = -INFINITY;
      int32_t bi = kNoCode;
      for (int64_t k = 0; k < K && ok; ++k) {
        const float* cp = &cb[(g * K + k) * d];
        float s;
        if (normalize) {
          const UnitScale uc = unit_scale(cp, d);
          for (int j = 0; j < d; ++j) c[j] = unit_elem(cp[j], uc);
          s = score_cos(zt.data(), c.data(), d);
        } else {
          float cs = 0.f;
          for (int j = 0; j < d; ++j) cs = fmaf(cp[j] * scale[g], cp[j] * scale[g], cs);
          for (int j = 0; j < d; ++j) c[j] = 2.f * (cp[j] * scale[g]);
          s = score_l2(zt.data(), c.data(), -cs, d);
        }
        if (better(s, int32_t(k), bv, bi)) bv = s, bi = int32_t(k);
      }
      idx[n * G + g] = bi;
    }
}

static std::vector<int64_t> run(const std::vector<float>& z, const std::vector<float>& cb,
                                int64_t N, int G, int64_t K, int d, bool normalize,
                                int64_t* missing = nullptr) {
  std::vector<float> packed(packed_size(G, K, d, normalize)), rowmajor(G * K * d), scale(G);
  l2_group_scales(cb.data(), G, K, d, scale.data());
  pack_codebook(cb.data(), G, K, d, normalize, packed.data(), rowmajor.data(), scale.data());
  std::vector<int64_t> idx(N * G);
  std::vector<float> codes(N * G * d);
  const int64_t m = lookup(z.data(), N, G, K, d, normalize, packed.data(), rowmajor.data(),
                           idx.data(), codes.data(), scale.data());
  if (missing) *missing = m;
  for (int64_t o = 0; o < N * G; ++o)
    if (idx[o] >= 0)
      for (int j = 0; j < d; ++j) {
        const float* r = &rowmajor[((o % G) * K + idx[o]) * d];
        EXPECT(codes[o * d + j] == r[j], "code mismatch");
      }
  return idx;
}

int main() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  const int shapes[][4] = {{37, 8, 2048, 4}, {19, 3, 17, 8}, {9, 2, 33, 16}, {5, 1, 40, 32},
                           {11, 2, 50, 3},   {8, 1, 1, 1},   {70, 4, 100, 5}};
  for (auto& s : shapes) {
    const int64_t N = s[0], K = s[2];
    const int G = s[1], d = s[3];
    std::vector<float> z(N * G * d), cb(G * K * d);
    for (auto& v : z) v = nd(rng);
    for (auto& v : cb) v = nd(rng);
    for (bool normalize : {true, false}) {
      std::vector<int64_t> ref;
      brute(z, cb, N, G, K, d, normalize, ref);
      const auto got = run(z, cb, N, G, K, d, normalize);
      int bad = 0;
      for (int64_t o = 0; o < N * G; ++o) bad += got[o] != ref[o];
      EXPECT(bad == 0, "N=%ld G=%d K=%ld d=%d normalize=%d: %d index mismatches", long(N), G,
             long(K), d, int(normalize), bad);
    }
  }
  {  // ties -> lowest index, across lanes and blocks; NaN codes never win; NaN z reported
    const int G = 1, d = 4;
    const int64_t K = 100, N = 9;
    std::vector<float> cb(K * d), z(N * d);
    for (auto& v : cb) v = nd(rng);
    for (int64_t k : {90, 37, 21, 6, 5})
      for (int j = 0; j < d; ++j) cb[k * d + j] = float(j + 1);
    for (int64_t n = 0; n < N; ++n)
      for (int j = 0; j < d; ++j) z[n * d + j] = float(j + 1);
    for (bool normalize : {true, false}) {
      auto idx = run(z, cb, N, G, K, d, normalize);
      for (auto i : idx) EXPECT(i == 5, "tie: got %ld", long(i));
      auto cb2 = cb;
      cb2[5 * d] = NAN;
      idx = run(z, cb2, N, G, K, d, normalize);
      for (auto i : idx) EXPECT(i == 6, "NaN code: got %ld", long(i));
      auto z2 = z;
      z2[3 * d + 1] = NAN;
      int64_t missing = 0;
      idx = run(z2, cb, N, G, K, d, normalize, &missing);
      EXPECT(missing == 1 && idx[3] == kNoCode, "NaN z: missing %ld idx %ld", long(missing),
             long(idx[3]));
    }
  }
  {  // no overflow: indices unchanged when z and the codebook are scaled by 2^100 (or 2^-100: exact)
    const int G = 3, d = 5;
    const int64_t K = 37, N = 40;
    std::vector<float> z(N * G * d), cb(G * K * d);
    for (auto& v : z) v = nd(rng);
    for (auto& v : cb) v = nd(rng);
    for (bool normalize : {true, false}) {
      const auto base = run(z, cb, N, G, K, d, normalize);
      // (Cosine only upwards: vectors shorter than kNormEps are divided by kNormEps, as F.normalize does.)
      for (float f : {0x1p100f, 0x1p-100f}) {
        if (normalize && f < 1.f) continue;
        auto zs = z, cs = cb;
        for (auto& v : zs) v *= f;
        for (auto& v : cs) v *= f;
        int64_t missing = 0;
        const auto got = run(zs, cs, N, G, K, d, normalize, &missing);
        int bad = 0;
        for (int64_t o = 0; o < N * G; ++o) bad += got[o] != base[o];
        EXPECT(missing == 0 && bad == 0, "scale %g normalize=%d: %ld missing, %d changed", double(f),
               int(normalize), long(missing), bad);
      }
    }
    // Squared L2: Inf in z, or a token ~1e38 against codes ~1, gets no code (reported by the op).
    for (float bad_value : {INFINITY, -INFINITY, 3e38f}) {
      auto z2 = z;
      z2[(5 * G + 1) * d + 2] = bad_value;
      int64_t missing = 0;
      const auto idx = run(z2, cb, N, G, K, d, false, &missing);
      EXPECT(missing == 1 && idx[5 * G + 1] == kNoCode, "L2 z = %g: missing %ld", double(bad_value),
             long(missing));
    }
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
