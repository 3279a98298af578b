// The CPU MGVQ lookup ops of one CPU variant (compiled once per variant: common/isa.h): a fused
// normalise + score + running arg-best + gather (mgvq_cpu_core.h); no N x K buffer. Arguments are
// checked by the entry points (mgvq_lookup_cpu.cpp).
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/cpu_kernels.h"
#include "mgvq_lookup/mgvq_checks.h"
#include "mgvq_lookup/mgvq_cpu_core.h"

HTC_DECLARE_CPU_KERNELS(HTC_ISA_NS)

namespace htc::HTC_ISA_NS {

std::tuple<at::Tensor, at::Tensor> mgvq_lookup(const at::Tensor& z, const at::Tensor& codebook,
                                                   bool normalize) {
  const int64_t G = codebook.size(0), K = codebook.size(1), d = codebook.size(2);
  const int64_t N = z.numel() / (G * d);
  const auto zf = z.to(at::kFloat).contiguous();
  const auto cbf = codebook.to(at::kFloat).contiguous();
  auto packed = at::empty({mgvq::packed_size(int(G), K, int(d), normalize)}, cbf.options());
  auto rowmajor = at::empty({G, K, d}, cbf.options());
  std::vector<float> group_scale(G, 1.f);
  if (!normalize) mgvq::l2_group_scales(cbf.data_ptr<float>(), int(G), K, int(d), group_scale.data());
  mgvq::pack_codebook(cbf.data_ptr<float>(), int(G), K, int(d), normalize,
                      packed.data_ptr<float>(), rowmajor.data_ptr<float>(), group_scale.data());
  auto idx_sizes = z.sizes().vec();
  idx_sizes.pop_back();
  auto indices = at::empty(idx_sizes, z.options().dtype(at::kLong));
  const bool direct = z.scalar_type() == at::kFloat;
  auto codes = at::empty(z.sizes(), zf.options());
  const int64_t missing = mgvq::lookup(zf.data_ptr<float>(), N, int(G), K, int(d), normalize,
                                       packed.data_ptr<float>(), rowmajor.data_ptr<float>(),
                                       indices.data_ptr<int64_t>(), codes.data_ptr<float>(), group_scale.data());
  if (missing > 0) raise_no_code(zf, cbf, indices);
  return {direct ? codes : codes.to(z.scalar_type()), indices};
}

std::tuple<at::Tensor, at::Tensor> mgvq_lookup_backward(const at::Tensor& grad_codes,
                                                            const at::Tensor& z,
                                                            const at::Tensor& codebook,
                                                            const at::Tensor& indices,
                                                            bool normalize) {
  const int64_t G = codebook.size(0), K = codebook.size(1), d = codebook.size(2);
  const int64_t N = z.numel() / (G * d);
  const auto gf = grad_codes.to(at::kFloat).contiguous();
  const auto zf = z.to(at::kFloat).contiguous();
  const auto cbf = codebook.to(at::kFloat).contiguous();
  const auto idx = indices.contiguous();
  if (N > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < K,
                      "mgvq_lookup_backward: indices out of range [0, ", K, ")");
  }
  auto grad_z = at::empty(z.sizes(), zf.options());
  auto grad_cb = at::empty({G, K, d}, cbf.options());
  mgvq::lookup_backward(gf.data_ptr<float>(), zf.data_ptr<float>(), cbf.data_ptr<float>(),
                        idx.data_ptr<int64_t>(), N, int(G), K, int(d), normalize,
                        grad_z.data_ptr<float>(), grad_cb.data_ptr<float>());
  return {grad_z.to(z.scalar_type()), grad_cb.to(codebook.scalar_type())};
}

}  // namespace htc::HTC_ISA_NS
