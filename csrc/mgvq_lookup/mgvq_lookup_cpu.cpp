// CPU entry points of htc::mgvq_lookup and htc::mgvq_lookup_backward (DESIGN.md §3), compiled for the
// baseline: argument checks, then the kernels of the CPU variant chosen at load (common/cpu_dispatch.h;
// mgvq_lookup_cpu_isa.cpp).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_dispatch.h"
#include "mgvq_lookup/mgvq_checks.h"

namespace htc {
namespace {

std::tuple<at::Tensor, at::Tensor> mgvq_lookup_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                   bool normalize) {
  check_mgvq_args("mgvq_lookup", z, codebook);
  TORCH_CHECK_VALUE(z.device().is_cpu(), "mgvq_lookup (CPU kernel): tensors are on ", z.device());
  return cpu_kernels().mgvq_lookup(z, codebook, normalize);
}

std::tuple<at::Tensor, at::Tensor> mgvq_lookup_backward_cpu(const at::Tensor& grad_codes, const at::Tensor& z,
                                                            const at::Tensor& codebook, const at::Tensor& indices,
                                                            bool normalize) {
  check_mgvq_backward_args("mgvq_lookup_backward", grad_codes, z, codebook, indices);
  return cpu_kernels().mgvq_lookup_backward(grad_codes, z, codebook, indices, normalize);
}

}  // namespace

TORCH_LIBRARY_IMPL(htc, CPU, m) {
  m.impl("mgvq_lookup", &mgvq_lookup_cpu);
  m.impl("mgvq_lookup_backward", &mgvq_lookup_backward_cpu);
}

}  // namespace htc
