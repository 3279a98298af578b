// Argument checks shared by the CPU and CUDA entry points. They raise c10::Error (RuntimeError in
// Python) with a message naming the problem; the Python wrappers validate first and raise ValueError,
// these are the last line for direct torch.ops.htc callers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace htc {

inline void check_plan_args(const at::Tensor& kinds, const at::Tensor& groups, int64_t q_len,
                            int64_t block_q, int64_t block_k, int64_t topology) {
  TORCH_CHECK(kinds.dim() == 2, "star_plan: kinds must be [B, S], got ", kinds.sizes());
  TORCH_CHECK(kinds.scalar_type() == at::kChar, "star_plan: kinds must be int8, got ",
              kinds.scalar_type());
  TORCH_CHECK(groups.scalar_type() == at::kInt, "star_plan: groups must be int32, got ",
              groups.scalar_type());
  TORCH_CHECK(groups.sizes() == kinds.sizes(), "star_plan: groups ", groups.sizes(),
              " must match kinds ", kinds.sizes());
  TORCH_CHECK(groups.device() == kinds.device(), "star_plan: kinds and groups on different devices");
  TORCH_CHECK(q_len >= 1 && q_len <= kinds.size(1), "star_plan: q_len ", q_len,
              " must be in [1, S=", kinds.size(1), "]");
  TORCH_CHECK(block_q >= 1 && block_k >= 1, "star_plan: block sizes must be positive");
  TORCH_CHECK(topology == 0 || topology == 1, "star_plan: topology must be 0 (star) or 1 (group)");
}

}  // namespace htc
