// Argument checks shared by the CPU and CUDA implementations of htc::mgvq_lookup(_backward).
// TORCH_CHECK_VALUE raises a Python ValueError (DESIGN.md §3: say what is wrong and what would work).
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <vector>

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
  TORCH_CHECK_VALUE(grad_codes.scalar_type() == z.scalar_type(), op, ": grad_codes has dtype ",
                    grad_codes.scalar_type(), ", z ", z.scalar_type(), " (the gradient of the codes is in their dtype)");
  const auto want = z.sizes().slice(0, z.dim() - 1);
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong && indices.sizes() == want, op,
                    ": indices must be int64 of shape z.shape[:-1] = ", want, ", got ",
                    indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK_VALUE(grad_codes.device() == z.device() && indices.device() == z.device(), op,
                    ": all tensors must be on one device");
}

// Some token-group got no code (index < 0 in idx): raise the reason as a ValueError. zf [N, G, d] and
// cbf [G, K, d] float32 (any device), idx [N, G] (any shape of N * G elements). The messages match
// htc_kernels/mgvq_lookup.py (_raise_no_code), which the Triton backend uses.
[[noreturn]] inline void raise_no_code(const at::Tensor& zf, const at::Tensor& cbf, const at::Tensor& idx) {
  const int64_t G = cbf.size(0), d = cbf.size(2);
  const int64_t first = (idx.reshape({-1}) < 0).nonzero()[0][0].item<int64_t>();
  const int64_t n = first / G, g = first % G;
  const at::Tensor zrow = zf.reshape({-1, G, d})[n][g];
  TORCH_CHECK_VALUE(zrow.isfinite().all().item<bool>(), "mgvq_lookup: z contains NaN/Inf (first at token ",
                    n, ", group ", g, "); the lookup needs finite latents");
  TORCH_CHECK_VALUE(cbf[g].isfinite().all(-1).any().item<bool>(), "mgvq_lookup: every code of group ", g,
                    " is NaN/Inf: no code can be selected");
  const auto finite_rows = cbf[g].isfinite().all(-1, true);
  const double zmax = zrow.abs().max().item<double>();
  const double cmax = at::where(finite_rows, cbf[g].abs(), at::zeros({}, cbf.options())).max().item<double>();
  TORCH_CHECK_VALUE(false, "mgvq_lookup: z at token ", n, ", group ", g, " (max |z| = ", zmax,
                    ") is too large for the squared-L2 score against the codes of group ", g, " (max |c| = ",
                    cmax, "): it would overflow float32. Scale z and the codebook by a common factor (the "
                    "nearest code does not change) or use normalize=True");
  TORCH_CHECK(false, "unreachable");
}

}  // namespace htc
