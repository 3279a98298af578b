// Torch-free CUDA kernels of the MGVQ grouped nearest-code lookup; included by the torch op
// (mgvq_lookup_cuda.cu) and by the standalone nvcc build (csrc/tests/cuda_standalone.cu) that prints
// the ptxas register/spill report. The per-code math (normalisation, score, tie-break) is
// mgvq_math.h, shared with the CPU kernel, so CPU and CUDA scores are the same fmaf chains.
#pragma once
#include <cstdint>

#include "mgvq_lookup/mgvq_math.h"

namespace htc {
namespace mgvq {

// Prepared codebook rows [G*K][R]: cosine R = d (unit code); squared L2 R = d + 1 (-|s c|^2, then
// 2 s c) with s = pow2_scale(gmax[group]) (gmax [G]: the group's largest finite |c_j|; squared L2 only).
__global__ void mgvq_prepare_kernel(const float* __restrict__ cb, int64_t GK, int64_t K, int d, bool normalize,
                                    const float* __restrict__ gmax, float* __restrict__ prep) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= GK) return;
  const float* c = cb + r * d;
  if (normalize) {
    const UnitScale u = unit_scale(c, d);
    for (int j = 0; j < d; ++j) prep[r * d + j] = unit_elem(c[j], u);
  } else {
    const float s = pow2_scale(gmax[r / K]);
    float ss = 0.f;
    for (int j = 0; j < d; ++j) ss = fmaf(c[j] * s, c[j] * s, ss);
    float* o = prep + r * (d + 1);
    o[0] = -ss;
    for (int j = 0; j < d; ++j) o[j + 1] = 2.f * (c[j] * s);
  }
}

constexpr int kLookupThreads = 128;  // tokens per block (one thread per token)
constexpr int kTileK = 256;          // codes per shared-memory tile

// Grid (ceil(N / kLookupThreads), G). Each block streams its group's prepared codebook through shared
// memory in kTileK-code tiles; each thread keeps its token (registers when D > 0, else shared memory)
// and a running (best score, lowest index). Writes idx [N][G] (kNoCode when nothing wins) and codes
// [N][G][d] from code_src rows (stride code_stride; NaN when nothing wins). Squared L2: tokens are
// scaled like their group's codes (gmax, as mgvq_prepare_kernel), and one beyond l2_token_limit gets
// kNoCode (its score would overflow).
// Dynamic shared memory: kTileK * R floats (+ kLookupThreads * d floats when D == 0).
template <int D, bool Norm>
__global__ void __launch_bounds__(kLookupThreads)
    mgvq_lookup_kernel(const float* __restrict__ z, const float* __restrict__ prep,
                       const float* __restrict__ code_src, int code_stride, int64_t N, int G,
                       int64_t K, int d_rt, const float* __restrict__ gmax, int64_t* __restrict__ idx,
                       float* __restrict__ codes) {
  extern __shared__ float smem[];
  const int d = D > 0 ? D : d_rt;
  const int R = Norm ? d : d + 1;
  float* tile = smem;
  const int g = blockIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kLookupThreads + threadIdx.x;
  const bool active = n < N;
  const float* zp = z + (n * G + g) * d;
  // Token: unit z (cosine) or z scaled like its group's codes (L2), in registers (D > 0) or this
  // thread's shared slot. An L2 token that is not finite or out of range becomes NaN: no code wins.
  float zr[D > 0 ? D : 1];
  float* zs = smem + kTileK * R + threadIdx.x * d;
  // Cosine: unit_elem with u; squared L2: z_j * u.s (u.s the group's scale, NaN for a bad token).
  UnitScale u{1.f, 1.f, false};
  if (active) {
    if (Norm) {
      u = unit_scale(zp, d);
    } else {
      u.s = pow2_scale(gmax[g]);
      const float limit = l2_token_limit(d);
      for (int j = 0; j < d; ++j)
        if (!(fabsf(zp[j] * u.s) <= limit)) u.s = __int_as_float(0x7fc00000);
    }
  }
  auto prep_z = [&](int j) { return !active ? 0.f : Norm ? unit_elem(zp[j], u) : zp[j] * u.s; };
  if (D > 0) {
#pragma unroll
    for (int j = 0; j < (D > 0 ? D : 1); ++j) zr[j] = prep_z(j);
  } else {
    for (int j = 0; j < d; ++j) zs[j] = prep_z(j);
  }
  const float* zt = D > 0 ? zr : zs;
  float best = -__int_as_float(0x7f800000);
  int32_t best_i = kNoCode;
  const float* pg = prep + static_cast<int64_t>(g) * K * R;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    const int nk = static_cast<int>(K - k0 < kTileK ? K - k0 : kTileK);
    __syncthreads();
    for (int e = threadIdx.x; e < nk * R; e += kLookupThreads) tile[e] = pg[k0 * R + e];
    __syncthreads();
    if (active) {
      for (int kk = 0; kk < nk; ++kk) {
        const float* c = tile + kk * R;
        const float s = Norm ? score_cos(zt, c, d) : score_l2(zt, c + 1, c[0], d);
        const int32_t ki = static_cast<int32_t>(k0 + kk);
        if (better(s, ki, best, best_i)) {
          best = s;
          best_i = ki;
        }
      }
    }
  }
  if (!active) return;
  idx[n * G + g] = best_i;
  float* out = codes + (n * G + g) * d;
  const float* src = code_src + (static_cast<int64_t>(g) * K + (best_i < 0 ? 0 : best_i)) * code_stride;
  for (int j = 0; j < d; ++j) out[j] = best_i < 0 ? __int_as_float(0x7fc00000) : src[j];
}

// Straight-through backward, part 1: grad_z (one thread per token-group) and the index-add of
// grad_codes into acc [G][K][d] (float atomics).
__global__ void mgvq_backward_tokens_kernel(const float* __restrict__ grad_codes,
                                            const float* __restrict__ z,
                                            const int64_t* __restrict__ idx, int64_t NG, int G,
                                            int64_t K, int d, bool normalize,
                                            float* __restrict__ grad_z, float* __restrict__ acc) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= NG) return;
  const float* gc = grad_codes + o * d;
  if (normalize) {
    normalize_backward(z + o * d, gc, d, grad_z + o * d);
  } else {
    for (int j = 0; j < d; ++j) grad_z[o * d + j] = gc[j];
  }
  const int64_t g = o % G;
  float* a = acc + (g * K + idx[o]) * d;
  for (int j = 0; j < d; ++j) atomicAdd(a + j, gc[j]);
}

// Part 2 (normalize only): grad_cb[k] = J(c_k)^T acc[k], one thread per code (in place is unsafe:
// reads acc, writes grad_cb).
__global__ void mgvq_backward_codes_kernel(const float* __restrict__ cb, const float* __restrict__ acc,
                                           int64_t GK, int d, float* __restrict__ grad_cb) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= GK) return;
  normalize_backward(cb + r * d, acc + r * d, d, grad_cb + r * d);
}

}  // namespace mgvq
}  // namespace htc
