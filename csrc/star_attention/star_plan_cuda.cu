// CUDA implementation of htc::star_plan: one thread per (sample, query tile, key tile), running the
// same classify_tile as the CPU path (star_mask.h), so the rule is shared and covered by CPU tests.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "star_attention/star_checks.h"
#include "star_attention/star_plan_kernel.cuh"

namespace htc {
namespace {

at::Tensor star_plan_cuda(const at::Tensor& kinds, const at::Tensor& groups, int64_t q_len,
                          int64_t block_q, int64_t block_k, int64_t topology,
                          const std::optional<at::Tensor>& panel) {
  check_plan_args(kinds, groups, q_len, block_q, block_k, topology);
  check_panel_args("star_plan", panel, kinds, block_k);
  const c10::cuda::CUDAGuard guard(kinds.device());
  const auto kinds_c = kinds.contiguous();
  const auto groups_c = groups.contiguous();
  const int64_t batch = kinds.size(0), seq_len = kinds.size(1);
  // The panel's values are not read here (a device sync): entries outside [0, Skv) count as empty slots.
  const auto panel_c = panel ? panel->contiguous() : at::Tensor();
  const int64_t panel_len = panel ? panel->size(1) : 0;
  const int64_t n_qt = (q_len + block_q - 1) / block_q;
  const int64_t n_kt = key_tiles(seq_len, block_k, KeyMap{nullptr, panel_len, seq_len});
  auto plan = at::empty({batch, n_qt, n_kt}, kinds.options().dtype(at::kByte));
  const int64_t total = batch * n_qt * n_kt;
  if (total == 0) return plan;
  constexpr int kThreads = 128;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  star_plan_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      kinds_c.data_ptr<int8_t>(), groups_c.data_ptr<int32_t>(), panel ? panel_c.data_ptr<int32_t>() : nullptr,
      panel_len, batch, seq_len, q_len, block_q, block_k, static_cast<int>(topology), plan.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

}  // namespace

TORCH_LIBRARY_IMPL(htc, CUDA, m) { m.impl("star_plan", &star_plan_cuda); }

}  // namespace htc
