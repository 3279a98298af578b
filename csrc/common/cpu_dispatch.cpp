// Runtime ISA dispatch (cpu_dispatch.h): CPUID/XGETBV feature detection and the choice of variant.
#include "common/cpu_dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

// The variants this build compiled (setup.py defines HTC_ISA_COMPILED_<name> for each).
#if defined(HTC_ISA_COMPILED_avx2)
HTC_DECLARE_CPU_KERNELS(isa_avx2)
#endif
#if defined(HTC_ISA_COMPILED_avx512)
HTC_DECLARE_CPU_KERNELS(isa_avx512)
#endif
#if defined(HTC_ISA_COMPILED_avx512_bf16)
HTC_DECLARE_CPU_KERNELS(isa_avx512_bf16)
#endif
#if defined(HTC_ISA_COMPILED_amx)
HTC_DECLARE_CPU_KERNELS(isa_amx)
#endif
#if defined(HTC_ISA_COMPILED_native)
HTC_DECLARE_CPU_KERNELS(isa_native)
#endif

namespace htc {
namespace {

// What the variants need, as setup.py compiles them (keep the two in step):
//   avx2         -march=x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE, and the OS saving ymm state
//   avx512       -march=x86-64-v4: + AVX512F/BW/CD/DQ/VL and the OS saving zmm/opmask state
//   avx512_bf16  + AVX512_BF16
//   amx          + AMX-TILE, AMX-BF16, the OS saving tile data, and Linux's per-process permission
struct Features {
  bool v3 = false, avx512 = false, avx512_bf16 = false, amx = false;
  std::string text, amx_note;
};

#if defined(__x86_64__) || defined(__i386__)
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux grants AMX tile data state per process, on request (arch_prctl ARCH_REQ_XCOMP_PERM); without
// it the first tile instruction faults.
bool request_amx(std::string* note) {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return true;
  *note = "the kernel refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
  return false;
#else
  *note = "AMX needs Linux's arch_prctl permission here";
  return false;
#endif
}
#endif

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), movbe = c & (1u << 22), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_ymm = (xcr0 & 0x6) == 0x6, os_zmm = (xcr0 & 0xe6) == 0xe6, os_tile = (xcr0 & 0x60000) == 0x60000;
  unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0, x;
  if (__get_cpuid_count(7, 0, &x, &b7, &c7, &d7)) __get_cpuid_count(7, 1, &a71, &x, &x, &x);
  bool lzcnt = false;
  if (__get_cpuid(0x80000001, &a, &b, &c, &d)) lzcnt = c & (1u << 5);
  const bool bmi1 = b7 & (1u << 3), avx2 = b7 & (1u << 5), bmi2 = b7 & (1u << 8);
  const bool f512 = b7 & (1u << 16), dq = b7 & (1u << 17), cd = b7 & (1u << 28), bw = b7 & (1u << 30),
             vl = b7 & (1u << 31);
  const bool bf16 = a71 & (1u << 5), amx_bf16 = d7 & (1u << 22), amx_tile = d7 & (1u << 24);
  f.v3 = avx && avx2 && fma && f16c && bmi1 && bmi2 && lzcnt && movbe && os_ymm;
  f.avx512 = f.v3 && f512 && dq && cd && bw && vl && os_zmm;
  f.avx512_bf16 = f.avx512 && bf16;
  std::string& t = f.text;
  auto add = [&t](bool on, const char* name) {
    if (on) t += t.empty() ? name : std::string(" ") + name;
  };
  add(avx2, "avx2");
  add(fma, "fma");
  add(f16c, "f16c");
  add(bmi2, "bmi2");
  add(os_ymm, "os:ymm");
  add(f512, "avx512f");
  add(bw, "avx512bw");
  add(dq, "avx512dq");
  add(vl, "avx512vl");
  add(cd, "avx512cd");
  add(os_zmm, "os:zmm");
  add(bf16, "avx512_bf16");
  add(amx_tile, "amx_tile");
  add(amx_bf16, "amx_bf16");
  add(os_tile, "os:tile");
  if (f.avx512_bf16 && amx_tile && amx_bf16 && os_tile) f.amx = request_amx(&f.amx_note);
#endif
  return f;
}

struct Variant {
  const char* name;
  CpuKernels kernels;
  bool (*runs)(const Features&);
};

// Lowest first: auto-selection takes the last one that runs.
const Variant kVariants[] = {
#if defined(HTC_ISA_COMPILED_avx2)
    {"avx2", HTC_CPU_KERNELS_OF(isa_avx2), [](const Features& f) { return f.v3; }},
#endif
#if defined(HTC_ISA_COMPILED_avx512)
    {"avx512", HTC_CPU_KERNELS_OF(isa_avx512), [](const Features& f) { return f.avx512; }},
#endif
#if defined(HTC_ISA_COMPILED_avx512_bf16)
    {"avx512_bf16", HTC_CPU_KERNELS_OF(isa_avx512_bf16), [](const Features& f) { return f.avx512_bf16; }},
#endif
#if defined(HTC_ISA_COMPILED_amx)
    {"amx", HTC_CPU_KERNELS_OF(isa_amx), [](const Features& f) { return f.amx; }},
#endif
#if defined(HTC_ISA_COMPILED_native)
    // Built with -march=$HTC_CPU_ARCH for one machine (opt-in): whatever that machine had. Only the
    // features this unit was compiled with, and that detect() knows, can be checked here.
    {"native", HTC_CPU_KERNELS_OF(isa_native),
     [](const Features& f) {
       bool ok = true;
#if defined(__AVX2__) && defined(__FMA__)
       ok &= f.v3;
#endif
#if defined(__AVX512F__)
       ok &= f.avx512;
#endif
#if defined(__AVX512BF16__)
       ok &= f.avx512_bf16;
#endif
#if defined(__AMX_TILE__)
       ok &= f.amx;
#endif
       (void)f;
       return ok;
     }},
#endif
};

const char* const kKnownNames[] = {"avx2", "avx512", "avx512_bf16", "amx", "native"};

struct Choice {
  CpuIsaStatus status;
  const CpuKernels* kernels = nullptr;
  Bf16Tiles bf16_tiles = Bf16Tiles::kFp32;
};

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s.empty() ? "none" : s;
}

// HTC_CPU_BF16_TILES for the chosen variant: "" / "0" / "fp32" (default: bf16 tiles widened to fp32, every
// variant), "1" / "dpbf16" (AVX512-BF16 dot products: the avx512_bf16 and amx variants), "emulate" (those
// products emulated with AVX-512F: any AVX-512 variant; for tests), "amx" (AMX-BF16 tiles: the amx
// variant), "amx_emulate" (the AMX tile code on an emulated tile unit: any AVX-512 variant; for tests).
// Anything else, or a mode the variant cannot run, is an error on every CPU op call: never a quiet
// substitute.
void choose_bf16_tiles(Choice& c) {
  CpuIsaStatus& st = c.status;
  const char* env = std::getenv("HTC_CPU_BF16_TILES");
  const std::string want = env ? env : "";
  const std::string& v = st.active;
#if defined(HTC_ISA_COMPILED_native) && defined(__AVX512BF16__)
  const bool native_bf16 = true;
#else
  const bool native_bf16 = false;
#endif
#if defined(HTC_ISA_COMPILED_native) && defined(__AVX512F__)
  const bool native_avx512 = true;
#else
  const bool native_avx512 = false;
#endif
#if defined(HTC_ISA_COMPILED_native) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  const bool native_amx = true;
#else
  const bool native_amx = false;
#endif
  const bool amx = v == "amx" || (v == "native" && native_amx);
  const bool dpbf16 = v == "avx512_bf16" || v == "amx" || (v == "native" && native_bf16);
  const bool avx512 = dpbf16 || v == "avx512" || (v == "native" && native_avx512);
  if (want.empty() || want == "0" || want == "fp32") {
    st.bf16_tiles = "fp32";
    return;
  }
  // Each mode: the values that name it, its name in hk.info(), whether the variant in use can run it.
  struct Mode {
    const char* name;
    const char* alias;  // or nullptr
    const char* status;
    Bf16Tiles tiles;
    bool runs;
    const char* needs;
  };
  const Mode modes[] = {
      {"dpbf16", "1", "dpbf16", Bf16Tiles::kDpbf16, dpbf16, "the avx512_bf16 or amx variant (AVX512-BF16)"},
      {"emulate", nullptr, "emulated", Bf16Tiles::kEmulated, avx512, "an AVX-512 variant"},
      {"amx", nullptr, "amx", Bf16Tiles::kAmx, amx, "the amx variant (AMX-TILE and AMX-BF16, granted by the OS)"},
      {"amx_emulate", nullptr, "amx_emulated", Bf16Tiles::kAmxEmulated, avx512, "an AVX-512 variant"},
  };
  std::string why = "is not a mode; use fp32 (default), dpbf16 (or 1), emulate, amx, amx_emulate";
  for (const Mode& m : modes) {
    if (want != m.name && !(m.alias && want == m.alias)) continue;
    if (m.runs) {
      st.bf16_tiles = m.status;
      c.bf16_tiles = m.tiles;
      return;
    }
    why = std::string("needs ") + m.needs + ", the variant in use is " + v;
    break;
  }
  st.error = "HTC_CPU_BF16_TILES=" + want + " " + why + " (CPU has: " + st.cpu_features + ")";
  st.active.clear();
  c.kernels = nullptr;
}

Choice choose() {
  Choice c;
  CpuIsaStatus& st = c.status;
  const Features f = detect();
  st.cpu_features = f.text + (f.amx_note.empty() ? "" : " (" + f.amx_note + ")");
  for (const Variant& v : kVariants) {
    st.compiled.push_back(v.name);
    if (v.runs(f)) st.runnable.push_back(v.name);
  }
  const char* env = std::getenv("HTC_CPU_ISA");
  st.requested = env ? env : "";
  if (st.requested.empty() || st.requested == "auto") {
    for (const Variant& v : kVariants)
      if (v.runs(f)) {
        st.active = v.name;
        c.kernels = &v.kernels;
      }
    if (!c.kernels)
      st.error = "no CPU kernel variant of this build runs on this CPU (built: " + joined(st.compiled) +
                 "; CPU has: " + (f.text.empty() ? "none of the features they need" : f.text) +
                 "); the reference and Triton backends remain";
    return c;
  }
  bool known = false;
  for (const char* n : kKnownNames) known |= st.requested == n;
  if (!known) {
    st.error = "HTC_CPU_ISA=" + st.requested + " is not a CPU kernel variant; use one of avx2, avx512, "
               "avx512_bf16, amx (those this build has: " + joined(st.compiled) + "), or unset it";
    return c;
  }
  for (const Variant& v : kVariants) {
    if (st.requested != v.name) continue;
    if (!v.runs(f)) {
      st.error = "HTC_CPU_ISA=" + st.requested + ": this CPU cannot run that variant (CPU has: " +
                 (f.text.empty() ? "none of the features it needs" : f.text) +
                 (f.amx_note.empty() ? "" : "; " + f.amx_note) + "); variants that run here: " +
                 joined(st.runnable);
      return c;
    }
    st.active = v.name;
    c.kernels = &v.kernels;
    return c;
  }
  st.error = "HTC_CPU_ISA=" + st.requested + ": this build has no such variant (it has: " + joined(st.compiled) +
             (st.compiled.size() == 1 && st.compiled[0] == "native"
                  ? "; it was built with HTC_CPU_ARCH for one machine: rebuild without HTC_CPU_ARCH for the "
                    "dispatched variants"
                  : "") +
             ")";
  return c;
}

const Choice& choice() {
  static const Choice c = [] {
    Choice c = choose();
    if (c.kernels) choose_bf16_tiles(c);
    return c;
  }();
  return c;
}

}  // namespace

const CpuKernels& cpu_kernels() {
  const Choice& c = choice();
  TORCH_CHECK_VALUE(c.kernels != nullptr, "htc_kernels CPU kernels: ", c.status.error);
  return *c.kernels;
}

const CpuIsaStatus& cpu_isa_status() { return choice().status; }

Bf16Tiles cpu_bf16_tiles() { return choice().bf16_tiles; }

}  // namespace htc
