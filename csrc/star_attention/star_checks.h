// Argument checks shared by the CPU and CUDA entry points. They raise c10::Error (RuntimeError in
// Python) with a message naming the problem; the Python wrappers validate first and raise ValueError,
// these are the last line for direct torch.ops.htc callers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "star_attention/star_mask.h"

namespace htc {

// The kernels read rows with unit stride; anything else is copied once.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline void check_plan_args(const at::Tensor& kinds, const at::Tensor& groups, int64_t q_len,
                            int64_t block_q, int64_t block_k, int64_t topology) {
  TORCH_CHECK(kinds.dim() == 2, "star_plan: kinds must be [B, S], got ", kinds.sizes());
  TORCH_CHECK(kinds.scalar_type() == at::kChar, "star_plan: kinds must be int8, got ",
              kinds.scalar_type());
  TORCH_CHECK(groups.scalar_type() == at::kInt, "star_plan: groups must be int32, got ",
              groups.scalar_type());
  TORCH_CHECK(groups.sizes() == kinds.sizes(), "star_plan: groups ", groups.sizes(),
              " must match kinds ", kinds.sizes());
  TORCH_CHECK(groups.device() == kinds.device(), "star_plan: kinds and groups on different devices");
  TORCH_CHECK(q_len >= 1 && q_len <= kinds.size(1), "star_plan: q_len ", q_len,
              " must be in [1, S=", kinds.size(1), "]");
  // Bounded like the attention ops': a plan is only ever consumed with the block sizes it was built for.
  TORCH_CHECK(block_q >= 1 && block_k >= 1 && block_q <= kMaxBlock && block_k <= kMaxBlock,
              "star_plan: block sizes must be in [1, ", kMaxBlock, "], got block_q=", block_q,
              ", block_k=", block_k);
  TORCH_CHECK(topology == 0 || topology == 1, "star_plan: topology must be 0 (star) or 1 (group)");
}

// panel None or int32 [Bl, P] (Bl: kinds' batch), P a multiple of block_k, on kinds' device: the key
// panel of StarLayout (positions of every TEXT and VOCO key in order, then -1). Shapes here;
// check_panel_values reads the values.
inline void check_panel_args(const char* op, const std::optional<at::Tensor>& panel, const at::Tensor& kinds,
                             int64_t block_k) {
  if (!panel) return;
  TORCH_CHECK(panel->scalar_type() == at::kInt && panel->dim() == 2 && panel->size(0) == kinds.size(0) &&
                  panel->size(1) % block_k == 0,
              op, ": panel must be int32 [B, P] (B = ", kinds.size(0), ", the kinds' batch) with P a multiple of "
              "block_k=", block_k, " (StarLayout.key_panel(block_k)), got ", panel->scalar_type(), " ",
              panel->sizes());
  TORCH_CHECK(panel->device() == kinds.device(), op, ": panel and kinds on different devices");
}

// Each sample's panel lists exactly its TEXT/VOCO positions, ascending, then -1 (every key has one
// slot in the mapped order: the kernels' exactness rests on it). CPU tensors (reads the values).
inline void check_panel_values(const at::Tensor& panel, const at::Tensor& kinds) {
  const auto pc = panel.contiguous();
  const auto kc = kinds.contiguous();
  const int64_t batch = kinds.size(0), seq_len = kinds.size(1), len = panel.size(1);
  const int32_t* pp = pc.data_ptr<int32_t>();
  const int8_t* kp = kc.data_ptr<int8_t>();
  for (int64_t b = 0; b < batch; ++b) {
    int64_t slot = 0;
    for (int64_t p = 0; p < seq_len; ++p) {
      if (kp[b * seq_len + p] != kText && kp[b * seq_len + p] != kVoco) continue;
      TORCH_CHECK(slot < len && pp[b * len + slot] == p, "star_plan: panel[", b, ", ", slot,
                  "] must be position ", p, " (the panel lists every TEXT/VOCO position in order, then -1)");
      ++slot;
    }
    for (; slot < len; ++slot)
      TORCH_CHECK(pp[b * len + slot] == -1, "star_plan: panel[", b, ", ", slot, "] = ", pp[b * len + slot],
                  " must be -1 (after the sample's TEXT/VOCO positions)");
  }
}

// scale: a finite float32 (the kernels take it as one: NaN, inf or 1e300 made every output NaN).
// softcap: 0 (no capping) or a cap c > 0 that is a normal float32 (scores become c * tanh(s / c); the
// kernels use 1/c, which must be finite).
inline void check_scalars(const char* op, double scale, double softcap) {
  TORCH_CHECK(std::abs(scale) <= std::numeric_limits<float>::max(), op,
              ": scale must be a finite float32, got ", scale);
  TORCH_CHECK(softcap == 0.0 || (softcap >= std::numeric_limits<float>::min() &&
                                 softcap <= std::numeric_limits<float>::max()),
              op, ": softcap must be 0 (no capping) or a positive normal float32 (",
              std::numeric_limits<float>::min(), " .. ", std::numeric_limits<float>::max(), "), got ", softcap);
}

// Every kind is a TokenKind (0..3). Reads the values (a device sync on a GPU): CPU entry points call it.
inline void check_kinds_values(const char* op, const at::Tensor& kinds) {
  if (kinds.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(kinds);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= 3, op,
              ": kinds must hold TokenKind values 0..3 (TEXT, VISUAL, VOCO, PAD), got values in [",
              lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
}

}  // namespace htc

namespace htc {

// q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], kinds/groups [Bl, Skv] with Bl in {1, B}, plan
// [Bl, ceil(Sq/block_q), P/block_k + ceil(Skv/block_k)] uint8, panel None (P = 0) or int32 [Bl, P].
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& kinds, const at::Tensor& groups,
                                 const at::Tensor& plan, int64_t block_q, int64_t block_k,
                                 int64_t topology, const std::optional<at::Tensor>& panel) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "star_attention: q, k, v must be 4-D [B, H, S, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "star_attention: q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "star_attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "star_attention: q and k disagree on batch or head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "star_attention: query heads must be a multiple of key/value heads");
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= k.size(2), "star_attention: need 1 <= Sq <= Skv");
  TORCH_CHECK(q.size(3) >= 1, "star_attention: head dim D must be >= 1, got ", q.size(3));
  // Kernels keep key-sequence positions in int32.
  TORCH_CHECK(k.size(2) <= std::numeric_limits<int32_t>::max(), "star_attention: Skv = ", k.size(2),
              " exceeds the int32 position range");
  TORCH_CHECK(kinds.dim() == 2 && kinds.size(1) == k.size(2) &&
                  (kinds.size(0) == 1 || kinds.size(0) == q.size(0)),
              "star_attention: kinds must be [1 or B, Skv], got ", kinds.sizes());
  TORCH_CHECK(kinds.scalar_type() == at::kChar && groups.scalar_type() == at::kInt &&
                  groups.sizes() == kinds.sizes(),
              "star_attention: kinds must be int8 and groups int32 of the same shape");
  TORCH_CHECK(block_q >= 1 && block_k >= 1 && block_q <= kMaxBlock && block_k <= kMaxBlock,
              "star_attention: block sizes must be in [1, ", kMaxBlock, "], got block_q=", block_q,
              ", block_k=", block_k);
  check_panel_args("star_attention", panel, kinds, block_k);
  const int64_t panel_tiles = panel ? panel->size(1) / block_k : 0;
  TORCH_CHECK(plan.scalar_type() == at::kByte && plan.dim() == 3 && plan.size(0) == kinds.size(0) &&
                  plan.size(1) == ceil_div(q.size(2), block_q) &&
                  plan.size(2) == panel_tiles + ceil_div(k.size(2), block_k),
              "star_attention: plan ", plan.sizes(), " does not match the problem, block sizes and panel");
  TORCH_CHECK(topology == 0 || topology == 1, "star_attention: topology must be 0 or 1");
  for (const at::Tensor* t : {&k, &v, &kinds, &groups, &plan})
    TORCH_CHECK(t->device() == q.device(), "star_attention: all tensors must be on ", q.device());
}

inline void check_backward_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                                const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse) {
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(),
              "star_attention_backward: dout must match q");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "star_attention_backward: out must match q");
  const std::vector<int64_t> stat{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(stat) && lse.scalar_type() == at::kFloat,
              "star_attention_backward: lse must be float32 [B, Hq, Sq]");
  TORCH_CHECK(!grad_lse || (grad_lse->sizes() == at::IntArrayRef(stat) && grad_lse->scalar_type() == at::kFloat),
              "star_attention_backward: grad_lse must be float32 [B, Hq, Sq]");
  for (const at::Tensor* t : {&dout, &out, &lse})
    TORCH_CHECK(t->device() == q.device(), "star_attention_backward: all tensors must be on ", q.device());
  TORCH_CHECK(!grad_lse || grad_lse->device() == q.device(),
              "star_attention_backward: all tensors must be on ", q.device());
}

}  // namespace htc
