// The soft-capped CPU star attention kernels (kCap = true) of one CPU variant (compiled once per
// variant: common/isa.h), in a translation unit of their own so that the uncapped kernels of
// star_attention_cpu_uncapped_isa.cpp compile exactly as without capping (see
// star_attention_cpu_kernels.h).
#include "star_attention/star_attention_cpu_kernels.h"  // first: selects the at::vec ISA (common/vec.h)

namespace htc::HTC_ISA_NS {

void star_forward_capped(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kinds,
                         const at::Tensor& groups, const at::Tensor& plan, int64_t block_q, int64_t block_k,
                         int64_t topology, double scale, double softcap, at::Tensor& out, at::Tensor& lse) {
  run_forward<true>(q, k, v, kinds, groups, plan, block_q, block_k, topology, scale, softcap, out, lse);
}

void star_backward_capped(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse,
                          const at::Tensor& kinds, const at::Tensor& groups, const at::Tensor& plan,
                          int64_t block_q, int64_t block_k, int64_t topology, double scale, double softcap,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  run_backward<true>(dout, q, k, v, out, lse, grad_lse, kinds, groups, plan, block_q, block_k, topology, scale,
                     softcap, dq, dk, dv);
}

}  // namespace htc::HTC_ISA_NS
