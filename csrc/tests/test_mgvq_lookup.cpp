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
  std::vector<float> zt(d), c(d + 1);
  for (int64_t n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g) {
      const float* zp = &z[(n * G + g) * d];
      float ss = 0.f;
      for (int j = 0; j < d; ++j) ss = fmaf(zp[j], zp[j], ss);
      const float inv = normalize ? inv_norm(ss) : 1.f;
      for (int j = 0; j < d; ++j) zt[j] = zp[j] * inv;
      float bv = -INFINITY;
      int32_t bi = kNoCode;
      for (int64_t k = 0; k < K; ++k) {
        const float* cp = &cb[(g * K + k) * d];
        float cs = 0.f;
        for (int j = 0; j < d; ++j) cs = fmaf(cp[j], cp[j], cs);
        float s;
        if (normalize) {
          const float ci = inv_norm(cs);
          for (int j = 0; j < d; ++j) c[j] = cp[j] * ci;
          s = score_cos(zt.data(), c.data(), d);
        } else {
          for (int j = 0; j < d; ++j) c[j] = 2.f * cp[j];
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
  std::vector<float> packed(packed_size(G, K, d, normalize)), rowmajor(G * K * d);
  pack_codebook(cb.data(), G, K, d, normalize, packed.data(), rowmajor.data());
  std::vector<int64_t> idx(N * G);
  std::vector<float> codes(N * G * d);
  const int64_t m = lookup(z.data(), N, G, K, d, normalize, packed.data(), rowmajor.data(),
                           idx.data(), codes.data());
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
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
