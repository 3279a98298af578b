// MGVQ grouped nearest-code lookup: the per-code math shared by every backend (DESIGN.md §3).
// Torch-free and host/device: the CPU kernel, the CUDA kernel and the C++ unit tests include this one
// header, so normalisation, the score and the tie-break rule are written exactly once.
//
// Score convention: larger is better.
//   cosine (normalize=true):  score(z, c) = <z/|z|, c/|c|>                (|.| clamped to >= kNormEps)
//   squared L2 (normalize=false): score(z, c) = <z, 2c> - |c|^2 = |z|^2 - |z - c|^2
// so the arg-max of the score is the arg-min of the distance. Ties break to the lowest code index.
// A NaN or -inf score never wins; a token-group for which no code wins (non-finite z, or a codebook of
// NaNs) gets index kNoCode.
#pragma once
#include <cmath>
#include <cstdint>

#ifndef HTC_HD
#if defined(__CUDACC__)
#define HTC_HD __host__ __device__ __forceinline__
#else
#define HTC_HD inline
#endif
#endif

namespace htc {
namespace mgvq {

// Same clamp as torch.nn.functional.normalize (MGVQ's l2norm): v / max(|v|, eps).
constexpr float kNormEps = 1e-12f;
constexpr int32_t kNoCode = -1;

// 1 / max(sqrt(sumsq), eps), and whether the clamp is active (its gradient through |v| is then 0).
HTC_HD float inv_norm(float sumsq, bool* clamped = nullptr) {
  const float n = sqrtf(sumsq);
  const bool c = !(n > kNormEps);
  if (clamped) *clamped = c;
  return 1.0f / (c ? kNormEps : n);
}

// Strictly better (value, index) pair: higher score, or equal score with a lower index. Start from
// (-inf, kNoCode): NaN and -inf scores never win, so "no code" survives only if no score is > -inf.
HTC_HD bool better(float v, int32_t i, float best_v, int32_t best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

// Scalar score of one code against one (already prepared) token: cosine takes unit z and unit c,
// squared L2 takes z, c and |c|^2. The vectorised kernels compute the same sums in the same order.
HTC_HD float score_cos(const float* zn, const float* cn, int d) {
  float s = 0.f;
  for (int j = 0; j < d; ++j) s = fmaf(zn[j], cn[j], s);
  return s;
}
HTC_HD float score_l2(const float* z, const float* c2, float neg_c_sq, int d) {
  // c2 = 2c; score = sum_j z_j (2 c_j) - |c|^2, accumulated starting from -|c|^2.
  float s = neg_c_sq;
  for (int j = 0; j < d; ++j) s = fmaf(z[j], c2[j], s);
  return s;
}

// Backward of y = v * inv_norm(|v|) for one vector: dv = inv * (dy - y * <y, dy>) (clamped: inv*dy).
HTC_HD void normalize_backward(const float* v, const float* dy, int d, float* dv) {
  float ss = 0.f;
  for (int j = 0; j < d; ++j) ss = fmaf(v[j], v[j], ss);
  bool clamped = false;
  const float inv = inv_norm(ss, &clamped);
  float ydy = 0.f;
  if (!clamped)
    for (int j = 0; j < d; ++j) ydy = fmaf(v[j] * inv, dy[j], ydy);
  for (int j = 0; j < d; ++j) dv[j] = inv * (dy[j] - (clamped ? 0.f : v[j] * inv * ydy));
}

}  // namespace mgvq
}  // namespace htc
