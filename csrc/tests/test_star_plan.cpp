// ctest: the torch-free block-plan core against an element-wise brute force of the mask rule.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "star_attention/star_mask.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int seed) {
  if (!ok) {
    std::printf("FAIL seed=%d: %s\n", seed, what);
    ++failures;
  }
}

// A random sample: text, then images (VISUAL run + VOCO run), text between, padding on one side.
void random_layout(std::mt19937& rng, std::vector<int8_t>& kinds, std::vector<int32_t>& groups) {
  std::uniform_int_distribution<int> small(0, 9), images(0, 3), vis(1, 40), voco(0, 3);
  kinds.clear();
  groups.clear();
  auto push = [&](int8_t k, int32_t g, int n) {
    for (int i = 0; i < n; ++i) kinds.push_back(k), groups.push_back(g);
  };
  const bool left_pad = rng() & 1;
  const int pad = small(rng);
  if (left_pad) push(htc::kPad, -1, pad);
  push(htc::kText, -1, small(rng));
  const int n_img = images(rng);
  for (int g = 0; g < n_img; ++g) {
    push(htc::kVisual, g, vis(rng));
    push(htc::kVoco, g, voco(rng));
    push(htc::kText, -1, small(rng));
  }
  push(htc::kText, -1, 1 + small(rng));
  if (!left_pad) push(htc::kPad, -1, pad);
}

}  // namespace

// star_allowed_flat (the kernels' branch-free form) equals star_allowed on every combination of kinds,
// topology, key before / at / after the query, and same / other group.
void test_flat_rule() {
  int checked = 0;
  for (int topo = 0; topo < 2; ++topo)
    for (int ki = 0; ki < 4; ++ki)
      for (int kj = 0; kj < 4; ++kj)
        for (int64_t j = 3; j <= 5; ++j)
          for (int32_t gj = -1; gj <= 1; ++gj) {
            const int64_t i = 4;
            const int32_t gi = 0;
            const bool want = htc::star_allowed(i, j, static_cast<int8_t>(ki), gi, static_cast<int8_t>(kj), gj, topo);
            const bool got = htc::star_allowed_flat<int>(static_cast<int>(i), static_cast<int>(j), static_cast<int8_t>(ki),
                                                         gi, static_cast<int8_t>(kj), gj, topo);
            if (got != want) {
              std::fprintf(stderr, "star_allowed_flat(i=4, j=%lld, ki=%d, kj=%d, gj=%d, topo=%d) = %d, want %d\n",
                           static_cast<long long>(j), ki, kj, gj, topo, got, want);
              std::exit(1);
            }
            ++checked;
          }
  std::printf("star_allowed_flat == star_allowed on %d cases\n", checked);
}

int main() {
  test_flat_rule();
  std::mt19937 rng(1234);
  for (int seed = 0; seed < 400; ++seed) {
    std::vector<int8_t> kinds;
    std::vector<int32_t> groups;
    random_layout(rng, kinds, groups);
    const int64_t s = static_cast<int64_t>(kinds.size());
    const int64_t q_len = 1 + static_cast<int64_t>(rng() % s);
    const int64_t bq = 1 + rng() % 17, bk = 1 + rng() % 17;
    const int topo = static_cast<int>(rng() & 1);
    // Without a panel, then with the key panel (every TEXT/VOCO position, then -1; sometimes a whole
    // empty tile more), its tiles checked element by element in the mapped key order.
    std::vector<int32_t> panel;
    for (int64_t p = 0; p < s; ++p)
      if (kinds[p] == htc::kText || kinds[p] == htc::kVoco) panel.push_back(static_cast<int32_t>(p));
    const int64_t panel_len = (htc::ceil_div(static_cast<int64_t>(panel.size()), bk) + (rng() % 3 == 0)) * bk;
    panel.resize(panel_len, -1);
    for (const htc::KeyMap map : {htc::KeyMap{}, htc::KeyMap{panel.data(), panel_len, s}}) {
      const int64_t n_qt = (q_len + bq - 1) / bq, n_kt = htc::key_tiles(s, bk, map);
      std::vector<uint8_t> plan(n_qt * n_kt);
      htc::build_star_plan(kinds.data(), groups.data(), s, q_len, bq, bk, topo, plan.data(), map);
      const int64_t off = s - q_len;
      for (int64_t r = 0; r < q_len; ++r) {
        const int64_t p = r + off;
        std::vector<int> taken(s, 0);  // how often each key position is computed for this row
        for (int64_t j = 0; j < map.panel_len + s; ++j) {
          const htc::MappedKey key = htc::mapped_key(kinds.data(), groups.data(), map, j);
          const bool allowed = htc::star_allowed(p, key.pos, kinds[p], groups[p], key.kind, key.group, topo);
          const uint8_t tk = plan[(r / bq) * n_kt + j / bk];
          // What the kernels will compute for this element from the tile kind alone (with a panel a
          // DIAG row also needs its own key not to be a hole, i.e. a VISUAL row).
          bool computed = false;
          switch (tk) {
            case htc::kSkip: computed = false; break;
            case htc::kFull: computed = true; break;
            case htc::kCausal: computed = key.pos <= p; break;
            case htc::kDiag:
              expect(j >= map.panel_len, "DIAG panel tile", seed);
              computed = key.pos == p && kinds[p] != htc::kPad && (map.panel_len == 0 || kinds[p] == htc::kVisual);
              break;
            case htc::kMasked: computed = allowed; break;
            default: expect(false, "unknown tile kind", seed);
          }
          expect(computed == allowed, "tile kind disagrees with the element-wise rule", seed);
          if (computed != allowed) return 1;
          if (computed) ++taken[key.pos];
        }
        // Independently of the map: every key exactly as often as the rule allows it (0 or 1).
        for (int64_t j = 0; j < s; ++j) {
          const bool want = htc::star_allowed(p, j, kinds[p], groups[p], kinds[j], groups[j], topo);
          expect(taken[j] == static_cast<int>(want), "a key computed other than once per allowed pair", seed);
          if (taken[j] != static_cast<int>(want)) return 1;
        }
      }
    }
  }
  // Sizes never overflow: a block larger than the sequence is one tile (the torch ops bound block sizes
  // to kMaxBlock; the header itself must not compute (S + block - 1) / block, which wraps).
  {
    std::vector<int8_t> kinds;
    std::vector<int32_t> groups;
    random_layout(rng, kinds, groups);
    const int64_t s = static_cast<int64_t>(kinds.size()), huge = INT64_MAX - 5;
    expect(htc::ceil_div(s, huge) == 1 && htc::ceil_div(huge, 1) == huge && htc::ceil_div(0, 7) == 0,
           "ceil_div", -1);
    expect(htc::clamp_end(5, huge, s + 5) == s + 5 && htc::clamp_end(0, 3, 10) == 3, "clamp_end", -1);
    std::vector<uint8_t> one(1), ref(1);
    for (int topo = 0; topo < 2; ++topo) {
      htc::build_star_plan(kinds.data(), groups.data(), s, s, huge, huge, topo, one.data());
      htc::build_star_plan(kinds.data(), groups.data(), s, s, s, s, topo, ref.data());
      expect(one[0] == ref[0], "huge block sizes: one tile, as with block = S", -1);
    }
  }
  std::printf(failures ? "test_star_plan: FAILED\n" : "test_star_plan: 400 random layouts OK\n");
  return failures ? 1 : 0;
}
