// A CUDA block emulator for ctests (no GPU needed): runs each thread of a block as a fiber on one CPU
// thread and implements the primitives of csrc/common/simt.h with the PTX ISA's semantics, so the
// kernels' own source (written against simt.h) executes on the host.
//
// What it checks beyond computing the results:
//  - barriers: every thread of the block (of the warp, for warp collectives) must reach the same
//    barrier; a divergent collective, or a thread leaving while others wait, aborts with a message;
//  - races: between barriers, threads run in a random order (seeded), so a missing __syncthreads
//    shows up as a wrong result; shared memory starts filled with NaN bytes;
//  - cp.async: copies land only at cp.async.wait_group (a read before the wait sees the poison);
//    source ranges must lie in buffers registered with add_global_range (when any are registered);
//  - ldmatrix / cp.async shared addresses must be 16-byte aligned and inside the block's smem.
// Collectives of one warp must be the same call (tagged), as on hardware with a full mask.
#pragma once
#define HTC_SIMT_EMULATOR 1
#define HTC_DEV inline
#define HTC_UNROLL

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "common/half_bits.h"

// AddressSanitizer must be told about stack switches (else it reports false stack overflows).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define HTC_EMU_ASAN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#define HTC_EMU_ASAN_START(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define HTC_EMU_ASAN_FINISH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define HTC_EMU_ASAN_UNPOISON(p, n) ((void)0)
#define HTC_EMU_ASAN_START(save, bottom, size) ((void)0)
#define HTC_EMU_ASAN_FINISH(save, bottom, size) ((void)0)
#endif

#if defined(__x86_64__)
// Minimal context switch (System V x86-64): saves callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *save_sp and resumes the stack `new_sp`.
// About 20x faster than swapcontext, which makes a system call per switch.
extern "C" void htc_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl htc_emu_switch
.type htc_emu_switch,@function
htc_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size htc_emu_switch,.-htc_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#endif

namespace htc::simt {

struct U128 {
  uint32_t w[4];
};

namespace emu {

constexpr int kMaxThreads = 256;
constexpr size_t kStackBytes = size_t{1} << 20;

struct Pending {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  std::vector<char> stack;
  void* asan_fake = nullptr;  // AddressSanitizer's fake-stack handle while switched out
  int tid = 0;
  bool done = false;
  std::vector<Pending> open;
  std::vector<std::vector<Pending>> groups;
};

struct Barrier {
  int arrived = 0;
  uint64_t gen = 0;
  int acc_or = 0, acc_count = 0, result_or = 0, result_count = 0;
  std::vector<int> waiters;  // fibers blocked here, made runnable when the last one arrives
};

struct Warp {
  Barrier bar;
  int tag[32];
  alignas(16) unsigned char slot[32][64];
};

struct Machine {
  int nthreads = 0;
  int64_t block = 0;
  std::vector<Fiber> fibers;
  Barrier block_bar;
  Warp warps[kMaxThreads / 32];
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  int current = -1;
  const void* sched_bottom = nullptr;  // the scheduler's stack (for AddressSanitizer)
  size_t sched_size = 0;
  std::function<void(int)> body;
  std::mt19937_64 rng{12345};
  std::vector<int> runnable;  // fibers ready to run (not done, not blocked)
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<std::pair<const char*, const char*>> globals;
  uint64_t collectives = 0;
};

inline Machine& M() {
  static Machine m;
  return m;
}

[[noreturn]] inline void fail(const char* what, const char* more = "") {
  std::fprintf(stderr, "simt emulator: %s%s (block %lld, thread %d)\n", what, more,
               static_cast<long long>(M().block), M().current >= 0 ? M().fibers[M().current].tid : -1);
  std::abort();
}

inline Fiber& self() { return M().fibers[M().current]; }
inline int tid() { return self().tid; }
inline int lane() { return tid() & 31; }

inline void yield() {
  Machine& m = M();
  Fiber& f = m.fibers[m.current];
  HTC_EMU_ASAN_START(&f.asan_fake, m.sched_bottom, m.sched_size);
#if defined(__x86_64__)
  htc_emu_switch(&f.sp, m.sched_sp);
#else
  swapcontext(&f.ctx, &m.sched);
#endif
  HTC_EMU_ASAN_FINISH(f.asan_fake, &m.sched_bottom, &m.sched_size);
}

extern "C" inline void htc_emu_fiber_main() {
  Machine& m = M();
  HTC_EMU_ASAN_FINISH(nullptr, &m.sched_bottom, &m.sched_size);
  Fiber& f = m.fibers[m.current];
  m.body(f.tid);
  f.done = true;
  HTC_EMU_ASAN_START(nullptr, m.sched_bottom, m.sched_size);  // this fiber's stack is done
#if defined(__x86_64__)
  htc_emu_switch(&f.sp, m.sched_sp);
  std::abort();  // never resumed
#endif
}

#if !defined(__x86_64__)
inline void fiber_entry_ucontext() { htc_emu_fiber_main(); }
#endif

// Arrive at `b` (participants threads); returns once all have arrived.
inline void arrive(Barrier& b, int participants) {
  Machine& m = M();
  if (++b.arrived == participants) {
    b.arrived = 0;
    b.result_or = b.acc_or;
    b.result_count = b.acc_count;
    b.acc_or = b.acc_count = 0;
    ++b.gen;
    m.runnable.insert(m.runnable.end(), b.waiters.begin(), b.waiters.end());
    b.waiters.clear();
    m.runnable.push_back(m.current);  // the last arriver too: others may now run before it
    yield();
    return;
  }
  b.waiters.push_back(m.current);
  yield();
}

inline void set_scheduling_seed(uint64_t seed) { M().rng.seed(seed); }

// Host buffers the kernels may read through cp.async (checked when at least one is registered).
inline void add_global_range(const void* p, size_t bytes) {
  M().globals.emplace_back(static_cast<const char*>(p), static_cast<const char*>(p) + bytes);
}
inline void clear_global_ranges() { M().globals.clear(); }

inline void check_smem(const void* p, size_t bytes, const char* what) {
  const Machine& m = M();
  const auto* c = static_cast<const unsigned char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(what);
  if (c < m.smem || c + bytes > m.smem + m.smem_bytes) fail(what);
}

inline void check_global(const void* p, size_t bytes, const char* what = "cp.async source") {
  const Machine& m = M();
  if (m.globals.empty()) return;
  const char* c = static_cast<const char*>(p);
  for (const auto& r : m.globals)
    if (c >= r.first && c + bytes <= r.second) return;
  fail(what, " outside every registered global buffer");
}

// Runs `body(tid, block, smem)` for every block of a 1-D grid, blocks one after another.
template <class Body>
void launch(int64_t grid, int threads, size_t smem_bytes, Body&& body) {
  Machine& m = M();
  if (threads <= 0 || threads > kMaxThreads || threads % 32 != 0) fail("block size must be a multiple of 32 <= 256");
  std::vector<unsigned char> smem(smem_bytes + 16);
  unsigned char* base = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
  m.fibers.resize(threads);
  for (auto& f : m.fibers)
    if (f.stack.size() != kStackBytes) f.stack.assign(kStackBytes, 0);
  for (int64_t blk = 0; blk < grid; ++blk) {
    std::memset(base, 0xff, smem_bytes);  // NaN in every float format: unwritten smem shows up
    m.nthreads = threads;
    m.block = blk;
    m.smem = base;
    m.smem_bytes = smem_bytes;
    m.block_bar = Barrier{};
    for (auto& w : m.warps) w.bar = Barrier{};
    m.body = [&](int t) { body(t, blk, base); };
    for (int t = 0; t < threads; ++t) {
      Fiber& f = m.fibers[t];
      f.tid = t;
      f.done = false;
      f.open.clear();
      f.groups.clear();
      HTC_EMU_ASAN_UNPOISON(f.stack.data(), f.stack.size());  // redzones of the previous block's frames
#if defined(__x86_64__)
      uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t{15};
      auto* sp = reinterpret_cast<uint64_t*>(top);
      *--sp = 0;  // fake return address of the fiber's main: keeps the ABI's stack alignment
      *--sp = reinterpret_cast<uint64_t>(&htc_emu_fiber_main);
      for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
      sp -= 2;
      reinterpret_cast<uint32_t*>(sp)[0] = 0x1f80;  // default MXCSR
      reinterpret_cast<uint16_t*>(sp)[2] = 0x037f;  // default x87 control word
      f.sp = sp;
#else
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &m.sched;
      makecontext(&f.ctx, fiber_entry_ucontext, 0);
#endif
    }
    m.runnable.clear();
    for (int t = 0; t < threads; ++t) m.runnable.push_back(t);
    for (;;) {
      if (m.runnable.empty()) {
        for (int t = 0; t < threads; ++t)
          if (!m.fibers[t].done) {
            m.current = t;
            fail("deadlock: threads wait at a barrier that not every thread reaches");
          }
        break;
      }
      // A random runnable fiber runs until it blocks: any order of the threads between two
      // barriers can come up, so a missing barrier shows as a wrong result.
      const size_t at = m.rng() % m.runnable.size();
      const int pick = m.runnable[at];
      m.runnable[at] = m.runnable.back();
      m.runnable.pop_back();
      m.current = pick;
      void* sched_fake = nullptr;
      HTC_EMU_ASAN_START(&sched_fake, m.fibers[pick].stack.data(), m.fibers[pick].stack.size());
#if defined(__x86_64__)
      htc_emu_switch(&m.sched_sp, m.fibers[pick].sp);
#else
      swapcontext(&m.sched, &m.fibers[pick].ctx);
#endif
      HTC_EMU_ASAN_FINISH(sched_fake, nullptr, nullptr);
    }
    m.current = -1;
  }
}

// ---- warp collectives: every lane writes its operand, waits, computes its result, waits ----

inline Warp& my_warp() { return M().warps[tid() / 32]; }

template <class P>
inline void put(const P& p, int tag) {
  static_assert(sizeof(P) <= 64, "collective payload too large");
  Warp& w = my_warp();
  std::memcpy(w.slot[lane()], &p, sizeof(P));
  w.tag[lane()] = tag;
  arrive(w.bar, 32);
  for (int l = 0; l < 32; ++l)
    if (w.tag[l] != tag) fail("lanes of one warp are in different collectives (divergent warp)");
}
template <class P>
inline P get(int src_lane) {
  P p;
  std::memcpy(&p, my_warp().slot[src_lane], sizeof(P));
  return p;
}
inline void done() {
  ++M().collectives;
  arrive(my_warp().bar, 32);
}

inline float elt(uint32_t reg, int half, bool fp16) {
  const auto h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return fp16 ? bits::f16_to_float(h) : bits::bf16_to_float(h);
}

}  // namespace emu

inline void sync_block() {
  emu::Machine& m = emu::M();
  emu::arrive(m.block_bar, m.nthreads);
}
inline int sync_block_or(int pred) {
  emu::Machine& m = emu::M();
  m.block_bar.acc_or |= pred != 0;
  emu::arrive(m.block_bar, m.nthreads);
  return m.block_bar.result_or;
}
inline int sync_block_count(int pred) {
  emu::Machine& m = emu::M();
  m.block_bar.acc_count += pred != 0;
  emu::arrive(m.block_bar, m.nthreads);
  return m.block_bar.result_count;
}
inline void sync_warp() {
  emu::put(0, 1);
  emu::done();
}
inline float shfl_xor(float v, int lane_mask) {
  emu::put(v, 2);
  const float r = emu::get<float>(emu::lane() ^ lane_mask);
  emu::done();
  return r;
}
inline float shfl_idx(float v, int src_lane) {
  emu::put(v, 3);
  const float r = emu::get<float>(src_lane & 31);
  emu::done();
  return r;
}
inline unsigned ballot(int pred) {
  emu::put(pred != 0 ? 1 : 0, 4);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= static_cast<unsigned>(emu::get<int>(l)) << l;
  emu::done();
  return r;
}
inline bool any_warp(int pred) { return ballot(pred) != 0; }
inline int popc(unsigned x) { return __builtin_popcount(x); }
inline void opaque(unsigned&) {}

inline void copy16(void* dst, const void* src) { std::memcpy(dst, src, 16); }
inline U128 load16(const void* src) {
  U128 v;
  std::memcpy(&v, src, 16);
  return v;
}

template <int N, bool kTrans>
inline void ldsm(uint32_t (&r)[N], const void* p) {
  emu::check_smem(p, 16, "ldmatrix row address not 16-byte aligned or outside shared memory");
  emu::put(p, 10 + N * 2 + kTrans);
  const int l = emu::lane(), g = l >> 2, t = l & 3;
  for (int m = 0; m < N; ++m) {
    uint16_t lo, hi;
    if (!kTrans) {
      const auto* row = static_cast<const uint16_t*>(emu::get<const void*>(m * 8 + g));
      lo = row[2 * t];
      hi = row[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t*>(emu::get<const void*>(m * 8 + 2 * t))[g];
      hi = static_cast<const uint16_t*>(emu::get<const void*>(m * 8 + 2 * t + 1))[g];
    }
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  emu::done();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm<4, false>(r, p); }
inline void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ldsm<4, true>(r, p); }
inline void ldsm_x2(uint32_t (&r)[2], const void* p) { ldsm<2, false>(r, p); }
inline void ldsm_x2_t(uint32_t (&r)[2], const void* p) { ldsm<2, true>(r, p); }

// mma.m16n8k16 with fp32 accumulation. Products of two bf16/fp16 values are exact in fp32; they are
// added to the accumulator in k order (the hardware's internal order and rounding are unspecified).
template <bool kFp16>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct In {
    uint32_t a[4], b[2];
  };
  emu::put(In{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, 20 + kFp16);
  const int l = emu::lane(), g = l >> 2, t = l & 3;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) {
      // A(row, k): lane (row%8)*4 + (k%8)/2, register (k>=8)*2 + (row>=8), half k%2
      const In ia = emu::get<In>((row & 7) * 4 + ((k & 7) >> 1));
      const float av = emu::elt(ia.a[(k >= 8 ? 2 : 0) + (row >= 8 ? 1 : 0)], k & 1, kFp16);
      // B(k, col): lane col*4 + (k%8)/2, register k>=8, half k%2
      const In ib = emu::get<In>(col * 4 + ((k & 7) >> 1));
      const float bv = emu::elt(ib.b[k >= 8 ? 1 : 0], k & 1, kFp16);
      acc += av * bv;
    }
    out[e] = acc;
  }
  emu::done();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
  emu::check_smem(smem, 16, "cp.async destination not 16-byte aligned or outside shared memory");
  if (src_bytes < 0 || src_bytes > 16) emu::fail("cp.async src-size out of range");
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) emu::fail("cp.async source not 16-byte aligned");
    emu::check_global(gmem, static_cast<size_t>(src_bytes));
  }
  emu::self().open.push_back({smem, gmem, src_bytes});
}
// A cache hint on the GPU; here the address is checked (a prefetch names a valid global byte).
inline void prefetch_l1(const void* p) { emu::check_global(p, 1, "prefetch address"); }
inline void cp_async_commit() {
  emu::Fiber& f = emu::self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  emu::Fiber& f = emu::self();
  while (static_cast<int>(f.groups.size()) > N) {
    for (const emu::Pending& c : f.groups.front()) {
      auto* dst = static_cast<unsigned char*>(c.dst);
      if (c.src_bytes > 0) std::memcpy(dst, c.src, static_cast<size_t>(c.src_bytes));
      std::memset(dst + c.src_bytes, 0, static_cast<size_t>(16 - c.src_bytes));
    }
    f.groups.erase(f.groups.begin());
  }
}

inline uint32_t pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(bits::float_to_bf16(lo)) | (static_cast<uint32_t>(bits::float_to_bf16(hi)) << 16);
}
inline uint32_t pack_f16(float lo, float hi) {
  return static_cast<uint32_t>(bits::float_to_f16(lo)) | (static_cast<uint32_t>(bits::float_to_f16(hi)) << 16);
}

}  // namespace htc::simt
