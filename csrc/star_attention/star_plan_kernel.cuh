// Torch-free CUDA kernel for the block plan; included by the torch op (star_plan_cuda.cu) and by the
// standalone nvcc build (csrc/tests/cuda_standalone.cu) that prints the ptxas resource report.
#pragma once
#include <cstdint>

#include "star_attention/star_mask.h"

namespace htc {

// panel [batch, panel_len] or null (panel_len 0): the key panel (star_mask.h KeyMap).
__global__ void star_plan_kernel(const int8_t* __restrict__ kinds, const int32_t* __restrict__ groups,
                                 const int32_t* __restrict__ panel, int64_t panel_len, int64_t batch,
                                 int64_t seq_len, int64_t q_len, int64_t block_q, int64_t block_k,
                                 int topology, uint8_t* __restrict__ plan) {
  const int64_t n_qt = (q_len + block_q - 1) / block_q;
  const int64_t n_kt = key_tiles(seq_len, block_k, KeyMap{nullptr, panel_len, seq_len});
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * n_qt * n_kt) return;
  const int64_t b = idx / (n_qt * n_kt), qt = (idx / n_kt) % n_qt, kt = idx % n_kt;
  const int64_t r0 = qt * block_q, r1 = min(r0 + block_q, q_len);
  const int64_t k0 = kt * block_k, k1 = min(k0 + block_k, panel_len + seq_len);
  const KeyMap map{panel ? panel + b * panel_len : nullptr, panel_len, seq_len};
  plan[idx] = classify_tile(kinds + b * seq_len, groups + b * seq_len, seq_len - q_len, r0, r1, k0,
                            k1, topology, map);
}

}  // namespace htc
