// ctest: the CUDA star_attention kernels and their shared math, run on the host.
//  1. Shared math (star_tile_math.h, half_bits.h) against float64 / the compiler's _Float16.
//  2. The kernel bodies of star_attention_kernel.cuh executed by the SIMT emulator
//     (simt_emulator.h: fibers, PTX fragment semantics, randomised thread order, cp.async landing at
//     the wait) on random star layouts, against a float64 dense reference: fp32/bf16/fp16, every
//     head dim, GQA, decode (Sq < Skv), left/right padding, both topologies, strided inputs, split-K,
//     NaN/Inf planted in keys/values that the checked rows may not attend, and soft-capping.
// Nothing here needs a GPU; what it cannot show is listed in the report of the branch (timing, the
// hardware's own MMA accumulation order, real memory ordering).
//
//   HTC_EMU_QUICK=1   fewer cases (used while iterating)
#include "tests/simt_emulator.h"  // first: provides the simt primitives on the host

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "star_attention/star_attention_kernel.cuh"
#include "star_attention/star_mask.h"
#include "star_attention/star_tile_math.h"

namespace {

using htc::star_cuda::Elt;
using htc::star_cuda::EltT;
namespace sc = htc::star_cuda;
namespace emu = htc::simt::emu;

int failures = 0;
#define EXPECT(cond, ...)                       \
  do {                                          \
    if (!(cond)) {                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                 \
      std::printf("\n");                        \
      ++failures;                               \
    }                                           \
  } while (0)

const bool kQuick = std::getenv("HTC_EMU_QUICK") != nullptr;

// ------------------------------------------------------------------------------------------------
// 1. Shared math

void test_conversions() {
  // bf16: every pattern round-trips; float -> bf16 is round-to-nearest-even.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = htc::bits::bf16_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT(htc::bits::float_to_bf16(f) == h, "bf16 round trip %04x", h);
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 200000; ++i) {
    const float f = htc::bits::as_float(any(rng));
    if (std::isnan(f)) continue;
    // bf16 reference: the nearest of the two neighbours, ties to the even one.
    const uint16_t lo = static_cast<uint16_t>(htc::bits::as_u32(f) >> 16);
    const uint16_t hi = static_cast<uint16_t>(lo + 1);
    if (std::isinf(f)) continue;
    // The pattern after the largest finite bf16 is infinity; for rounding it stands for 2^128.
    auto value = [](uint16_t h) {
      const float x = htc::bits::bf16_to_float(h);
      return std::isinf(x) ? std::copysign(std::ldexp(1.0, 128), double(x)) : double(x);
    };
    const double dl = std::fabs(value(lo) - f), dh = std::fabs(value(hi) - f);
    const uint16_t want = (dl < dh || (dl == dh && (lo & 1) == 0)) ? lo : hi;
    const uint16_t got = htc::bits::float_to_bf16(f);
    EXPECT(got == want, "bf16 rounding of %a: %04x vs %04x", f, got, want);
#if defined(__FLT16_MAX__)
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    EXPECT(htc::bits::float_to_f16(f) == ref_bits, "f16 rounding of %a: %04x vs %04x", f,
           htc::bits::float_to_f16(f), ref_bits);
#endif
  }
#if defined(__FLT16_MAX__)
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 x;
    const uint16_t hb = static_cast<uint16_t>(h);
    std::memcpy(&x, &hb, 2);
    const float want = static_cast<float>(x), got = htc::bits::f16_to_float(hb);
    EXPECT((std::isnan(want) && std::isnan(got)) || want == got, "f16 -> f32 %04x", h);
  }
  // Small values around the subnormal range of fp16.
  std::uniform_real_distribution<float> tiny(-1e-4f, 1e-4f);
  for (int i = 0; i < 100000; ++i) {
    const float f = tiny(rng);
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    EXPECT(htc::bits::float_to_f16(f) == ref_bits, "f16 subnormal rounding of %a", f);
  }
#endif
  // Non-finite detection.
  EXPECT(htc::bits::nonfinite_bf16(0x7f80) && htc::bits::nonfinite_bf16(0xffc1) && !htc::bits::nonfinite_bf16(0x7f7f),
         "bf16 nonfinite");
  EXPECT(htc::bits::nonfinite_f16(0x7c00) && htc::bits::nonfinite_f16(0xfe00) && !htc::bits::nonfinite_f16(0x7bff),
         "f16 nonfinite");
  EXPECT(htc::bits::nonfinite_f32(0x7f800000u) && !htc::bits::nonfinite_f32(0x7f7fffffu), "f32 nonfinite");
}

void test_split3() {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ex(-30.f, 30.f);
  double worst = 0, worst_prod = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = nd(rng) * std::exp2(ex(rng)), y = nd(rng) * std::exp2(ex(rng));
    const auto a = htc::tile::split3(x), b = htc::tile::split3(y);
    auto f = [](uint16_t h) { return double(htc::bits::bf16_to_float(h)); };
    const double rx = f(a.hi) + f(a.mid) + f(a.lo);
    worst = std::max(worst, std::fabs(rx - x) / std::fabs(double(x)));
    // the six kept products, as the tensor cores form them (exact products, fp32 sums)
    const double prod = f(a.hi) * f(b.hi) + f(a.hi) * f(b.mid) + f(a.mid) * f(b.hi) + f(a.hi) * f(b.lo) +
                        f(a.lo) * f(b.hi) + f(a.mid) * f(b.mid);
    worst_prod = std::max(worst_prod, std::fabs(prod - double(x) * y) / std::fabs(double(x) * y));
  }
  EXPECT(worst <= std::exp2(-24), "split3 reconstruction error %g", worst);
  EXPECT(worst_prod <= std::exp2(-21), "split3 product error %g", worst_prod);
  std::printf("split3: reconstruction error <= %.3g, product error <= %.3g\n", worst, worst_prod);
}

// tile::softcap against float64: the capped score (relative to the cap: what the softmax sees) and
// its derivative 1 - tanh^2, over scores from tiny to far past the cap, infinities included.
void test_softcap_math() {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> ex(-30.f, 30.f);
  double worst_s = 0, worst_ds = 0;
  for (int i = 0; i < 200000; ++i) {
    const float cap = std::exp2(ex(rng) / 4), s = (rng() % 2 ? 1.f : -1.f) * cap * std::exp2(ex(rng) / 3);
    const auto c = htc::tile::softcap(s, cap, 1.f / cap);
    const double t = std::tanh(double(s) / double(cap));
    worst_s = std::max(worst_s, std::fabs(c.s - double(cap) * t) / cap);
    worst_ds = std::max(worst_ds, std::fabs(c.ds - (1 - t * t)));
  }
  for (float s : {INFINITY, -INFINITY}) {
    const auto c = htc::tile::softcap(s, 3.f, 1.f / 3.f);
    EXPECT(c.s == std::copysign(3.f, s) && c.ds == 0.f, "softcap(%g) = %g, %g", s, c.s, c.ds);
  }
  EXPECT(worst_s < 1e-6 && worst_ds < 1e-6, "softcap: score error %g, derivative error %g", worst_s, worst_ds);
  std::printf("softcap: score error <= %.2g (of the cap), derivative error <= %.2g\n", worst_s, worst_ds);
}

// Online softmax over random chunkings of a row (masked entries, empty chunks, all-masked rows) vs
// float64; then the same rows split into parts and merged with the split-K combine.
void test_online_softmax_and_combine() {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 3.f);
  double worst_o = 0, worst_l = 0, worst_co = 0, worst_cl = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 300), dv = 4;
    std::vector<float> s(n), v(static_cast<size_t>(n) * dv);
    std::vector<char> allow(n);
    const int mode = trial % 4;  // 0: dense, 1: sparse, 2: nothing allowed, 3: one allowed
    for (int j = 0; j < n; ++j) {
      s[j] = nd(rng);
      allow[j] = mode == 0 ? 1 : mode == 1 ? (rng() % 5 == 0) : 0;
      for (int d = 0; d < dv; ++d) v[j * dv + d] = nd(rng);
    }
    if (mode == 3) allow[rng() % n] = 1;
    const bool live = trial % 8 != 2;  // an empty row is a PAD row or a live one (all scores -inf)
    // float64 reference (natural log domain)
    double mx = -INFINITY;
    for (int j = 0; j < n; ++j)
      if (allow[j]) mx = std::max(mx, double(s[j]));
    double l = 0, o[4] = {0, 0, 0, 0};
    for (int j = 0; j < n; ++j)
      if (allow[j]) {
        const double e = std::exp(double(s[j]) - mx);
        l += e;
        for (int d = 0; d < dv; ++d) o[d] += e * v[j * dv + d];
      }
    const bool empty = l == 0;
    const double ref_lse = empty ? -INFINITY : mx + std::log(l);
    // kernel math: scores in the log2 domain, chunks of random size
    auto run = [&](int j0, int j1, float* out, float* lse_out) {
      float m = htc::tile::neg_inf(), lsum = 0, acc[4] = {0, 0, 0, 0};
      for (int c0 = j0; c0 < j1;) {
        const int c1 = std::min(j1, c0 + 1 + static_cast<int>(rng() % 70));
        float tmax = htc::tile::neg_inf();
        for (int j = c0; j < c1; ++j)
          if (allow[j]) tmax = std::max(tmax, s[j] * htc::tile::kLog2e);
        const auto u = htc::tile::row_step(m, tmax);
        float sum = 0;
        for (int d = 0; d < dv; ++d) acc[d] *= u.alpha;
        for (int j = c0; j < c1; ++j) {
          const float p = allow[j] ? exp2f(s[j] * htc::tile::kLog2e - u.ref) : 0.f;
          sum += p;
          if (allow[j])
            for (int d = 0; d < dv; ++d) acc[d] += p * v[j * dv + d];
        }
        lsum = lsum * u.alpha + sum;
        m = u.m_new;
        c0 = c1;
      }
      const float inv = htc::tile::row_inv(lsum, live);
      for (int d = 0; d < dv; ++d) out[d] = acc[d] * inv;
      *lse_out = htc::tile::row_lse(m, lsum);
    };
    float out[4], lse;
    run(0, n, out, &lse);
    if (empty) {  // PAD: exact zeros; live: the reference's 0/0
      EXPECT(lse == htc::tile::neg_inf() && (live ? std::isnan(out[0]) && std::isnan(out[3]) : out[0] == 0 && out[3] == 0),
             "empty %s row: lse %g out %g", live ? "live" : "PAD", lse, out[0]);
    } else {
      worst_l = std::max(worst_l, std::fabs(lse - ref_lse) / std::max(1.0, std::fabs(ref_lse)));
      for (int d = 0; d < dv; ++d) worst_o = std::max(worst_o, std::fabs(out[d] - o[d] / l) / (std::fabs(o[d] / l) + 1e-3));
    }
    // split-K: up to 5 parts (some empty), combined in order
    const int parts = 1 + static_cast<int>(rng() % 5);
    std::vector<float> po(static_cast<size_t>(parts) * dv), pl(parts);
    for (int k = 0; k < parts; ++k) run(n * k / parts, n * (k + 1) / parts, &po[k * dv], &pl[k]);
    const float clse = htc::tile::combine_lse(pl.data(), 1, parts);
    float co[4] = {0, 0, 0, 0};
    for (int k = 0; k < parts; ++k) {
      const float w = htc::tile::combine_weight(pl[k], clse);
      if (w == 0.f) continue;
      for (int d = 0; d < dv; ++d) co[d] += w * po[k * dv + d];
    }
    if (empty) {
      EXPECT(clse == htc::tile::neg_inf() && (live ? std::isnan(co[0]) : co[0] == 0), "empty combined %s row",
             live ? "live" : "PAD");
    } else {
      worst_cl = std::max(worst_cl, std::fabs(clse - ref_lse) / std::max(1.0, std::fabs(ref_lse)));
      for (int d = 0; d < dv; ++d) worst_co = std::max(worst_co, std::fabs(co[d] - o[d] / l) / (std::fabs(o[d] / l) + 1e-3));
    }
  }
  EXPECT(worst_o < 1e-4 && worst_l < 1e-5, "online softmax: out %g lse %g", worst_o, worst_l);
  EXPECT(worst_co < 1e-4 && worst_cl < 1e-5, "split-K combine: out %g lse %g", worst_co, worst_cl);
  // A +inf (or NaN) score: the step's p = exp2(inf - inf) makes l NaN; lse is NaN, as the reference's
  // softmax (never the -inf of a row that attended nothing, which would make the backward's p infinite),
  // and a NaN part makes the combined lse NaN whatever the others saw.
  {
    const float inf = __builtin_huge_valf();
    const auto u = htc::tile::row_step(htc::tile::neg_inf(), inf);
    const float l = exp2f(inf - u.ref) + exp2f(1.f - u.ref);
    const float parts[3] = {htc::tile::neg_inf(), htc::tile::row_lse(u.m_new, l), 0.5f};
    EXPECT(std::isnan(htc::tile::row_lse(u.m_new, l)) && htc::tile::row_lse(1.f, 0.f) == htc::tile::neg_inf() &&
               std::isnan(htc::tile::combine_lse(parts, 1, 2)) && std::isnan(htc::tile::combine_lse(parts, 1, 3)),
           "row_lse / combine_lse of a row with a +inf score");
  }
  std::printf("online softmax: out %.2g lse %.2g; combine: out %.2g lse %.2g (relative)\n", worst_o, worst_l,
              worst_co, worst_cl);
}

// ------------------------------------------------------------------------------------------------
// 2. Kernels on the emulator

// A random sample: text (at least text_prefix tokens first), images (VISUAL run + VOCO run), text
// between, padding on one side.
void random_layout(std::mt19937& rng, int min_len, std::vector<int8_t>& kinds, std::vector<int32_t>& groups,
                   bool left_pad, int pad, int text_prefix) {
  kinds.clear();
  groups.clear();
  auto push = [&](int8_t k, int32_t g, int n) {
    for (int i = 0; i < n; ++i) kinds.push_back(k), groups.push_back(g);
  };
  if (left_pad) push(htc::kPad, -1, pad);
  push(htc::kText, -1, text_prefix + static_cast<int>(rng() % 10));
  const int n_img = 1 + static_cast<int>(rng() % 3);
  for (int g = 0; g < n_img; ++g) {
    push(htc::kVisual, g, 1 + static_cast<int>(rng() % 80));
    push(htc::kVoco, g, static_cast<int>(rng() % 3));
    push(htc::kText, -1, static_cast<int>(rng() % 6));
  }
  push(htc::kText, -1, 1 + static_cast<int>(rng() % 8));
  while (static_cast<int>(kinds.size()) + (left_pad ? 0 : pad) < min_len) push(htc::kText, -1, 1);
  if (!left_pad) push(htc::kPad, -1, pad);
}

struct Case {
  std::string name;
  int B = 1, Hq = 2, Hkv = 1, Sq = 0, Skv = 0, D = 64, plan_batch = 1, topology = 0, n_split = 1;
  int split_min = 1;      // split-K: the fewest tiles per part (star_attention_kernel.cuh split_parts)
  bool strided = false;   // q/k/v stored [B, S, H, D] (HF's transpose(1, 2) views)
  bool poison = false;    // NaN/Inf in keys/values that the checked rows may not attend
  bool backward = true;   // also dQ, dK, dV (with grad_lse, and NaN grad_out / grad_lse on PAD rows)
  float scale = 0.125f;
  float softcap = 0.f;    // > 0: the kernels with kCap, scores s -> c tanh(s / c)
  bool panel = false;     // plan in the TEXT/VOCO key panel order (star_mask.h KeyMap)
  bool three = false;     // the row kernels' three-CTA builds (RowCfg::kThree; the default where none)
  bool empty_live = false;  // each sample's first live row sees only -inf scores (run_case)
  bool inf_value = false;   // +inf in a text key's value that later rows attend (run_case)
  bool poison_row = false;  // a live row per sample with +inf in q and NaN in grad_out (run_case)
  int text_prefix = 0;      // the layout's first text run has at least this many tokens
  uint64_t seed = 1;
};

// The float64 reference's score: scale * q.k, soft-capped when the case asks for it; *dcap gets
// d capped / d score.
double ref_score(const Case& c, double qk, double* dcap = nullptr) {
  const double s = qk * c.scale;
  if (c.softcap <= 0) {
    if (dcap) *dcap = 1;
    return s;
  }
  const double t = std::tanh(s / c.softcap);
  if (dcap) *dcap = 1 - t * t;
  return c.softcap * t;
}

struct Layout {
  std::vector<int8_t> kinds;    // [plan_batch, Skv]
  std::vector<int32_t> groups;  // [plan_batch, Skv]
};

// The kind of sample b's key position j (the layout has one sample, or one per sample).
int8_t kind_at(const Layout& L, const Case& c, int b, int64_t j) {
  return L.kinds[static_cast<size_t>(c.plan_batch == 1 ? 0 : b) * c.Skv + j];
}

bool allowed_at(const Layout& L, const Case& c, int b, int64_t qi, int64_t j) {
  const int bl = c.plan_batch == 1 ? 0 : b;
  const int8_t* k = L.kinds.data() + static_cast<size_t>(bl) * c.Skv;
  const int32_t* g = L.groups.data() + static_cast<size_t>(bl) * c.Skv;
  const int64_t p = qi + c.Skv - c.Sq;
  return htc::star_allowed(p, j, k[p], g[p], k[j], g[j], c.topology);
}

template <Elt E>
struct Tensors {
  using Store = typename EltT<E>::Store;
  std::vector<Store> q, k, v;
  int64_t q_s[3], k_s[3], v_s[3];  // batch, head, seq strides
};

template <Elt E>
void fill(const Case& c, std::mt19937& rng, Tensors<E>& t) {
  std::normal_distribution<float> nd(0.f, 1.f);
  auto make = [&](std::vector<typename EltT<E>::Store>& x, int64_t (&st)[3], int H, int S) {
    x.resize(static_cast<size_t>(c.B) * H * S * c.D);
    for (auto& e : x) e = sc::from_f<E>(nd(rng));
    if (c.strided) {  // storage [B, S, H, D]
      st[0] = static_cast<int64_t>(S) * H * c.D;
      st[1] = c.D;
      st[2] = static_cast<int64_t>(H) * c.D;
    } else {
      st[0] = static_cast<int64_t>(H) * S * c.D;
      st[1] = static_cast<int64_t>(S) * c.D;
      st[2] = c.D;
    }
  };
  make(t.q, t.q_s, c.Hq, c.Sq);
  make(t.k, t.k_s, c.Hkv, c.Skv);
  make(t.v, t.v_s, c.Hkv, c.Skv);
}

// Backward on the emulator (delta, dQ, dK/dV kernels, from the forward's own out and lse) against
// float64 gradients of sum(dO . O) + sum(grad_lse . lse). grad_out and grad_lse are NaN on PAD rows.
// Rows attending a poisoned key, and keys such rows attend, are not compared (their gradients are
// legitimately NaN); everything else must be finite and close.
template <Elt E, int D, bool kCap, bool kThree>
void check_backward(const Case& c, const Layout& L, const Tensors<E>& t, const std::vector<char>& poisoned,
                    const std::vector<int>& empty_key, const std::vector<char>& inf_key,
                    const std::vector<int>& bad_query, sc::StarParams p,
                    const std::vector<typename EltT<E>::Store>& out, const std::vector<float>& lse) {
  using Store = typename EltT<E>::Store;
  using Dq = sc::DqCfg<E, D, kCap, kThree>;
  using Dkv = sc::DkvCfg<E, D, kCap>;
  std::mt19937 rng(static_cast<uint32_t>(c.seed * 31 + 7));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t rows = static_cast<int64_t>(c.B) * c.Hq * c.Sq;
  auto row_pad = [&](int b, int i) { return kind_at(L, c, b, i + c.Skv - c.Sq) == htc::kPad; };
  std::vector<Store> dout(static_cast<size_t>(rows) * D);
  std::vector<float> glse(rows), delta(rows, NAN);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h)
      for (int i = 0; i < c.Sq; ++i) {
        const int64_t row = (static_cast<int64_t>(b) * c.Hq + h) * c.Sq + i;
        const bool pad = row_pad(b, i);
        glse[row] = pad ? NAN : 0.5f * nd(rng);
        for (int d = 0; d < D; ++d) dout[row * D + d] = sc::from_f<E>(pad ? NAN : nd(rng));
        if (i == bad_query[b]) dout[row * D + 1] = sc::from_f<E>(NAN);
      }
  std::vector<Store> dq(t.q.size(), sc::from_f<E>(NAN)), dk(t.k.size(), sc::from_f<E>(NAN)),
      dv(t.v.size(), sc::from_f<E>(NAN));
  p.dout = dout.data();
  p.do_sb = static_cast<int64_t>(c.Hq) * c.Sq * D, p.do_sh = static_cast<int64_t>(c.Sq) * D, p.do_ss = D;
  p.o = out.data();
  p.o_sb = p.do_sb, p.o_sh = p.do_sh, p.o_ss = p.do_ss;
  p.lse_in = lse.data();
  p.grad_lse = glse.data();
  p.delta = delta.data();
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.n_split = 1;
  p.split_min = 1;
  emu::add_global_range(dout.data(), dout.size() * sizeof(Store));
  emu::launch((rows + 7) / 8, 256, 0, [&](int tid, int64_t blk, unsigned char*) {
    sc::star_delta_warp<E, D>(p, blk * 8 + tid / 32, tid % 32);
  });
  const int64_t dq_grid = static_cast<int64_t>(c.B) * c.Hq * ((c.Sq + Dq::BQ - 1) / Dq::BQ) * Dq::kOSplit;
  emu::launch(dq_grid, Dq::kThreads, Dq::kSmemBytes,
              [&](int tid, int64_t blk, unsigned char* smem) { sc::star_row_block<Dq>(p, smem, tid, blk); });
  const int64_t kv_grid = static_cast<int64_t>(c.B) * c.Hkv * p.n_kt;
  emu::launch(kv_grid, Dkv::kThreads, Dkv::kSmemBytes,
              [&](int tid, int64_t blk, unsigned char* smem) { sc::star_key_block<Dkv>(p, smem, tid, blk); });

  // float64 reference
  auto Q = [&](int b, int h, int i, int d) { return double(sc::to_f<E>(t.q[b * t.q_s[0] + h * t.q_s[1] + i * t.q_s[2] + d])); };
  auto K = [&](int b, int h, int j, int d) { return double(sc::to_f<E>(t.k[b * t.k_s[0] + h * t.k_s[1] + j * t.k_s[2] + d])); };
  auto V = [&](int b, int h, int j, int d) { return double(sc::to_f<E>(t.v[b * t.v_s[0] + h * t.v_s[1] + j * t.v_s[2] + d])); };
  std::vector<double> rdq(t.q.size(), 0.0), rdk(t.k.size(), 0.0), rdv(t.v.size(), 0.0);
  std::vector<char> bad_row(rows, 0), bad_key(static_cast<size_t>(c.B) * c.Skv, 0), sees_inf(rows, 0);
  for (int b = 0; b < c.B; ++b)
    for (int j = 0; j < c.Skv; ++j) bad_key[static_cast<size_t>(b) * c.Skv + j] = poisoned[static_cast<size_t>(b) * c.Skv + j];
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / (c.Hq / c.Hkv);
      for (int i = 0; i < c.Sq; ++i) {
        const int64_t row = (static_cast<int64_t>(b) * c.Hq + h) * c.Sq + i;
        if (row_pad(b, i)) continue;
        std::vector<double> s(c.Skv, -INFINITY), pr(c.Skv, 0.0), dcap(c.Skv, 1.0);
        double mx = -INFINITY;
        bool bad = false;
        for (int j = 0; j < c.Skv; ++j) {
          if (!allowed_at(L, c, b, i, j)) continue;
          bad |= poisoned[static_cast<size_t>(b) * c.Skv + j] != 0;
          sees_inf[row] |= inf_key[static_cast<size_t>(b) * c.Skv + j] != 0;
          double a = 0;
          for (int d = 0; d < D; ++d) a += Q(b, h, i, d) * K(b, hk, j, d);
          s[j] = ref_score(c, a, &dcap[j]);
          mx = std::max(mx, s[j]);
        }
        bad |= i == bad_query[b];
        if (bad || mx == -INFINITY) {  // mx -inf: the row empty_key's (softmax 0/0, checked below)
          bad_row[row] = 1;
          for (int j = 0; j < c.Skv; ++j)
            if (allowed_at(L, c, b, i, j)) bad_key[static_cast<size_t>(b) * c.Skv + j] = 1;
          continue;
        }
        double l = 0;
        for (int j = 0; j < c.Skv; ++j)
          if (s[j] > -INFINITY) l += std::exp(s[j] - mx);
        const double lse_ref = mx + std::log(l);
        std::vector<double> o(D, 0.0);
        for (int j = 0; j < c.Skv; ++j) {
          if (s[j] == -INFINITY) continue;
          pr[j] = std::exp(s[j] - lse_ref);
          for (int d = 0; d < D; ++d) o[d] += pr[j] * V(b, hk, j, d);
        }
        double dlt = -double(glse[row]);
        for (int d = 0; d < D; ++d) dlt += double(sc::to_f<E>(dout[row * D + d])) * o[d];
        for (int j = 0; j < c.Skv; ++j) {
          if (pr[j] == 0.0) continue;
          double dpj = 0;
          for (int d = 0; d < D; ++d) dpj += double(sc::to_f<E>(dout[row * D + d])) * V(b, hk, j, d);
          const double ds = pr[j] * (dpj - dlt) * dcap[j];
          for (int d = 0; d < D; ++d) {
            rdq[b * t.q_s[0] + h * t.q_s[1] + i * t.q_s[2] + d] += c.scale * ds * K(b, hk, j, d);
            rdk[b * t.k_s[0] + hk * t.k_s[1] + j * t.k_s[2] + d] += c.scale * ds * Q(b, h, i, d);
            rdv[b * t.v_s[0] + hk * t.v_s[1] + j * t.v_s[2] + d] += pr[j] * double(sc::to_f<E>(dout[row * D + d]));
          }
        }
      }
    }
  // compare (dq/dk/dv are written contiguous [B, H, S, D]; the reference follows the input strides)
  auto compare = [&](const char* what, const std::vector<Store>& got, const std::vector<double>& want,
                     const int64_t (&st)[3], int H, int S, auto skip, auto zero) {
    double e2 = 0, r2 = 0;
    int nonfinite = 0, nonzero = 0;
    for (int b = 0; b < c.B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < S; ++i) {
          if (skip(b, h, i)) continue;
          for (int d = 0; d < D; ++d) {
            const double g = sc::to_f<E>(got[((static_cast<int64_t>(b) * H + h) * S + i) * D + d]);
            const double w = want[b * st[0] + h * st[1] + i * st[2] + d];
            if (!std::isfinite(g)) ++nonfinite;
            if (zero(b, h, i) && g != 0.0) ++nonzero;
            e2 += (g - w) * (g - w);
            r2 += w * w;
          }
        }
    const double rel = std::sqrt(e2 / std::max(r2, 1e-30));
    const double tol = E == Elt::kF32 ? 2e-5 : E == Elt::kF16 ? 5e-3 : 3e-2;
    std::printf("    %s rel %.2e%s\n", what, rel, rel <= tol && !nonfinite && !nonzero ? "" : "  <-- FAIL");
    EXPECT(nonfinite == 0, "%s %s: %d non-finite gradient entries", c.name.c_str(), what, nonfinite);
    EXPECT(nonzero == 0, "%s %s: %d non-zero entries on PAD rows/keys", c.name.c_str(), what, nonzero);
    EXPECT(rel <= tol, "%s %s: relative error %g > %g", c.name.c_str(), what, rel, tol);
  };
  auto key_pad = [&](int b, int j) { return kind_at(L, c, b, j) == htc::kPad; };
  // A row that sees an inf_key's -inf next to finite scores gets p = 0 and dS = 0 there, and dq's element
  // 0 is 0 * -inf = NaN (IEEE, as the Python reference's autograd): not compared, checked below.
  compare("dq", dq, rdq, t.q_s, c.Hq, c.Sq,
          [&](int b, int h, int i) {
            const int64_t row = (static_cast<int64_t>(b) * c.Hq + h) * c.Sq + i;
            return bad_row[row] != 0 || sees_inf[row] != 0;
          },
          [&](int b, int, int i) { return row_pad(b, i); });
  auto kskip = [&](int b, int, int j) { return bad_key[static_cast<size_t>(b) * c.Skv + j] != 0; };
  auto kzero = [&](int b, int, int j) { return key_pad(b, j); };
  compare("dk", dk, rdk, t.k_s, c.Hkv, c.Skv, kskip, kzero);
  compare("dv", dv, rdv, t.v_s, c.Hkv, c.Skv, kskip, kzero);
  // empty_key's row (every allowed score -inf): its softmax is NaN, so its dq row and the dk, dv rows of
  // the one key it attends are NaN throughout; the other rows that see an inf_key: NaN in dq's element
  // 0. The other inf_key's dk, dv rows: exact zeros.
  int wrong = 0;
  for (int b = 0; b < c.B; ++b) {
    if (empty_key[b] < 0) continue;
    const int j = empty_key[b];
    for (int x = 0; x < c.Skv; ++x) {
      if (x == j || !inf_key[static_cast<size_t>(b) * c.Skv + x]) continue;
      for (int hk = 0; hk < c.Hkv; ++hk)
        for (int d = 0; d < D; ++d) {
          const int64_t at = ((static_cast<int64_t>(b) * c.Hkv + hk) * c.Skv + x) * D + d;
          wrong += (sc::to_f<E>(dk[at]) != 0.f) + (sc::to_f<E>(dv[at]) != 0.f);
        }
    }
    for (int h = 0; h < c.Hq; ++h)
      for (int i = 0; i < c.Sq; ++i) {
        const int64_t row = (static_cast<int64_t>(b) * c.Hq + h) * c.Sq + i;
        if (!sees_inf[row]) continue;
        const Store* g = dq.data() + row * D;
        const bool own = i + c.Skv - c.Sq == j;
        for (int d = 0; d < D; ++d) wrong += (own || d == 0) != std::isnan(sc::to_f<E>(g[d]));
      }
    for (int hk = 0; hk < c.Hkv; ++hk)
      for (int d = 0; d < D; ++d) {
        const int64_t at = ((static_cast<int64_t>(b) * c.Hkv + hk) * c.Skv + j) * D + d;
        wrong += !std::isnan(sc::to_f<E>(dk[at])) + !std::isnan(sc::to_f<E>(dv[at]));
      }
  }
  EXPECT(wrong == 0, "%s: %d gradient entries of the -inf keys and their rows not as IEEE gives", c.name.c_str(),
         wrong);
  // bad_query's row (+inf in q: NaN scores, so NaN P and dS with every key it attends): those keys' dk and
  // dv are NaN throughout, through the exact path that keeps the row out of the MMAs.
  int not_nan = 0, seen = 0;
  for (int b = 0; b < c.B; ++b) {
    if (bad_query[b] < 0) continue;
    for (int j = 0; j < c.Skv; ++j) {
      if (!allowed_at(L, c, b, bad_query[b], j)) continue;
      ++seen;
      for (int hk = 0; hk < c.Hkv; ++hk)
        for (int d = 0; d < D; ++d) {
          const int64_t at = ((static_cast<int64_t>(b) * c.Hkv + hk) * c.Skv + j) * D + d;
          not_nan += !std::isnan(sc::to_f<E>(dk[at])) + !std::isnan(sc::to_f<E>(dv[at]));
        }
    }
  }
  EXPECT(not_nan == 0 && (seen > 0) == c.poison_row, "%s: %d dK/dV entries of the keys the +inf row attends not NaN",
         c.name.c_str(), not_nan);
}

template <Elt E, int D, bool kCap, bool kThree = false>
void run_case(const Case& c) {
  using Store = typename EltT<E>::Store;
  constexpr int BK = sc::fwd_block_k(E, D);
  using Cfg = sc::FwdCfg<E, D, kCap, kThree>;
  std::mt19937 rng(static_cast<uint32_t>(c.seed));
  Layout L;
  for (int bl = 0; bl < c.plan_batch; ++bl) {
    std::vector<int8_t> k;
    std::vector<int32_t> g;
    random_layout(rng, c.Skv, k, g, bl % 2 == 1, static_cast<int>(rng() % 7), c.text_prefix);
    k.resize(c.Skv, htc::kText);  // keep the requested length (a cut image is still a valid layout)
    g.resize(c.Skv, -1);
    L.kinds.insert(L.kinds.end(), k.begin(), k.end());
    L.groups.insert(L.groups.end(), g.begin(), g.end());
  }
  Tensors<E> t;
  fill<E>(c, rng, t);

  // Poison keys/values that some rows may not attend with NaN/Inf in K and V; rows that do attend
  // one are not compared (their output is legitimately non-finite).
  std::vector<char> poisoned(static_cast<size_t>(c.B) * c.Skv, 0);
  if (c.poison) {
    for (int b = 0; b < c.B; ++b)
      for (int j = 0; j < c.Skv; ++j) {
        const int bl = c.plan_batch == 1 ? 0 : b;
        const int8_t kj = L.kinds[static_cast<size_t>(bl) * c.Skv + j];
        const int32_t gj = L.groups[static_cast<size_t>(bl) * c.Skv + j];
        // PAD keys; a third of image 0's visual keys (masked for text rows and the other visual rows,
        // in MASKED tiles); the last text key (masked for every earlier row of its tile: CAUSAL).
        const bool last_text = kj == htc::kText && j == c.Skv - 1;
        if (kj == htc::kPad || (kj == htc::kVisual && gj == 0 && rng() % 3 == 0) || last_text) {
          poisoned[static_cast<size_t>(b) * c.Skv + j] = 1;
          for (int hk = 0; hk < c.Hkv; ++hk)
            for (int d = 0; d < D; ++d) {
              const float bad = (d % 3 == 0) ? NAN : (d % 3 == 1 ? INFINITY : -INFINITY);
              if (rng() % 2) t.k[b * t.k_s[0] + hk * t.k_s[1] + j * t.k_s[2] + d] = sc::from_f<E>(bad);
              if (d % 5 == 0 || rng() % 2) t.v[b * t.v_s[0] + hk * t.v_s[1] + j * t.v_s[2] + d] = sc::from_f<E>(bad);
            }
        }
      }
  }

  // c.empty_live: each sample's first live position, a row that attends only itself, sees only -inf:
  // q[..., 0] > 0 on every row and that key's element 0 = -inf. Its output must be NaN (the softmax's
  // 0/0, as the Python reference), never a PAD row's zeros; the later rows see the key next to finite
  // scores (p = 0) and stay finite and compared. A second -inf key (inf_key) from a third of the way
  // in, seen by other rows too, none of them empty: its dK/dV rows are exact zeros (every p is 0), so
  // its scores must be -inf in all three kernels; fp32's three-term split of -inf has NaN terms
  // (star_attention_kernel.cuh, quad_dot).
  std::vector<int> empty_key(c.B, -1);
  std::vector<char> inf_key(static_cast<size_t>(c.B) * c.Skv, 0);
  if (c.empty_live) {
    for (int b = 0; b < c.B; ++b) {
      int j = 0;
      while (j < c.Skv && kind_at(L, c, b, j) == htc::kPad) ++j;
      if (j == c.Skv || j < c.Skv - c.Sq) continue;  // no live row, or not among the queries
      empty_key[b] = j;
      int j2 = -1;
      for (int x = c.Skv / 3; x < c.Skv && j2 < 0; ++x) {
        const int64_t qx = x - (c.Skv - c.Sq);
        if (x == j || qx < 0 || kind_at(L, c, b, x) == htc::kPad) continue;
        int seen_by = 0, finite_keys = 0;
        for (int64_t i = 0; i < c.Sq; ++i) seen_by += i != qx && allowed_at(L, c, b, i, x);
        for (int y = 0; y < c.Skv; ++y) finite_keys += y != x && y != j && allowed_at(L, c, b, qx, y);
        if (seen_by > 0 && finite_keys > 0) j2 = x;
      }
      EXPECT(j2 >= 0, "%s: no second -inf key found", c.name.c_str());
      for (int x : {j, j2}) {
        if (x < 0) continue;
        inf_key[static_cast<size_t>(b) * c.Skv + x] = 1;
        for (int hk = 0; hk < c.Hkv; ++hk) t.k[b * t.k_s[0] + hk * t.k_s[1] + x * t.k_s[2]] = sc::from_f<E>(-INFINITY);
      }
      for (int h = 0; h < c.Hq; ++h)
        for (int i = 0; i < c.Sq; ++i) {
          auto& x = t.q[b * t.q_s[0] + h * t.q_s[1] + i * t.q_s[2]];
          x = sc::from_f<E>(std::fabs(sc::to_f<E>(x)) + 0.5f);
        }
    }
    EXPECT(empty_key[0] >= 0, "%s: no empty live row made", c.name.c_str());
  }

  // c.inf_value: +inf in element 1 of the value of sample b's text key at position 20 + its padding
  // (inside the text prefix of c.text_prefix >= 30 tokens): every later live row attends it with a
  // finite score, so its output's element 1 is +inf (IEEE) and the rest finite. fp32's three-term split
  // of an infinity has NaN terms: such V rows are added back exactly in every tile kind, FULL ones
  // included (checked below that the plan has one).
  std::vector<int> inf_value_key(c.B, -1);
  if (c.inf_value) {
    for (int b = 0; b < c.B; ++b) {
      int j = 20;
      while (j < c.Skv && kind_at(L, c, b, j - 20) == htc::kPad) ++j;
      EXPECT(j < c.Skv && kind_at(L, c, b, j) == htc::kText, "%s: position %d is not text", c.name.c_str(), j);
      inf_value_key[b] = j;
      for (int hk = 0; hk < c.Hkv; ++hk) t.v[b * t.v_s[0] + hk * t.v_s[1] + j * t.v_s[2] + 1] = sc::from_f<E>(INFINITY);
    }
  }

  // c.poison_row: the query two before each sample's last live position holds +inf in q (and NaN in
  // grad_out: check_backward); the two keys after it are masked for it (causal) and attended by their own
  // rows, in its tile. Its output, its gradients and the dK/dV rows of the keys it attends are not
  // compared; every other key's must stay finite and exact: in dK += dS^T Q and dV += P^T dO the row
  // meets those keys' zeros (0 * Inf = NaN) unless it is kept out of the products.
  std::vector<int> bad_query(c.B, -1);
  if (c.poison_row) {
    for (int b = 0; b < c.B; ++b) {
      int last = c.Skv - 1;
      while (last >= 0 && kind_at(L, c, b, last) == htc::kPad) --last;
      const int i = last - 2 - (c.Skv - c.Sq);
      EXPECT(i >= 0 && kind_at(L, c, b, last - 2) != htc::kPad && !allowed_at(L, c, b, i, last),
             "%s: no row to poison", c.name.c_str());
      bad_query[b] = i;
      for (int h = 0; h < c.Hq; ++h) t.q[b * t.q_s[0] + h * t.q_s[1] + i * t.q_s[2]] = sc::from_f<E>(INFINITY);
    }
  }

  // Plan with the kernel's tile sizes; with c.panel in the key panel's order (each sample's TEXT/VOCO
  // positions, then -1, to a common multiple of BK).
  int panel_len = 0;
  std::vector<std::vector<int32_t>> panels(c.plan_batch);
  if (c.panel) {
    for (int bl = 0; bl < c.plan_batch; ++bl) {
      for (int j = 0; j < c.Skv; ++j) {
        const int8_t kj = L.kinds[static_cast<size_t>(bl) * c.Skv + j];
        if (kj == htc::kText || kj == htc::kVoco) panels[bl].push_back(j);
      }
      panel_len = std::max(panel_len, static_cast<int>(panels[bl].size() + BK - 1) / BK * BK);
    }
  }
  std::vector<int32_t> panel;
  for (auto& one : panels) {
    one.resize(panel_len, -1);
    panel.insert(panel.end(), one.begin(), one.end());
  }
  const int n_qt = (c.Sq + 63) / 64, n_kt = panel_len / BK + (c.Skv + BK - 1) / BK;
  std::vector<uint8_t> plan(static_cast<size_t>(c.plan_batch) * n_qt * n_kt);
  for (int bl = 0; bl < c.plan_batch; ++bl)
    htc::build_star_plan(L.kinds.data() + static_cast<size_t>(bl) * c.Skv, L.groups.data() + static_cast<size_t>(bl) * c.Skv,
                         c.Skv, c.Sq, 64, BK, c.topology, plan.data() + static_cast<size_t>(bl) * n_qt * n_kt,
                         htc::KeyMap{c.panel ? panel.data() + static_cast<size_t>(bl) * panel_len : nullptr, panel_len, c.Skv});

  if (c.inf_value && E == Elt::kF32 && !c.panel) {  // the case reaches a FULL tile holding the +inf
    int full = 0;
    for (int b = 0; b < c.plan_batch; ++b)
      for (int qt = 0; qt < n_qt; ++qt)
        full += plan[(static_cast<size_t>(b) * n_qt + qt) * n_kt + inf_value_key[b] / BK] == htc::kFull;
    EXPECT(full > 0, "%s: no FULL tile holds the +inf value", c.name.c_str());
  }
  const int64_t rows = static_cast<int64_t>(c.B) * c.Hq * c.Sq;
  std::vector<Store> out(static_cast<size_t>(rows) * D, sc::from_f<E>(NAN));
  std::vector<float> lse(rows, NAN), o_part, lse_part;
  std::vector<int32_t> n_parts;
  if (c.n_split > 1) {
    o_part.assign(static_cast<size_t>(c.n_split) * rows * D, NAN);
    lse_part.assign(static_cast<size_t>(c.n_split) * rows, NAN);
    n_parts.assign(static_cast<size_t>(c.B) * c.Hq * n_qt, -1);
  }
  sc::StarParams p{};
  p.q = t.q.data();
  p.k = t.k.data();
  p.v = t.v.data();
  p.q_sb = t.q_s[0], p.q_sh = t.q_s[1], p.q_ss = t.q_s[2];
  p.k_sb = t.k_s[0], p.k_sh = t.k_s[1], p.k_ss = t.k_s[2];
  p.v_sb = t.v_s[0], p.v_sh = t.v_s[1], p.v_ss = t.v_s[2];
  p.out = out.data();
  p.lse = lse.data();
  p.o_part = o_part.data();
  p.lse_part = lse_part.data();
  p.n_parts = n_parts.data();
  p.kinds = L.kinds.data();
  p.groups = L.groups.data();
  p.plan = plan.data();
  p.panel = c.panel ? panel.data() : nullptr;
  p.panel_len = panel_len;
  p.B = c.B, p.Hq = c.Hq, p.Hkv = c.Hkv, p.Sq = c.Sq, p.Skv = c.Skv, p.n_qt = n_qt, p.n_kt = n_kt;
  p.q_off = c.Skv - c.Sq, p.plan_batch = c.plan_batch, p.topology = c.topology, p.n_split = c.n_split;
  p.split_min = c.split_min;
  p.scale = c.scale;
  p.scale_log2 = c.scale * htc::tile::kLog2e;
  p.softcap = c.softcap;
  p.inv_softcap = c.softcap > 0 ? 1.f / c.softcap : 0.f;

  emu::clear_global_ranges();
  emu::add_global_range(t.q.data(), t.q.size() * sizeof(Store));
  emu::add_global_range(t.k.data(), t.k.size() * sizeof(Store));
  emu::add_global_range(t.v.data(), t.v.size() * sizeof(Store));
  emu::add_global_range(plan.data(), plan.size());  // prefetched (simt::prefetch_l1)
  emu::set_scheduling_seed(c.seed * 7919);
  const int64_t grid = static_cast<int64_t>(c.B) * c.Hq * n_qt * c.n_split * Cfg::kOSplit;
  emu::launch(grid, Cfg::kThreads, Cfg::kSmemBytes,
              [&](int tid, int64_t blk, unsigned char* smem) { sc::star_row_block<Cfg>(p, smem, tid, blk); });
  if (c.n_split > 1) {
    int single = 0, split = 0;
    for (int v : n_parts) {
      EXPECT(v >= 1 && v <= c.n_split, "%s: a tile's parts = %d", c.name.c_str(), v);
      ++(v == 1 ? single : split);
    }
    // Prefill split (split_min > 1) must reach both paths: tiles written directly and tiles combined.
    EXPECT(c.split_min == 1 || (single > 0 && split > 0), "%s: %d tiles of one part, %d split", c.name.c_str(),
           single, split);
    const int64_t n = rows * (D / 4);
    for (int64_t i = 0; i < n; ++i) sc::star_combine_thread<E, D>(p, i);
  }

  // float64 reference on the (rounded) inputs; rows attending a poisoned key are skipped.
  double err2 = 0, ref2 = 0, lse_err = 0, cap_effect2 = 0;  // cap_effect: |capped - uncapped| reference
  int checked = 0, skipped = 0;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / (c.Hq / c.Hkv);
      for (int i = 0; i < c.Sq; ++i) {
        const int64_t row = (static_cast<int64_t>(b) * c.Hq + h) * c.Sq + i;
        bool attends_poison = false;
        std::vector<double> s(c.Skv, -INFINITY), s_plain(c.Skv, -INFINITY);
        double mx = -INFINITY, mx_plain = -INFINITY;
        for (int j = 0; j < c.Skv; ++j) {
          if (!allowed_at(L, c, b, i, j)) continue;
          attends_poison |= poisoned[static_cast<size_t>(b) * c.Skv + j] != 0 || i == bad_query[b];
          double acc = 0;
          for (int d = 0; d < D; ++d)
            acc += double(sc::to_f<E>(t.q[b * t.q_s[0] + h * t.q_s[1] + i * t.q_s[2] + d])) *
                   double(sc::to_f<E>(t.k[b * t.k_s[0] + hk * t.k_s[1] + j * t.k_s[2] + d]));
          s[j] = ref_score(c, acc);
          s_plain[j] = acc * c.scale;
          mx = std::max(mx, s[j]);
          mx_plain = std::max(mx_plain, s_plain[j]);
        }
        if (attends_poison) {
          ++skipped;
          continue;
        }
        ++checked;
        std::vector<double> o(D, 0.0), o_plain(D, 0.0);
        double l = 0, l_plain = 0;
        for (int j = 0; j < c.Skv; ++j) {
          if (s[j] == -INFINITY) continue;
          const double e = std::exp(s[j] - mx), e_plain = std::exp(s_plain[j] - mx_plain);
          l += e;
          l_plain += e_plain;
          for (int d = 0; d < D; ++d) {
            const double vd = double(sc::to_f<E>(t.v[b * t.v_s[0] + hk * t.v_s[1] + j * t.v_s[2] + d]));
            o[d] += e * vd;
            o_plain[d] += e_plain * vd;
          }
        }
        for (int d = 0; d < D && l > 0; ++d) cap_effect2 += std::pow(o[d] / l - o_plain[d] / l_plain, 2);
        const double ref_lse = l > 0 ? mx + std::log(l) : -INFINITY;
        const bool pad_row = kind_at(L, c, b, i + c.Skv - c.Sq) == htc::kPad;
        if (l == 0) {
          EXPECT(lse[row] == -INFINITY, "%s: empty row %lld lse %g", c.name.c_str(), static_cast<long long>(row), lse[row]);
        } else {
          lse_err = std::max(lse_err, std::fabs(lse[row] - ref_lse) / std::max(1.0, std::fabs(ref_lse)));
        }
        for (int d = 0; d < D; ++d) {
          const double want = l > 0 ? o[d] / l : 0.0;
          const double got = sc::to_f<E>(out[row * D + d]);
          if (l == 0) {  // a PAD row: exact 0; a live row whose allowed scores are all -inf: NaN (0/0)
            EXPECT(pad_row ? got == 0.0 : std::isnan(got), "%s: empty %s row %lld col %d = %g", c.name.c_str(),
                   pad_row ? "PAD" : "live", static_cast<long long>(row), d, got);
            continue;
          }
          if (std::isinf(want)) {  // c.inf_value's element: IEEE's infinity, never NaN
            EXPECT(got == want, "%s: row %lld col %d = %g, IEEE gives %g", c.name.c_str(), static_cast<long long>(row), d,
                   got, want);
            continue;
          }
          if (!std::isfinite(got)) {
            EXPECT(false, "%s: non-finite output row %lld col %d", c.name.c_str(), static_cast<long long>(row), d);
            return;
          }
          err2 += (got - want) * (got - want);
          ref2 += want * want;
        }
      }
    }
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  if (c.softcap > 0) {  // the case must be one where ignoring the cap would fail
    const double effect = std::sqrt(cap_effect2 / std::max(ref2, 1e-30));
    EXPECT(effect > 0.1, "%s: the cap changes the output by only %g: not a test of it", c.name.c_str(), effect);
  }
  const double tol = E == Elt::kF32 ? 2e-6 : E == Elt::kF16 ? 2e-3 : 1.2e-2;
  std::printf("%-44s rel %.2e lse %.2e (%d rows, %d skipped)%s\n", c.name.c_str(), rel, lse_err, checked, skipped,
              rel <= tol && lse_err <= (E == Elt::kF32 ? 5e-6 : 1e-3) ? "" : "  <-- FAIL");
  EXPECT(rel <= tol, "%s: relative error %g > %g", c.name.c_str(), rel, tol);
  EXPECT(lse_err <= (E == Elt::kF32 ? 5e-6 : 1e-3), "%s: lse error %g", c.name.c_str(), lse_err);
  if (c.backward) check_backward<E, D, kCap, kThree>(c, L, t, poisoned, empty_key, inf_key, bad_query, p, out, lse);
}

// Capped kernels are emulated at D = 64, 128, 256 only (the capping code does not depend on D, the
// register-tight configurations do; fewer instantiations keep this test's compile time down).
template <Elt E>
void run_dim(int D, const Case& c) {
  const bool cap = c.softcap > 0;
  if (c.three) {  // 16-bit, uncapped (the builds differ from the capped ones only in kCap)
    if constexpr (E != Elt::kF32) {
      switch (D) {
        case 64: return run_case<E, 64, false, true>(c);
        case 80: return run_case<E, 80, false, true>(c);
        case 96: return run_case<E, 96, false, true>(c);
        case 128: return run_case<E, 128, false, true>(c);
        default: break;
      }
    }
    std::abort();
  }
  switch (D) {
    case 64: return cap ? run_case<E, 64, true>(c) : run_case<E, 64, false>(c);
    case 80: return cap ? std::abort() : run_case<E, 80, false>(c);
    case 96: return cap ? std::abort() : run_case<E, 96, false>(c);
    case 128: return cap ? run_case<E, 128, true>(c) : run_case<E, 128, false>(c);
    case 256: return cap ? run_case<E, 256, true>(c) : run_case<E, 256, false>(c);
    default: std::abort();
  }
}

void run(Elt e, const Case& c) {
  switch (e) {
    case Elt::kF32: return run_dim<Elt::kF32>(c.D, c);
    case Elt::kBF16: return run_dim<Elt::kBF16>(c.D, c);
    case Elt::kF16: return run_dim<Elt::kF16>(c.D, c);
  }
}

const char* elt_name(Elt e) { return e == Elt::kF32 ? "fp32" : e == Elt::kBF16 ? "bf16" : "fp16"; }

float inv_sqrt(int d) { return 1.f / std::sqrt(static_cast<float>(d)); }

// Runs case c under a name that says what it is: dtype, head dim, what the block tests, and the
// shape options that vary between cases.
void run_named(Elt e, const char* what, Case c) {
  c.name = std::string(elt_name(e)) + " D=" + std::to_string(c.D) + " " + what + " Sq=" + std::to_string(c.Sq) +
           "/" + std::to_string(c.Skv) + (c.topology ? " group" : " star") + (c.strided ? " strided" : "") +
           (c.panel ? " panel" : "") + (c.n_split > 1 ? " split=" + std::to_string(c.n_split) : "") +
           (c.poison ? " poison" : "");
  run(e, c);
}

void test_forward_kernels() {
  const Elt elts[] = {Elt::kBF16, Elt::kF16, Elt::kF32};
  // Prefill, every dtype and head dim: GQA 2:1 (1:1 at D = 96), both topologies, strided inputs.
  int n = 0;
  for (Elt e : elts)
    for (int d : {64, 80, 96, 128, 256}) {
      if (kQuick && d != 64 && d != 80) continue;
      const int i = ++n, s = 100 + 37 * (i % 3);
      run_named(e, "prefill", {.B = 2, .Hq = 2, .Hkv = d == 96 ? 2 : 1, .Sq = s, .Skv = s, .D = d, .plan_batch = 2,
                               .topology = i % 2, .strided = i % 3 == 1, .scale = inv_sqrt(d),
                               .seed = static_cast<uint64_t>(99 + i)});
    }
  // Decode (bottom-right aligned) with and without split-K; poisoned masked keys/values.
  for (Elt e : elts) {
    if (kQuick && e == Elt::kF32) continue;
    for (int variant = 0; variant < 4; ++variant) {
      const int d = variant % 2 ? 128 : 64, skv = 150 + 23 * variant;
      run_named(e, "decode", {.B = 2, .Hq = 4, .Hkv = 2,
                              .Sq = variant == 0 ? 1 : variant == 1 ? 3 : variant == 2 ? 70 : skv, .Skv = skv,
                              .D = d, .plan_batch = variant == 3 ? 1 : 2, .topology = variant % 2,
                              .n_split = variant <= 1 ? 3 : (variant == 2 ? 2 : 1), .poison = true,
                              .scale = variant == 3 ? 0.3f : inv_sqrt(d),
                              .seed = static_cast<uint64_t>(500 + variant + 10 * static_cast<int>(e))});
    }
  }
  // The TEXT/VOCO key panel order (several images per sample): prefill and decode with split-K, both
  // topologies, GQA, strided inputs, poisoned masked keys/values (PAD keys, holes' rows stay unread).
  for (Elt e : elts)
    for (int d : {64, 128}) {
      if (kQuick && (d != 64 || e == Elt::kF32)) continue;
      for (int variant = 0; variant < 3; ++variant) {
        const int skv = 190 + 29 * variant;
        run_named(e, "key panel", {.B = 2, .Hq = 4, .Hkv = 2, .Sq = variant == 1 ? 3 : variant == 2 ? 70 : skv,
                                   .Skv = skv, .D = d, .plan_batch = 2, .topology = variant % 2,
                                   .n_split = variant == 1 ? 3 : 1, .strided = variant == 2, .poison = true,
                                   .scale = inv_sqrt(d), .panel = true,
                                   .seed = static_cast<uint64_t>(1300 + d + variant + 10 * static_cast<int>(e))});
      }
    }
  // Prefill split-K of the long query tiles only (split_min > 1): tiles of one part are written by their
  // CTA, the others by the combine, and splits past a tile's parts exit before reading anything; with
  // and without the key panel, GQA, poisoned masked keys/values.
  for (Elt e : elts)
    for (int variant = 0; variant < 2; ++variant) {
      if (kQuick && e == Elt::kF32) continue;
      const int d = variant ? 128 : 64, s = 300 + 41 * variant;
      run_named(e, "prefill split", {.B = 2, .Hq = 4, .Hkv = 2, .Sq = s, .Skv = s, .D = d, .plan_batch = 2,
                                     .topology = variant, .n_split = 4,
                                     .split_min = e == Elt::kF32 ? 8 : 2,  // fp32's key tiles are 16 keys
                                     .poison = true, .scale = inv_sqrt(d), .panel = variant == 1,
                                     .seed = static_cast<uint64_t>(1700 + variant + 10 * static_cast<int>(e))});
    }
  // The row kernels' three-CTA builds (fewer pipeline stages than items per tile at D = 128: 3 in the
  // forward, 2 in dq; less unrolling): prefill and decode with split-K, GQA, both topologies, poisoned
  // masked keys/values, the key panel, strided inputs; forward and backward.
  static_assert(sc::FwdCfg<Elt::kBF16, 128, false, true>::kStages == 3 && sc::DqCfg<Elt::kBF16, 128, false, true>::kStages == 2,
                "the cases below are meant to run 3- and 2-stage pipelines of half tiles");
  for (Elt e : {Elt::kBF16, Elt::kF16})
    for (int d : {64, 80, 96, 128}) {
      if (kQuick && d != 128) continue;
      for (int variant = 0; variant < 2; ++variant) {
        const int skv = 210 + 37 * variant;
        run_named(e, "three CTAs", {.B = 2, .Hq = 4, .Hkv = 2, .Sq = variant ? 5 : skv, .Skv = skv, .D = d,
                                    .plan_batch = 2, .topology = (d / 16 + variant) % 2, .n_split = variant ? 3 : 1,
                                    .strided = d == 96, .poison = true, .scale = inv_sqrt(d),
                                    .panel = variant == 0 && d >= 96, .three = true,
                                    .seed = static_cast<uint64_t>(2100 + d + variant + 10 * static_cast<int>(e))});
      }
    }
  // A live row whose every allowed score is -inf (each sample's first live row, run_case): NaN output
  // and gradients, as the Python reference gives; the rows that also see its -inf key, or a second
  // one, stay finite.
  for (Elt e : elts)
    for (int variant = 0; variant < 2; ++variant) {
      const int d = variant ? 128 : 64, s = 120 + 17 * variant;
      run_named(e, "empty live row", {.B = 2, .Hq = 2, .Hkv = 1, .Sq = s, .Skv = s, .D = d, .plan_batch = 2,
                                      .topology = variant, .scale = inv_sqrt(d), .empty_live = true,
                                      .seed = static_cast<uint64_t>(2500 + variant + 10 * static_cast<int>(e))});
    }
  // An attended +inf value (forward only: the gradients of rows that see it are non-finite), in the
  // long text prefix: fp32 meets it in FULL tiles too. Prefill and decode with split-K.
  for (Elt e : elts)
    for (int variant = 0; variant < 2; ++variant) {
      const int d = variant ? 128 : 64, s = 140 + 9 * variant;
      run_named(e, "attended inf value",
                {.B = 2, .Hq = 2, .Hkv = 1, .Sq = variant ? 3 : s, .Skv = s, .D = d, .plan_batch = 2,
                 .topology = variant, .n_split = variant ? 3 : 1, .backward = false, .scale = inv_sqrt(d),
                 .inf_value = true, .text_prefix = 40,
                 .seed = static_cast<uint64_t>(2600 + variant + 10 * static_cast<int>(e))});
    }
  // A live row holding +inf in q and NaN in grad_out: the keys it may not attend keep finite, exact dK/dV.
  // Prefill, both topologies, GQA.
  for (Elt e : elts)
    for (int variant = 0; variant < 2; ++variant) {
      const int d = variant ? 128 : 64, s = 130 + 11 * variant;
      run_named(e, "poisoned live row", {.B = 2, .Hq = 2, .Hkv = 1, .Sq = s, .Skv = s, .D = d, .plan_batch = 2,
                                         .topology = variant, .scale = inv_sqrt(d), .poison_row = true,
                                         .seed = static_cast<uint64_t>(2700 + variant + 10 * static_cast<int>(e))});
    }
  // Soft-capping (the kCap kernels): scores of standard deviation 4 against caps of 2 and 4, so that
  // many are capped hard; prefill and decode with split-K, both topologies, GQA, poisoned masked keys/values
  // (prefill: many rows stay checked; decode: every row and key checked).
  for (Elt e : elts)
    for (int d : {64, 128, 256}) {
      if (kQuick && d != 64) continue;
      for (int variant = 0; variant < 2; ++variant) {
        const int skv = 110 + 31 * variant;
        const float sd4 = 4.f / std::sqrt(static_cast<float>(d));  // scores of standard deviation 4
        run_named(e, variant ? "softcap=4" : "softcap=2",
                  {.B = 2, .Hq = 2, .Hkv = variant ? 1 : 2, .Sq = variant ? 2 : skv, .Skv = skv, .D = d,
                   .plan_batch = 2, .topology = variant, .n_split = variant ? 3 : 1, .strided = d == 128,
                   .poison = variant == 0, .scale = sd4, .softcap = variant ? 4.f : 2.f,
                   .seed = static_cast<uint64_t>(900 + d + variant + 10 * static_cast<int>(e))});
      }
    }
}

}  // namespace

int main() {
  test_conversions();
  test_split3();
  test_online_softmax_and_combine();
  test_softcap_math();
  test_forward_kernels();
  std::printf("emulated warp collectives: %llu\n", static_cast<unsigned long long>(emu::M().collectives));
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all star CUDA kernel tests passed\n");
  return 0;
}
