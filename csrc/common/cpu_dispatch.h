// Runtime ISA dispatch of the CPU kernels (README "CPU kernels"). The extension holds several compiled
// variants of the same kernel sources (setup.py: avx2, avx512, avx512_bf16, amx; or one "native" variant
// when built with HTC_CPU_ARCH); which one runs is decided once, when the extension loads, from CPUID
// (and the OS's consent to the register state), or forced with HTC_CPU_ISA=<variant>. A forced variant
// that is unknown, not compiled in, or that this CPU cannot run is an error on every CPU op call, never a
// quiet substitute. This unit is compiled for the baseline: nothing here may need more than x86-64.
#pragma once
#include <string>
#include <vector>

#include "common/cpu_kernels.h"

namespace htc {

// The chosen variant's kernels; throws (ValueError) with the reason when HTC_CPU_ISA asked for a
// variant that cannot run here, or when no compiled variant can.
const CpuKernels& cpu_kernels();

struct CpuIsaStatus {
  std::string active;                 // the variant in use ("" when none can run: see error)
  std::string error;                  // why none is in use ("" when one is)
  std::string requested;              // HTC_CPU_ISA as read at load ("" when unset)
  std::vector<std::string> compiled;  // the variants in this build, lowest first
  std::vector<std::string> runnable;  // those this CPU (and OS) can run
  std::string cpu_features;           // what CPUID/XGETBV said, the features the variants need
  std::string bf16_tiles;             // "fp32" | "dpbf16" | "emulated" | "amx" | "amx_emulated" (HTC_CPU_BF16_TILES)
};
const CpuIsaStatus& cpu_isa_status();  // decided on first call (the extension calls it at load)

}  // namespace htc
