// MGVQ grouped nearest-code lookup: the per-code math shared by every backend (DESIGN.md §3).
// Torch-free and host/device: the CPU kernel, the CUDA kernel and the C++ unit tests include this one
// header, so normalisation, the score and the tie-break rule are written exactly once.
//
// Score convention: larger is better.
//   cosine (normalize=true):  score(z, c) = <z/|z|, c/|c|>                (|.| clamped to >= kNormEps)
//   squared L2 (normalize=false): score(z, c) = <z, 2c> - |c|^2 = |z|^2 - |z - c|^2
// so the arg-max of the score is the arg-min of the distance. Ties break to the lowest code index.
// A NaN or -inf score never wins; a token-group for which no code wins gets index kNoCode (non-finite
// z, a group whose codes are all NaN/Inf, or, squared L2 only, a token too large for float32 against
// its group's codes: see l2_token_limit). Callers report it as an error.
//
// No overflow for finite inputs: squares are formed of values scaled by a power of two s (pow2_scale)
// with max|v| * s in [1, 2). Cosine is scale-invariant, so each vector is scaled by its own s; squared
// L2 is invariant under a common scale, so a group's codes and every token against them are scaled by
// the group's s. Power-of-two scaling is exact: where the unscaled formula neither overflows nor
// underflows, results are bit-identical to it.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

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

HTC_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

HTC_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// The power of two s with max_abs * s in [1, 2) (max_abs >= 0), its exponent clamped to [-126, 126]
// so s is a normal float (denormal max_abs: s = 2^126; Inf/NaN: s = 2^-126, the result stays
// non-finite); 1 for max_abs = 0.
HTC_HD float pow2_scale(float max_abs) {
  if (max_abs == 0.f) return 1.f;
  int e = static_cast<int>((float_bits(max_abs) >> 23) & 0xffu);  // biased exponent
  e = e < 1 ? 1 : (e > 253 ? 253 : e);
  return bits_float(static_cast<uint32_t>(254 - e) << 23);  // 2^(127 - e)
}

// max_j |v_j| (NaN propagates: the scale of a NaN vector is irrelevant, its scores are NaN anyway).
HTC_HD float max_abs(const float* v, int d) {
  float m = 0.f;
  for (int j = 0; j < d; ++j) m = fmaxf(m, fabsf(v[j]));  // = the larger; a NaN entry is skipped
  return m;
}

// 1 / max(|v|, eps) for any finite v without overflow, and whether the clamp is active (its gradient
// through |v| is then 0). |v| is formed as sqrt(sum (s v_j)^2) / s (s = pow2_scale(max|v_j|)), so the
// result is bit-identical to 1 / max(sqrt(sum v_j^2), eps) wherever that does not overflow/underflow.
// Non-finite v: 0 (Inf) or 1/eps (NaN); either way v * inv_norm is not finite.
HTC_HD float inv_norm(const float* v, int d, bool* clamped = nullptr) {
  const float s = pow2_scale(max_abs(v, d));
  float ss = 0.f;
  for (int j = 0; j < d; ++j) ss = fmaf(v[j] * s, v[j] * s, ss);
  const float n_s = sqrtf(ss);  // = s |v|, exactly
  const bool c = !(n_s > kNormEps * s);
  if (clamped) *clamped = c;
  return c ? 1.0f / kNormEps : s * (1.0f / n_s);
}

// v / max(|v|, eps) for one vector, element by element, as the reference (htc_kernels/mgvq_lookup.py
// _unit) and F.normalize compute it: (v_j s) / (s |v|), one rounding per element (v_j s is exact), so
// a vector along an axis comes out exactly +-1 (d = 1: every code is +-1 and the lowest-index tie rule
// decides). v_j * inv_norm(v) would round twice. The CPU and CUDA kernels share this function, so
// their bits agree; torch's norm (the reference) and Triton's sum order the squares differently and
// can differ in |v|'s last bit (measured: 1 ulp in some codes at d = 4 and 8, none at d = 3 and 5).
struct UnitScale {
  float s, n_s;  // n_s = s |v|
  bool clamped;  // |v| <= eps: v / eps
};
HTC_HD UnitScale unit_scale(const float* v, int d) {
  UnitScale u;
  u.s = pow2_scale(max_abs(v, d));
  float ss = 0.f;
  for (int j = 0; j < d; ++j) ss = fmaf(v[j] * u.s, v[j] * u.s, ss);
  u.n_s = sqrtf(ss);
  u.clamped = !(u.n_s > kNormEps * u.s);
  return u;
}
HTC_HD float unit_elem(float v_j, const UnitScale& u) { return u.clamped ? v_j / kNormEps : (v_j * u.s) / u.n_s; }

// Squared L2: tokens scaled by their group's s (pow2_scale of the group's largest finite |c_j|) must
// stay within this bound, so that |<z, 2c>| + |c|^2 <= 4 d limit + 4 d < FLT_MAX (scaled codes < 2).
HTC_HD float l2_token_limit(int d) { return FLT_MAX / (8.0f * (static_cast<float>(d) + 1.0f)); }

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

// Backward of y = v * inv_norm(v) for one vector: dv = inv * (dy - y * <y, dy>) (clamped: inv*dy).
// A vector holding NaN/Inf (a codebook row, never selected: dy = 0) gets dv = 0, not 0 * Inf.
HTC_HD void normalize_backward(const float* v, const float* dy, int d, float* dv) {
  bool finite = true;
  for (int j = 0; j < d; ++j) finite &= fabsf(v[j]) <= FLT_MAX;
  if (!finite) {
    for (int j = 0; j < d; ++j) dv[j] = 0.f;
    return;
  }
  bool clamped = false;
  const float inv = inv_norm(v, d, &clamped);
  float ydy = 0.f;
  if (!clamped)
    for (int j = 0; j < d; ++j) ydy = fmaf(v[j] * inv, dy[j], ydy);
  for (int j = 0; j < d; ++j) dv[j] = inv * (dy[j] - (clamped ? 0.f : v[j] * inv * ydy));
}

}  // namespace mgvq
}  // namespace htc
