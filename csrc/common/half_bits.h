// bf16 / fp16 <-> fp32 conversions on raw 16-bit patterns, host and device (torch-free).
// Device code uses the hardware conversions (round to nearest even); host code does the same rounding
// with integer arithmetic, so the SIMT emulator (csrc/tests/simt_emulator.h) and the ctests see the
// values a GPU would. csrc/tests/test_star_cuda_kernels.cpp checks the host versions against
// the compiler's _Float16 and against exhaustive bf16 round trips.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define HTC_HB __host__ __device__ __forceinline__
#else
#define HTC_HB inline
#endif

namespace htc::bits {

HTC_HB float as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

HTC_HB uint32_t as_u32(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

HTC_HB float bf16_to_float(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet).
HTC_HB uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t u = as_u32(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
#endif
}

HTC_HB float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return as_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    const float v = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    return sign ? -v : v;
  }
  return as_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

// Round to nearest even, overflow to +-inf, subnormals rounded, NaN stays NaN.
HTC_HB uint16_t float_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = as_u32(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                         // below 2^-14: subnormal half (or zero)
    // The result is round(v * 2^24) units of 2^-24; v * 2^24 is exact in fp32 and < 1024.5.
    const float scaled = as_float(a) * 16777216.0f;
    uint32_t q = static_cast<uint32_t>(scaled);
    const float rest = scaled - static_cast<float>(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  const uint32_t m = a + 0xfffu + ((a >> 13) & 1u);
  return sign | static_cast<uint16_t>((m - 0x38000000u) >> 13);
#endif
}

// True when the 16-bit float pattern (bf16 or fp16 by `half`) or fp32 pattern is Inf or NaN.
HTC_HB bool nonfinite_bf16(uint16_t h) { return (h & 0x7f80u) == 0x7f80u; }
HTC_HB bool nonfinite_f16(uint16_t h) { return (h & 0x7c00u) == 0x7c00u; }
HTC_HB bool nonfinite_f32(uint32_t u) { return (u & 0x7f800000u) == 0x7f800000u; }

}  // namespace htc::bits
