"""star_attention against the float64 dense reference (DESIGN.md §6)."""

import math
import random

import pytest
import torch

import htc_kernels as hk
from htc_kernels import _ext
from tests.layouts import C, P, T, V, llava_kinds, pad_batch, random_kinds, random_sample

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.LOAD_ERROR}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Compiled backends the matrix runs against. "cuda" needs a GPU; without one it is still compiled and
# its kernels run on the host SIMT emulator in ctest (csrc/tests/test_star_cuda_kernels.cpp).
NO_GPU = "no CUDA device: the CUDA backend is compiled (and emulated in ctest) but cannot run here"
BACKENDS = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
]
CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)


def on_device(x, device):
    """x on `device` with x's strides (non-contiguous inputs stay non-contiguous)."""
    if x.device == torch.device(device):
        return x
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    return y.copy_(x)


def rel(a, b, floor=1e-30):
    """||a - b|| / max(||b||, floor)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def make_qkv(b, hq, hkv, sq, skv, d, dtype, noncontig=False):
    if noncontig:  # [B, S, H, D] storage viewed as [B, H, S, D], like HF's transpose(1, 2)
        q = torch.randn(b, sq, hq, d).transpose(1, 2)
        k = torch.randn(b, skv, hkv, d).transpose(1, 2)
        v = torch.randn(b, skv, hkv, d * 2)[..., ::2].transpose(1, 2)  # last dim strided too
    else:
        q, k, v = (
            torch.randn(b, hq, sq, d),
            torch.randn(b, hkv, skv, d),
            torch.randn(b, hkv, skv, d),
        )
    return [x.to(dtype) for x in (q, k, v)]


def check(q, k, v, layout, scale=None, grads=True, backend="cpu"):
    """Forward and all three gradients vs the float64 reference; low precision vs the same math in
    that dtype (error <= 2x PyTorch's own error in that dtype, plus a small floor). Inputs on the CPU;
    backend "cuda" runs on GPU copies (same strides), compared on the CPU."""
    device = "cuda" if backend == "cuda" else "cpu"
    if backend == "cuda" and q.shape[-1] not in CUDA_HEAD_DIMS:
        pytest.skip(f"head dim {q.shape[-1]} is not one the CUDA kernel is built for {CUDA_HEAD_DIMS}")
    qd, kd, vd = [on_device(x.detach(), device).requires_grad_(grads) for x in (q, k, v)]
    q, k, v = [x.detach() for x in (q, k, v)]
    out_d = hk.star_attention(qd, kd, vd, layout.to(device), scale=scale, backend=backend)
    out = out_d.detach().cpu()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    q64, k64, v64 = [x.detach().double().requires_grad_(grads) for x in (q, k, v)]
    ref = hk.star_attention_reference(q64, k64, v64, layout, scale=scale)
    if q.dtype == torch.float32:
        tol = lambda _same: 1e-4  # noqa: E731
    else:
        tol = lambda same: 2 * same + 2e-3  # noqa: E731
    same_dtype = None
    if q.dtype != torch.float32:
        ql, kl, vl = [x.detach().requires_grad_(grads) for x in (q, k, v)]
        same_dtype = hk.star_attention_reference(ql, kl, vl, layout, scale=scale)
    assert rel(out, ref) <= tol(rel(same_dtype, ref) if same_dtype is not None else 0)
    pad_rows = (layout.kinds[:, -q.shape[2] :] == P).expand(q.shape[0], -1)
    assert (out.transpose(1, 2)[pad_rows] == 0).all()
    if not grads:
        return
    g = torch.randn_like(ref)
    out_d.backward(g.to(out.dtype).to(device))
    ref.backward(g)
    if same_dtype is not None:
        same_dtype.backward(g.to(out.dtype))
    # A gradient that is zero in exact arithmetic (e.g. dq when a row sees one key) is judged against
    # the scale of its siblings, not against its own rounding noise.
    floor = max(0.1 * max(x.grad.norm().item() for x in (q64, k64, v64)), 1e-30)
    low = {"dq": ql, "dk": kl, "dv": vl} if same_dtype is not None else {}
    for name, ours, want in (("dq", qd, q64), ("dk", kd, k64), ("dv", vd, v64)):
        grad = ours.grad.cpu()
        assert torch.isfinite(grad).all(), name
        base = rel(low[name].grad, want.grad, floor) if low else 0
        err = rel(grad, want.grad, floor)
        assert err <= tol(base), f"{name}: {err:.2e} vs allowed {tol(base):.2e}"
    assert (qd.grad.cpu().transpose(1, 2)[pad_rows] == 0).all()


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_layouts_fp32(seed, topology, backend):
    kinds = random_kinds(seed, batch=3)
    layout = hk.StarLayout(kinds, topology=topology)
    d = [64, 32, 40, 128, 8][seed % 5]
    hq, hkv = [(2, 2), (4, 2), (4, 1)][seed % 3]
    q, k, v = make_qkv(3, hq, hkv, layout.seq_len, layout.seq_len, d, torch.float32, noncontig=seed % 2 == 1)
    check(q, k, v, layout, scale=None if seed % 4 else 0.3, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(dtype, topology, backend):
    layout = hk.StarLayout(random_kinds(100, batch=2, max_visual=70), topology=topology)
    q, k, v = make_qkv(2, 4, 2, layout.seq_len, layout.seq_len, 64, dtype)
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("seq", [1, 7, 97, 577])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes(seq, backend):
    rng = random.Random(seq)
    kinds = [T] * min(seq, 3)
    while len(kinds) < seq:
        kinds += [V] * rng.randint(1, 200) + [C] * rng.randint(1, 2) + [T] * rng.randint(0, 4)
    kinds = torch.tensor(kinds[:seq])
    if seq > 1 and kinds[-1] == V:  # a trailing image without its <voco> is still a valid layout
        pass
    layout = hk.StarLayout(kinds)
    q, k, v = make_qkv(1, 2, 1, seq, seq, 48, torch.float32)
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("q_len", [1, 2, 65, 130])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_bottom_right(q_len, side, backend):
    rng = random.Random(q_len)
    samples = [random_sample(rng, max_visual=50) for _ in range(2)]
    kinds = pad_batch(samples, side, total=max(map(len, samples)) + 3)
    layout = hk.StarLayout(kinds)
    q_len = min(q_len, layout.seq_len)
    q, k, v = make_qkv(2, 4, 2, q_len, layout.seq_len, 64, torch.float32)
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_images_and_voco_tokens_both_paddings(backend):
    rows = [
        [T] * 5 + [V] * 70 + [C] * 3 + [T] * 2 + [V] * 65 + [C] * 2 + [T] * 9,
        [T] * 2 + [V] * 30 + [C] + [T] * 4,
    ]
    for side in ("left", "right"):
        for topology in ("star", "group"):
            layout = hk.StarLayout(pad_batch(rows, side), topology=topology)
            q, k, v = make_qkv(2, 4, 4, layout.seq_len, layout.seq_len, 64, torch.float32)
            check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_broadcast_over_batch(backend):
    layout = hk.StarLayout(llava_kinds(prefix=5, visual=100, voco=2, suffix=7))
    q, k, v = make_qkv(3, 2, 2, layout.seq_len, layout.seq_len, 32, torch.float32)
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_shape_fp32_forward(backend):
    layout = hk.StarLayout(llava_kinds())
    q, k, v = make_qkv(1, 8, 8, 680, 680, 128, torch.float32)
    check(q, k, v, layout, grads=False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_pad_sample_outputs_zero(backend):
    kinds = pad_batch([[T, V, V, C, T], [P] * 5], "right")
    layout = hk.StarLayout(kinds)
    q, k, v = make_qkv(2, 2, 2, 5, 5, 16, torch.float32)
    check(q, k, v, layout, backend=backend)


def test_thread_count_does_not_change_results():
    layout = hk.StarLayout(random_kinds(7, batch=2, max_visual=80))
    q, k, v = make_qkv(2, 4, 2, layout.seq_len, layout.seq_len, 64, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hk.star_attention(q, k, v, layout)
        torch.set_num_threads(max(2, threads))
        two = hk.star_attention(q, k, v, layout)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_lse_gradient_is_exact():
    layout = hk.StarLayout(random_kinds(3, batch=2))
    q, k, v = [
        x.requires_grad_() for x in make_qkv(2, 2, 2, layout.seq_len, layout.seq_len, 32, torch.float64)
    ]
    plan = layout.plan(layout.seq_len, 64, 64)
    args = (layout.kinds, layout.groups, plan, 64, 64, layout.topology_id, 0.2)
    qf, kf, vf = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out, lse = torch.ops.htc.star_attention(qf, kf, vf, *args)
    live = torch.isfinite(lse)
    (out.sum() + lse[live].sum()).backward()
    # reference lse and out in float64
    mask = hk.star_mask(layout)[:, None]
    s = (q @ k.transpose(-1, -2)) * 0.2
    s = s.masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref_out = hk.star_attention_reference(q, k, v, layout, scale=0.2)
    assert rel(lse[live], ref_lse[live]) < 1e-5
    (ref_out.sum() + ref_lse[live].sum()).backward()
    for ours, want in ((qf, q), (kf, k), (vf, v)):
        assert rel(ours.grad, want.grad) < 1e-4


def test_opcheck():
    layout = hk.StarLayout(random_kinds(5, batch=2, max_visual=20))
    s = layout.seq_len
    q, k, v = [x.requires_grad_() for x in make_qkv(2, 4, 2, s, s, 16, torch.float32)]
    plan = layout.plan(s, 64, 64)
    torch.library.opcheck(torch.ops.htc.star_plan, (layout.kinds, layout.groups, s, 64, 64, 0))
    torch.library.opcheck(
        torch.ops.htc.star_attention, (q, k, v, layout.kinds, layout.groups, plan, 64, 64, 0, 0.25)
    )
    out, lse = torch.ops.htc.star_attention(q, k, v, layout.kinds, layout.groups, plan, 64, 64, 0, 0.25)
    grad_lse = torch.randn_like(lse)
    torch.library.opcheck(
        torch.ops.htc.star_attention_backward,
        (
            torch.randn_like(out),
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse.detach(),
            grad_lse,
            layout.kinds,
            layout.groups,
            plan,
            64,
            64,
            0,
            0.25,
        ),
    )


def test_torch_compile_fullgraph():
    layout = hk.StarLayout(random_kinds(11, batch=2, max_visual=30))
    s = layout.seq_len
    q, k, v = make_qkv(2, 4, 2, s, s, 32, torch.float32)

    def f(q, k, v):
        return hk.star_attention(q, k, v, layout).sum(-1) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qc = q.clone().requires_grad_()
    qe = q.clone().requires_grad_()
    out_c = compiled(qc, k, v)
    out_e = f(qe, k, v)
    assert torch.allclose(out_c, out_e, atol=1e-6)
    out_c.sum().backward()
    out_e.sum().backward()
    assert torch.allclose(qc.grad, qe.grad, atol=1e-6)


def test_reference_backend_and_default_scale():
    layout = hk.StarLayout(random_kinds(2, batch=1))
    q, k, v = make_qkv(1, 2, 2, layout.seq_len, layout.seq_len, 16, torch.float64)
    ref = hk.star_attention(q, k, v, layout, backend="reference")
    auto = hk.star_attention(q, k, v, layout)  # float64: only the reference can run it
    assert torch.equal(ref, auto)
    scaled = hk.star_attention(q, k, v, layout, scale=1 / math.sqrt(16), backend="reference")
    assert torch.equal(ref, scaled)


def bad_inputs():
    layout = hk.StarLayout(llava_kinds(prefix=2, visual=3, voco=1, suffix=2))  # S = 8
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.float32)
    yield "4-D", (q[0], k, v, layout), {}
    yield (
        "not divisible",
        (q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16), layout),
        {},
    )
    yield (
        "layout describes 8 keys but k has Skv=7",
        (q[:, :, :7], k[:, :, :7], v[:, :, :7], layout),
        {},
    )
    yield "dtypes differ", (q.double(), k, v, layout), {}
    yield "Sq", (torch.randn(1, 4, 9, 16), k, v, layout), {}
    yield "must be a StarLayout", (q, k, v, llava_kinds()), {}
    yield "unknown backend 'gpu'", (q, k, v, layout), {"backend": "gpu"}
    yield "not a CUDA device", (q, k, v, layout), {"backend": "cuda"}
    yield (
        "dtype torch.float64 not supported",
        (q.double(), k.double(), v.double(), layout),
        {"backend": "cpu"},
    )
    yield "layout batch 2", (q, k, v, hk.StarLayout(llava_kinds(2, 3, 1, 2).expand(2, -1))), {}
    yield "and v", (q, k, v[..., :8], layout), {}


@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda c: c[0])
def test_bad_inputs(case):
    match, args, kwargs = case
    with pytest.raises(ValueError, match=match):
        hk.star_attention(*args, **kwargs)


def test_layout_on_other_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2)).to("cuda")
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="layout on"):
        hk.star_attention(q, k, v, layout)


def test_op_level_checks_raise_not_crash():
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    wrong_plan = layout.plan(8, 4, 4)
    with pytest.raises(RuntimeError, match="plan"):
        torch.ops.htc.star_attention(q, k, v, layout.kinds, layout.groups, wrong_plan, 64, 64, 0, 0.25)


# ---- CUDA backend specifics (the matrix above runs it too, when a GPU is present) ----
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


def test_cuda_backend_refuses_cpu_tensors_and_says_why():
    layout = hk.StarLayout(llava_kinds(prefix=2, visual=3, voco=1, suffix=2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call: .*not a CUDA device") as info:
        hk.star_attention(q, k, v, layout, backend="cuda")
    assert "Backends that can: ['cpu', 'reference']" in str(info.value)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim 48 not supported by the CUDA kernel"):
        hk.star_attention(q, k, v, layout, backend="cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
def test_cuda_head_dims(dtype, d):
    layout = hk.StarLayout(
        random_kinds(40 + d, batch=2, max_visual=90), topology="group" if d % 3 else "star"
    )
    q, k, v = make_qkv(2, 4, 2, layout.seq_len, layout.seq_len, d, dtype, noncontig=d == 80)
    check(q, k, v, layout, backend="cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_masked_keys_and_values_are_never_read(dtype):
    """NaN/Inf in keys/values a query may not attend, and in grad_out at PAD rows, change nothing."""
    rows = [[T] * 3 + [V] * 70 + [C] + [T] * 9, [T] * 2 + [V] * 30 + [C] + [T] * 4]
    layout = hk.StarLayout(pad_batch(rows, "left")).to("cuda")
    s = layout.seq_len
    q, k, v = [x.cuda() for x in make_qkv(2, 4, 2, s, s, 64, dtype)]
    kinds = layout.kinds.cpu()
    # poison: PAD keys, every VISUAL key and the last TEXT key
    bad = (kinds == P) | (kinds == V)
    bad[:, -1] = True
    kp, vp = k.clone(), v.clone()
    for b in range(2):
        idx = bad[b].nonzero().flatten().cuda()
        kp[b][:, idx] = float("nan")
        vp[b][:, idx] = float("inf")
    mask = hk.star_mask(layout).cpu()  # [B, Sq, Skv]
    clean_rows = ~(mask & bad[:, None, :]).any(-1)  # rows that attend no poisoned key
    ref = hk.star_attention(q, k, v, layout, backend="cuda")
    out = hk.star_attention(q, kp, vp, layout, backend="cuda")
    rows_ok = clean_rows[:, None, :, None].expand_as(out.cpu())
    assert torch.equal(out.cpu()[rows_ok], ref.cpu()[rows_ok])
    # grad_out at PAD rows never reaches any gradient
    qg, kg, vg = [x.detach().requires_grad_() for x in (q, k, v)]
    g = torch.randn_like(q)
    hk.star_attention(qg, kg, vg, layout, backend="cuda").backward(g)
    grads = [x.grad.clone() for x in (qg, kg, vg)]
    pad = (layout.kinds == P)[:, None, :, None].expand_as(g)
    g2 = g.masked_fill(pad, float("nan"))
    for x in (qg, kg, vg):
        x.grad = None
    hk.star_attention(qg, kg, vg, layout, backend="cuda").backward(g2)
    for before, x in zip(grads, (qg, kg, vg)):
        assert torch.equal(before, x.grad)


@needs_gpu
def test_cuda_opcheck_lse_and_split_k():
    """The raw op: opcheck, lse against float64, and decode shapes that take the split-K path."""
    layout = hk.StarLayout(random_kinds(5, batch=2, max_visual=150)).to("cuda")
    s = layout.seq_len
    q, k, v = [x.cuda().requires_grad_() for x in make_qkv(2, 4, 2, s, s, 64, torch.float32)]
    plan = layout.plan(s, 64, 16)  # the CUDA kernel's tiles for fp32
    args = (layout.kinds, layout.groups, plan, 64, 16, layout.topology_id, 0.25)
    torch.library.opcheck(torch.ops.htc.star_attention, (q, k, v, *args))
    out, lse = torch.ops.htc.star_attention(q, k, v, *args)
    grad_lse = torch.randn_like(lse)
    torch.library.opcheck(
        torch.ops.htc.star_attention_backward,
        (
            torch.randn_like(out),
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse.detach(),
            grad_lse,
            *args,
        ),
    )
    mask = hk.star_mask(layout)[:, None]
    sc = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    ref_lse = torch.logsumexp(sc.masked_fill(~mask, float("-inf")), -1)
    live = torch.isfinite(ref_lse)
    assert torch.equal(live, torch.isfinite(lse))
    assert rel(lse[live], ref_lse[live]) < 1e-5
    for q_len in (1, 3):  # B*H*n_qt = 8 CTAs: split-K over the key tiles
        qd = q[:, :, -q_len:].detach()
        check(qd.cpu(), k.detach().cpu(), v.detach().cpu(), layout.to("cpu"), backend="cuda")
