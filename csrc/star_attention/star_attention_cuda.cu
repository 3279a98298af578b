// CUDA implementation of htc::star_attention (and its backward): argument checks, dtype / head-dim
// dispatch, launch geometry (split-K for decode), workspaces. The kernels themselves are torch-free
// (star_attention_kernel.cuh) and run on the host emulator in ctest.
//
// Contract (besides csrc/ops.cpp's schema): q/k/v with any strides whose last dimension is contiguous
// and whose rows are 16-byte aligned are read in place (HF's transpose(1, 2) views qualify); anything
// else is copied to a contiguous tensor first (same computation, one extra copy). Head dims 64, 80,
// 96, 128, 256; fp32 / bf16 / fp16; sm_80 or newer; block_q = 64 and block_k = fwd_block_k(dtype, D)
// (htc_kernels/star_attention.py, _CudaStar, builds its plans with these sizes).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "star_attention/star_attention_kernel.cuh"
#include "star_attention/star_checks.h"

namespace htc {
namespace {

using star_cuda::Elt;

constexpr int kMaxSplit = 32;

struct DeviceInfo {
  int major = 0, minor = 0, sms = 0, smem_optin = 0;
};

// Per-device properties, read once (cudaDeviceGetAttribute is cheap, but decode steps count µs).
const DeviceInfo& device_info(int dev) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool have[64] = {};
  TORCH_CHECK(dev >= 0 && dev < 64, "star_attention (CUDA): device index ", dev, " out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!have[dev]) {
    DeviceInfo& d = cache[dev];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    have[dev] = true;
  }
  return cache[dev];
}

// HTC_POISON_OUTPUTS=1 (tests): outputs start as NaN, so an element a kernel fails to write fails the
// comparison instead of passing with whatever the allocator left (same switch as the CPU kernels).
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* env = std::getenv("HTC_POISON_OUTPUTS");
    return env != nullptr && env[0] == '1';
  }();
  return poison ? at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options) : at::empty(sizes, options);
}

// Readable in place by 16-byte copies: last dim contiguous, base and row/head/batch strides aligned.
bool vector_readable(const at::Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < t.dim() - 1; ++d)
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}
at::Tensor readable(const at::Tensor& t) { return vector_readable(t) ? t : t.contiguous(); }

Elt elt_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return Elt::kF32;
    case at::kBFloat16: return Elt::kBF16;
    case at::kHalf: return Elt::kF16;
    default: TORCH_CHECK(false, "star_attention (CUDA): dtype ", s, " not supported (float32, bfloat16, float16)");
  }
}

template <Elt E>
using EltC = std::integral_constant<Elt, E>;
template <int D>
using DimC = std::integral_constant<int, D>;

// Calls f(EltC<E>{}, DimC<D>{}) for the runtime (dtype, head dim).
template <class F>
void dispatch(at::ScalarType s, int64_t d, F&& f) {
  auto by_dim = [&](auto elt) {
    switch (d) {
      case 64: return f(elt, DimC<64>{});
      case 80: return f(elt, DimC<80>{});
      case 96: return f(elt, DimC<96>{});
      case 128: return f(elt, DimC<128>{});
      case 256: return f(elt, DimC<256>{});
      default:
        TORCH_CHECK(false, "star_attention (CUDA): head dim ", d, " not supported (64, 80, 96, 128, 256)");
    }
  };
  switch (elt_of(s)) {
    case Elt::kF32: return by_dim(EltC<Elt::kF32>{});
    case Elt::kBF16: return by_dim(EltC<Elt::kBF16>{});
    case Elt::kF16: return by_dim(EltC<Elt::kF16>{});
  }
}

// Raises the kernel's dynamic shared-memory limit (once per device) after checking the device has it.
template <class Kernel>
void set_smem(Kernel kernel, size_t smem, const DeviceInfo& info, int dev, uint64_t& done_mask) {
  TORCH_CHECK(smem <= static_cast<size_t>(info.smem_optin), "star_attention (CUDA): the kernel needs ", smem,
              " bytes of shared memory per block, the device offers ", info.smem_optin);
  if (smem > 48 * 1024 && !(done_mask >> dev & 1u)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    done_mask |= uint64_t{1} << dev;
  }
}

void check_device(const at::Tensor& q, const DeviceInfo& info, const char* op) {
  TORCH_CHECK(info.major >= 8, op, " (CUDA): needs compute capability 8.0 or newer (mma.sync bf16/fp16), device ",
              q.device(), " has ", info.major, ".", info.minor);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::tuple<at::Tensor, at::Tensor> star_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& kinds,
                                                       const at::Tensor& groups, const at::Tensor& plan,
                                                       int64_t block_q, int64_t block_k, int64_t topology,
                                                       double scale) {
  check_attention_args(q_in, k_in, v_in, kinds, groups, plan, block_q, block_k, topology);
  TORCH_CHECK(q_in.is_cuda(), "star_attention (CUDA): tensors are on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int dev = q_in.get_device();
  const DeviceInfo& info = device_info(dev);
  check_device(q_in, info, "star_attention");
  const Elt elt = elt_of(q_in.scalar_type());
  const int64_t D = q_in.size(3);
  TORCH_CHECK(star_cuda::supported_head_dim(static_cast<int>(D)), "star_attention (CUDA): head dim ", D,
              " not supported (64, 80, 96, 128, 256)");
  const int64_t want_bk = star_cuda::fwd_block_k(elt, static_cast<int>(D));
  TORCH_CHECK(block_q == 64 && block_k == want_bk, "star_attention (CUDA): this kernel takes plans with block_q=64, "
              "block_k=", want_bk, " for ", q_in.scalar_type(), " D=", D, "; got ", block_q, ", ", block_k);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Sq = q_in.size(2), Hkv = k_in.size(1), Skv = k_in.size(2);
  TORCH_CHECK(Skv < (int64_t{1} << 28) * want_bk && Skv <= std::numeric_limits<int32_t>::max(),
              "star_attention (CUDA): sequence too long (", Skv, ")");

  auto out = new_output(q_in.sizes(), q_in.options());
  auto lse = new_output({B, Hq, Sq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const auto q = readable(q_in), k = readable(k_in), v = readable(v_in);
  const auto kinds_c = kinds.contiguous(), groups_c = groups.contiguous(), plan_c = plan.contiguous();

  star_cuda::StarParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.kinds = kinds_c.data_ptr<int8_t>();
  p.groups = groups_c.data_ptr<int32_t>();
  p.plan = plan_c.data_ptr<uint8_t>();
  p.B = static_cast<int>(B), p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(Hkv);
  p.Sq = static_cast<int>(Sq), p.Skv = static_cast<int>(Skv);
  p.n_qt = static_cast<int>(plan.size(1)), p.n_kt = static_cast<int>(plan.size(2));
  p.q_off = static_cast<int>(Skv - Sq), p.plan_batch = static_cast<int>(plan.size(0));
  p.topology = static_cast<int>(topology);
  p.scale_log2 = static_cast<float>(scale) * tile::kLog2e;

  // Split-K when the (batch, head, query tile) CTAs cannot fill the GPU (decode, small B*H): each
  // split takes a contiguous, count-balanced share of a tile's non-SKIP key tiles.
  const int64_t ctas = B * Hq * p.n_qt;
  int64_t n_split = 1;
  if (ctas < info.sms) n_split = std::max<int64_t>(1, std::min<int64_t>({ceil_div(2 * info.sms, ctas), ceil_div(p.n_kt, 2), kMaxSplit}));
  p.n_split = static_cast<int>(n_split);
  TORCH_CHECK(ctas * n_split <= std::numeric_limits<int32_t>::max(), "star_attention (CUDA): grid too large");
  at::Tensor o_part, lse_part;
  if (n_split > 1) {
    o_part = at::empty({n_split, B, Hq, Sq, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({n_split, B, Hq, Sq}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), D, [&](auto elt_c, auto dim_c) {
    constexpr Elt E = decltype(elt_c)::value;
    constexpr int Dim = decltype(dim_c)::value;
    using Cfg = star_cuda::FwdCfg<E, Dim, star_cuda::fwd_block_k(E, Dim)>;
    static uint64_t smem_set = 0;
    static std::mutex mu;
    {
      std::lock_guard<std::mutex> lock(mu);
      set_smem(star_cuda::star_fwd_kernel<Cfg>, Cfg::kSmemBytes, info, dev, smem_set);
    }
    star_cuda::star_fwd_kernel<Cfg><<<static_cast<unsigned>(ctas * n_split), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (n_split > 1) {
      const int64_t n = B * Hq * Sq * (Dim / 4);
      star_cuda::star_combine_kernel<E, Dim><<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(htc, CUDA, m) { m.impl("star_attention", &star_attention_cuda); }

}  // namespace htc
