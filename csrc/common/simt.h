// Warp-level primitives of the CUDA kernels behind one small API with two implementations:
//  - nvcc: PTX (mma.sync m16n8k16, ldmatrix, cp.async; sm_80+) and warp intrinsics;
//  - a host compiler with HTC_SIMT_EMULATOR: csrc/tests/simt_emulator.h (included first) runs every
//    CUDA thread of a block as a fiber and implements the same calls with the PTX ISA's documented
//    semantics (fragment layouts, zero-filling copies that land only at cp.async.wait_group), so the
//    ctests execute the very kernel source on a CPU.
// Kernel bodies are written against this API only (no threadIdx/blockIdx inside: the __global__
// wrappers pass tid and block index), which is what makes them runnable in both worlds.
#pragma once
#include <cstdint>

#include "common/half_bits.h"

#if defined(__CUDACC__)

#define HTC_DEV __device__ __forceinline__
#define HTC_UNROLL _Pragma("unroll")

namespace htc::simt {

struct U128 {
  uint32_t w[4];
};

HTC_DEV void sync_block() { __syncthreads(); }
HTC_DEV int sync_block_or(int pred) { return __syncthreads_or(pred); }
HTC_DEV int sync_block_count(int pred) { return __syncthreads_count(pred); }
HTC_DEV void sync_warp() { __syncwarp(); }
HTC_DEV float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
HTC_DEV float shfl_idx(float v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
HTC_DEV unsigned ballot(int pred) { return __ballot_sync(0xffffffffu, pred); }
HTC_DEV bool any_warp(int pred) { return __any_sync(0xffffffffu, pred) != 0; }
HTC_DEV int popc(unsigned x) { return __popc(x); }
// Makes x opaque to the optimiser: it is materialised here as one register and cannot be recomputed
// from (or kept as) its ingredients later. Used on packed mask words that must not be re-expanded.
HTC_DEV void opaque(unsigned& x) { asm volatile("" : "+r"(x)); }

HTC_DEV uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16-byte plain copies/loads (shared or global, 16-byte aligned).
HTC_DEV void copy16(void* dst, const void* src) { *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src); }
HTC_DEV U128 load16(const void* src) {
  const uint4 v = *static_cast<const uint4*>(src);
  return U128{{v.x, v.y, v.z, v.w}};
}

// ldmatrix: four (x4) or two (x2) 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m.
// Non-transposed: lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of each matrix (low half first);
// transposed: column l/4, rows 2(l%4), 2(l%4)+1. The "memory" clobbers keep the compiler from moving
// shared-memory reads across the plain stores and barriers around them.
HTC_DEV void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
HTC_DEV void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
HTC_DEV void ldsm_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p))
               : "memory");
}
HTC_DEV void ldsm_x2_t(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p))
               : "memory");
}

// d += a * b on tensor cores: A 16x16 (row), B 16x8 (col), fp32 accumulators; bf16 or fp16 operands.
template <bool kFp16>
HTC_DEV void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kFp16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // sm_80+ only; the host side refuses older GPUs before launching
#endif
}

// 16-byte asynchronous global -> shared copy; src_bytes < 16 zero-fills the rest (0: reads nothing).
HTC_DEV void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
// A hint: the global line holding p is brought into L1 (no register waits for it).
HTC_DEV void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p)); }
HTC_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
HTC_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

HTC_DEV uint32_t pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(bits::float_to_bf16(lo)) | (static_cast<uint32_t>(bits::float_to_bf16(hi)) << 16);
}
HTC_DEV uint32_t pack_f16(float lo, float hi) {
  return static_cast<uint32_t>(bits::float_to_f16(lo)) | (static_cast<uint32_t>(bits::float_to_f16(hi)) << 16);
}

}  // namespace htc::simt

#elif defined(HTC_SIMT_EMULATOR)
// Everything above is provided by csrc/tests/simt_emulator.h, included before this header.
#else
#error "common/simt.h: device code needs nvcc, or the host emulator (csrc/tests/simt_emulator.h)"
#endif
