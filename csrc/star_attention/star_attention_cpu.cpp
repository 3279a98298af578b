// CPU star attention: the op entry points (argument checks, output allocation), compiled for the
// baseline; the kernels (star_attention_cpu_kernels.h, instantiated by the *_isa.cpp units once per CPU
// variant) are those of the variant chosen at load (common/cpu_dispatch.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "common/cpu_dispatch.h"
#include "star_attention/star_checks.h"

namespace htc {
namespace {

// HTC_POISON_OUTPUTS=1 (tests): fill outputs with NaN before the kernel runs, so any element the
// kernel fails to write shows up instead of passing with whatever the allocator left there.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* env = std::getenv("HTC_POISON_OUTPUTS");
    return env != nullptr && env[0] == '1';
  }();
  return poison ? at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options)
                : at::empty(sizes, options);
}

// The CPU kernel reads key tiles as contiguous position ranges: plans in the plain key order only.
void check_no_panel(const char* op, const std::optional<at::Tensor>& panel) {
  TORCH_CHECK(!panel, op, " (CPU): the CPU kernel takes plans in the plain key order; pass panel=None and a "
              "plan built without one");
}

// Live query rows whose lse is not finite: every allowed score was -inf (the forward output NaN, by
// tile::row_inv) or one was NaN/+inf. The softmax of such a row is NaN at each pair it may attend, so
// the reference's autograd gives NaN for its dq row and for the dk and dv rows of each key it may
// attend; the kernel, which reads a non-finite lse as a row with nothing to attend, skipped it. Rare
// (poisoned inputs only): one scan of lse, then the rows it finds are filled from the mask rule.
void nan_gradients_of_non_finite_rows(const at::Tensor& lse, const at::Tensor& kinds, const at::Tensor& groups,
                                      int64_t topology, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const auto bad = lse.isfinite().logical_not();  // [B, Hq, Sq]; PAD rows (lse -inf) told apart below
  if (!bad.any().item<bool>()) return;
  const int64_t Sq = dq.size(2), Skv = dk.size(2), group = dq.size(1) / dk.size(1), q_off = Skv - Sq;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto rows = bad.nonzero();  // [n, 3]: b, h, query index
  const auto r = rows.accessor<int64_t, 2>();
  for (int64_t n = 0; n < rows.size(0); ++n) {
    const int64_t b = r[n][0], h = r[n][1], i = r[n][2] + q_off, bl = kinds.size(0) == 1 ? 0 : b;
    const int8_t* kin = kinds.data_ptr<int8_t>() + bl * Skv;
    const int32_t* grp = groups.data_ptr<int32_t>() + bl * Skv;
    if (kin[i] == kPad) continue;
    dq[b][h][i - q_off].fill_(nan);
    for (int64_t j = 0; j <= i; ++j)
      if (star_allowed(i, j, kin[i], grp[i], kin[j], grp[j], static_cast<int>(topology))) {
        dk[b][h / group][j].fill_(nan);
        dv[b][h / group][j].fill_(nan);
      }
  }
}

std::tuple<at::Tensor, at::Tensor> star_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const at::Tensor& kinds,
                                                      const at::Tensor& groups, const at::Tensor& plan,
                                                      int64_t block_q, int64_t block_k,
                                                      int64_t topology, double scale, double softcap,
                                                      const std::optional<at::Tensor>& panel) {
  check_attention_args(q_in, k_in, v_in, kinds, groups, plan, block_q, block_k, topology, panel);
  check_no_panel("star_attention", panel);
  check_scalars("star_attention", scale, softcap);
  check_kinds_values("star_attention", kinds);
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const auto kinds_c = kinds.contiguous();
  const auto groups_c = groups.contiguous();
  const auto plan_c = plan.contiguous();
  auto out = new_output(q.sizes(), q.options());
  auto lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  cpu_kernels().star_forward[softcap > 0](q, k, v, kinds_c, groups_c, plan_c, block_q, block_k, topology, scale,
                                          softcap, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> star_attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& kinds, const at::Tensor& groups, const at::Tensor& plan, int64_t block_q,
    int64_t block_k, int64_t topology, double scale, double softcap, const std::optional<at::Tensor>& panel) {
  check_attention_args(q_in, k_in, v_in, kinds, groups, plan, block_q, block_k, topology, panel);
  check_no_panel("star_attention_backward", panel);
  check_scalars("star_attention_backward", scale, softcap);
  check_backward_args(dout_in, q_in, out_in, lse, grad_lse);
  check_kinds_values("star_attention_backward", kinds);
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const auto dout = last_dim_contiguous(dout_in), out = last_dim_contiguous(out_in);
  const auto lse_c = lse.contiguous();
  const auto grad_lse_c = grad_lse ? grad_lse->contiguous() : at::Tensor();
  const auto kinds_c = kinds.contiguous();
  const auto groups_c = groups.contiguous();
  const auto plan_c = plan.contiguous();
  auto dq = new_output(q.sizes(), q.options());
  auto dk = new_output(k.sizes(), k.options());
  auto dv = new_output(v.sizes(), v.options());
  // No query (B, Hq or Sq is 0): no gradient reaches the keys; the kernel's work split assumes a task.
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  cpu_kernels().star_backward[softcap > 0](dout, q, k, v, out, lse_c, grad_lse_c, kinds_c, groups_c, plan_c,
                                           block_q, block_k, topology, scale, softcap, dq, dk, dv);
  nan_gradients_of_non_finite_rows(lse_c, kinds_c, groups_c, topology, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(htc, CPU, m) {
  m.impl("star_attention", &star_attention_cpu);
  m.impl("star_attention_backward", &star_attention_backward_cpu);
}

}  // namespace htc
