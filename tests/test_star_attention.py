"""star_attention against the float64 dense reference (DESIGN.md §6), on every kernel backend that can
run here: the C++ kernel ("cpu") and the Triton kernels ("triton": on a CUDA device when there is one,
else on CPU tensors under TRITON_INTERPRET=1, which the suite's command sets). Under the interpreter
the Triton cases use fewer seeds and smaller shapes (it runs every tile op in NumPy)."""

import importlib
import json
import math
import random

import pytest
import torch

import htc_kernels as hk
from htc_kernels import _ext
from htc_kernels.backends import triton_reasons
from tests.accuracy import rel, stored_output_grads
from tests.children import interpreter_child, run_interpreted, run_python
from tests.layouts import C, P, T, V, llava_kinds, pad_batch, random_kinds, random_sample

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_WHY_NOT = "; ".join(triton_reasons(TRITON_DEVICE)) if HAS_TRITON else "triton is not installed"
INTERPRETED = TRITON_DEVICE.type == "cpu"  # Triton cases run in the interpreter: keep them small

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.LOAD_ERROR}")
needs_triton = pytest.mark.skipif(bool(TRITON_WHY_NOT), reason=f"Triton cannot run here: {TRITON_WHY_NOT}")
# "cuda" needs a GPU; without one it is still compiled and its kernels run on the host SIMT emulator in
# ctest (csrc/tests/test_star_cuda_kernels.cpp).
NO_GPU = "no CUDA device: the CUDA backend is compiled (and emulated in ctest) but cannot run here"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)
MARKS = {"cpu": needs_ext, "triton": needs_triton, "cuda": needs_gpu}
BACKENDS = [pytest.param(name, marks=mark) for name, mark in MARKS.items()]


def per_backend(cpu_values, triton_values):
    """(backend, value) cases: every value for the C++ kernel, ``triton_values`` for Triton when it
    runs in the interpreter (all of ``cpu_values`` on a GPU)."""
    values = {"cpu": cpu_values, "triton": triton_values if INTERPRETED else cpu_values, "cuda": cpu_values}
    return [
        pytest.param(name, x, marks=MARKS[name], id=f"{name}-{x}") for name in MARKS for x in values[name]
    ]


def device_of(backend: str) -> torch.device:
    return {"triton": TRITON_DEVICE, "cuda": torch.device("cuda")}.get(backend, torch.device("cpu"))


def on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on ``device`` with x's strides (non-contiguous inputs stay non-contiguous)."""
    if x.device == device:
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device).copy_(x)


def small(backend: str) -> bool:
    """Shrink this case (the Triton interpreter)?"""
    return backend == "triton" and INTERPRETED


def make_qkv(b, hq, hkv, sq, skv, d, dtype, noncontig=False, device="cpu"):
    """Random q, k, v (drawn on the CPU, so every device sees the same numbers)."""
    if noncontig:  # [B, S, H, D] storage viewed as [B, H, S, D], like HF's transpose(1, 2)
        q = torch.randn(b, sq, hq, d).to(device, dtype).transpose(1, 2)
        k = torch.randn(b, skv, hkv, d).to(device, dtype).transpose(1, 2)
        v = (
            torch.randn(b, skv, hkv, d * 2).to(device, dtype)[..., ::2].transpose(1, 2)
        )  # last dim strided too
        return [q, k, v]
    q, k, v = (
        torch.randn(b, hq, sq, d),
        torch.randn(b, hkv, skv, d),
        torch.randn(b, hkv, skv, d),
    )
    return [x.to(device, dtype) for x in (q, k, v)]


def check(q, k, v, layout, scale=None, grads=True, backend="cpu", softcap=None):
    """Forward and all three gradients of ``backend`` vs the float64 reference; low precision vs the
    same math in that dtype (error <= 2x PyTorch's own error in that dtype, plus a small floor)."""
    if backend == "cuda" and q.shape[-1] not in CUDA_HEAD_DIMS:
        pytest.skip(f"head dim {q.shape[-1]} is not one the CUDA kernel is built for {CUDA_HEAD_DIMS}")
    q, k, v = [on_device(x, device_of(backend)) for x in (q, k, v)]
    layout = layout.to(q.device)
    q, k, v = [x.detach().requires_grad_(grads) for x in (q, k, v)]
    out = hk.star_attention(q, k, v, layout, scale=scale, softcap=softcap, backend=backend)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    q64, k64, v64 = [x.detach().double().requires_grad_(grads) for x in (q, k, v)]
    ref = hk.star_attention_reference(q64, k64, v64, layout, scale=scale, softcap=softcap)
    if q.dtype == torch.float32:
        tol = lambda _same: 1e-4  # noqa: E731
    else:
        tol = lambda same: 2 * same + 2e-3  # noqa: E731
    same_dtype = None
    if q.dtype != torch.float32:
        ql, kl, vl = [x.detach().requires_grad_(grads) for x in (q, k, v)]
        same_dtype = hk.star_attention_reference(ql, kl, vl, layout, scale=scale, softcap=softcap)
    assert rel(out, ref) <= tol(rel(same_dtype, ref) if same_dtype is not None else 0)
    pad_rows = (layout.kinds[:, -q.shape[2] :] == P).expand(q.shape[0], -1)
    assert (out.transpose(1, 2)[pad_rows] == 0).all()
    if not grads:
        return
    g = torch.randn_like(ref)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    if same_dtype is not None:
        same_dtype.backward(g.to(out.dtype))
    # A gradient that is zero in exact arithmetic (e.g. dq when a row sees one key) is judged against
    # the scale of its siblings, not against its own rounding noise.
    floor = max(0.1 * max(x.grad.norm().item() for x in (q64, k64, v64)), 1e-30)
    low = {"dq": ql, "dk": kl, "dv": vl} if same_dtype is not None else {}
    target = stored_output_grads(q, k, v, layout, scale, softcap, out, g)
    for name, ours, exact, want in zip(("dq", "dk", "dv"), (q, k, v), (q64, k64, v64), target):
        assert torch.isfinite(ours.grad).all(), name
        base = rel(low[name].grad, exact.grad, floor) if low else 0
        err = rel(ours.grad, want, floor)
        assert err <= tol(base), f"{name}: {err:.2e} vs allowed {tol(base):.2e}"
    assert (q.grad.transpose(1, 2)[pad_rows] == 0).all()


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("backend, seed", per_backend(range(10), range(4)))
def test_random_layouts_fp32(backend, seed, topology):
    batch = 2 if small(backend) else 3
    kinds = random_kinds(seed, batch=batch)
    layout = hk.StarLayout(kinds, topology=topology)
    d = [64, 32, 40, 128, 8][seed % 5]
    hq, hkv = [(2, 2), (4, 2), (4, 1)][seed % 3]
    s = layout.seq_len
    q, k, v = make_qkv(batch, hq, hkv, s, s, d, torch.float32, seed % 2 == 1, device_of(backend))
    check(q, k, v, layout, scale=None if seed % 4 else 0.3, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype, topology):
    kinds = random_kinds(100, batch=2, max_visual=70)
    if small(backend):
        kinds = kinds[:1]  # the interpreter: one sample (the one with images; padding is tested elsewhere)
    layout = hk.StarLayout(kinds, topology=topology)
    hq, hkv = (2, 1) if small(backend) else (4, 2)
    b = kinds.shape[0]
    q, k, v = make_qkv(b, hq, hkv, layout.seq_len, layout.seq_len, 64, dtype, device=device_of(backend))
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend, seq", per_backend([1, 7, 97, 577], [1, 7, 97, 577]))
def test_odd_sizes(backend, seq):
    rng = random.Random(seq)
    kinds = [T] * min(seq, 3)
    while len(kinds) < seq:
        kinds += [V] * rng.randint(1, 200) + [C] * rng.randint(1, 2) + [T] * rng.randint(0, 4)
    kinds = torch.tensor(kinds[:seq])  # may end inside an image: still a valid layout
    layout = hk.StarLayout(kinds)
    hq = 1 if small(backend) else 2
    q, k, v = make_qkv(1, hq, 1, seq, seq, 48, torch.float32, device=device_of(backend))
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [16, 24, 80, 96, 256])
def test_head_dims(backend, d):
    """Head dims of real models (80, 96, 256) and odd small ones (padded to a power of two inside)."""
    layout = hk.StarLayout(random_kinds(21, batch=2, max_visual=50))
    s = layout.seq_len
    dtypes = (torch.float32, torch.bfloat16)
    if small(backend):  # one dtype per head dim in the interpreter
        dtypes = (torch.bfloat16,) if d in (24, 96) else (torch.float32,)
    for dtype in dtypes:
        q, k, v = make_qkv(2, 2, 1, s, s, d, dtype, noncontig=d == 80, device=device_of(backend))
        check(q, k, v, layout, backend=backend)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [1, 7, 33, 65])
def test_odd_head_dims_low_precision(dtype, d):
    """Odd head dims in bf16 and fp16 on the C++ kernel: forward and gradients, GQA, non-contiguous
    inputs, decode and soft-capping. Under HTC_CPU_BF16_TILES (test_cpu_isa.py runs this file so) the
    bf16 calls take the pair GEMMs, whose last pair along D holds a zero."""
    layout = hk.StarLayout(random_kinds(d, batch=2, max_visual=70))
    s = layout.seq_len
    q, k, v = make_qkv(2, 4, 2, s, s, d, dtype, noncontig=d % 4 == 1)
    check(q, k, v, layout)
    q, k, v = make_qkv(2, 4, 2, max(2, s // 3), s, d, dtype)  # decode: Sq < Skv
    check(q, k, v, layout)
    q, k, v = make_qkv(2, 2, 1, s, s, d, dtype)
    check_capped(q, k, v, layout, 4.0 / math.sqrt(d), 2.0, "cpu")


@pytest.mark.parametrize("q_len", [1, 2, 65, 130])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_bottom_right(backend, q_len, side):
    rng = random.Random(q_len)
    samples = [random_sample(rng, max_visual=50) for _ in range(2)]
    kinds = pad_batch(samples, side, total=max(map(len, samples)) + 3)
    layout = hk.StarLayout(kinds)
    q_len = min(q_len, layout.seq_len)
    hq, hkv = (2, 1) if small(backend) else (4, 2)
    q, k, v = make_qkv(2, hq, hkv, q_len, layout.seq_len, 64, torch.float32, device=device_of(backend))
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_images_and_voco_tokens_both_paddings(backend):
    rows = [
        [T] * 5 + [V] * 70 + [C] * 3 + [T] * 2 + [V] * 65 + [C] * 2 + [T] * 9,
        [T] * 2 + [V] * 30 + [C] + [T] * 4,
    ]
    heads = 1 if small(backend) else 4
    for side in ("left", "right"):
        for topology in ("star", "group"):
            layout = hk.StarLayout(pad_batch(rows, side), topology=topology)
            s = layout.seq_len
            q, k, v = make_qkv(2, heads, heads, s, s, 64, torch.float32, device=device_of(backend))
            check(q, k, v, layout, backend=backend)


@needs_triton
@pytest.mark.parametrize("panel", [True, False])
@pytest.mark.parametrize("topology", ["star", "group"])
def test_triton_key_panel(topology, panel, monkeypatch):
    """Several images per sample: the Triton backend takes the TEXT/VOCO key panel (its plan visits
    fewer tiles) and is exact with it and, forced, without it: forward, gradients, GQA, padding on
    (a sample with fewer TEXT/VOCO keys leaves empty panel slots) and decode. (Non-finite masked
    keys: test_masked_keys_are_never_read, whose layout takes the panel too.)"""
    rows = [
        [T] * 3 + ([V] * 37 + [C] + [T] * 5) * 3 + [T] * 4,
        [T] * 2 + [V] * 20 + [C] * 2 + [T] * 3 + [V] * 9 + [C] + [T] * 6,
    ]
    layout = hk.StarLayout(pad_batch(rows, "left"), topology=topology).to(TRITON_DEVICE)
    assert layout.uses_key_panel
    monkeypatch.setattr(layout, "uses_key_panel", panel)
    s = layout.seq_len
    for q_len in (s, 40, 3):
        q, k, v = make_qkv(2, 4, 2, q_len, s, 32, torch.float32, device=TRITON_DEVICE)
        check(q, k, v, layout, backend="triton")
    used = {key[3] for key in layout._triton_tile_lists}
    assert used == {panel}
    if panel:
        visits = [int((layout.plan(s, 32, 32, panel=p) != 0).sum()) for p in (False, True)]
        assert visits[1] < visits[0], visits


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_broadcast_over_batch(backend):
    layout = hk.StarLayout(llava_kinds(prefix=5, visual=100, voco=2, suffix=7))
    q, k, v = make_qkv(3, 2, 2, layout.seq_len, layout.seq_len, 32, torch.float32, device=device_of(backend))
    check(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_shape_fp32_forward(backend):
    layout = hk.StarLayout(llava_kinds())
    heads = 1 if small(backend) else 8
    q, k, v = make_qkv(1, heads, heads, 680, 680, 128, torch.float32, device=device_of(backend))
    check(q, k, v, layout, grads=small(backend), backend=backend)  # interpreter: gradients too, one head


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_pad_sample_outputs_zero(backend):
    kinds = pad_batch([[T, V, V, C, T], [P] * 5], "right")
    layout = hk.StarLayout(kinds)
    q, k, v = make_qkv(2, 2, 2, 5, 5, 16, torch.float32, device=device_of(backend))
    check(q, k, v, layout, backend=backend)


@needs_ext
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


def raw_forward(backend, q, k, v, layout, scale, softcap=0.0):
    """(out, lse) of a backend's raw op, with the plan (or tile lists) the public function would use."""
    if backend == "cpu":
        plan = layout.plan(q.shape[2], 64, 64)
        return torch.ops.htc.star_attention(
            q, k, v, layout.kinds, layout.groups, plan, 64, 64, layout.topology_id, scale, softcap
        )
    args = triton_args(layout, q)  # first: it imports the module that registers the op
    panel = triton_panel(layout, q)
    return torch.ops.htc.star_attention_triton(
        q, k, v, layout.kinds, layout.groups, *args, scale, softcap, panel
    )


def triton_args(layout, q):
    """The Triton op's layout arguments after (q, k, v, kinds, groups): tile lists, blocks, topology
    (the key-panel plan's lists when the layout takes the panel, as the public function does)."""
    sa = importlib.import_module("htc_kernels.star_attention")  # the module, not hk.star_attention

    mod = sa._triton_star()  # loads the kernels and registers the op's autograd
    cfg = mod.tile_config(q.shape[-1], q.dtype, q.device, q.shape[2])
    lists = sa._triton_tile_lists(layout, q.shape[2], cfg.block_q, cfg.block_k, layout.uses_key_panel)
    return (*lists, cfg.block_q, cfg.block_k, layout.topology_id)


def triton_panel(layout, q):
    """The Triton op's last argument: the key panel that goes with triton_args' lists, or None."""
    ts = importlib.import_module("htc_kernels.triton.star_attention")
    cfg = ts.tile_config(q.shape[-1], q.dtype, q.device, q.shape[2])
    return layout.key_panel(cfg.block_k) if layout.uses_key_panel else None


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_is_exact(backend, softcap):
    """lse (of the capped scores, with softcap) and the gradient reaching it directly."""
    layout = hk.StarLayout(random_kinds(3, batch=2)).to(device_of(backend))
    dev = device_of(backend)
    q, k, v = [
        x.requires_grad_()
        for x in make_qkv(2, 2, 2, layout.seq_len, layout.seq_len, 32, torch.float64, device=dev)
    ]
    qf, kf, vf = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out, lse = raw_forward(backend, qf, kf, vf, layout, 0.2, softcap or 0.0)
    live = torch.isfinite(lse)
    assert torch.equal(live, (layout.kinds != P)[:, None].expand_as(live))  # -inf exactly on PAD rows
    (out.sum() + lse[live].sum()).backward()
    # reference lse and out in float64
    mask = hk.star_mask(layout)[:, None]
    s = (q @ k.transpose(-1, -2)) * 0.2
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref_out = hk.star_attention_reference(q, k, v, layout, scale=0.2, softcap=softcap)
    assert rel(lse[live], ref_lse[live]) < 1e-5
    (ref_out.sum() + ref_lse[live].sum()).backward()
    for ours, want in ((qf, q), (kf, k), (vf, v)):
        assert rel(ours.grad, want.grad) < 1e-4


def opcheck_forward_backward(q, k, v, args):
    """``torch.library.opcheck`` of the raw forward op, then of its backward at the forward's outputs
    (random grad_out and grad_lse); returns the forward's ``(out, lse)``."""
    torch.library.opcheck(torch.ops.htc.star_attention, (q, k, v, *args))
    out, lse = torch.ops.htc.star_attention(q, k, v, *args)
    saved = (q.detach(), k.detach(), v.detach(), out.detach(), lse.detach())
    grads = (torch.randn_like(out), torch.randn_like(lse))
    torch.library.opcheck(torch.ops.htc.star_attention_backward, (grads[0], *saved, grads[1], *args))
    return out, lse


@needs_ext
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_opcheck(softcap):
    layout = hk.StarLayout(random_kinds(5, batch=2, max_visual=20))
    s = layout.seq_len
    q, k, v = [x.requires_grad_() for x in make_qkv(2, 4, 2, s, s, 16, torch.float32)]
    plan = layout.plan(s, 64, 64)
    torch.library.opcheck(torch.ops.htc.star_plan, (layout.kinds, layout.groups, s, 64, 64, 0))
    panel = layout.key_panel(64)
    torch.library.opcheck(torch.ops.htc.star_plan, (layout.kinds, layout.groups, s, 64, 64, 0, panel))
    args = (layout.kinds, layout.groups, plan, 64, 64, 0, 0.25, softcap)
    out, lse = opcheck_forward_backward(q, k, v, args)


@needs_triton
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_opcheck_triton(softcap):
    dev = TRITON_DEVICE
    layout = hk.StarLayout(random_kinds(5, batch=2, max_visual=20)).to(dev)
    s = layout.seq_len
    q, k, v = [x.requires_grad_() for x in make_qkv(2, 2, 1, s, s, 16, torch.float32, device=dev)]
    args = triton_args(layout, q)
    # test_aot_dispatch_dynamic traces through wrap_triton, which the CPU interpreter cannot do (it
    # dereferences the traced storages); on a GPU the full opcheck runs.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if INTERPRETED else None
    kw = {"test_utils": utils} if utils else {}
    fwd_args = (q, k, v, layout.kinds, layout.groups, *args, 0.25, softcap, triton_panel(layout, q))
    torch.library.opcheck(torch.ops.htc.star_attention_triton.default, fwd_args, **kw)
    out, lse = torch.ops.htc.star_attention_triton(*fwd_args)
    plain = [x.detach() for x in (q, k, v, out, lse)]
    for grad_lse in (torch.randn_like(lse), None):
        bwd_args = (
            torch.randn_like(out),
            *plain,
            grad_lse,
            layout.kinds,
            layout.groups,
            *args,
            0.25,
            softcap,
            fwd_args[-1],
        )
        torch.library.opcheck(torch.ops.htc.star_attention_triton_backward.default, bwd_args, **kw)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, softcap):
    """One graph, no break, from a fresh layout (its plan and tile lists are built inside the compiled
    region; the Triton module may be too, when this runs first); with and without soft-capping."""
    dev = device_of(backend)
    layout = hk.StarLayout(random_kinds(11, batch=2, max_visual=30)).to(dev)
    s = layout.seq_len
    d = 64 if backend == "cuda" else 32  # the CUDA kernel's smallest head dim
    q, k, v = make_qkv(2, 4, 2, s, s, d, torch.float32, device=dev)

    def f(q, k, v):
        return hk.star_attention(q, k, v, layout, softcap=softcap, backend=backend).sum(-1) * 2

    # AOT tracing runs the Triton op's body on fake tensors through wrap_triton, which the interpreter
    # cannot do; there, dynamo's capture (fullgraph) is checked with the eager backend.
    compiler = "eager" if backend == "triton" and INTERPRETED else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
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
    # A tensor scale's gradient would be dropped; True / "0.5" would mean something else.
    yield r"scale must be .*\(Tensor\)", (q, k, v, layout), {"scale": torch.tensor(0.5)}
    yield r"scale must be .*\(bool\)", (q, k, v, layout), {"scale": True}
    yield r"scale must be .*\(str\)", (q, k, v, layout), {"scale": "0.5"}
    yield r"scale must be .*nan", (q, k, v, layout), {"scale": float("nan")}
    yield r"scale must be .*1e\+300", (q, k, v, layout), {"scale": 1e300}


@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda c: c[0])
def test_bad_inputs(case):
    match, args, kwargs = case
    with pytest.raises(ValueError, match=match):
        hk.star_attention(*args, **kwargs)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_layout_edited_after_a_call_is_refused_on_the_next(backend):
    """Backends cache plans per layout: an in-place edit after a call must not reach the kernel
    through the old plan."""
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    q, k, v = make_qkv(
        1, 2, 2, 8, 8, 16, torch.float32, device=TRITON_DEVICE if backend == "triton" else "cpu"
    )
    layout = layout.to(q.device)
    hk.star_attention(q, k, v, layout, backend=backend)
    layout.kinds[0, :2] = P
    with pytest.raises(ValueError, match="modified in place"):
        hk.star_attention(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_batch_forward_and_backward(backend):
    """B = 0 (a batch-1 layout serves it): empty outputs and gradients, no crash."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    device = TRITON_DEVICE if backend in ("triton", "cuda") else "cpu"
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2)).to(device)
    q, k, v = (x.requires_grad_() for x in make_qkv(0, 4, 2, 8, 8, 64, torch.float32, device=device))
    out = hk.star_attention(q, k, v, layout, backend=backend)
    assert out.shape == (0, 4, 8, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@needs_ext
def test_compiled_call_computes_the_layout_as_built():
    """torch.compile cannot see an in-place edit of layout.kinds (the check is eager-only); the
    compiled call keeps computing the layout as built, never a mix of the edit and the old plan."""
    layout = hk.StarLayout(torch.tensor([V] * 40 + [C] + [T] * 7))
    q, k, v = make_qkv(1, 2, 2, 48, 48, 16, torch.float32)
    f = torch.compile(
        lambda q, k, v: hk.star_attention(q, k, v, layout, backend="cpu"), backend="aot_eager", fullgraph=True
    )
    expected = hk.star_attention_reference(q.double(), k.double(), v.double(), layout)
    assert rel(f(q, k, v), expected) < 1e-5
    layout.kinds[0, :41] = T
    assert rel(f(q, k, v), expected) < 1e-5


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_layout_first_used_under_inference_mode_then_trained(backend):
    """Plans (and Triton's tile lists) cached under inference_mode are inference tensors, which
    autograd cannot save: a training step after a generation step gets plans of its own."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    device = TRITON_DEVICE if backend in ("triton", "cuda") else "cpu"
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2)).to(device)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float32, device=device)
    with torch.inference_mode():
        hk.star_attention(q, k, v, layout, backend=backend)
    q.requires_grad_()
    hk.star_attention(q, k, v, layout, backend=backend).sum().backward()
    q64 = q.detach().double().requires_grad_()
    hk.star_attention_reference(q64, k.double(), v.double(), layout).sum().backward()
    assert rel(q.grad, q64.grad) < 1e-4
    with torch.inference_mode():  # and the plans built for training serve inference again
        hk.star_attention(q, k, v, layout, backend=backend)


@needs_ext
def test_forward_mode_ad_and_torch_func_take_the_reference_or_are_refused():
    """The kernels' ops have reverse-mode autograd only: through them a forward-mode tangent came out
    zero (torch.func.jvp) or None (forward_ad), silently. "auto" takes the reference then; an
    explicit kernel backend refuses, saying why."""
    import torch.autograd.forward_ad as fwAD

    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    t = torch.randn_like(q)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    want = torch.func.jvp(lambda q: hk.star_attention_reference(q, k64, v64, layout), (q64,), (t.double(),))[
        1
    ]
    got = torch.func.jvp(lambda q: hk.star_attention(q, k, v, layout), (q,), (t,))[1]
    assert float(want.norm()) > 0 and rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="forward-mode AD .* Backends that can: \\['reference'\\]"):
        torch.func.jvp(lambda q: hk.star_attention(q, k, v, layout, backend="cpu"), (q,), (t,))
    with fwAD.dual_level(), pytest.raises(ValueError, match="forward-mode AD"):
        hk.star_attention(q, k, fwAD.make_dual(v, torch.randn_like(v)), layout, backend="cpu")
    want = torch.func.grad(lambda q: hk.star_attention_reference(q, k64, v64, layout).pow(2).sum())(q64)
    got = torch.func.grad(lambda q: hk.star_attention(q, k, v, layout).pow(2).sum())(q)
    assert rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="torch.func.grad"):
        torch.func.grad(lambda q: hk.star_attention(q, k, v, layout, backend="cpu").sum())(q)
    out = hk.star_attention(q.requires_grad_(), k, v, layout)  # torch.autograd: the kernel, as before
    assert "htc_star_attention" in type(out.grad_fn).__name__


def test_reference_checks_its_inputs_and_ignores_autocast():
    """The oracle is public: it refuses what star_attention refuses (Hq=1 over Hkv=2 returned an empty
    tensor; batch 2 over 1 broadcast), and computes in q's dtype under autocast, as the kernels do."""
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    q, k, v = make_qkv(1, 1, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="not divisible"):
        hk.star_attention_reference(q, k, v, layout)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="disagree on batch"):
        hk.star_attention_reference(torch.cat([q, q]), k, v, layout)
    with pytest.raises(ValueError, match="dense \\(strided\\)"):
        hk.star_attention(q, k.to_sparse(), v, layout)
    want = hk.star_attention_reference(q, k, v, layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hk.star_attention(q, k, v, layout, backend="reference")
    assert got.dtype == torch.float32 and torch.equal(got, want)


@needs_ext
def test_double_backward_is_refused_not_zero():
    """The kernels' gradients are first-order only: a second derivative through them would silently
    be zero (PyTorch only warns), so create_graph=True is refused; the reference differentiates."""
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 2, 8, 8, 16, torch.float32))
    out = hk.star_attention(q, k, v, layout, backend="reference")
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    (g2,) = torch.autograd.grad(g.pow(2).sum(), k)
    assert float(g2.abs().sum()) > 0  # the case has a second derivative
    out = hk.star_attention(q, k, v, layout, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    hk.star_attention(q, k, v, layout, backend="cpu").sum().backward()  # first order as before


def test_layout_on_other_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2)).to("cuda")
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="layout on"):
        hk.star_attention(q, k, v, layout)


@needs_ext
def test_op_level_checks_raise_not_crash():
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    wrong_plan = layout.plan(8, 4, 4)
    with pytest.raises(RuntimeError, match="plan"):
        torch.ops.htc.star_attention(q, k, v, layout.kinds, layout.groups, wrong_plan, 64, 64, 0, 0.25, 0.0)
    plan = layout.plan(8, 64, 64)
    for softcap in (-1.0, float("nan"), float("inf"), 1e-40):
        with pytest.raises(RuntimeError, match="softcap must be 0 .no capping. or a positive normal float32"):
            torch.ops.htc.star_attention(q, k, v, layout.kinds, layout.groups, plan, 64, 64, 0, 0.25, softcap)
    for scale in (float("nan"), float("-inf"), 1e300):  # every output was NaN
        with pytest.raises(RuntimeError, match="scale must be a finite float32"):
            torch.ops.htc.star_attention(q, k, v, layout.kinds, layout.groups, plan, 64, 64, 0, scale, 0.0)


@needs_ext
def test_cpu_op_takes_no_key_panel():
    """The CPU kernel reads the plain key order: a key-panel plan (with or without its panel) is refused."""
    layout = hk.StarLayout(torch.tensor([T] * 3 + [V] * 20 + [C] + [T] * 2 + [V] * 30 + [C] + [T] * 4))
    assert layout.uses_key_panel
    s = layout.seq_len
    q, k, v = make_qkv(1, 2, 2, s, s, 16, torch.float32)
    plan, panel = layout.plan(s, 64, 64, panel=True), layout.key_panel(64)
    base = (q, k, v, layout.kinds, layout.groups, plan, 64, 64, 0, 0.25, 0.0)
    with pytest.raises(RuntimeError, match="plain key order"):
        torch.ops.htc.star_attention(*base, panel)
    with pytest.raises(RuntimeError, match="does not match the problem, block sizes and panel"):
        torch.ops.htc.star_attention(*base)
    assert torch.isfinite(hk.star_attention(q, k, v, layout, backend="cpu")).all()  # the backend: plain order


@needs_triton
def test_triton_op_checks_raise_not_crash():
    layout = hk.StarLayout(llava_kinds(4, 30, 1, 5)).to(TRITON_DEVICE)  # S = 40
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, torch.float32, device=TRITON_DEVICE)
    *lists, block_q, block_k, topology = triton_args(layout, q)
    assert (block_q, block_k) != (16, 16)
    base = (q, k, v, layout.kinds, layout.groups)
    with pytest.raises(ValueError, match="q_tiles must be int32"):  # lists of other block sizes
        torch.ops.htc.star_attention_triton(*base, *lists, 16, 16, topology, 0.25, 0.0)
    with pytest.raises(ValueError, match="block sizes"):
        torch.ops.htc.star_attention_triton(*base, *lists, 48, 48, topology, 0.25, 0.0)
    with pytest.raises(ValueError, match="kinds int8"):
        torch.ops.htc.star_attention_triton(
            q, k, v, layout.kinds.long(), layout.groups, *lists, block_q, block_k, topology, 0.25, 0.0
        )
    with pytest.raises(ValueError, match="topology"):
        torch.ops.htc.star_attention_triton(*base, *lists, block_q, block_k, 2, 0.25, 0.0)
    for softcap in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            torch.ops.htc.star_attention_triton(*base, *lists, block_q, block_k, topology, 0.25, softcap)
    for scale in (float("nan"), float("-inf"), 1e300):
        with pytest.raises(ValueError, match="scale must be a finite float32"):
            torch.ops.htc.star_attention_triton(*base, *lists, block_q, block_k, topology, scale, 0.0)


# --------------------------------------------------------------------------------------------------
# Soft-capping (DESIGN.md §2): c * tanh(s / c) before the mask, forward and backward
# --------------------------------------------------------------------------------------------------


def check_capped(q, k, v, layout, scale, softcap, backend, grads=True):
    """``check`` with soft-capping, after making sure the cap matters on this input: the capped
    float64 reference must differ substantially from the uncapped one (a backend that ignored the
    cap could not pass)."""
    q64, k64, v64 = [x.detach().double() for x in (q, k, v)]
    capped = hk.star_attention_reference(q64, k64, v64, layout, scale=scale, softcap=softcap)
    plain = hk.star_attention_reference(q64, k64, v64, layout, scale=scale)
    assert rel(capped, plain) > 0.1, "test input too tame: the cap changes little"
    check(q, k, v, layout, scale=scale, grads=grads, backend=backend, softcap=softcap)


def test_softcap_reference_matches_formula():
    """The reference against a hand-written dense computation: softmax(c tanh(scale q.k / c) | mask) v,
    in float64, GQA, padding and decode included."""
    layout = hk.StarLayout(
        pad_batch([[T] * 3 + [V] * 9 + [C] + [T] * 4, [T] * 2 + [V] * 5 + [C] + [T]], "left")
    )
    s = layout.seq_len
    for sq in (s, 4):
        q, k, v = make_qkv(2, 4, 2, sq, s, 8, torch.float64)
        scale, c = 0.9, 1.7
        out = hk.star_attention_reference(q, k, v, layout, scale=scale, softcap=c)
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        mask = hk.star_mask(layout, sq)[:, None]  # [B, 1, Sq, Skv]
        want = torch.zeros_like(out)
        for b in range(2):
            for h in range(4):
                for i in range(sq):
                    allowed = mask[b, 0, i]
                    if not allowed.any():
                        continue  # PAD row: zeros
                    scores = c * torch.tanh(scale * (kk[b, h, allowed] @ q[b, h, i]) / c)
                    want[b, h, i] = torch.softmax(scores, 0) @ vv[b, h, allowed]
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        assert rel(out, hk.star_attention_reference(q, k, v, layout, scale=scale)) > 0.1


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("backend, seed", per_backend(range(6), range(2)))
def test_softcap_random_layouts(backend, seed, topology):
    """Random layouts (padding on either side, several images), GQA, decode, odd head dims, large score
    scales so that most scores are capped hard."""
    batch = 2
    rng = random.Random(seed)
    samples = [random_sample(rng, max_visual=40 if small(backend) else 80) for _ in range(batch)]
    side = ["left", "right"][seed % 2]
    layout = hk.StarLayout(pad_batch(samples, side, total=max(map(len, samples)) + 2), topology=topology)
    s = layout.seq_len
    d = [32, 16, 40, 64, 24, 8][seed % 6]
    hq, hkv = [(2, 1), (4, 2), (2, 2)][seed % 3]
    sq = [s, max(1, s // 3), 1, s, 2, s][seed % 6]
    scale, softcap = [(1.0, 2.0), (None, 0.5), (0.7, 5.0)][seed % 3]
    q, k, v = make_qkv(batch, hq, hkv, sq, s, d, torch.float32, seed % 2 == 1, device_of(backend))
    check_capped(q, k, v, layout, scale, softcap, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_dtypes(backend, dtype):
    kinds = random_kinds(100, batch=2, max_visual=70)
    if small(backend):
        kinds = kinds[:1]
    layout = hk.StarLayout(kinds)
    hq, hkv = (2, 1) if small(backend) else (4, 2)
    b = kinds.shape[0]
    q, k, v = make_qkv(b, hq, hkv, layout.seq_len, layout.seq_len, 64, dtype, device=device_of(backend))
    check_capped(q, k, v, layout, 0.5, 3.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_llava_shape(backend):
    """The LLaVA layout (DIAG tiles for the visual block, the <voco> row, text), scores of order 10
    against a cap of 10."""
    layout = hk.StarLayout(llava_kinds())
    heads = 1 if small(backend) else 4
    q, k, v = make_qkv(1, heads, heads, 680, 680, 128, torch.float32, device=device_of(backend))
    check_capped(q * 8, k, v, layout, None, 10.0, backend)


@pytest.mark.parametrize(
    "softcap", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-300, "2", True, [3.0]]
)
@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_softcap_bad_values(backend, softcap):
    layout = hk.StarLayout(llava_kinds(prefix=2, visual=3, voco=1, suffix=2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="softcap must be None .no capping. or a finite number > 0"):
        hk.star_attention(q, k, v, layout, softcap=softcap, backend=backend)
    with pytest.raises(ValueError, match="softcap must be None"):
        hk.star_attention_reference(q, k, v, layout, softcap=softcap)


def test_softcap_accepts_numbers():
    layout = hk.StarLayout(llava_kinds(prefix=2, visual=3, voco=1, suffix=2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float64)
    ref = hk.star_attention_reference(q, k, v, layout, softcap=2.0)
    for c in (2, 2.0, torch.tensor(2.0).item()):
        assert torch.equal(hk.star_attention(q, k, v, layout, softcap=c), ref)


# --------------------------------------------------------------------------------------------------
# Triton-specific: refusals, determinism, dispatch, non-finite values, large offsets
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="triton needs a CUDA device .or TRITON_INTERPRET=1"):
        hk.star_attention(q, k, v, layout, backend="triton")


@needs_triton
def test_triton_refusals_name_the_reason():
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2)).to(TRITON_DEVICE)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
        hk.star_attention(q, k, v, layout, backend="triton")
    q, k, v = make_qkv(1, 1, 1, 8, 8, 264, torch.float32, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="head dim 264 not supported"):
        hk.star_attention(q, k, v, layout, backend="triton")


def test_auto_order():
    """CPU tensors: the C++ kernel first. CUDA tensors: Triton before the reference."""
    sa = importlib.import_module("htc_kernels.star_attention")  # the module, not hk.star_attention

    assert [be.name for be in sa._STAR_CPU_ORDER][:2] == ["cpu", "reference"]
    gpu = [be.name for be in sa._STAR_GPU_ORDER]
    assert gpu.index("triton") < gpu.index("reference")


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("triton", "cuda")])
def test_gpu_backends_are_deterministic(backend):
    """Two runs give the same bits, forward and every gradient: the backward reduces in a fixed order
    (no float atomics). Several images per sample (the key panel), GQA, padding."""
    if backend == "triton" and INTERPRETED:
        pytest.skip("the interpreter runs programs one after another: determinism is a GPU question")
    device = device_of(backend)
    rows = [
        [T] * 5 + ([V] * 50 + [C] + [T] * 3) * 3 + [T] * 4,
        [T] * 2 + ([V] * 70 + [C] * 2 + [T]) * 2 + [T] * 3,
    ]
    layout = hk.StarLayout(pad_batch(rows, "left")).to(device)
    assert layout.uses_key_panel
    s = layout.seq_len
    q, k, v = make_qkv(2, 4, 2, s, s, 64, torch.bfloat16, device=device)
    g = torch.randn(2, 4, s, 64).to(device, torch.bfloat16)
    runs = []
    for _ in range(2):
        qq, kk, vv = [x.detach().requires_grad_() for x in (q, k, v)]
        out = hk.star_attention(qq, kk, vv, layout, backend=backend)
        out.backward(g)
        runs.append([out.detach(), qq.grad, kk.grad, vv.grad])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_kernels_compile_pipelined_and_spill_free_for_sm90(head_dim):
    """What decides the Triton kernels' speed on an H100, checked without one (issue 8): compiled for
    sm_90 at the tile table's 16-bit entry, the plain pass of the forward, dQ and dK/dV kernels
    software-pipelines its tile loads (async copies inside the visiting loop, none waiting) and spills
    nothing, with persistent programs (the table's) and one program per tile.
    Before this check the loops branched per tile kind around their loads (never pipelined)
    and every kernel spilled 1-2 KB per thread (htc_kernels/triton/_codegen.py, the table in
    benchmarks/results/triton-codegen.md)."""
    pytest.importorskip("triton")
    # In a child without the interpreter: under TRITON_INTERPRET=1 @triton.jit makes no compilable kernel.
    code = (
        "import dataclasses, json, torch\n"
        "from htc_kernels.triton import _codegen as cg, star_attention as ts\n"
        f"cfg = next(h for d_max, h, _f in ts._TILE_TABLE['sm90'] if {head_dim} <= d_max)\n"
        "assert cfg.persist > 0\n"
        "for kernel in cg._KERNELS:\n"
        f"    c = cg.compile_kernel(kernel, 90, cfg, torch.bfloat16, {head_dim})\n"
        "    print(json.dumps(dataclasses.asdict(c)))\n"
        "for kernel in cg._KERNELS:  # one program per tile: the tile sweep's persist 0 rows\n"
        f"    c = cg.compile_kernel(kernel, 90, cfg._replace(persist=0), torch.bfloat16, {head_dim})\n"
        "    print(json.dumps(dataclasses.asdict(c)))\n"
    )
    out = run_python(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    assert [c["kernel"] for c in reports] == ["fwd", "dq", "dkdv"] * 2, out.stdout
    for c in reports:
        assert c["stack_bytes"] == 0, c
        assert c["pipelined_tiles"] >= 2 and c["sync_tiles"] == 0, c
        assert c["shared_bytes"] <= 227 * 1024, c


@needs_triton
def test_triton_tile_override_reaches_forward_and_backward():
    """The GPU benchmark's tile sweep (_override_tiles) must run the kernels at its configuration,
    forward and backward, and stay exact; outside the block the table's configuration is back."""
    ts = importlib.import_module("htc_kernels.triton.star_attention")
    layout = hk.StarLayout(random_kinds(5, batch=2, max_visual=40)).to(TRITON_DEVICE)
    s = layout.seq_len
    q, k, v = make_qkv(2, 2, 1, s, s, 32, torch.float32, device=TRITON_DEVICE)
    table = ts.tile_config(32, torch.float32, TRITON_DEVICE, s)
    cfg = ts.TileConfig(16, 16, 1, 1, 1) if table.block_q != 16 else ts.TileConfig(32, 32, 1, 1, 1)
    launches = []
    real_launch = ts._launch

    def spy(device, head_dim, dtype, q_len, backward, exact=False):
        launches.append(ts.tile_config(head_dim, dtype, device, q_len))
        return real_launch(device, head_dim, dtype, q_len, backward, exact)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ts, "_launch", spy)
        with ts._override_tiles(cfg):
            qq, kk, vv = [x.detach().requires_grad_() for x in (q, k, v)]
            out = hk.star_attention(qq, kk, vv, layout, backend="triton")
            out.backward(torch.ones_like(out))
    assert (s, cfg.block_q, cfg.block_k, layout.uses_key_panel) in layout._triton_tile_lists
    assert launches and all(c == cfg for c in launches)  # forward and backward launches
    assert ts.tile_config(32, torch.float32, TRITON_DEVICE, s) == table
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out_ref = hk.star_attention_reference(*ref, layout)
    out_ref.backward(torch.ones_like(out_ref))
    assert rel(out, out_ref) < 1e-4
    for got, want in zip((qq, kk, vv), ref):
        assert rel(got.grad, want.grad) < 1e-4


def _poison_case(device):
    """A layout, inputs, the keys to poison (some attended by a few queries only, all PAD keys) and the
    rows / keys whose results may not change."""
    rows = [
        [T] * 6 + [V] * 40 + [C] * 2 + [T] * 12 + [V] * 9 + [C] + [T] * 8,
        [T] * 3 + [V] * 30 + [C] + [T] * 5,
    ]
    layout = hk.StarLayout(pad_batch(rows, "left")).to(device)
    allowed = hk.star_mask(layout)  # [B, S, S]
    poison = (layout.kinds == P).cpu()  # every PAD key: attended by nobody
    poison[0, 6 + 10] = True  # a visual key: its own row and the image's <voco> rows see it
    poison[0, 6 + 40 + 2 + 7] = True  # a text key: the rows after it see it, the rows before do not
    pad = len(rows[0]) - len(rows[1])
    poison[1, pad + 3 + 18] = True  # a visual key of the left-padded sample
    poison = poison.to(device)
    clean_rows = ~(allowed & poison[:, None, :]).any(-1)  # [B, S]: queries that see no poisoned key
    # keys whose every attending query is clean (their dK/dV may not change)
    clean_keys = ~(allowed & ~clean_rows[:, :, None]).any(1) & ~poison
    return layout, poison, clean_rows, clean_keys


@needs_triton
@pytest.mark.parametrize("side", ["rows", "columns"])
@pytest.mark.parametrize("shared", [True, False])
def test_triton_work_split_covers_every_tile_once(shared, side):
    """Persistent programs (_star_split_kernel): runs of whole tiles (query tiles of (batch, head) for
    the forward and dQ, key tiles of (batch, kv head) times the GQA group for dK/dV), in order,
    together every tile exactly once, with near-equal loop steps (one per visit, one for a tile
    without visits); one program per tile when persist is 0 or tiles are few."""
    ts = importlib.import_module("htc_kernels.triton.star_attention")
    dev = TRITON_DEVICE
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    kinds = random_kinds(7, batch=1 if shared else 3, max_visual=90)
    kinds[-1, :40] = P  # a sample with leading PAD tiles: tiles without visits
    layout = hk.StarLayout(kinds).to(dev)
    q_tiles, q_steps, k_tiles, k_steps = ts.tile_lists(layout.plan(layout.seq_len, 16, 16))
    tiles, steps = (q_tiles, q_steps) if side == "rows" else (k_tiles, k_steps)
    per_tile = (steps[:, 1:] - steps[:, :-1]).cpu()
    assert (per_tile >= 1).all() and (per_tile == 1).any()
    batch = 3
    for heads, mult in ((1, 1), (3, 1), (2, 3)):
        items = (per_tile.expand(batch, -1)[:, None, :].expand(batch, heads, -1).reshape(-1) * mult).tolist()
        for persist in (0, 1, 2, 7):
            split = ts._work_split(tiles, steps, batch, heads, persist, dev, mult=mult)
            if persist * n_sm >= len(items) or not persist:
                assert not split["PERSIST"] and split["grid"] == (len(items),)
                continue
            assert split["PERSIST"] and split["grid"] == (persist * n_sm,)
            work = split["WORK"].cpu().tolist()
            firsts = [w[0] for w in work] + [len(items)]
            assert firsts[0] == 0 and firsts == sorted(firsts)
            for p, (first, n) in enumerate(work):
                assert n == sum(items[first : firsts[p + 1]]), (p, work)
            fair = sum(items) / len(work)
            assert max(w[1] for w in work) <= fair + max(items), (fair, work)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf * 0
@pytest.mark.parametrize("persist", [0, 2])
@pytest.mark.parametrize("case", ["random", "decode", "poison", "panel"])
def test_triton_both_work_splits(case, persist):
    """The visiting kernels have two code paths: one program per tile (persist 0: q, or k and v for
    dK/dV, loaded once; the table's choice on sm_80, for fp32 and D=256) and persistent programs
    walking several tiles in one loop (the interpreter's default, persist 3; sm_90 16-bit). The matrix
    runs the device's default; these cases (forward and backward) run each path wherever tests run."""
    ts = importlib.import_module("htc_kernels.triton.star_attention")
    cfg = ts.tile_config(32, torch.float32, TRITON_DEVICE, 64)._replace(persist=persist)
    with ts._override_tiles(cfg):
        if case == "random":
            test_random_layouts_fp32("triton", 1, "star")
        elif case == "decode":
            test_decode_bottom_right("triton", 2, "left")
        elif case == "poison":
            test_masked_means_never_read("triton", torch.float32)
        else:
            with pytest.MonkeyPatch.context() as mp:
                test_triton_key_panel("group", True, mp)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf * 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_means_never_read(backend, dtype):
    """DESIGN.md §2: a query's output and every gradient are independent of the keys/values it may
    not attend (NaN/Inf included) and of grad_out at PAD rows; and, the other way round, a key's
    gradients are independent of the q and grad_out rows of the queries that may not attend it (a live
    row holding NaN/Inf shares the dK/dV products of its tiles with the keys it does not see)."""
    dev = device_of(backend)
    layout, poison, clean_rows, clean_keys = _poison_case(dev)
    b, s = layout.kinds.shape
    d = 64 if backend == "cuda" else 32  # the CUDA kernel's smallest head dim
    q, k, v = make_qkv(b, 2, 1, s, s, d, dtype, device=dev)
    g = torch.randn(b, 2, s, d).to(dev, dtype)
    pad_rows = layout.kinds == P
    live_row = torch.zeros_like(pad_rows)
    # The second sample's first suffix row: it attends the text prefix, the <voco> and itself, and shares
    # its CAUSAL tile with the later suffix keys, which the rows after it attend.
    live_row[1, int(pad_rows[1].sum()) + 3 + 30 + 1] = True
    seen_by_live = (hk.star_mask(layout) & live_row[:, :, None]).any(1)  # [B, S]: the keys it attends
    assert seen_by_live.sum() == 5

    def run(q, k, v, g):
        q, k, v = [x.detach().requires_grad_() for x in (q, k, v)]
        out = hk.star_attention(q, k, v, layout, backend=backend)
        out.backward(g)
        return out.detach(), q.grad, k.grad, v.grad

    def poisoned(x, where, value):
        x = x.clone()
        sel = where[:, None, :, None].expand_as(x)
        x[sel] = value
        return x

    clean = run(q, k, v, g)
    for value in (float("nan"), float("inf")):
        kp, vp = poisoned(k, poison, value), poisoned(v, poison, -value)
        qp, gp = poisoned(q, pad_rows | live_row, value), poisoned(g, pad_rows | live_row, value)
        dirty = run(qp, kp, vp, gp)
        rows = (clean_rows & ~live_row)[:, None, :, None].expand_as(q)
        keys = (clean_keys & ~seen_by_live)[:, None, :, None].expand_as(k)
        failures = [
            name
            for name, a, c, sel in zip(("out", "dq", "dk", "dv"), dirty, clean, (rows, rows, keys, keys))
            if not torch.equal(a[sel], c[sel])
        ]
        assert not failures, f"{value}: {failures} changed where nothing poisoned is attended"
        # and the keys the poisoned live row does attend get its NaN (NaN scores: NaN P and dS), all of them
        seen = seen_by_live[:, None, :, None].expand_as(k)
        assert all(x[seen].isnan().all() for x in dirty[2:]), value
        assert (dirty[0].transpose(1, 2)[pad_rows] == 0).all() and (
            dirty[1].transpose(1, 2)[pad_rows] == 0
        ).all()


def _non_finite_case(case, d):
    """(layout, q, k, v, empty_rows) float32 with NaN/Inf in keys or values that some queries attend
    (PAD rows on both sides). "values": NaN, +inf and -inf values (outputs NaN, +inf, -inf). "keys":
    q[..., 0] > 0 and keys whose first element is -inf: every allowed score of the prefix rows and of
    one visual row (``empty_rows``, positions) is -inf (softmax 0/0), the other rows see such keys next
    to finite ones (p = 0); a +inf key (+inf scores: NaN softmax, NaN lse); plus a NaN key.
    ``empty_rows`` is empty for "values"."""
    kinds = llava_kinds(prefix=5, visual=50, voco=1, suffix=9)
    kinds = torch.cat([torch.tensor([P, P]), kinds, torch.tensor([P])])
    layout = hk.StarLayout(kinds)
    s = layout.seq_len
    q, k, v = make_qkv(1, 2, 1, s, s, d, torch.float32)
    text, vis, suffix = 2, 2 + 5, 2 + 5 + 50 + 1  # first prefix, visual and suffix positions
    if case == "values":
        v[0, 0, suffix + 2, 3] = float("nan")  # a suffix text key: only the rows after it see it
        v[0, 0, vis + 20, 5] = float("inf")  # a visual key: its own row and the <voco> row see it
        v[0, 0, text + 2, 6] = float("-inf")  # a prefix key, seen by every later row
        v[0, 0, suffix + 5, 5] = float("-inf")  # -inf in the suffix rows after it (none sees the +inf)
        v[0, 0, vis + 30, 7] = float("-inf")  # another visual key, alone: -inf in its row and the <voco> row
        return layout, q, k, v, []
    q[..., 0] = q[..., 0].abs() + 0.5
    k[0, 0, text : text + 5, 0] = float("-inf")  # the whole prefix
    k[0, 0, vis + 20, 0] = float("-inf")  # row vis + 20 (star: prefix + itself) sees only -inf
    k[0, 0, vis + 30, 0] = float("inf")  # +inf scores: its own row and the <voco> row are NaN (lse NaN)
    k[0, 0, suffix + 4, 1] = float("nan")
    return layout, q, k, v, [*range(text, text + 5), vis + 20]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf * 0
@pytest.mark.parametrize("case", ["values", "keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attended_non_finite_inputs_propagate(backend, dtype, case):
    """The other half of the contract: a NaN/Inf a query does attend reaches its output and every
    gradient with IEEE semantics, as in the reference's float64 autograd: the same NaN, +inf and -inf
    elements, the finite ones close. A live row whose every allowed score is -inf outputs NaN (0/0),
    never the zeros of a PAD row, and its gradients are NaN; PAD rows stay exactly zero."""
    d = 64 if backend == "cuda" else 16
    layout, q, k, v, empty_rows = _non_finite_case(case, d)
    dev = device_of(backend)
    g = torch.randn_like(q)
    x = [t.to(dev, dtype).requires_grad_() for t in (q, k, v)]
    out = hk.star_attention(*x, layout.to(dev), backend=backend)
    out.backward(g.to(dev, dtype))
    x64 = [t.detach().to("cpu", torch.float64).requires_grad_() for t in x]
    want = hk.star_attention_reference(*x64, layout)
    want.backward(g.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    pairs = zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in x)), (want, *(t.grad for t in x64)))
    for name, ours, exact in pairs:
        ours = ours.detach().cpu().double()
        for pattern in (torch.isnan, torch.isposinf, torch.isneginf):
            diff = (pattern(ours) != pattern(exact)).nonzero()[:4].tolist()
            assert not diff, f"{name}: {pattern.__name__} differs at {diff}"
        finite = torch.isfinite(exact)
        assert rel(ours[finite], exact[finite]) < tol, name
    if case == "keys":  # the rows whose allowed scores are all -inf are there, and NaN
        assert torch.isnan(want[0, :, empty_rows]).all()
    else:  # and the values case has all three patterns
        assert all(f(want).sum() > 2 for f in (torch.isnan, torch.isposinf, torch.isneginf))
    pad = layout.kinds[0] == P
    assert (out.detach()[:, :, pad] == 0).all() and (x[0].grad[:, :, pad] == 0).all()


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU")
def test_triton_int64_offsets():
    """Strides past 2**31 elements (a [B, S, H, D] view of a huge buffer): int64 offsets."""
    s, d = 40, 64
    span = 2**31 // d + s  # the second sample starts past 2**31 elements
    buf = torch.randn(2 * span * d, device="cuda", dtype=torch.bfloat16)
    k = buf.as_strided((2, 1, s, d), (span * d, d, d, 1))
    v = buf.as_strided((2, 1, s, d), (span * d, d, d, 1), storage_offset=s * d)  # rows after k's
    q = torch.randn(2, 2, s, d, device="cuda", dtype=torch.bfloat16)
    layout = hk.StarLayout(llava_kinds(prefix=4, visual=30, voco=1, suffix=5)).to("cuda")
    assert k.stride(0) * (k.shape[0] - 1) >= 2**31
    check(q, k, v, layout, backend="triton")


@interpreter_child
def test_triton_interpreter_subprocess():
    """Always runs the Triton kernels once under TRITON_INTERPRET=1, whatever this environment says."""
    run_interpreted(
        "import torch, htc_kernels as hk\n"
        "from tests.layouts import random_kinds\n"
        "torch.manual_seed(1)\n"
        "layout = hk.StarLayout(random_kinds(4, batch=1, max_visual=40))\n"
        "s = layout.seq_len\n"
        "q, k, v = [torch.randn(1, h, s, 24, requires_grad=True) for h in (2, 1, 1)]\n"
        "out = hk.star_attention(q, k, v, layout, backend='triton')\n"
        "out.backward(torch.ones_like(out))\n"
        "r = [x.detach().double().requires_grad_() for x in (q, k, v)]\n"
        "ref = hk.star_attention_reference(*r, layout)\n"
        "ref.backward(torch.ones_like(ref))\n"
        "for a, b in zip((out, q.grad, k.grad, v.grad), (ref, *[x.grad for x in r])):\n"
        "    assert ((a.double() - b).norm() / b.norm()) < 1e-4\n"
    )


def test_cuda_backend_refuses_cpu_tensors_and_says_why():
    layout = hk.StarLayout(llava_kinds(prefix=2, visual=3, voco=1, suffix=2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call: .*not a CUDA device") as info:
        hk.star_attention(q, k, v, layout, backend="cuda")
    assert "Backends that can: ['cpu', 'reference'" in str(info.value)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim 48 not supported by the CUDA kernel"):
        hk.star_attention(q, k, v, layout, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_inputs_at_a_misaligned_offset(backend):
    """Contiguous views at an odd storage offset (``buf[1:].view(...)``): the CUDA glue copied only
    non-contiguous inputs, so its 16-byte cp.async copies would meet a misaligned base (a fault)."""
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2)).to(device_of(backend))  # S = 8
    shape = (1, 2, 8, 64)

    def shifted():
        x = torch.randn(1 + math.prod(shape), device=device_of(backend))[1:].view(shape)
        assert x.is_contiguous() and x.data_ptr() % 16
        return x

    q, k, v, grad = shifted(), shifted(), shifted(), shifted()
    for x in (q, k, v):
        x.requires_grad_()
    out = hk.star_attention(q, k, v, layout, backend=backend)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = hk.star_attention_reference(*r, layout)
    want = (ref, *torch.autograd.grad(ref, r, grad.double()))
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-4


def test_cuda_arch_rule():
    """Which builds run on which GPU: machine code of the same major and a minor no higher, or PTX of
    an arch no newer. The default build (8.0;9.0) has no kernel for sm_100/sm_120 or sm_7x."""
    from htc_kernels.backends import parse_cuda_archs, runs_on

    archs = parse_cuda_archs("8.0;9.0")
    caps = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5)]
    assert [runs_on(c, archs) for c in caps] == [True] * 4 + [False] * 3
    assert runs_on((12, 0), parse_cuda_archs("8.0;9.0+PTX"))
    assert not runs_on((8, 9), parse_cuda_archs("9.0+PTX"))
    assert runs_on((9, 0), parse_cuda_archs("9.0a")) and not runs_on((10, 0), parse_cuda_archs("9.0a"))
    assert parse_cuda_archs("Ampere") is None and runs_on((12, 0), None)  # unknown: the launch says


@pytest.mark.skipif(not _ext.build_info().get("cuda"), reason="the extension was built without CUDA")
def test_cuda_shared_memory_is_decided_before_the_forward():
    """GPUs with 99 KB per block (sm_86/89/120) cannot run bf16 D=128's dQ kernel: the backend says so
    before a forward whose inputs require grad ("auto" then takes Triton), not in the backward."""
    from htc_kernels.mgvq_lookup import _CUDA_SMEM as MGVQ_SMEM
    from htc_kernels.star_attention import _CUDA_SMEM, _smem_reasons

    consumer, a100, h100 = 99 * 1024, 163 * 1024, 227 * 1024
    need = _CUDA_SMEM[(1, 128, 0)]  # bf16, D = 128, no softcap: forward, dQ, dK/dV
    assert need[0] <= consumer < need[1]
    assert _smem_reasons(need, training=False, optin=consumer) == []
    assert "dQ" in _smem_reasons(need, training=True, optin=consumer)[0]
    assert _smem_reasons(need, training=True, optin=h100) == []
    assert _smem_reasons(need, training=True, optin=None) == []  # a torch that does not report it
    assert len(_CUDA_SMEM) == 3 * 5 * 2  # every dtype, head dim and softcap build
    assert MGVQ_SMEM[(4, True)] <= consumer and MGVQ_SMEM[(150, True)] > a100
    from htc_kernels._info import cuda_smem_limits  # what `python -m htc_kernels.info` says there

    said = cuda_smem_limits(_CUDA_SMEM, consumer)
    assert "bf16 D=256" in said.split("(forward)")[0] and "bf16 D=128" in said.split("(forward)")[1]
    assert cuda_smem_limits(_CUDA_SMEM, a100) == cuda_smem_limits(_CUDA_SMEM, None) == ""


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
    args = (layout.kinds, layout.groups, plan, 64, 16, layout.topology_id, 0.25, 0.0)
    out, lse = opcheck_forward_backward(q, k, v, args)
    mask = hk.star_mask(layout)[:, None]
    sc = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    ref_lse = torch.logsumexp(sc.masked_fill(~mask, float("-inf")), -1)
    live = torch.isfinite(ref_lse)
    assert torch.equal(live, torch.isfinite(lse))
    assert rel(lse[live], ref_lse[live]) < 1e-5
    for q_len in (1, 3):  # B*H*n_qt = 8 CTAs: split-K over the key tiles
        qd = q[:, :, -q_len:].detach()
        check(qd, k.detach(), v.detach(), layout, backend="cuda")


@needs_gpu
def test_cuda_prefill_split_of_long_tiles(monkeypatch):
    """At a small prefill grid (LLaVA, B=1: 352 query-tile CTAs) the CUDA forward splits only its long
    query tiles (the `<voco>` tile visits its whole image): exact, and every tile of one part is computed
    exactly as without the split (HTC_CUDA_PREFILL_SPLIT=0), bit for bit."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    layout = hk.StarLayout(llava_kinds()).to("cuda")
    s, heads = layout.seq_len, 32
    ctas = heads * -(-s // 64)
    if not sms <= ctas < 4 * sms:
        pytest.skip(f"{ctas} query-tile CTAs on {sms} SMs: this GPU would not split (star_attention_cuda.cu)")
    q, k, v = make_qkv(1, heads, heads, s, s, 64, torch.bfloat16, device="cuda")
    check(q, k, v, layout, backend="cuda", grads=False)
    split = hk.star_attention(q, k, v, layout, backend="cuda")
    monkeypatch.setenv("HTC_CUDA_PREFILL_SPLIT", "0")
    whole = hk.star_attention(q, k, v, layout, backend="cuda")
    voco_tile = int((layout.kinds[0] == C).nonzero()[0]) // 64
    rows = torch.arange(s, device="cuda") // 64 != voco_tile
    assert torch.equal(split[:, :, rows], whole[:, :, rows])
    assert not torch.equal(split, whole)  # the `<voco>` tile went through the combine


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_cuda_three_ctas_builds(monkeypatch, dtype, d):
    """HTC_CUDA_THREE_CTAS=1: the forward and dQ kernels' builds for three CTAs per SM (fewer pipeline
    stages, less unrolling; star_attention_cuda.cu) are exact: forward and gradients against float64,
    with padding, GQA, decode split-K, the key panel and (D=128) soft-capping that changes the output."""
    props = torch.cuda.get_device_properties(0)
    if props.shared_memory_per_multiprocessor < 228 * 1024:
        pytest.skip(
            f"{props.shared_memory_per_multiprocessor // 1024} KB of shared memory per SM: the three-CTA "
            "builds need sm_90's 228 KB (the default builds run here)"
        )
    monkeypatch.setenv("HTC_CUDA_THREE_CTAS", "1")
    layout = hk.StarLayout(
        random_kinds(60 + d, batch=2, max_visual=150), topology="group" if d == 80 else "star"
    )
    s = layout.seq_len
    q, k, v = make_qkv(2, 4, 2, s, s, d, dtype, noncontig=d == 96)
    # D=128: scores of standard deviation ~4 against a cap of 2 (the capped builds), so a dropped cap fails.
    cap = dict(scale=4 / d**0.5, softcap=2.0) if d == 128 else {}
    if cap:
        r = [x.double() for x in (q, k, v)]
        plain = hk.star_attention_reference(*r, layout, scale=cap["scale"])
        assert rel(hk.star_attention_reference(*r, layout, **cap), plain) > 0.1
    check(q, k, v, layout, backend="cuda", **cap)
    check(q[:, :, -3:], k, v, layout, backend="cuda")  # decode: split-K over the key tiles
    images = hk.StarLayout(torch.cat([llava_kinds(prefix=5, visual=70, voco=1, suffix=3)] * 3))  # key panel
    assert images.uses_key_panel
    q, k, v = make_qkv(1, 4, 2, images.seq_len, images.seq_len, d, dtype)
    check(q, k, v, images, backend="cuda")


# --------------------------------------------------------------------------------------------------
# Hardening (issue 9)
# --------------------------------------------------------------------------------------------------


def test_unclear_input_errors_are_value_errors():
    layout = hk.StarLayout(llava_kinds(prefix=2, visual=3, voco=1, suffix=2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="head dim D must be >= 1"):
        hk.star_attention(q[..., :0], k[..., :0], v[..., :0], layout)
    f8 = torch.float8_e4m3fn
    with pytest.raises(ValueError, match=r"dtype torch.float8_e4m3fn; supported: float32, bfloat16"):
        hk.star_attention(q.to(f8), k.to(f8), v.to(f8), layout)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        hk.star_attention(q.long(), k.long(), v.long(), layout)


def test_raw_op_rejects_zero_head_dim():
    layout = hk.StarLayout(llava_kinds(prefix=2, visual=3, voco=1, suffix=2))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    plan = layout.plan(8, 64, 64)
    with pytest.raises(RuntimeError, match="head dim D must be >= 1"):
        torch.ops.htc.star_attention(
            q[..., :0], k[..., :0], v[..., :0], layout.kinds, layout.groups, plan, 64, 64, 0, 1.0, 0.0
        )


def _poison_run(backend, layout, q, k, v, g, keys_nan=(), keys_inf=(), pad_rows=True):
    """out, dq, dk, dv of `backend` on (q, k, v) and output gradient g, after poisoning: NaN in the K and
    V rows at positions `keys_nan`, +-Inf at `keys_inf` (all samples, all heads), and (pad_rows) NaN in q
    and in g at every PAD query row."""
    q, k, v, g = (x.clone() for x in (q, k, v, g))
    for j in keys_nan:
        k[:, :, j] = float("nan")
        v[:, :, j] = float("nan")
    for j in keys_inf:
        k[:, :, j] = float("inf")
        v[:, :, j] = -float("inf")
    if pad_rows:
        pad = (layout.kinds[:, -q.shape[2] :] == P).expand(q.shape[0], -1)  # [B, Sq]
        q.transpose(1, 2)[pad] = float("nan")
        g.transpose(1, 2)[pad] = float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = hk.star_attention(q, k, v, layout, backend=backend)
    out.backward(g.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _unaffected(layout, b, sq, poisoned):
    """Query rows [B, Sq] and key rows [B, Skv] whose results may not depend on the poisoned keys: rows
    that attend none of them, and keys that no such attending row attends."""
    mask = hk.star_mask(layout, sq).expand(b, -1, -1)  # [B, Sq, Skv]
    hit = mask[:, :, list(poisoned)].any(-1) if poisoned else torch.zeros(mask.shape[:2], dtype=torch.bool)
    keys_hit = (mask & hit[:, :, None]).any(1)
    return ~hit, ~keys_hit


def check_masked_never_read(layout, q, k, v, keys_nan=(), keys_inf=(), backends=("cpu", "reference")):
    """DESIGN.md §2: outputs and gradients not fed by a poisoned key are bit-identical to the clean run
    (and finite); PAD q rows and grad_out at PAD rows reach nothing."""
    g = torch.randn_like(q)
    rows_ok, keys_ok = _unaffected(layout, q.shape[0], q.shape[2], set(keys_nan) | set(keys_inf))
    assert rows_ok.any()
    for backend in backends:
        clean = _poison_run(backend, layout, q, k, v, g, pad_rows=False)
        dirty = _poison_run(backend, layout, q, k, v, g, keys_nan, keys_inf)
        for name, c, d_, ok in zip(
            ("out", "dq", "dk", "dv"), clean, dirty, (rows_ok, rows_ok, keys_ok, keys_ok)
        ):
            sel = ok[:, None, :].expand(c.shape[:3])  # [B, H, S]
            assert torch.isfinite(c[sel]).all(), f"{backend} {name}: clean run not finite"
            assert torch.isfinite(d_[sel]).all(), (
                f"{backend} {name}: poison reached {int((~torch.isfinite(d_[sel])).sum())} values"
            )
            if backend == "reference":  # dense products: the same values up to summation order
                torch.testing.assert_close(d_[sel], c[sel], rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(d_[sel], c[sel]), f"{backend} {name} differs from the clean run"


MIDDLE_PAD = [T] * 20 + [P] * 30 + [T] * 10 + [V] * 40 + [C] + [T] * 27  # e.g. compacted cache slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_never_read_pad_keys_and_rows(dtype):
    """A NaN V row at a PAD key reached 127/128 rows; NaN grad_out on a PAD row turned dk/dv NaN."""
    layout = hk.StarLayout(torch.tensor(MIDDLE_PAD))
    s = layout.seq_len
    q, k, v = make_qkv(1, 4, 2, s, s, 32, torch.float64)
    check_masked_never_read(layout, q, k, v, keys_nan=[25], keys_inf=[40], backends=("reference",))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    check_masked_never_read(layout, q, k, v, keys_nan=[25], keys_inf=[40], backends=("cpu",))


@pytest.mark.parametrize("topology", ["star", "group"])
def test_masked_never_read_visual_keys(topology):
    """A NaN at a VISUAL key reached the other rows of its query tile; only the rows that may attend it
    (its own row, its image in "group", its <voco> tokens) may see it."""
    layout = hk.StarLayout(torch.tensor(MIDDLE_PAD), topology=topology)
    s = layout.seq_len
    q, k, v = make_qkv(1, 2, 2, s, s, 16, torch.float64)
    check_masked_never_read(layout, q, k, v, keys_nan=[65], keys_inf=[90], backends=("reference",))
    check_masked_never_read(
        layout, *(x.float() for x in (q, k, v)), keys_nan=[65], keys_inf=[90], backends=("cpu",)
    )


@pytest.mark.parametrize("seed", range(4))
def test_masked_never_read_random_layouts(seed):
    """Left/right padding, several images, decode (Sq < Skv), GQA, odd head dims: NaN at every PAD key
    and row, NaN/Inf at a few VISUAL keys, the last key poisoned (a future key for every other row)."""
    rng = random.Random(seed)
    samples = [random_sample(rng, max_visual=70) for _ in range(2)]
    layout = hk.StarLayout(
        pad_batch(samples, rng.choice(["left", "right"]), total=max(map(len, samples)) + 5)
    )
    s = layout.seq_len
    sq = [s, s, max(1, s // 3), 1][seed]
    kinds = layout.kinds.tolist()
    pad_keys = sorted({j for row in kinds for j, x in enumerate(row) if x == P})
    visual = [j for j, x in enumerate(kinds[0]) if x == V]
    bad = rng.sample(visual, min(3, len(visual)))
    q, k, v = make_qkv(
        2, 4, [4, 2, 1, 2][seed], sq, s, [16, 24, 40, 8][seed], torch.float32, noncontig=seed % 2 == 1
    )
    q, k, v = (x.contiguous() if seed % 2 == 0 else x for x in (q, k, v))
    future = [s - 1] if sq > 1 else []  # a key after every other query row
    check_masked_never_read(layout, q, k, v, keys_nan=pad_keys + bad[:2] + future, keys_inf=bad[2:])


@needs_ext
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("d", [7, 33])
def test_masked_never_read_bf16_odd_head_dims(seed, d):
    """bf16 (the pair GEMMs under HTC_CPU_BF16_TILES), odd head dims, GQA, decode: NaN at every PAD key
    and row, NaN/Inf at VISUAL keys, the last key poisoned; padded cache slots in the middle."""
    rng = random.Random(seed)
    if seed == 0:
        layout = hk.StarLayout(torch.tensor(MIDDLE_PAD))
        keys_nan, keys_inf, sq = [25, 65, 127], [40, 90], layout.seq_len
    else:
        samples = [random_sample(rng, max_visual=70) for _ in range(2)]
        layout = hk.StarLayout(pad_batch(samples, "left", total=max(map(len, samples)) + 5))
        kinds = layout.kinds.tolist()
        pad_keys = sorted({j for row in kinds for j, x in enumerate(row) if x == P})
        visual = [j for j, x in enumerate(kinds[0]) if x == V]
        bad = rng.sample(visual, min(3, len(visual)))
        keys_nan, keys_inf, sq = pad_keys + bad[:2] + [layout.seq_len - 1], bad[2:], layout.seq_len // 2
    s = layout.seq_len
    q, k, v = make_qkv(layout.kinds.shape[0], 4, 2, sq, s, d, torch.bfloat16, noncontig=seed == 1)
    check_masked_never_read(layout, q, k, v, keys_nan=keys_nan, keys_inf=keys_inf, backends=("cpu",))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [3, 8])
def test_backward_split_over_query_tiles(dtype, threads):
    """Fewer (batch, kv head) tasks than threads: the CPU backward splits each task's query tiles over
    the threads, with per-part dK/dV partials summed in a fixed order. Exact (vs the reference) and
    deterministic (two runs give the same bits) with any number of parts; GQA, decode and an odd head dim
    included."""
    layout = hk.StarLayout(llava_kinds(prefix=20, visual=200, voco=2, suffix=78))  # S = 300
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for hq, q_len, d in ((4, 300, 64), (2, 130, 64), (2, 300, 33)):
            q, k, v = make_qkv(1, hq, 1, q_len, layout.seq_len, d, dtype)
            check(q, k, v, layout)
            grads = []
            for _ in range(2):
                qg, kg, vg = [x.detach().requires_grad_() for x in (q, k, v)]
                out = hk.star_attention(qg, kg, vg, layout, backend="cpu")
                grads.append(torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out)))
            for a, b in zip(*grads):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)
