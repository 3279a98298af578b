// CPU implementation of htc::star_plan: the per-layout block plan (DESIGN.md §4).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "star_attention/star_mask.h"
#include "star_attention/star_checks.h"

namespace htc {
namespace {

at::Tensor star_plan_cpu(const at::Tensor& kinds, const at::Tensor& groups, int64_t q_len,
                         int64_t block_q, int64_t block_k, int64_t topology,
                         const std::optional<at::Tensor>& panel) {
  check_plan_args(kinds, groups, q_len, block_q, block_k, topology);
  check_panel_args("star_plan", panel, kinds, block_k);
  check_kinds_values("star_plan", kinds);
  if (panel) check_panel_values(*panel, kinds);
  const auto kinds_c = kinds.contiguous();
  const auto groups_c = groups.contiguous();
  const int64_t batch = kinds.size(0), seq_len = kinds.size(1);
  const auto panel_c = panel ? panel->contiguous() : at::Tensor();
  const int64_t panel_len = panel ? panel->size(1) : 0;
  const int32_t* pp = panel ? panel_c.data_ptr<int32_t>() : nullptr;
  auto key_map = [&](int64_t b) { return KeyMap{pp ? pp + b * panel_len : nullptr, panel_len, seq_len}; };
  const int64_t n_qt = ceil_div(q_len, block_q), n_kt = key_tiles(seq_len, block_k, key_map(0));
  auto plan = at::empty({batch, n_qt, n_kt}, kinds.options().dtype(at::kByte));
  const int8_t* kp = kinds_c.data_ptr<int8_t>();
  const int32_t* gp = groups_c.data_ptr<int32_t>();
  uint8_t* out = plan.data_ptr<uint8_t>();
  // Key-tile summaries once per sample, then one task per (sample, query tile); small plans stay on
  // the calling thread.
  std::vector<RangeSummary> keys(batch * n_kt);
  for (int64_t b = 0; b < batch; ++b)
    summarize_key_tiles(kp + b * seq_len, gp + b * seq_len, seq_len, block_k, keys.data() + b * n_kt, key_map(b));
  const int64_t grain = batch * n_qt * n_kt < 4096 ? std::max<int64_t>(batch * n_qt, 1) : 1;
  at::parallel_for(0, batch * n_qt, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_qt;
      plan_row(kp + b * seq_len, gp + b * seq_len, seq_len, q_len, block_q, block_k, static_cast<int>(topology),
               keys.data() + b * n_kt, t % n_qt, out + t * n_kt, key_map(b));
    }
  });
  return plan;
}

}  // namespace

TORCH_LIBRARY_IMPL(htc, CPU, m) { m.impl("star_plan", &star_plan_cpu); }

}  // namespace htc
