// CPU core of the MGVQ grouped nearest-code lookup (torch-free; used by mgvq_lookup_cpu.cpp and the
// C++ unit test). Design:
//   * The codebook is re-laid out once per call ("packed"): per group, blocks of kW = 16 codes, each
//     block `rows` vectors of 16 floats (cosine: the d unit-code coordinates; squared L2: -|c|^2 then
//     2c_j), so one 16-wide vector holds one coordinate of 16 codes. Padding lanes are NaN (a NaN score
//     never wins), so K needs no tail loop. Cost O(G*K*d), negligible next to the O(N*G*K*d) search.
//   * kT tokens of one group are register-blocked: each loaded code vector feeds kT FMAs; every lane
//     keeps a running (best score, best index) with a strict '>' (codes visited in increasing order per
//     lane, so the lane keeps its lowest index); lanes are reduced at the end with mgvq::better.
//   * OpenMP over (group, chunk of tokens) so a group's packed codebook stays in L1/L2.
//   * Scores are fmaf chains in coordinate order, bit-identical to mgvq::score_cos / score_l2.
// No N x K buffer exists anywhere.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/isa.h"
#include "mgvq_lookup/mgvq_math.h"

namespace htc {
namespace mgvq {
// The CPU variant's namespace (common/isa.h): each variant compiled into the extension keeps its own copy.
inline namespace HTC_ISA_NS {

constexpr int kW = 16;  // codes per vector
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  vf r;
  for (int l = 0; l < kW; ++l) r[l] = fmaf(a[l], b[l], c[l]);
  return r;
#endif
}

inline int packed_rows(int d, bool normalize) { return normalize ? d : d + 1; }
inline int64_t packed_blocks(int64_t K) { return (K + kW - 1) / kW; }
inline int64_t packed_size(int G, int64_t K, int d, bool normalize) {
  return int64_t(G) * packed_blocks(K) * packed_rows(d, normalize) * kW;
}

// Squared L2: the scale of group g's codes and tokens (mgvq_math.h), from its largest finite |c_j|.
// Rows with a NaN/Inf never win, so they do not set the scale. group_scale: [G].
inline void l2_group_scales(const float* cb, int G, int64_t K, int d, float* group_scale) {
  for (int g = 0; g < G; ++g) {
    float m = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float* c = cb + (int64_t(g) * K + k) * d;
      bool finite = true;
      for (int j = 0; j < d; ++j) finite &= std::isfinite(c[j]);
      if (finite) m = std::max(m, max_abs(c, d));
    }
    group_scale[g] = pow2_scale(m);
  }
}

// cb [G][K][d] (contiguous fp32) -> packed (packed_size floats) and rowmajor [G][K][d]: the codes the
// lookup returns (unit-normalised when `normalize`, else a copy). Squared L2 also needs group_scale
// [G] from l2_group_scales: the packed codes are scaled by it (-|s c|^2, then 2 s c_j).
inline void pack_codebook(const float* cb, int G, int64_t K, int d, bool normalize, float* packed,
                          float* rowmajor, const float* group_scale = nullptr) {
  const int rows = packed_rows(d, normalize);
  const int64_t nblk = packed_blocks(K);
  const float qnan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel for schedule(static) if (int64_t(G) * K * d > 65536)
  for (int64_t gb = 0; gb < int64_t(G) * nblk; ++gb) {
    const int64_t g = gb / nblk, b = gb % nblk;
    float* blk = packed + gb * rows * kW;
    for (int l = 0; l < kW; ++l) {
      const int64_t k = b * kW + l;
      if (k >= K) {
        for (int r = 0; r < rows; ++r) blk[r * kW + l] = qnan;
        continue;
      }
      const float* c = cb + (g * K + k) * d;
      float* out = rowmajor + (g * K + k) * d;
      if (normalize) {
        const UnitScale u = unit_scale(c, d);
        for (int j = 0; j < d; ++j) {
          out[j] = unit_elem(c[j], u);
          blk[j * kW + l] = out[j];
        }
      } else {
        const float sc = group_scale[g];
        float ss = 0.f;
        for (int j = 0; j < d; ++j) ss = fmaf(c[j] * sc, c[j] * sc, ss);
        blk[l] = -ss;
        for (int j = 0; j < d; ++j) {
          out[j] = c[j];
          blk[(j + 1) * kW + l] = 2.f * (c[j] * sc);
        }
      }
    }
  }
}

// T prepared tokens (zt [T][d]) against one group's packed codebook -> best index per token.
// D = d at compile time (0: runtime d). Bias: squared-L2 layout (row 0 = -|c|^2).
template <int T, int D, bool Bias>
inline void search_block(const float* __restrict zt, const float* __restrict pk, int64_t nblk,
                         int d_rt, int32_t* __restrict out_idx) {
  const int d = D > 0 ? D : d_rt;
  const int rows = Bias ? d + 1 : d;
  vf best[T];
  vi bidx[T];
  const vf ninf = vf{} - std::numeric_limits<float>::infinity();
  for (int t = 0; t < T; ++t) {
    best[t] = ninf;
    bidx[t] = vi{} + kNoCode;
  }
  vi cur;
  for (int l = 0; l < kW; ++l) cur[l] = l;
  for (int64_t b = 0; b < nblk; ++b) {
    const float* p = pk + b * rows * kW;
    vf s[T];
    if (Bias) {
      vf bias;
      std::memcpy(&bias, p, sizeof(vf));
      for (int t = 0; t < T; ++t) s[t] = bias;
      p += kW;
    } else {
      for (int t = 0; t < T; ++t) s[t] = vf{};
    }
#pragma GCC unroll 32
    for (int j = 0; j < d; ++j) {
      vf c;
      std::memcpy(&c, p + j * kW, sizeof(vf));
      for (int t = 0; t < T; ++t) s[t] = vfma(vf{} + zt[t * d + j], c, s[t]);
    }
    for (int t = 0; t < T; ++t) {
      const vi m = s[t] > best[t];
      best[t] = m ? s[t] : best[t];
      bidx[t] = m ? cur : bidx[t];
    }
    cur += kW;
  }
  for (int t = 0; t < T; ++t) {
    float bv = -std::numeric_limits<float>::infinity();
    int32_t bi = kNoCode;
    for (int l = 0; l < kW; ++l)
      if (bidx[t][l] != kNoCode && better(best[t][l], bidx[t][l], bv, bi)) {
        bv = best[t][l];
        bi = bidx[t][l];
      }
    out_idx[t] = bi;
  }
}

template <int D, bool Bias>
inline void search_tokens(const float* zt, int64_t n_tok, const float* pk, int64_t nblk, int d,
                          int32_t* out_idx) {
  constexpr int T = 8;
  int64_t t = 0;
  for (; t + T <= n_tok; t += T) search_block<T, D, Bias>(zt + t * d, pk, nblk, d, out_idx + t);
  for (; t < n_tok; ++t) search_block<1, D, Bias>(zt + t * d, pk, nblk, d, out_idx + t);
}

template <bool Bias>
inline void search_dispatch(const float* zt, int64_t n_tok, const float* pk, int64_t nblk, int d,
                            int32_t* out_idx) {
  switch (d) {
    case 4: return search_tokens<4, Bias>(zt, n_tok, pk, nblk, d, out_idx);
    case 8: return search_tokens<8, Bias>(zt, n_tok, pk, nblk, d, out_idx);
    case 16: return search_tokens<16, Bias>(zt, n_tok, pk, nblk, d, out_idx);
    case 32: return search_tokens<32, Bias>(zt, n_tok, pk, nblk, d, out_idx);
    default: return search_tokens<0, Bias>(zt, n_tok, pk, nblk, d, out_idx);
  }
}

// z [N][G][d] fp32 contiguous; packed/rowmajor (and, squared L2, group_scale) from pack_codebook.
// Writes idx [N][G] (kNoCode where no code wins) and, if codes != nullptr, codes [N][G][d] (NaN where
// no code wins). Returns the number of token-groups with no winning code.
inline int64_t lookup(const float* z, int64_t N, int G, int64_t K, int d, bool normalize,
                      const float* packed, const float* rowmajor, int64_t* idx, float* codes,
                      const float* group_scale = nullptr) {
  constexpr int64_t kChunk = 64;  // tokens per work item
  const int rows = packed_rows(d, normalize);
  const int64_t nblk = packed_blocks(K);
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  int64_t missing = 0;
  // Threads only for enough work (~>1 ms on one core): on small calls (one image) a thread team costs
  // more than it saves, and on a shared, loaded machine waiting for a descheduled second thread costs
  // milliseconds.
  [[maybe_unused]] const bool threaded = double(N) * G * K * d > 6.0e7;
  const float limit = l2_token_limit(d);
#pragma omp parallel reduction(+ : missing) if (threaded)
  {
    std::vector<float> zt(kChunk * d);
    int32_t bi[kChunk];
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_chunks * G; ++item) {
      // Group-major items: neighbouring items (and so the two threads, most of the time) work on
      // different token ranges of one group, so they neither share output cache lines (an idx row is
      // G int64 = one line for G = 8) nor evict each other's packed codebook.
      const int g = int(item / n_chunks);
      const int64_t n0 = (item % n_chunks) * kChunk, n1 = std::min(N, n0 + kChunk), nt = n1 - n0;
      for (int64_t t = 0; t < nt; ++t) {  // prepare: unit z (cosine) or z scaled as its group (L2)
        const float* src = z + ((n0 + t) * G + g) * d;
        float* dst = zt.data() + t * d;
        if (normalize) {
          const UnitScale u = unit_scale(src, d);
          for (int j = 0; j < d; ++j) dst[j] = unit_elem(src[j], u);
        } else {
          bool ok = true;  // finite and within the overflow-free range (NaN compares false)
          for (int j = 0; j < d; ++j) {
            dst[j] = src[j] * group_scale[g];
            ok &= std::fabs(dst[j]) <= limit;
          }
          if (!ok)  // no code wins: reported as an error by the caller
            for (int j = 0; j < d; ++j) dst[j] = std::numeric_limits<float>::quiet_NaN();
        }
      }
      const float* pk = packed + int64_t(g) * nblk * rows * kW;
      if (normalize)
        search_dispatch<false>(zt.data(), nt, pk, nblk, d, bi);
      else
        search_dispatch<true>(zt.data(), nt, pk, nblk, d, bi);
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t o = (n0 + t) * G + g;
        idx[o] = bi[t];
        if (bi[t] == kNoCode) ++missing;
        if (codes) {
          float* dst = codes + o * d;
          if (bi[t] == kNoCode) {
            for (int j = 0; j < d; ++j) dst[j] = std::numeric_limits<float>::quiet_NaN();
          } else {
            std::memcpy(dst, rowmajor + (int64_t(g) * K + bi[t]) * d, sizeof(float) * d);
          }
        }
      }
    }
  }
  return missing;
}

// Straight-through backward. grad_codes [N][G][d]; idx [N][G] (all valid). grad_z [N][G][d] (nullable):
// grad through z's normalisation when `normalize`, else a copy. grad_cb [G][K][d] (nullable): the
// index-add of grad_codes onto the selected codes, through each code's normalisation when `normalize`.
inline void lookup_backward(const float* grad_codes, const float* z, const float* cb,
                            const int64_t* idx, int64_t N, int G, int64_t K, int d, bool normalize,
                            float* grad_z, float* grad_cb) {
  if (grad_z) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < N * G; ++o) {
      if (normalize)
        normalize_backward(z + o * d, grad_codes + o * d, d, grad_z + o * d);
      else
        std::memcpy(grad_z + o * d, grad_codes + o * d, sizeof(float) * d);
    }
  }
  if (grad_cb) {
    std::memset(grad_cb, 0, sizeof(float) * size_t(G) * size_t(K) * size_t(d));
#pragma omp parallel
    {
      std::vector<float> tmp(d);
#pragma omp for schedule(dynamic, 1)
      for (int g = 0; g < G; ++g) {
        float* acc = grad_cb + int64_t(g) * K * d;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t k = idx[n * G + g];
          const float* src = grad_codes + (n * G + g) * d;
          for (int j = 0; j < d; ++j) acc[k * d + j] += src[j];
        }
        if (normalize) {
          for (int64_t k = 0; k < K; ++k) {
            normalize_backward(cb + (int64_t(g) * K + k) * d, acc + k * d, d, tmp.data());
            std::memcpy(acc + k * d, tmp.data(), sizeof(float) * d);
          }
        }
      }
    }
  }
}

}  // namespace HTC_ISA_NS
}  // namespace mgvq
}  // namespace htc
