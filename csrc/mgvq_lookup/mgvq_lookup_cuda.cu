// CUDA implementation of htc::mgvq_lookup and htc::mgvq_lookup_backward: codebook tiles in shared
// memory, one thread per token, running arg-best; math shared with the CPU kernel (mgvq_math.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

#include "mgvq_lookup/mgvq_checks.h"
#include "mgvq_lookup/mgvq_lookup_kernel.cuh"

namespace htc {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

bool specialised(int64_t d) { return d == 4 || d == 8 || d == 16 || d == 32; }

// Dynamic shared memory of the lookup kernel: a tile of kTileK prepared codes (d floats, + |c|^2 for
// squared L2) and, for d without a specialised build, each thread's token.
size_t lookup_smem_bytes(int64_t d, bool normalize) {
  const int64_t R = normalize ? d : d + 1;
  return sizeof(float) * static_cast<size_t>(mgvq::kTileK * R + (specialised(d) ? 0 : mgvq::kLookupThreads * d));
}

template <int D, bool Norm>
void launch_lookup(const float* z, const float* prep, const float* code_src, int code_stride,
                   int64_t N, int G, int64_t K, int d, const float* gmax, int64_t* idx, float* codes,
                   cudaStream_t stream) {
  const size_t smem = lookup_smem_bytes(d, Norm);
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK_VALUE(smem <= static_cast<size_t>(optin), "mgvq_lookup (CUDA kernel): d = ", d, " needs ", smem,
                    " bytes of shared memory per block, this GPU offers ", optin,
                    "; use backend='triton' or 'reference'");
  auto kernel = mgvq::mgvq_lookup_kernel<D, Norm>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>((N + mgvq::kLookupThreads - 1) / mgvq::kLookupThreads),
                  static_cast<unsigned>(G));
  kernel<<<grid, mgvq::kLookupThreads, smem, stream>>>(z, prep, code_src, code_stride, N, G, K, d,
                                                       gmax, idx, codes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool Norm>
void dispatch_lookup(const float* z, const float* prep, const float* code_src, int code_stride,
                     int64_t N, int G, int64_t K, int d, const float* gm, int64_t* idx, float* codes,
                     cudaStream_t s) {
  switch (d) {
    case 4: return launch_lookup<4, Norm>(z, prep, code_src, code_stride, N, G, K, d, gm, idx, codes, s);
    case 8: return launch_lookup<8, Norm>(z, prep, code_src, code_stride, N, G, K, d, gm, idx, codes, s);
    case 16: return launch_lookup<16, Norm>(z, prep, code_src, code_stride, N, G, K, d, gm, idx, codes, s);
    case 32: return launch_lookup<32, Norm>(z, prep, code_src, code_stride, N, G, K, d, gm, idx, codes, s);
    default: return launch_lookup<0, Norm>(z, prep, code_src, code_stride, N, G, K, d, gm, idx, codes, s);
  }
}

std::tuple<at::Tensor, at::Tensor> mgvq_lookup_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                    bool normalize) {
  check_mgvq_args("mgvq_lookup", z, codebook);
  TORCH_CHECK_VALUE(z.is_cuda(), "mgvq_lookup (CUDA kernel): tensors are on ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t G = codebook.size(0), K = codebook.size(1), d = codebook.size(2);
  const int64_t N = z.numel() / (G * d);
  // The kernel keeps a tile of kTileK codes x (d + 1) floats in shared memory (lookup_smem_bytes: what
  // fits depends on the GPU, checked at launch); d <= 200 bounds the tile's index arithmetic.
  TORCH_CHECK_VALUE(d <= 200, "mgvq_lookup (CUDA kernel): d = ", d, " > 200 not supported");
  TORCH_CHECK_VALUE(G <= 65535, "mgvq_lookup (CUDA kernel): G = ", G, " groups > 65535 (a grid dimension)");
  const auto zf = z.to(at::kFloat).contiguous();
  const auto cbf = codebook.to(at::kFloat).contiguous();
  const int R = normalize ? int(d) : int(d) + 1;
  auto prep = at::empty({G * K * R}, cbf.options());
  // Squared L2: each group's largest finite |c_j| sets its scale (mgvq_math.h); rows with NaN/Inf never win.
  const auto gmax = normalize ? at::zeros({G}, cbf.options())
                              : at::where(cbf.isfinite().all(-1, true), cbf.abs(), at::zeros({}, cbf.options()))
                                    .amax({1, 2})
                                    .contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  mgvq::mgvq_prepare_kernel<<<blocks_for(G * K), kThreads, 0, stream>>>(
      cbf.data_ptr<float>(), G * K, K, int(d), normalize, gmax.data_ptr<float>(), prep.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto idx_sizes = z.sizes().vec();
  idx_sizes.pop_back();
  auto indices = at::empty(idx_sizes, z.options().dtype(at::kLong));
  auto codes = at::empty(z.sizes(), zf.options());
  if (N > 0) {
    const float* code_src = normalize ? prep.data_ptr<float>() : cbf.data_ptr<float>();
    if (normalize)
      dispatch_lookup<true>(zf.data_ptr<float>(), prep.data_ptr<float>(), code_src, R, N, int(G), K,
                            int(d), gmax.data_ptr<float>(), indices.data_ptr<int64_t>(),
                            codes.data_ptr<float>(), stream);
    else
      dispatch_lookup<false>(zf.data_ptr<float>(), prep.data_ptr<float>(), code_src, int(d), N,
                             int(G), K, int(d), gmax.data_ptr<float>(), indices.data_ptr<int64_t>(),
                             codes.data_ptr<float>(), stream);
    // Raise like the CPU kernel where a token-group got no code (one host sync per call).
    if ((indices < 0).any().item<bool>()) raise_no_code(zf, cbf, indices);
  }
  return {codes.to(z.scalar_type()), indices};
}

std::tuple<at::Tensor, at::Tensor> mgvq_lookup_backward_cuda(const at::Tensor& grad_codes,
                                                             const at::Tensor& z,
                                                             const at::Tensor& codebook,
                                                             const at::Tensor& indices,
                                                             bool normalize) {
  check_mgvq_backward_args("mgvq_lookup_backward", grad_codes, z, codebook, indices);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t G = codebook.size(0), K = codebook.size(1), d = codebook.size(2);
  const int64_t N = z.numel() / (G * d);
  const auto gf = grad_codes.to(at::kFloat).contiguous();
  const auto zf = z.to(at::kFloat).contiguous();
  const auto cbf = codebook.to(at::kFloat).contiguous();
  const auto idx = indices.contiguous();
  // The kernel adds into the codebook rows the indices name: out of [0, K) would write out of bounds
  // (the CPU op checks the same; autograd passes the forward's indices, a raw op call anything).
  if (idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < K,
                      "mgvq_lookup_backward: indices out of range [0, ", K, ")");
  }
  auto grad_z = at::empty(z.sizes(), zf.options());
  auto acc = at::zeros({G, K, d}, cbf.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (N > 0) {
    mgvq::mgvq_backward_tokens_kernel<<<blocks_for(N * G), kThreads, 0, stream>>>(
        gf.data_ptr<float>(), zf.data_ptr<float>(), idx.data_ptr<int64_t>(), N * G, int(G), K,
        int(d), normalize, grad_z.data_ptr<float>(), acc.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor grad_cb = acc;
  if (normalize) {
    grad_cb = at::empty_like(acc);
    mgvq::mgvq_backward_codes_kernel<<<blocks_for(G * K), kThreads, 0, stream>>>(
        cbf.data_ptr<float>(), acc.data_ptr<float>(), G * K, int(d), grad_cb.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_z.to(z.scalar_type()), grad_cb.to(codebook.scalar_type())};
}

}  // namespace

// The lookup kernel's shared memory per block for d = 1..200, cosine then squared L2 ({d, normalize,
// bytes}), for the backend selection (htc_kernels/mgvq_lookup.py, _CudaMgvq).
std::vector<std::array<int64_t, 3>> mgvq_cuda_smem_table() {
  std::vector<std::array<int64_t, 3>> rows;
  for (int64_t d = 1; d <= 200; ++d)
    for (const bool normalize : {true, false})
      rows.push_back({d, normalize, static_cast<int64_t>(lookup_smem_bytes(d, normalize))});
  return rows;
}

TORCH_LIBRARY_IMPL(htc, CUDA, m) {
  m.impl("mgvq_lookup", &mgvq_lookup_cuda);
  m.impl("mgvq_lookup_backward", &mgvq_lookup_backward_cuda);
}

}  // namespace htc
