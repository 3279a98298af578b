// Per-row attention math shared by the star_attention kernels, host and device (torch-free), written
// once and unit-tested on the host (csrc/tests/test_star_cuda_kernels.cpp) against float64:
//  - the online-softmax step (running max in the log2 domain, rescale factor, empty-row handling);
//  - the log-sum-exp of a finished row;
//  - the deterministic split-K combine of partial rows (fixed order, no atomics);
//  - the three-term bf16 split of fp32 values used to run fp32 attention on bf16 tensor cores;
//  - logit soft-capping of a score and its derivative.
// Rows that have seen no allowed key keep m = -inf and exponentiate against 0, so they stay exactly 0
// (never -inf - -inf = NaN); their lse is -inf. Finished, such a row is a PAD row (output 0, DESIGN.md
// §2) or a live row whose every allowed score was -inf (an attended key holding an infinity): its
// softmax is 0/0 and its output NaN, as the reference's (row_inv).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/half_bits.h"
#include "star_attention/star_mask.h"  // HTC_HD

namespace htc::tile {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

HTC_HD float neg_inf() { return -__builtin_huge_valf(); }

// Exponent reference for a running max: 0 while the row has no allowed key yet.
HTC_HD float softmax_ref(float m) { return m == neg_inf() ? 0.f : m; }

// One online-softmax step of a row: the tile's max of the (log2-scaled, masked: -inf) scores joins
// the running max. The caller multiplies its accumulator and partial sum by `alpha` and takes
// p = exp2(s - ref) for every allowed score (0 for masked ones, chosen by select, never multiplied).
struct RowStep {
  float m_new, ref, alpha;
};
HTC_HD RowStep row_step(float m_old, float tile_max) {
  RowStep r;
  r.m_new = fmaxf(m_old, tile_max);
  r.ref = softmax_ref(r.m_new);
  r.alpha = exp2f(m_old - r.ref);
  return r;
}

// Natural-log log-sum-exp of a finished row (max m in the log2 domain, sum l of exp2(s - m));
// -inf for a row that attended nothing, NaN for one whose l is NaN (a NaN or +inf score: +inf - +inf),
// as the reference's softmax, so that the backward's p = exp(s - lse) is NaN there too.
HTC_HD float row_lse(float m, float l) { return l == 0.f ? neg_inf() : (m + log2f(l)) * kLn2; }

// The factor a finished row's accumulator is multiplied by: 1 / l. A row with l = 0 attended nothing:
// 0 for a PAD row (the caller also zeroes its accumulator by select), NaN for a live row (every
// allowed score was -inf; zeros would pass an infinity in the inputs off as a valid output).
HTC_HD float row_inv(float l, bool live) {
  return !live ? 0.f : l > 0.f ? 1.f / l : __builtin_nanf("");
}

// Split-K combine. Partial k of a row covers a disjoint set of keys and reports its normalised output
// o_k and its natural-log lse_k (-inf when it saw no allowed key; o_k is then the row's empty output,
// 0 or NaN by row_inv). Returns the row's lse; the combined output is sum_k weight(lse_k, lse) * o_k,
// summed in k order (deterministic), skipping weights of 0. When no part saw an allowed key (lse -inf)
// every weight is 1 and the sum is the empty output again: 0 on PAD rows, NaN on live ones.
// A NaN part (row_lse) makes the row's lse NaN, whatever the other parts saw (fmaxf would drop it).
HTC_HD float combine_lse(const float* lse, int64_t stride, int n) {
  float mx = neg_inf();
  bool nan = false;
  for (int k = 0; k < n; ++k) {
    mx = fmaxf(mx, lse[k * stride]);
    nan |= lse[k * stride] != lse[k * stride];
  }
  if (nan) return __builtin_nanf("");
  if (mx == neg_inf()) return neg_inf();
  float sum = 0.f;
  for (int k = 0; k < n; ++k) sum += expf(lse[k * stride] - mx);
  return mx + logf(sum);
}
HTC_HD float combine_weight(float lse_k, float lse_total) {
  return lse_total == neg_inf() ? 1.f : expf(lse_k - lse_total);
}

// Logit soft-capping (Gemma2): a score s (already scaled) becomes c * tanh(s / c), and
// d capped / d s = 1 - tanh^2, which the backward multiplies into dS. Takes 1/c (finite for every
// normal float c; s / c may overflow to +-inf, where tanh is exactly +-1). Kernels working in the
// log2 domain multiply the capped score by log2(e) afterwards (c * log2(e) may overflow, the capped
// score cannot). tanhf, not an approximation: fp32 must hold 1e-4.
struct Capped {
  float s, ds;
};
HTC_HD Capped softcap(float s, float cap, float inv_cap) {
  const float t = tanhf(s * inv_cap);
  return {cap * t, 1.f - t * t};
}

// fp32 x = hi + mid + lo, each a bf16 (8 significant bits), |x - hi - mid - lo| <= 2^-24 |x| for
// normal x. Both subtractions are exact in fp32. Products of two split values keep the six terms of
// order >= 2^-16 (hi*hi, hi*mid, mid*hi, hi*lo, lo*hi, mid*mid): error ~2^-22 per product, against
// ~2^-9 for plain bf16 and ~2^-12 for TF32 — enough for the 1e-4 fp32 contract with margin.
struct Split3 {
  uint16_t hi, mid, lo;
};
HTC_HD Split3 split3(float x) {
  Split3 s;
  s.hi = bits::float_to_bf16(x);
  const float r1 = x - bits::bf16_to_float(s.hi);
  s.mid = bits::float_to_bf16(r1);
  s.lo = bits::float_to_bf16(r1 - bits::bf16_to_float(s.mid));
  return s;
}

}  // namespace htc::tile
