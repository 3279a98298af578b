// CUDA implementation of htc::star_attention (and its backward): argument checks, dtype / head-dim
// dispatch, launch geometry (split-K for decode), workspaces. The kernels themselves are torch-free
// (star_attention_kernel.cuh) and run on the host emulator in ctest.
//
// Contract (besides csrc/ops.cpp's schema): q/k/v with any strides whose last dimension is contiguous
// and whose rows are 16-byte aligned are read in place (HF's transpose(1, 2) views qualify); anything
// else is copied to a contiguous tensor first (same computation, one extra copy). Head dims 64, 80,
// 96, 128, 256; fp32 / bf16 / fp16; with or without soft-capping; sm_80 or newer; block_q = 64 and block_k = fwd_block_k(dtype, D)
// (htc_kernels/star_attention.py, _CudaStar, builds its plans with these sizes).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <array>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "star_attention/star_attention_kernel.cuh"
#include "star_attention/star_checks.h"

namespace htc {
namespace {

using star_cuda::Elt;

constexpr int kMaxSplit = 32;
// Prefill split-K (the forward's long query tiles only): below kPrefillSplitWaves CTAs per SM (about
// 2 waves at 2 CTAs per SM) a CTA that visits many key tiles is the launch's critical path: at the
// LLaVA shape, B = 1, the `<voco>` query tile visits 10 tiles and every other tile 2 or 3, ~3.6 per
// CTA slot balanced. Up to kPrefillParts parts of at least kPrefillPartMin tiles of 64 keys each
// (split_parts; fp32's 16-key tiles count 4 to one).
// A prediction from the H100 run's per-visit cost (CUDA_NOTES.md), not yet measured: the benchmark
// times it against HTC_CUDA_PREFILL_SPLIT=0 (off; read per call) at llava-b1.
constexpr int kPrefillSplitWaves = 4, kPrefillParts = 4, kPrefillPartMin = 3;

bool prefill_split_enabled() {
  const char* env = std::getenv("HTC_CUDA_PREFILL_SPLIT");
  return env == nullptr || env[0] != '0';
}

// HTC_CUDA_THREE_CTAS=1 (read per call; off by default, not yet measured): the row kernels' builds
// for three CTAs per SM (RowCfg::kThree: 12 warps per SM instead of 8, at most 168 registers, fewer
// stages at D = 128), where one exists for the call's dtype and head dim and three fit the device's
// shared memory per SM (sm_90's 228 KB; never sm_80's 164 KB). The same computation either way: the
// same plan, tiles and order of operations. The benchmark times it against the default.
bool three_ctas_requested() {
  const char* env = std::getenv("HTC_CUDA_THREE_CTAS");
  return env != nullptr && env[0] == '1';
}

struct DeviceInfo {
  int major = 0, minor = 0, sms = 0, smem_optin = 0, smem_per_sm = 0, smem_reserved = 0;
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
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
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
at::Tensor readable(const at::Tensor& t) {
  if (vector_readable(t)) return t;
  at::Tensor c = t.contiguous();
  // contiguous() returns t itself when t is contiguous at a misaligned base (a view at an odd storage
  // offset, e.g. x[1:].view(...)): a fresh allocation is aligned (the caching allocator's 512 B).
  return vector_readable(c) ? c : t.clone(at::MemoryFormat::Contiguous);
}

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

// Calls f(EltC<E>{}, DimC<D>{}, std::bool_constant<kCap>{}) for the runtime (dtype, head dim, softcap).
template <class F>
void dispatch(at::ScalarType s, int64_t d, double softcap, F&& f) {
  auto by_cap = [&](auto elt, auto dim) {
    return softcap > 0 ? f(elt, dim, std::true_type{}) : f(elt, dim, std::false_type{});
  };
  auto by_dim = [&](auto elt) {
    switch (d) {
      case 64: return by_cap(elt, DimC<64>{});
      case 80: return by_cap(elt, DimC<80>{});
      case 96: return by_cap(elt, DimC<96>{});
      case 128: return by_cap(elt, DimC<128>{});
      case 256: return by_cap(elt, DimC<256>{});
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

// The checks and parameters shared by forward and backward. Keeps the tensors it reads alive.
struct Problem {
  at::Tensor q, k, v, kinds, groups, plan, panel;
  star_cuda::StarParams p{};
  const DeviceInfo* info = nullptr;
  int dev = 0;
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Skv = 0, D = 0;
};

Problem prepare(const char* op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                const at::Tensor& kinds, const at::Tensor& groups, const at::Tensor& plan, int64_t block_q,
                int64_t block_k, int64_t topology, double scale, double softcap,
                const std::optional<at::Tensor>& panel) {
  check_attention_args(q_in, k_in, v_in, kinds, groups, plan, block_q, block_k, topology, panel);
  check_scalars(op, scale, softcap);
  TORCH_CHECK(q_in.is_cuda(), op, " (CUDA): tensors are on ", q_in.device());
  Problem pr;
  pr.dev = q_in.get_device();
  pr.info = &device_info(pr.dev);
  check_device(q_in, *pr.info, op);
  const Elt elt = elt_of(q_in.scalar_type());
  pr.D = q_in.size(3);
  TORCH_CHECK(star_cuda::supported_head_dim(static_cast<int>(pr.D)), op, " (CUDA): head dim ", pr.D,
              " not supported (64, 80, 96, 128, 256)");
  const int64_t want_bk = star_cuda::fwd_block_k(elt, static_cast<int>(pr.D));
  TORCH_CHECK(block_q == 64 && block_k == want_bk, op, " (CUDA): this kernel takes plans with block_q=64, block_k=",
              want_bk, " for ", q_in.scalar_type(), " D=", pr.D, "; got ", block_q, ", ", block_k);
  pr.B = q_in.size(0), pr.Hq = q_in.size(1), pr.Sq = q_in.size(2), pr.Hkv = k_in.size(1), pr.Skv = k_in.size(2);
  TORCH_CHECK(pr.Skv <= std::numeric_limits<int32_t>::max() / 2 && pr.B * pr.Hq <= std::numeric_limits<int32_t>::max(),
              op, " (CUDA): problem too large (Skv = ", pr.Skv, ", B*Hq = ", pr.B * pr.Hq, ")");
  pr.q = readable(q_in), pr.k = readable(k_in), pr.v = readable(v_in);
  pr.kinds = kinds.contiguous(), pr.groups = groups.contiguous(), pr.plan = plan.contiguous();
  star_cuda::StarParams& p = pr.p;
  p.q = pr.q.data_ptr();
  p.k = pr.k.data_ptr();
  p.v = pr.v.data_ptr();
  p.q_sb = pr.q.stride(0), p.q_sh = pr.q.stride(1), p.q_ss = pr.q.stride(2);
  p.k_sb = pr.k.stride(0), p.k_sh = pr.k.stride(1), p.k_ss = pr.k.stride(2);
  p.v_sb = pr.v.stride(0), p.v_sh = pr.v.stride(1), p.v_ss = pr.v.stride(2);
  p.kinds = pr.kinds.data_ptr<int8_t>();
  p.groups = pr.groups.data_ptr<int32_t>();
  p.plan = pr.plan.data_ptr<uint8_t>();
  // The panel's values are trusted like the plan's tile kinds (entries outside [0, Skv) read as empty).
  if (panel && panel->size(1) > 0) {
    pr.panel = panel->contiguous();
    p.panel = pr.panel.data_ptr<int32_t>();
    p.panel_len = static_cast<int>(pr.panel.size(1));
  }
  p.B = static_cast<int>(pr.B), p.Hq = static_cast<int>(pr.Hq), p.Hkv = static_cast<int>(pr.Hkv);
  p.Sq = static_cast<int>(pr.Sq), p.Skv = static_cast<int>(pr.Skv);
  p.n_qt = static_cast<int>(plan.size(1)), p.n_kt = static_cast<int>(plan.size(2));
  p.q_off = static_cast<int>(pr.Skv - pr.Sq), p.plan_batch = static_cast<int>(plan.size(0));
  p.topology = static_cast<int>(topology);
  p.n_split = 1;
  p.split_min = 1;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * tile::kLog2e;
  p.softcap = static_cast<float>(softcap);
  p.inv_softcap = softcap > 0 ? 1.f / p.softcap : 0.f;
  return pr;
}

// Launches kKernel with its dynamic shared memory, raising the kernel's limit once per device (each
// kernel its own record, so every launch site goes through here).
template <auto kKernel>
void launch(int64_t grid, int threads, size_t smem, const Problem& pr, cudaStream_t stream) {
  static uint64_t smem_set = 0;
  static std::mutex mu;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "star_attention (CUDA): grid too large (", grid, ")");
  {
    std::lock_guard<std::mutex> lock(mu);
    set_smem(kKernel, smem, *pr.info, pr.dev, smem_set);
  }
  kKernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(pr.p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// star_row_kernel<C> over `ctas` CTAs per output-column split (the grid is ctas * C::kOSplit).
template <class C>
void launch_row(int64_t ctas, const Problem& pr, cudaStream_t stream) {
  launch<star_cuda::star_row_kernel<C>>(ctas * C::kOSplit, C::kThreads, C::kSmemBytes, pr, stream);
}

// The default build Cfg, or its three-CTA build Three where asked for and where it fits (above).
template <class Cfg, class Three>
void launch_row_or_three(int64_t ctas, const Problem& pr, cudaStream_t stream) {
  if constexpr (Three::kThree) {
    static_assert(Three::BQ == Cfg::BQ && Three::kOSplit == Cfg::kOSplit && Three::BK == Cfg::BK, "same grid");
    const size_t per_cta = Three::kSmemBytes + static_cast<size_t>(pr.info->smem_reserved);
    if (three_ctas_requested() && 3 * per_cta <= static_cast<size_t>(pr.info->smem_per_sm))
      return launch_row<Three>(ctas, pr, stream);
  }
  launch_row<Cfg>(ctas, pr, stream);
}

std::tuple<at::Tensor, at::Tensor> star_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& kinds,
                                                       const at::Tensor& groups, const at::Tensor& plan,
                                                       int64_t block_q, int64_t block_k, int64_t topology,
                                                       double scale, double softcap,
                                                       const std::optional<at::Tensor>& panel) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  Problem pr = prepare("star_attention", q_in, k_in, v_in, kinds, groups, plan, block_q, block_k, topology, scale,
                       softcap, panel);
  auto out = new_output(q_in.sizes(), q_in.options());
  auto lse = new_output({pr.B, pr.Hq, pr.Sq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  star_cuda::StarParams& p = pr.p;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();

  // Split-K when the (batch, head, query tile) CTAs cannot fill the GPU (decode, small B*H): each
  // split takes a contiguous, count-balanced share of a tile's non-SKIP key tiles; and at small
  // prefill grids for the long tiles only (kPrefillSplitWaves). split_parts decides per tile.
  const int64_t ctas = pr.B * pr.Hq * p.n_qt;
  int64_t n_split = 1;  // and p.split_min = 1 (prepare)
  if (ctas < pr.info->sms) {
    n_split = std::max<int64_t>(1, std::min<int64_t>({ceil_div(2 * pr.info->sms, ctas), ceil_div(p.n_kt, 2), kMaxSplit}));
  } else if (const int split_min = kPrefillPartMin * 64 / static_cast<int>(block_k);
             ctas < kPrefillSplitWaves * pr.info->sms && p.n_kt >= 2 * split_min && prefill_split_enabled()) {
    n_split = kPrefillParts;
    p.split_min = split_min;
  }
  p.n_split = static_cast<int>(n_split);
  at::Tensor o_part, lse_part, n_parts;
  if (n_split > 1) {
    o_part = at::empty({n_split, pr.B, pr.Hq, pr.Sq, pr.D}, out.options().dtype(at::kFloat));
    lse_part = at::empty({n_split, pr.B, pr.Hq, pr.Sq}, out.options().dtype(at::kFloat));
    n_parts = at::empty({pr.B, pr.Hq, p.n_qt}, out.options().dtype(at::kInt));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
    p.n_parts = n_parts.data_ptr<int32_t>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(pr.q.scalar_type(), pr.D, softcap, [&](auto elt_c, auto dim_c, auto cap_c) {
    constexpr Elt E = decltype(elt_c)::value;
    constexpr int Dim = decltype(dim_c)::value;
    constexpr bool kCap = decltype(cap_c)::value;
    launch_row_or_three<star_cuda::FwdCfg<E, Dim, kCap>, star_cuda::FwdCfg<E, Dim, kCap, true>>(ctas * n_split, pr,
                                                                                                 stream);
    if (n_split > 1) {
      const int64_t n = pr.B * pr.Hq * pr.Sq * (Dim / 4);
      launch<star_cuda::star_combine_kernel<E, Dim>>(ceil_div(n, 256), 256, 0, pr, stream);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> star_attention_backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& kinds, const at::Tensor& groups, const at::Tensor& plan, int64_t block_q, int64_t block_k,
    int64_t topology, double scale, double softcap, const std::optional<at::Tensor>& panel) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  Problem pr = prepare("star_attention_backward", q_in, k_in, v_in, kinds, groups, plan, block_q, block_k,
                       topology, scale, softcap, panel);
  check_backward_args(dout_in, q_in, out_in, lse, grad_lse);
  auto dq = new_output(q_in.sizes(), q_in.options());
  auto dk = new_output(k_in.sizes(), k_in.options());
  auto dv = new_output(v_in.sizes(), v_in.options());
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  const auto dout = readable(dout_in), out = readable(out_in);
  const auto lse_c = lse.contiguous();
  const auto grad_lse_c = grad_lse ? grad_lse->contiguous() : at::Tensor();
  auto delta = at::empty({pr.B, pr.Hq, pr.Sq}, lse_c.options());
  star_cuda::StarParams& p = pr.p;
  p.dout = dout.data_ptr();
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_ss = dout.stride(2);
  p.o = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_ss = out.stride(2);
  p.lse_in = lse_c.data_ptr<float>();
  p.grad_lse = grad_lse_c.defined() ? grad_lse_c.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(pr.q.scalar_type(), pr.D, softcap, [&](auto elt_c, auto dim_c, auto cap_c) {
    constexpr Elt E = decltype(elt_c)::value;
    constexpr int Dim = decltype(dim_c)::value;
    constexpr bool kCap = decltype(cap_c)::value;
    using Dq = star_cuda::DqCfg<E, Dim, kCap>;
    using Dkv = star_cuda::DkvCfg<E, Dim, kCap>;
    const int64_t rows = pr.B * pr.Hq * pr.Sq;
    launch<star_cuda::star_delta_kernel<E, Dim>>(ceil_div(rows, 8), 256, 0, pr, stream);
    launch_row_or_three<Dq, star_cuda::DqCfg<E, Dim, kCap, true>>(pr.B * pr.Hq * ceil_div(pr.Sq, Dq::BQ), pr, stream);
    launch<star_cuda::star_key_kernel<Dkv>>(pr.B * pr.Hkv * p.n_kt, Dkv::kThreads, Dkv::kSmemBytes, pr, stream);
  });
  return {dq, dk, dv};
}

}  // namespace

// Shared memory per block of the default builds, for the backend selection (htc_kernels/star_attention.py,
// _CudaStar): one row {dtype (Elt: 0 fp32, 1 bf16, 2 fp16), head dim, softcap (0/1), forward, dQ, dK/dV}
// per build. Parts with 99 KB per block (sm_86/89/120) cannot run some of them (e.g. bf16 D=128 dQ).
std::vector<std::array<int64_t, 6>> star_cuda_smem_table() {
  std::vector<std::array<int64_t, 6>> rows;
  for (const auto s : {at::kFloat, at::kBFloat16, at::kHalf})
    for (const int64_t d : {64, 80, 96, 128, 256})
      for (const double cap : {0.0, 1.0})
        dispatch(s, d, cap, [&](auto elt_c, auto dim_c, auto cap_c) {
          constexpr Elt E = decltype(elt_c)::value;
          constexpr int Dim = decltype(dim_c)::value;
          constexpr bool kCap = decltype(cap_c)::value;
          rows.push_back({static_cast<int64_t>(E), Dim, kCap, star_cuda::FwdCfg<E, Dim, kCap>::kSmemBytes,
                          star_cuda::DqCfg<E, Dim, kCap>::kSmemBytes, star_cuda::DkvCfg<E, Dim, kCap>::kSmemBytes});
        });
  return rows;
}

TORCH_LIBRARY_IMPL(htc, CUDA, m) {
  m.impl("star_attention", &star_attention_cuda);
  m.impl("star_attention_backward", &star_attention_backward_cuda);
}

}  // namespace htc
