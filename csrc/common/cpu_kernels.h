// The entry points every CPU kernel variant defines (one per op and, for star attention, per soft-cap
// mode), and the table the dispatcher (cpu_dispatch.cpp) fills with one variant's addresses. Compiled
// for the baseline: only declarations and types, no code.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace htc {

// Inputs as the op entry points prepare them (checked; last dimension contiguous; kinds, groups, plan,
// lse and grad_lse contiguous; grad_lse may be undefined); outputs allocated by the caller.
using StarForward = void(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kinds,
                         const at::Tensor& groups, const at::Tensor& plan, int64_t block_q, int64_t block_k,
                         int64_t topology, double scale, double softcap, at::Tensor& out, at::Tensor& lse);
using StarBackward = void(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse,
                          const at::Tensor& kinds, const at::Tensor& groups, const at::Tensor& plan,
                          int64_t block_q, int64_t block_k, int64_t topology, double scale, double softcap,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);
// The ops themselves, arguments checked by the caller's schema only (mgvq_lookup_cpu_isa.cpp checks).
using MgvqLookup = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& z, const at::Tensor& codebook,
                                                       bool normalize);
using MgvqLookupBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& grad_codes, const at::Tensor& z,
                                                               const at::Tensor& codebook,
                                                               const at::Tensor& indices, bool normalize);

// How the chosen variant multiplies bf16 tiles (HTC_CPU_BF16_TILES, read once at load with HTC_CPU_ISA;
// cpu_dispatch.cpp): widened to fp32 (the default), AVX512-BF16 dot products, or the same products
// emulated with AVX-512F (testing), AMX-BF16 tiles (common/gemm_amx.h), or those tiles emulated in memory
// (testing). Defined by the dispatcher, read by the kernels.
enum class Bf16Tiles : int { kFp32 = 0, kDpbf16 = 1, kEmulated = 2, kAmx = 3, kAmxEmulated = 4 };
Bf16Tiles cpu_bf16_tiles();

struct CpuKernels {
  StarForward* star_forward[2];    // [softcap > 0]
  StarBackward* star_backward[2];  // [softcap > 0]
  MgvqLookup* mgvq_lookup;
  MgvqLookupBackward* mgvq_lookup_backward;
};

}  // namespace htc

// Declares variant `ns`'s entry points (htc::ns::...): in each variant's sources, which define them,
// and in cpu_dispatch.cpp once per compiled variant.
#define HTC_DECLARE_CPU_KERNELS(ns)                                 \
  namespace htc::ns {                                               \
  StarForward star_forward_uncapped, star_forward_capped;           \
  StarBackward star_backward_uncapped, star_backward_capped;        \
  MgvqLookup mgvq_lookup;                                           \
  MgvqLookupBackward mgvq_lookup_backward;                          \
  }

#define HTC_CPU_KERNELS_OF(ns)                                                      \
  ::htc::CpuKernels {                                                               \
    {&::htc::ns::star_forward_uncapped, &::htc::ns::star_forward_capped},           \
        {&::htc::ns::star_backward_uncapped, &::htc::ns::star_backward_capped},     \
        &::htc::ns::mgvq_lookup, &::htc::ns::mgvq_lookup_backward                   \
  }
