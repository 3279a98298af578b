// CPU implementation of htc::star_plan: the per-layout block plan (DESIGN.md §4).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "star_attention/star_mask.h"
#include "star_attention/star_checks.h"

namespace htc {
namespace {

at::Tensor star_plan_cpu(const at::Tensor& kinds, const at::Tensor& groups, int64_t q_len,
                         int64_t block_q, int64_t block_k, int64_t topology) {
  check_plan_args(kinds, groups, q_len, block_q, block_k, topology);
  const auto kinds_c = kinds.contiguous();
  const auto groups_c = groups.contiguous();
  const int64_t batch = kinds.size(0), seq_len = kinds.size(1);
  const int64_t n_qt = (q_len + block_q - 1) / block_q, n_kt = (seq_len + block_k - 1) / block_k;
  auto plan = at::empty({batch, n_qt, n_kt}, kinds.options().dtype(at::kByte));
  const int8_t* kp = kinds_c.data_ptr<int8_t>();
  const int32_t* gp = groups_c.data_ptr<int32_t>();
  uint8_t* out = plan.data_ptr<uint8_t>();
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      build_star_plan(kp + b * seq_len, gp + b * seq_len, seq_len, q_len, block_q, block_k,
                      static_cast<int>(topology), out + b * n_qt * n_kt);
    }
  });
  return plan;
}

}  // namespace

TORCH_LIBRARY_IMPL(htc, CPU, m) { m.impl("star_plan", &star_plan_cpu); }

}  // namespace htc
