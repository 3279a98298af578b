// The bf16-tile GEMM of a HTC_CPU_BF16_TILES mode (common/cpu_kernels.h Bf16Tiles): one call shape,
//     C [M x N] fp32 (+)= A [M x 2Kp] * B [2Kp x N], operands in bf16 pairs along k (layout: gemm_bf16),
// done by vdpbf16ps (kDpbf16), its AVX-512F emulation (kEmulated), AMX tiles (kAmx) or their emulation
// (kAmxEmulated). N % 16 == 0 (gemm_bf16's requirement; the AMX kernel has none).
#pragma once
#include "common/cpu_kernels.h"
#include "common/gemm.h"
#include "common/gemm_amx.h"

namespace htc::cpu {
inline namespace HTC_ISA_NS {

#if defined(__AVX512F__)
template <Bf16Tiles kTiles, class Pf = PrefetchStream>
inline void gemm_tiles(float* C, int64_t ldc, const uint16_t* A, int64_t sar, int64_t sac, const uint32_t* B,
                       int64_t ldb, int64_t M, int64_t N, int64_t Kp, bool accumulate, Pf* pf = nullptr) {
  static_assert(kTiles != Bf16Tiles::kFp32, "fp32 tiles use cpu::gemm");
  if constexpr (kTiles == Bf16Tiles::kAmxEmulated) {
    amx::gemm<amx::EmulatedTiles>(C, ldc, A, sar, sac, B, ldb, M, N, Kp, accumulate, pf);
  } else if constexpr (kTiles == Bf16Tiles::kAmx) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    amx::gemm<amx::AmxTiles>(C, ldc, A, sar, sac, B, ldb, M, N, Kp, accumulate, pf);
#else
    static_assert(kTiles != Bf16Tiles::kAmx, "AMX tiles need a variant compiled with AMX-TILE and AMX-BF16");
#endif
  } else {
    gemm_bf16<kTiles == Bf16Tiles::kEmulated>(C, ldc, A, sar, sac, B, ldb, M, N, Kp, accumulate, pf);
  }
}
#endif  // __AVX512F__

}  // namespace HTC_ISA_NS
}  // namespace htc::cpu
