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


def check(q, k, v, layout, scale=None, grads=True):
    """Forward and all three gradients vs the float64 reference; low precision vs the same math in
    that dtype (error <= 2x PyTorch's own error in that dtype, plus a small floor)."""
    q, k, v = [x.detach().requires_grad_(grads) for x in (q, k, v)]
    out = hk.star_attention(q, k, v, layout, scale=scale, backend="cpu")
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
    out.backward(g.to(out.dtype))
    ref.backward(g)
    if same_dtype is not None:
        same_dtype.backward(g.to(out.dtype))
    # A gradient that is zero in exact arithmetic (e.g. dq when a row sees one key) is judged against
    # the scale of its siblings, not against its own rounding noise.
    floor = max(0.1 * max(x.grad.norm().item() for x in (q64, k64, v64)), 1e-30)
    low = {"dq": ql, "dk": kl, "dv": vl} if same_dtype is not None else {}
    for name, ours, want in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert torch.isfinite(ours.grad).all(), name
        base = rel(low[name].grad, want.grad, floor) if low else 0
        err = rel(ours.grad, want.grad, floor)
        assert err <= tol(base), f"{name}: {err:.2e} vs allowed {tol(base):.2e}"
    assert (q.grad.transpose(1, 2)[pad_rows] == 0).all()


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("seed", range(10))
def test_random_layouts_fp32(seed, topology):
    kinds = random_kinds(seed, batch=3)
    layout = hk.StarLayout(kinds, topology=topology)
    d = [64, 32, 40, 128, 8][seed % 5]
    hq, hkv = [(2, 2), (4, 2), (4, 1)][seed % 3]
    q, k, v = make_qkv(3, hq, hkv, layout.seq_len, layout.seq_len, d, torch.float32, noncontig=seed % 2 == 1)
    check(q, k, v, layout, scale=None if seed % 4 else 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topology", ["star", "group"])
def test_dtypes(dtype, topology):
    layout = hk.StarLayout(random_kinds(100, batch=2, max_visual=70), topology=topology)
    q, k, v = make_qkv(2, 4, 2, layout.seq_len, layout.seq_len, 64, dtype)
    check(q, k, v, layout)


@pytest.mark.parametrize("seq", [1, 7, 97, 577])
def test_odd_sizes(seq):
    rng = random.Random(seq)
    kinds = [T] * min(seq, 3)
    while len(kinds) < seq:
        kinds += [V] * rng.randint(1, 200) + [C] * rng.randint(1, 2) + [T] * rng.randint(0, 4)
    kinds = torch.tensor(kinds[:seq])
    if seq > 1 and kinds[-1] == V:  # a trailing image without its <voco> is still a valid layout
        pass
    layout = hk.StarLayout(kinds)
    q, k, v = make_qkv(1, 2, 1, seq, seq, 48, torch.float32)
    check(q, k, v, layout)


@pytest.mark.parametrize("q_len", [1, 2, 65, 130])
@pytest.mark.parametrize("side", ["left", "right"])
def test_decode_bottom_right(q_len, side):
    rng = random.Random(q_len)
    samples = [random_sample(rng, max_visual=50) for _ in range(2)]
    kinds = pad_batch(samples, side, total=max(map(len, samples)) + 3)
    layout = hk.StarLayout(kinds)
    q_len = min(q_len, layout.seq_len)
    q, k, v = make_qkv(2, 4, 2, q_len, layout.seq_len, 64, torch.float32)
    check(q, k, v, layout)


def test_several_images_and_voco_tokens_both_paddings():
    rows = [
        [T] * 5 + [V] * 70 + [C] * 3 + [T] * 2 + [V] * 65 + [C] * 2 + [T] * 9,
        [T] * 2 + [V] * 30 + [C] + [T] * 4,
    ]
    for side in ("left", "right"):
        for topology in ("star", "group"):
            layout = hk.StarLayout(pad_batch(rows, side), topology=topology)
            q, k, v = make_qkv(2, 4, 4, layout.seq_len, layout.seq_len, 64, torch.float32)
            check(q, k, v, layout)


def test_layout_broadcast_over_batch():
    layout = hk.StarLayout(llava_kinds(prefix=5, visual=100, voco=2, suffix=7))
    q, k, v = make_qkv(3, 2, 2, layout.seq_len, layout.seq_len, 32, torch.float32)
    check(q, k, v, layout)


def test_llava_shape_fp32_forward():
    layout = hk.StarLayout(llava_kinds())
    q, k, v = make_qkv(1, 8, 8, 680, 680, 128, torch.float32)
    check(q, k, v, layout, grads=False)


def test_all_pad_sample_outputs_zero():
    kinds = pad_batch([[T, V, V, C, T], [P] * 5], "right")
    layout = hk.StarLayout(kinds)
    q, k, v = make_qkv(2, 2, 2, 5, 5, 16, torch.float32)
    check(q, k, v, layout)


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
    yield "not implemented yet", (q, k, v, layout), {"backend": "cuda"}
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
            q[..., :0], k[..., :0], v[..., :0], layout.kinds, layout.groups, plan, 64, 64, 0, 1.0
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
