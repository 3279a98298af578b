// Argument checks shared by the CPU and CUDA implementations of htc::mgvq_lookup(_backward).
// TORCH_CHECK_VALUE raises a Python ValueError (DESIGN.md §3: say what is wrong and what would work).
#pragma once
#include <ATen/ATen.h>

#include <limits>

namespace htc {

inline void check_mgvq_args(const char* op, const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(codebook.dim() == 3, op, ": codebook must be 3-D [G, K, d], got ",
                    codebook.sizes());
  TORCH_CHECK_VALUE(z.dim() >= 2, op, ": z must be [..., G, d] (at least 2-D), got ", z.sizes());
  const int64_t G = codebook.size(0), K = codebook.size(1), d = codebook.size(2);
  TORCH_CHECK_VALUE(z.size(-2) == G && z.size(-1) == d, op, ": z ", z.sizes(),
                    " does not match codebook [G=", G, ", K=", K, ", d=", d,
                    "]: z's last two dims must be [G, d]");
  TORCH_CHECK_VALUE(G > 0 && K > 0 && d > 0, op, ": codebook [G, K, d] = ", codebook.sizes(),
                    " must have G, K, d >= 1");
  TORCH_CHECK_VALUE(K <= std::numeric_limits<int32_t>::max(), op, ": K = ", K, " too large");
  TORCH_CHECK_VALUE(at::isFloatingType(z.scalar_type()) && z.scalar_type() == codebook.scalar_type(),
                    op, ": z (", z.scalar_type(), ") and codebook (", codebook.scalar_type(),
                    ") must have the same floating dtype");
  const auto st = z.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
                    ": dtype ", st, " not supported by this kernel (float32, bfloat16, float16)");
  TORCH_CHECK_VALUE(z.device() == codebook.device(), op, ": z on ", z.device(), " but codebook on ",
                    codebook.device());
}

inline void check_mgvq_backward_args(const char* op, const at::Tensor& grad_codes,
                                     const at::Tensor& z, const at::Tensor& codebook,
                                     const at::Tensor& indices) {
  check_mgvq_args(op, z, codebook);
  TORCH_CHECK_VALUE(grad_codes.sizes() == z.sizes(), op, ": grad_codes ", grad_codes.sizes(),
                    " must have z's shape ", z.sizes());
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong && indices.dim() == z.dim() - 1 &&
                        indices.numel() * z.size(-1) == z.numel(),
                    op, ": indices must be int64 of shape z.shape[:-1]");
  TORCH_CHECK_VALUE(grad_codes.device() == z.device() && indices.device() == z.device(), op,
                    ": all tensors must be on one device");
}

}  // namespace htc
