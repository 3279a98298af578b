"""mgvq_lookup: every backend against the float64 brute force (DESIGN.md §6), ties, batch shapes,
gradients, opcheck, bad inputs. Triton runs under TRITON_INTERPRET=1 (the suite's command sets it;
one test also launches a subprocess with it set, so the interpreter path is always exercised)."""

import pytest
import torch
import torch.nn.functional as F

import htc_kernels as hk
from htc_kernels import _ext
from htc_kernels.backends import triton_reasons
from tests.children import interpreter_child, run_interpreted, run_python

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

TRITON_HERE = HAS_TRITON and not triton_reasons(torch.device("cpu"))


def kernel_backends():
    out = [pytest.param("cpu", marks=pytest.mark.skipif(not _ext.available(), reason="no extension"))]
    out.append(
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                not TRITON_HERE,
                reason="Triton needs TRITON_INTERPRET=1 on CPU (see the subprocess test)",
            ),
        )
    )
    return out


@pytest.fixture
def poison():
    """torch.empty returns NaN-filled memory, so an output element the kernel never writes fails."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


def scores64(z, cb, normalize):
    """[..., G, K] float64 scores, larger is better (cosine, or minus the squared distance)."""
    z, cb = z.double(), cb.double()
    if normalize:
        return torch.einsum("...gd,gkd->...gk", F.normalize(z, dim=-1), F.normalize(cb, dim=-1))
    return -(z.unsqueeze(-2) - cb).pow(2).sum(-1)


def rounding_tol(z, cb, normalize):
    """Absolute rounding bound on an fp32 score (per token-group, broadcastable to [..., G, 1])."""
    d = cb.shape[-1]
    eps = 6e-8 * (d + 4)
    if normalize:
        return torch.full(z.shape[:-1] + (1,), 4 * eps, dtype=torch.float64)
    zz = z.double().pow(2).sum(-1, keepdim=True)
    cc = cb.double().pow(2).sum(-1).amax(-1)  # [G]
    return 8 * eps * (zz + cc.unsqueeze(-1) + 1e-30)


def check_lookup(z, cb, normalize, codes, idx):
    G, K, d = cb.shape
    assert idx.dtype == torch.int64 and idx.shape == z.shape[:-1]
    assert codes.shape == z.shape and codes.dtype == z.dtype
    assert bool(((idx >= 0) & (idx < K)).all()), "index out of range (unwritten output?)"
    s = scores64(z, cb, normalize)
    tol = rounding_tol(z, cb, normalize)
    top2 = s.topk(min(2, K), dim=-1).values
    chosen = s.gather(-1, idx.unsqueeze(-1))
    # The chosen code's distance equals the brute-force minimum within rounding.
    assert bool((top2[..., :1] - chosen <= tol).all()), (top2[..., :1] - chosen - tol).max()
    # Exact index equality wherever the two best differ by more than rounding.
    ref_idx = s.argmax(-1)
    if K > 1:
        clear = (top2[..., 0] - top2[..., 1]) > 2 * tol[..., 0]
    else:
        clear = torch.ones_like(ref_idx, dtype=torch.bool)
    assert torch.equal(idx[clear], ref_idx[clear])
    assert clear.float().mean() > 0.5  # the test is not vacuous
    # Codes are the selected (unit-normalised) codebook rows.
    cbn = F.normalize(cb.double(), dim=-1).float() if normalize else cb.float()  # float32 |c|^2 may overflow
    expect = cbn[torch.arange(G), idx]
    torch.testing.assert_close(codes.float(), expect.to(codes.dtype).float(), rtol=1e-6, atol=1e-7)


SHAPES = [  # (batch shape, G, K, d)
    ((441,), 8, 2048, 4),  # MGVQ-f16c32-g8, one image
    ((2, 21), 8, 300, 4),
    ((7,), 4, 257, 8),  # K not a multiple of the vector width or the tile
    ((33,), 2, 17, 16),
    ((5,), 1, 64, 32),
    ((13,), 3, 50, 3),  # d not a fast path, not a multiple of anything
    ((9,), 2, 31, 5),
    ((4, 3), 2, 40, 17),
    ((1,), 1, 1, 1),  # K = 1
    ((), 3, 20, 4),  # no batch dims: z [G, d]
    ((0,), 2, 10, 4),  # empty batch
]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-G{s[1]}K{s[2]}d{s[3]}")
def test_matches_bruteforce(backend, normalize, shape, poison):
    batch, G, K, d = shape
    if backend == "triton" and K * max(1, int(torch.tensor(batch).prod())) > 200_000:
        K = 512  # keep the interpreter fast
    z = torch.randn(*batch, G, d) * 3
    cb = torch.randn(G, K, d)
    codes, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    if z.numel() == 0:
        assert codes.shape == z.shape and idx.shape == z.shape[:-1]
        return
    check_lookup(z, cb, normalize, codes, idx)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype, poison):
    z = torch.randn(37, 4, 8).to(dtype)
    cb = torch.randn(4, 100, 8).to(dtype)
    for normalize in (True, False):
        codes, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
        # The kernels compute in fp32 on the exactly representable low-precision inputs.
        check_lookup(z, cb, normalize, codes, idx)


@pytest.mark.parametrize("backend", kernel_backends())
def test_non_contiguous(backend, poison):
    base = torch.randn(6, 4, 10, 8)  # [d?]: slice so z is [10, 4, 6] non-contiguous
    z = base.permute(2, 1, 0, 3)[..., 1, :6]  # [10, 4, 6] with odd strides
    assert not z.is_contiguous()
    cb = torch.randn(8, 96, 6)[::2]  # [4, 96, 6] non-contiguous
    for normalize in (True, False):
        codes, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
        check_lookup(z, cb, normalize, codes, idx)


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_break_to_lowest_index(backend, normalize):
    G, K, d = 2, 200, 4
    cb = torch.randn(G, K, d)
    v = torch.randn(G, d)
    # The same code in one SIMD lane (5, 21), another lane (6), other tiles (130, 199).
    for pos in (199, 130, 21, 6, 5):
        cb[:, pos] = v
    z = v.clone().expand(3, G, d).clone()  # exact hit: score 1 (cosine) or distance 0 (L2)
    _, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    assert (idx == 5).all(), idx
    # Latents near the copies, not on them: their scores are rounded, and must round alike (the
    # reference's cosine was a GEMM, which rounded equal codes by their place in it).
    later = torch.tensor([6, 21, 130, 199])
    for dtype in (torch.float32, torch.float64) if backend == "reference" else (torch.float32,):
        zn = (v + 0.05 * torch.randn(256, G, d)).to(dtype)
        _, idx = hk.mgvq_lookup(zn, cb.to(dtype), normalize=normalize, backend=backend)
        assert not torch.isin(idx, later).any(), idx[torch.isin(idx, later)]
    # Only the later copies remain: the lowest of them wins.
    cb[:, 5] = -v
    _, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    assert (idx == 6).all(), idx
    if normalize:  # a zero latent scores 0 against every code: all tie, index 0
        _, idx = hk.mgvq_lookup(torch.zeros(2, G, d), cb, normalize=True, backend=backend)
        assert (idx == 0).all()


def _ref_losses(z, cb, normalize, grad_seed):
    codes, idx = hk.mgvq_lookup_reference(z, cb, normalize)
    return codes, idx, (codes * grad_seed).sum()


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradients_vs_dense_autograd(backend, normalize):
    G, K, d = 3, 9, 4
    z = (torch.randn(2, 11, G, d) * 2).requires_grad_()
    cb = torch.randn(G, K, d).requires_grad_()
    w = torch.randn(2, 11, G, d)
    codes, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    (codes * w).sum().backward()
    # Dense float64 autograd: gather the selected codes; straight-through to z.
    z64 = z.detach().double().requires_grad_()
    cb64 = cb.detach().double().requires_grad_()
    codes64, idx64 = hk.mgvq_lookup_reference(z64, cb64, normalize)
    assert torch.equal(idx, idx64)
    (codes64 * w.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cb.grad.double(), cb64.grad, rtol=1e-4, atol=1e-5)
    # Straight-through semantics checked independently of the reference: d codes / d z = d zn / d z.
    zz = z64.detach().clone().requires_grad_()
    zn = F.normalize(zz, dim=-1) if normalize else zz
    (zn * w.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), zz.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_mgvq_losses_train(backend):
    """MGVQ's codebook loss mean((zq - sg(z))^2) reaches only the codebook, the commitment loss
    beta * mean((sg(zq) - z)^2) only z; both match dense autograd."""
    G, K, d = 2, 16, 4
    z = torch.randn(20, G, d, requires_grad=True)
    cb = torch.randn(G, K, d, requires_grad=True)
    zq, _ = hk.mgvq_lookup(z, cb, backend=backend)
    zn = F.normalize(z, dim=-1)
    loss = ((zq - zn.detach()) ** 2).mean() + 0.25 * ((zq.detach() - zn) ** 2).mean()
    loss.backward()
    z2 = z.detach().double().requires_grad_()
    cb2 = cb.detach().double().requires_grad_()
    zq2, _ = hk.mgvq_lookup_reference(z2, cb2)
    zn2 = F.normalize(z2, dim=-1)
    loss2 = ((zq2 - zn2.detach()) ** 2).mean() + 0.25 * ((zq2.detach() - zn2) ** 2).mean()
    loss2.backward()
    # The codebook loss also reaches z straight-through (as the op's contract says); same in both.
    torch.testing.assert_close(z.grad.double(), z2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cb.grad.double(), cb2.grad, rtol=1e-4, atol=1e-6)
    assert cb.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


@pytest.mark.skipif(not _ext.available(), reason="no extension")
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_cpu_ops(normalize):
    z = torch.randn(6, 3, 5, requires_grad=True)
    cb = torch.randn(3, 19, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.htc.mgvq_lookup.default, (z, cb, normalize))
    codes, idx = torch.ops.htc.mgvq_lookup(z.detach(), cb.detach(), normalize)
    g = torch.randn_like(codes)
    torch.library.opcheck(
        torch.ops.htc.mgvq_lookup_backward.default, (g, z.detach(), cb.detach(), idx, normalize)
    )


@pytest.mark.skipif(not TRITON_HERE, reason="Triton needs TRITON_INTERPRET=1 on CPU")
def test_opcheck_triton_op():
    z = torch.randn(6, 3, 5, requires_grad=True)
    cb = torch.randn(3, 19, 5, requires_grad=True)
    hk.mgvq_lookup(z, cb, backend="triton")  # registers the op's autograd
    # test_aot_dispatch_dynamic traces through wrap_triton, which the CPU interpreter cannot do (it
    # dereferences the traced storages); on a GPU the full opcheck runs (test_opcheck_triton_gpu).
    torch.library.opcheck(
        torch.ops.htc.mgvq_lookup_triton.default,
        (z, cb, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU")
def test_opcheck_triton_gpu():
    z = torch.randn(6, 3, 5, device="cuda", requires_grad=True)
    cb = torch.randn(3, 19, 5, device="cuda", requires_grad=True)
    hk.mgvq_lookup(z, cb, backend="triton")
    torch.library.opcheck(torch.ops.htc.mgvq_lookup_triton.default, (z, cb, True))


@pytest.mark.skipif(not _ext.available(), reason="no extension")
def test_cpu_kernel_compiles_with_torch_compile():
    z = torch.randn(10, 2, 4)
    cb = torch.randn(2, 33, 4)
    f = torch.compile(lambda a, b: hk.mgvq_lookup(a, b, backend="cpu"), fullgraph=True)
    codes, idx = f(z, cb)
    ref_codes, ref_idx = hk.mgvq_lookup(z, cb, backend="cpu")
    assert torch.equal(idx, ref_idx) and torch.equal(codes, ref_codes)


@interpreter_child
def test_triton_interpreter_subprocess():
    """Always runs the Triton kernel under TRITON_INTERPRET=1, whatever this environment says."""
    run_interpreted(
        "import torch, htc_kernels as hk\n"
        "torch.manual_seed(1)\n"
        "for norm in (True, False):\n"
        "    z = torch.randn(70, 3, 5) * 2; cb = torch.randn(3, 133, 5)\n"
        "    c, i = hk.mgvq_lookup(z, cb, normalize=norm, backend='triton')\n"
        "    rc, ri = hk.mgvq_lookup_reference(z.double(), cb.double(), norm)\n"
        "    assert torch.equal(i, ri), (i != ri).sum()\n"
        "    torch.testing.assert_close(c, rc.float())\n"
    )


# --------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "z_shape, cb_shape, match",
    [
        ((5, 8, 4), (4, 16, 4), "must be \\[..., G=4, d=4\\]"),  # G mismatch
        ((5, 8, 4), (8, 16, 8), "must be \\[..., G=8, d=8\\]"),  # d mismatch
        ((4,), (1, 16, 4), "must be \\[..., G=1, d=4\\]"),  # z rank 1
        ((5, 8, 4), (8, 0, 4), "G, K, d >= 1"),  # K = 0
        ((5, 8, 4), (128, 4), "codebook must be 3-D"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_shapes(z_shape, cb_shape, match, backend):
    with pytest.raises(ValueError, match=match):
        hk.mgvq_lookup(torch.randn(z_shape), torch.randn(cb_shape), backend=backend)


def test_bad_dtypes_devices_backends():
    cb = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="floating point"):
        hk.mgvq_lookup(torch.ones(3, 2, 4, dtype=torch.int64), cb)
    with pytest.raises(ValueError, match="same dtype"):
        hk.mgvq_lookup(torch.randn(3, 2, 4, dtype=torch.float64), cb)
    with pytest.raises(ValueError, match="on meta but codebook on cpu"):
        hk.mgvq_lookup(torch.randn(3, 2, 4, device="meta"), cb)
    with pytest.raises(ValueError, match="unknown backend"):
        hk.mgvq_lookup(torch.randn(3, 2, 4), cb, backend="xformers")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run.*not a CUDA device"):
        hk.mgvq_lookup(torch.randn(3, 2, 4), cb, backend="cuda")
    with pytest.raises(ValueError, match="normalize must be a bool"):
        hk.mgvq_lookup(torch.randn(3, 2, 4), cb, normalize="yes")
    # float64 is served by the reference under "auto", refused by the kernels with the reason.
    z64, cb64 = torch.randn(3, 2, 4, dtype=torch.float64), cb.double()
    _, idx = hk.mgvq_lookup(z64, cb64)
    assert idx.shape == (3, 2)
    if _ext.available():
        with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
            hk.mgvq_lookup(z64, cb64, backend="cpu")


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_z(backend, normalize, bad):
    """Every backend raises (Inf with normalize=False used to pick index 1; Triton returned index -1)."""
    z = torch.randn(10, 2, 4)
    cb = torch.randn(2, 8, 4)
    z[3, 1, 2] = bad
    with pytest.raises(ValueError, match=r"z contains NaN/Inf.*token 3, group 1"):
        hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_nan_code_never_selected(backend):
    cb = torch.randn(2, 40, 4)
    z = cb[:, 7].clone().expand(5, 2, 4).clone()
    cb[:, 7] = float("nan")  # the exact match is NaN: never chosen
    _, idx = hk.mgvq_lookup(z, cb, backend=backend)
    assert (idx != 7).all() and (idx >= 0).all()


# --------------------------------------------------------------------------------------------------
# Hardening (issue 9): no overflow for any finite input, or a clear refusal
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize(
    "normalize, scale",
    # Cosine only upwards: vectors shorter than eps = 1e-12 are divided by eps (F.normalize semantics).
    [(True, 2.0**70), (True, 2.0**120), (False, 2.0**70), (False, 2.0**120), (False, 2.0**-100)],
)
def test_scale_invariance_power_of_two(backend, normalize, scale):
    """Scaling z and the codebook by a power of two changes no index (exact in binary floating point):
    |x| > ~1.8e19 used to overflow x^2 (cosine picked index 0 everywhere, L2 reported NaN/Inf)."""
    z = torch.randn(40, 3, 5)
    cb = torch.randn(3, 37, 5)
    _, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    codes, idx_scaled = hk.mgvq_lookup(z * scale, cb * scale, normalize=normalize, backend=backend)
    assert torch.equal(idx_scaled, idx)
    if not normalize:
        assert torch.equal(codes, cb[torch.arange(3), idx] * scale)


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_large_finite_inputs_match_bruteforce(backend, normalize):
    z = torch.randn(50, 2, 4) * 3e25
    cb = torch.randn(2, 40, 4) * 1e25
    cb[:, 11] = z[7]  # an exact match: distance 0 (L2), cosine 1
    codes, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    assert bool((idx[7] == 11).all())
    check_lookup(z, cb, normalize, codes, idx)
    if normalize:  # cosine ignores |z|: huge and tiny z (below eps: z / eps) keep their direction
        for factor in (1e37, 1e-30):
            codes, idx = hk.mgvq_lookup(z / 3e25 * factor, cb, normalize=True, backend=backend)
            check_lookup(z, cb, True, codes, idx)  # the cosine ranking of z itself


@pytest.mark.parametrize("backend", kernel_backends())
def test_l2_overflow_is_refused_with_the_reason(backend):
    """Squared L2 of a token ~1e38 against codes ~1 cannot be formed in float32: a clear refusal."""
    z = torch.randn(6, 2, 4)
    z[4, 0] = 3e38
    cb = torch.randn(2, 16, 4)
    with pytest.raises(ValueError, match=r"token 4, group 0.*overflow.*normalize=True"):
        hk.mgvq_lookup(z, cb, normalize=False, backend=backend)
    hk.mgvq_lookup(z, cb, normalize=True, backend=backend)  # cosine: fine


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_codebook_rows_are_never_selected_and_all_bad_raises(backend, normalize):
    z = torch.randn(9, 2, 4)
    cb = torch.randn(2, 20, 4)
    z[5, 0] = cb[0, 3]  # its nearest code, until that code holds an Inf
    cb[0, 3, 1] = float("inf")
    cb[1, :, 2] = float("nan")  # every code of group 1
    with pytest.raises(ValueError, match="every code of group 1 is NaN/Inf"):
        hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    cb[1, :, 2] = 0.5
    _, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    assert bool((idx[:, 0] != 3).all())


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_unselected_non_finite_rows_get_zero_gradient(backend, normalize):
    """A NaN/Inf codebook row is never selected, so its gradient is 0 (a NaN there would poison
    gradient clipping for every parameter)."""
    z = torch.randn(9, 2, 4)
    cb = torch.randn(2, 20, 4)
    cb[0, 3, 1], cb[1, 7, 0] = float("inf"), float("nan")
    cb.requires_grad_()
    codes, idx = hk.mgvq_lookup(z, cb, normalize=normalize, backend=backend)
    codes.sum().backward()
    assert bool(torch.isfinite(cb.grad).all())
    assert float(cb.grad[0, 3].abs().sum()) == 0 and float(cb.grad[1, 7].abs().sum()) == 0


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
def test_one_dimensional_cosine_ties_break_to_lowest_index(backend):
    """d = 1: every code of a sign has cosine exactly 1 with a latent of that sign, so the tie rule
    decides; unit codes must come out exactly +-1 (one rounding, as F.normalize), not 0.99999994."""
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(3, 129, 1, generator=g)
    z = torch.randn(65, 3, 1, generator=g)
    codes, idx = hk.mgvq_lookup(z, cb, normalize=True, backend=backend)
    first = torch.stack([(cb[:, :, 0] > 0).int().argmax(1), (cb[:, :, 0] < 0).int().argmax(1)], 1)  # [3, 2]
    want = first[torch.arange(3), (z[..., 0] < 0).long()]
    assert torch.equal(idx, want)
    assert torch.equal(codes.abs(), torch.ones_like(codes))


@pytest.mark.parametrize("backend", [*kernel_backends(), "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_double_backward_matches_the_reference(backend, normalize):
    """A gradient penalty differentiates the backward: the kernels' backward op has no autograd, so
    it must not be used then (its second-order terms would silently vanish)."""
    z0 = torch.randn(5, 2, 4) * 2
    cb0 = torch.randn(2, 9, 4)

    def penalty(be):
        z, cb = z0.clone().requires_grad_(), cb0.clone().requires_grad_()
        codes, _ = hk.mgvq_lookup(z, cb, normalize=normalize, backend=be)
        gz, gc = torch.autograd.grad(codes.pow(2).sum(), (z, cb), create_graph=True)  # 2 codes upstream
        (gz.pow(2).sum() + gc.pow(2).sum()).backward()
        return z.grad, cb.grad

    got, want = penalty(backend), penalty("reference")
    for a, b in zip(got, want):
        assert a is not None and float(b.abs().sum()) > 0  # not vacuous
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not _ext.available(), reason="no extension")
def test_backward_op_checks_the_indices_shape():
    z = torch.randn(3, 2, 4)
    cb = torch.randn(2, 8, 4)
    _, idx = torch.ops.htc.mgvq_lookup(z, cb, True)
    g = torch.randn_like(z)
    with pytest.raises(
        ValueError, match=r"indices must be int64 of shape z.shape\[:-1\] = \[3, 2\], got Long \[2, 3\]"
    ):
        torch.ops.htc.mgvq_lookup_backward(g, z, cb, idx.T.contiguous(), True)
    with pytest.raises(ValueError, match="indices must be int64"):
        torch.ops.htc.mgvq_lookup_backward(g, z, cb, idx.int(), True)
    for bad in (g.to(torch.complex64), g.long(), g.double()):  # would be read as another dtype
        with pytest.raises(ValueError, match="grad_codes has dtype"):
            torch.ops.htc.mgvq_lookup_backward(bad, z, cb, idx, True)


def test_unsupported_float_dtype_is_a_value_error():
    z = torch.randn(3, 2, 4).to(torch.float8_e4m3fn)
    cb = torch.randn(2, 8, 4).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_e4m3fn.*float32, bfloat16, float16"):
        hk.mgvq_lookup(z, cb)


@pytest.mark.skipif(not _ext.available(), reason="no extension")
def test_forward_mode_ad_takes_the_reference_or_is_refused():
    """The kernels' ops have reverse-mode autograd only (a jvp through them came out zero): "auto"
    takes the reference under torch.func.jvp, an explicit kernel backend refuses."""
    z, cb, t = torch.randn(5, 2, 4), torch.randn(2, 7, 4), torch.randn(5, 2, 4)
    want = torch.func.jvp(lambda z: hk.mgvq_lookup_reference(z, cb)[0], (z,), (t,))[1]
    got = torch.func.jvp(lambda z: hk.mgvq_lookup(z, cb)[0], (z,), (t,))[1]
    assert float(want.norm()) > 0 and torch.allclose(got, want)
    with pytest.raises(ValueError, match="forward-mode AD"):
        torch.func.jvp(lambda z: hk.mgvq_lookup(z, cb, backend="cpu")[0], (z,), (t,))


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """The interpreter runs the kernel without type-checking it; a GPU compiles it. Cosine mode failed
    to compile on every Triton (a name bound before the tile loop and rebound inside it with another
    shape is a loop-carried variable): the GPU's cosine lookups on backend="triton" would fail."""
    pytest.importorskip("triton")
    code = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from htc_kernels.triton import mgvq_lookup as tm\n"
        "sig = dict(z_ptr='*bf16', cb_ptr='*fp32', cbsq_ptr='*fp32', gscale_ptr='*fp32', src_ptr='*fp32',\n"
        "           codes_ptr='*fp32', idx_ptr='*i64', N='i32', G='i32', K='i32', D='i32', limit='fp32')\n"
        "for normalize in (True, False):\n"
        "    for d in (4, 5):\n"
        "        block_n, block_k, block_d = tm.tile_sizes(d)\n"
        "        consts = dict(NORMALIZE=normalize, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)\n"
        "        full = {**sig, **{k: 'constexpr' for k in consts}}\n"
        "        for arch in (80, 90):\n"
        "            src = ASTSource(fn=tm._mgvq_lookup_kernel, signature=full, constexprs=consts)\n"
        "            triton.compile(src, target=GPUTarget('cuda', arch, 32))\n"
        "print('ok')\n"
    )
    out = run_python(code, TRITON_INTERPRET="0")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
