// The one place op schemas live (DESIGN.md §4). Kernel files add TORCH_LIBRARY_IMPL(htc, CPU|CUDA, m);
// Python (htc_kernels/star_attention.py, mgvq_lookup.py) adds the fake and autograd registrations once per op.
#include <torch/library.h>
#include <torch/extension.h>

#include <array>
#include <string>
#include <vector>

#include "common/cpu_dispatch.h"

#if defined(HTC_WITH_CUDA)
namespace htc {
std::vector<std::array<int64_t, 6>> star_cuda_smem_table();  // star_attention_cuda.cu
std::vector<std::array<int64_t, 3>> mgvq_cuda_smem_table();  // mgvq_lookup_cuda.cu
}  // namespace htc
#endif

TORCH_LIBRARY(htc, m) {
  // kinds [B, Skv] int8 (TokenKind), groups [B, Skv] int32 -> plan [B, ceil(q_len/block_q),
  // P/block_k + ceil(Skv/block_k)] uint8 (TileKind). Queries are the last q_len positions of the key
  // sequence. panel [B, P] int32 (P = 0 without): the key tiles follow StarLayout.key_panel's mapped
  // order (the panel's TEXT/VOCO keys, then the sequence with those keys as holes; star_mask.h KeyMap).
  m.def("star_plan(Tensor kinds, Tensor groups, int q_len, int block_q, int block_k, int topology,"
        " Tensor? panel=None) -> Tensor");
  // q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] (last dim contiguous) -> out [B, Hq, Sq, D] (q's dtype),
  // lse [B, Hq, Sq] float32 (log-sum-exp of the scaled scores; -inf on PAD rows, whose
  // output is 0, and on live rows whose every allowed score is -inf, whose output is NaN). `plan` must be
  // star_plan's for these kinds/groups/block sizes/topology (shapes are checked, tile kinds are trusted;
  // a value outside TileKind is evaluated element-wise). Masked keys/values and PAD rows are never read
  // into a result (DESIGN.md §2). softcap c > 0: each score s = scale * q.k becomes c * tanh(s / c)
  // before the mask and softmax (Gemma2); 0: no capping. lse is over the capped scores. panel: the key
  // panel the plan was built with (star_plan's), or None; only the CUDA kernel takes one.
  m.def("star_attention(Tensor q, Tensor k, Tensor v, Tensor kinds, Tensor groups, Tensor plan,"
        " int block_q, int block_k, int topology, float scale, float softcap, Tensor? panel=None)"
        " -> (Tensor, Tensor)");
  // out/lse: the forward's outputs; grad_lse [B, Hq, Sq] float32 or None: the gradient reaching lse
  // directly -> dq, dk, dv (shapes/dtypes of q, k, v). scale, softcap and panel: the forward's.
  m.def("star_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? grad_lse,"
        " Tensor kinds, Tensor groups, Tensor plan, int block_q, int block_k, int topology,"
        " float scale, float softcap, Tensor? panel=None) -> (Tensor, Tensor, Tensor)");
  // MGVQ grouped nearest-code lookup (DESIGN.md §3). z [..., G, d], codebook [G, K, d], same dtype
  // -> codes [..., G, d] (z's dtype; unit-normalised codes when normalize), indices [...,  G] int64.
  // normalize: cosine (largest <z/|z|, c/|c|>), else squared L2. Ties -> lowest index.
  m.def("mgvq_lookup(Tensor z, Tensor codebook, bool normalize) -> (Tensor, Tensor)");
  // Straight-through backward: grad_codes [..., G, d] -> grad_z (through z's normalisation when
  // normalize), grad_codebook [G, K, d] (index-add onto the selected codes, through their normalisation).
  m.def("mgvq_lookup_backward(Tensor grad_codes, Tensor z, Tensor codebook, Tensor indices,"
        " bool normalize) -> (Tensor, Tensor)");
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "htc_kernels compiled extension: build information; ops live in torch.ops.htc";
  m.def("build_info", []() {
    pybind11::dict info;
#if defined(HTC_WITH_CUDA)
    info["cuda"] = true;
    info["cuda_archs"] = std::string(HTC_CUDA_ARCHS);
#else
    info["cuda"] = false;
    info["cuda_archs"] = std::string();
#endif
    // The CPU kernel variants compiled in (common/cpu_dispatch.h); cpu_isa() says which one runs.
    std::string variants;
    for (const auto& v : htc::cpu_isa_status().compiled) variants += (variants.empty() ? "" : " ") + v;
    info["cpu_isa"] = variants;
#if defined(HTC_CPU_MARCH)
    info["cpu_march"] = std::string(HTC_CPU_MARCH);
#else
    info["cpu_march"] = std::string();
#endif
#if defined(_OPENMP)
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["compiler"] = std::string(__VERSION__);
    return info;
  });
  // Shared memory per block of the CUDA kernels (empty without CUDA), read once at import by the backend
  // selection: "star" rows {dtype, head dim, softcap, forward, dQ, dK/dV}, "mgvq" rows {d, normalize, bytes}.
  m.def("cuda_smem", []() {
    pybind11::dict info;
    pybind11::list star, mgvq;
#if defined(HTC_WITH_CUDA)
    for (const auto& r : htc::star_cuda_smem_table()) star.append(pybind11::make_tuple(r[0], r[1], r[2], r[3], r[4], r[5]));
    for (const auto& r : htc::mgvq_cuda_smem_table()) mgvq.append(pybind11::make_tuple(r[0], r[1], r[2]));
#endif
    info["star"] = star;
    info["mgvq"] = mgvq;
    return info;
  });
  // The CPU kernel variant in use (decided here, at load: HTC_CPU_ISA is read once), or why none is.
  htc::cpu_isa_status();
  m.def("cpu_isa", []() {
    const htc::CpuIsaStatus& status = htc::cpu_isa_status();
    pybind11::dict d;
    d["active"] = status.active;
    d["error"] = status.error;
    d["requested"] = status.requested;
    d["compiled"] = status.compiled;
    d["runnable"] = status.runnable;
    d["cpu_features"] = status.cpu_features;
    d["bf16_tiles"] = status.bf16_tiles;
    return d;
  });
}
