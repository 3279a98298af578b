"""Fuzz of the raw ops (torch.ops.htc.*): random layouts, groups, plans, block sizes, shapes, strides,
dtypes and values, valid and invalid. Every call must either raise a clean Python exception or return
what the reference returns; never crash (run under AddressSanitizer by `make test-asan`).

Bounded time: each test runs iterations for HTC_FUZZ_SECONDS (default 2) seconds and at least
MIN_ITERATIONS. HTC_FUZZ_SEED (default fixed, so CI is reproducible) picks the sequence; a failure
names its iteration's seed string: `HTC_FUZZ_SEED=<middle part>` replays the sequence (each iteration
seeds `random` and torch from its string).
"""

from __future__ import annotations

import math
import os
import random
import time
import zlib

import pytest
import torch
import torch.nn.functional as F

import htc_kernels as hk
from htc_kernels import _ext
from htc_kernels.layout import TileKind
from htc_kernels.mgvq_lookup import l2_group_scales, l2_token_limit, mgvq_lookup_backward_reference
from tests.accuracy import rel, stored_output_grads
from tests.layouts import P, pad_batch, random_sample
from tests.test_layout import _tile_any, _tile_semantics

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.LOAD_ERROR}")

SECONDS = float(os.environ.get("HTC_FUZZ_SECONDS", "2"))
SEED = os.environ.get("HTC_FUZZ_SEED", "0")
MIN_ITERATIONS = 10
CLEAN = (RuntimeError, ValueError, TypeError, IndexError)  # what a bad call may raise


def iterations(name: str):
    """(seed string, rng) until the time budget is spent."""
    start = time.monotonic()
    i = 0
    while i < MIN_ITERATIONS or time.monotonic() - start < SECONDS:
        seed = f"{name}-{SEED}-{i}"
        torch.manual_seed(zlib.crc32(seed.encode()))
        yield seed, random.Random(seed)
        i += 1


def random_layout(rng: random.Random) -> hk.StarLayout:
    """Left/right padding, PAD runs inside samples (compacted caches), 0..3 images, explicit groups
    with arbitrary int32 ids, both topologies."""
    samples = []
    for _ in range(rng.randint(1, 3)):
        seq = random_sample(rng, max_images=rng.randint(0, 3), max_visual=rng.choice([3, 20, 70]))
        if rng.random() < 0.5:
            at = rng.randint(0, len(seq))
            seq = seq[:at] + [P] * rng.randint(1, 40) + seq[at:]
        samples.append(seq)
    kinds = pad_batch(
        samples, rng.choice(["left", "right"]), total=max(map(len, samples)) + rng.randint(0, 4)
    )
    topology = rng.choice(["star", "group"])
    layout = hk.StarLayout(kinds, topology=topology)
    if rng.random() < 0.5:  # the same images under other (distinct, arbitrary) group ids
        ids = torch.tensor(rng.sample(range(2**31 - 1), 8))
        groups = torch.where(layout.groups >= 0, ids[layout.groups.long().clamp(min=0)], -1)
        layout = hk.StarLayout(kinds, groups, topology)
    return layout


def random_strided(rng: random.Random, shape, dtype) -> torch.Tensor:
    """A random tensor of `shape` with one of several memory layouts (values are standard normal)."""
    b, h, s, d = shape
    how = rng.choice(["contiguous", "bshd", "last_dim_strided", "expanded_heads"])
    if how == "bshd":  # HF's [B, S, H, D] viewed as [B, H, S, D]
        t = torch.randn(b, s, h, d).transpose(1, 2)
    elif how == "last_dim_strided":
        t = torch.randn(b, h, s, 2 * d)[..., ::2]
    elif how == "expanded_heads":  # stride 0 over heads
        t = torch.randn(b, 1, s, d).expand(b, h, s, d)
    else:
        t = torch.randn(b, h, s, d)
    return t.to(dtype)


def test_fuzz_star_plan():
    for seed, rng in iterations("star_plan"):
        layout = random_layout(rng)
        b, s = layout.kinds.shape
        q_len = rng.choice([s, rng.randint(1, s), 1, 0, s + 1, -5])
        bq = rng.choice([rng.randint(1, 70), 64, 1, 1024, 0, 1025, 2**62, -1, 2**63 - 10])
        bk = rng.choice([rng.randint(1, 70), 64, 1, 1024, 0, 1025, 2**62, -1, 2**63 - 10])
        topology = rng.choice([layout.topology_id] * 4 + [2, -1])
        kinds, groups = layout.kinds, layout.groups
        corrupt = rng.choice([None] * 6 + ["kinds_int64", "kinds_value", "groups_shape", "kinds_1d"])
        if corrupt == "kinds_int64":
            kinds = kinds.long()
        elif corrupt == "kinds_value":
            kinds = kinds.clone()
            kinds[rng.randrange(b), rng.randrange(s)] = rng.choice([4, 9, -1, 127])
        elif corrupt == "groups_shape":
            groups = groups[:, :-1] if s > 1 else groups[:0]
        elif corrupt == "kinds_1d":
            kinds = kinds[0]
        valid = 1 <= q_len <= s and 1 <= bq <= 1024 and 1 <= bk <= 1024 and topology in (0, 1) and not corrupt
        try:
            plan = torch.ops.htc.star_plan(kinds, groups, q_len, bq, bk, topology)
        except CLEAN as exc:
            assert not valid, f"{seed}: valid call raised {exc!r}"
            continue
        assert valid, (
            f"{seed}: invalid call accepted (q_len={q_len} bq={bq} bk={bk} topo={topology} {corrupt})"
        )
        assert plan.shape == (b, -(-q_len // bq), -(-s // bk)) and plan.dtype == torch.uint8, seed
        mask = hk.star_mask(layout, q_len)
        assert torch.equal(_tile_semantics(plan, layout.kinds, mask, q_len, bq, bk), mask), seed
        assert torch.equal(plan == TileKind.SKIP, ~_tile_any(mask, bq, bk)), seed


def _corrupt_attention_args(rng, args: dict) -> str:
    """Make one argument of a valid star_attention call invalid; returns what was done."""
    what = rng.choice(
        [
            "plan_blocks",
            "topology",
            "kinds_batch",
            "block_zero",
            "block_big",
            "head_dim",
            "sq",
            "plan_dtype",
            "softcap",
        ]
    )
    if what == "plan_blocks":
        # A plan of other block sizes whose shape differs. (Contents are trusted: a plan of the same
        # shape for other block sizes cannot be told apart without rebuilding it, see csrc/ops.cpp.)
        sq, skv = args["q"].shape[2], args["k"].shape[2]
        shape = tuple(args["plan"].shape[1:])
        sizes = ((bq, bk) for bq in range(1, 1025) for bk in (bq, 1024))
        other = next(((bq, bk) for bq, bk in sizes if (-(-sq // bq), -(-skv // bk)) != shape), None)
        if other is None:  # Sq = Skv = 1: every plan has one tile
            args["topology"] = 3
            return "topology"
        args["plan"] = torch.ops.htc.star_plan(args["kinds"], args["groups"], sq, *other, 0)
    elif what == "topology":
        args["topology"] = 3
    elif what == "kinds_batch":
        args["kinds"] = args["kinds"][:1].expand(args["q"].shape[0] + 1, -1).contiguous()
    elif what == "block_zero":
        args["block_q"] = 0
    elif what == "block_big":
        args["block_k"] = 4096
    elif what == "head_dim":
        args["q"] = args["q"][..., :-1] if args["q"].shape[-1] > 1 else torch.cat([args["q"]] * 2, -1)
    elif what == "softcap":
        args["softcap"] = rng.choice([-1.0, float("nan"), float("inf"), 1e-45])
    elif what == "sq":  # more queries than keys
        b, h, _, d = args["q"].shape
        args["q"] = torch.randn(b, h, args["k"].shape[2] + 1, d).to(args["q"].dtype)
    else:
        args["plan"] = args["plan"].long()
    return what


def test_fuzz_star_attention():
    for seed, rng in iterations("star_attention"):
        layout = random_layout(rng)
        s = layout.seq_len
        b = layout.batch_size if layout.batch_size > 1 or rng.random() < 0.5 else rng.randint(2, 3)
        hkv = rng.randint(1, 3)
        hq = hkv * rng.randint(1, 3)
        d = rng.choice([1, 3, 8, 16, 17, 32, 40, 64, 100])
        sq = rng.choice([s, s, rng.randint(1, s), 1])
        dtype = rng.choice([torch.float32] * 4 + [torch.bfloat16, torch.float16])
        bq = rng.choice([64, 64, rng.randint(1, 130), 1, 16, 128, 256, 1024])
        bk = rng.choice([64, 64, rng.randint(1, 130), 1, 16, 128, 256, 1024])
        scale = rng.choice([d**-0.5, 0.3, 1.7])
        softcap = rng.choice([None, None, 0.5, 3.0, 30.0])
        q = random_strided(rng, (b, hq, sq, d), dtype)
        k = random_strided(rng, (b, hkv, s, d), dtype)
        v = random_strided(rng, (b, hkv, s, d), dtype)
        plan = torch.ops.htc.star_plan(layout.kinds, layout.groups, sq, bq, bk, layout.topology_id)
        args = dict(
            q=q, k=k, v=v, kinds=layout.kinds, groups=layout.groups, plan=plan, block_q=bq, block_k=bk
        )
        args.update(topology=layout.topology_id, scale=scale, softcap=softcap or 0.0)
        if rng.random() < 0.15:
            what = _corrupt_attention_args(rng, args)
            with pytest.raises(CLEAN):
                torch.ops.htc.star_attention(*args.values())
                pytest.fail(f"{seed}: corrupted call ({what}) accepted")
            continue
        # Masked means never read: NaN in every PAD position of K, V and q must change nothing.
        poison = rng.random() < 0.5
        pad_k = (layout.kinds == P).expand(b, -1)  # [B, Skv]
        pad_q = pad_k[:, s - sq :]
        if poison and bool(pad_k.any()):
            for name, mask in (("k", pad_k), ("v", pad_k), ("q", pad_q)):
                t = args[name].clone()
                t.transpose(1, 2)[mask] = float("nan")
                args[name] = t
        out, lse = torch.ops.htc.star_attention(*args.values())
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref = hk.star_attention_reference(q64, k64, v64, layout, scale, softcap)
        tol = 1e-4
        if dtype != torch.float32:  # 2x the error of the same math in that dtype, plus a floor
            tol = 2 * rel(hk.star_attention_reference(q, k, v, layout, scale, softcap), ref) + 2e-3
        assert out.shape == q.shape and out.dtype == dtype, seed
        assert rel(out, ref) <= tol, f"{seed}: out error {rel(out, ref):.2e} > {tol:.2e}"
        assert (out.transpose(1, 2)[pad_q] == 0).all(), f"{seed}: PAD rows not zero"
        if rng.random() < 0.4:
            g = torch.randn(b, hq, sq, d)
            g_dirty = g.clone()
            if poison:
                g_dirty.transpose(1, 2)[pad_q] = float("nan")
            dq, dk, dv = torch.ops.htc.star_attention_backward(
                g_dirty.to(dtype), args["q"], args["k"], args["v"], out, lse, None, *list(args.values())[3:]
            )
            ref.backward(g.double())
            low = None
            if dtype != torch.float32:  # the same math in that dtype sets the tolerance, as in check()
                low = [x.detach().requires_grad_() for x in (q, k, v)]
                hk.star_attention_reference(*low, layout, scale, softcap).backward(g.to(dtype))
            floor = max(0.1 * max(x.grad.norm().item() for x in (q64, k64, v64)), 1e-30)
            target = stored_output_grads(q, k, v, layout, scale, softcap, out, g)
            for i, (name, ours, want) in enumerate(zip(("dq", "dk", "dv"), (dq, dk, dv), target)):
                assert ours.shape == want.shape and bool(torch.isfinite(ours).all()), f"{seed}: {name}"
                exact = (q64, k64, v64)[i].grad
                bound = 1e-4 if low is None else 2 * rel(low[i].grad, exact, floor) + 2e-3
                err = rel(ours, want, floor)
                assert err <= bound, f"{seed}: {name} error {err:.2e} > {bound:.2e}"


def _mgvq_expected_errors(z, cb, normalize) -> list[str]:
    """The ValueErrors the kernels may raise for (z, cb) (they report the first token-group with no
    code); empty: they must not raise."""
    g, _, d = cb.shape
    zf, cf = z.float().reshape(-1, g, d), cb.float()
    if zf.numel() == 0:
        return []
    errors = []
    if not bool(torch.isfinite(zf).all()):
        errors.append("z contains NaN/Inf")
    if not bool(torch.isfinite(cf).all(-1).any(-1).all()):
        errors.append("is NaN/Inf: no code can be selected")
    if not normalize and bool(((zf * l2_group_scales(cf)[:, None]).abs() > l2_token_limit(d)).any()):
        errors.append("is too large for the squared-L2 score")
    return errors


def _check_mgvq_result(seed, z, cb, normalize, codes, idx):
    """The chosen code is the float64 brute-force best within rounding; codes are the selected rows."""
    g, k, d = cb.shape
    assert idx.shape == z.shape[:-1] and codes.shape == z.shape and codes.dtype == z.dtype, seed
    if idx.numel() == 0:
        return
    assert bool(((idx >= 0) & (idx < k)).all()), seed
    z64, cb64 = z.double(), cb.double()
    if normalize:  # ranking of the directions (F.normalize's eps clamp only rescales a tiny z)
        zn = z64 / z64.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        s = torch.einsum("...gd,gkd->...gk", F.normalize(zn, dim=-1), F.normalize(cb64, dim=-1))
        tol = torch.full(s.shape[:-1] + (1,), 24e-8 * (d + 4), dtype=torch.float64)
    else:
        s = -(z64.unsqueeze(-2) - cb64).pow(2).sum(-1)
        finite = torch.isfinite(cb64).all(-1)  # NaN/Inf rows are never chosen; they set no scale
        cc = torch.where(finite, cb64.pow(2).sum(-1), torch.zeros_like(finite, dtype=torch.float64))
        tol = 48e-8 * (d + 4) * (z64.pow(2).sum(-1, keepdim=True) + cc.amax(-1).unsqueeze(-1))
    s = torch.nan_to_num(s, nan=-math.inf)
    best = s.max(-1, keepdim=True).values
    chosen = s.gather(-1, idx.unsqueeze(-1))
    assert bool((best - chosen <= tol + 1e-300).all()), f"{seed}: chosen code not the nearest"
    want = F.normalize(cb64, dim=-1) if normalize else cb64
    expect = want[torch.arange(g), idx].to(z.dtype)
    torch.testing.assert_close(
        codes, expect, rtol=2e-6 if z.dtype == torch.float32 else 1e-2, atol=0, msg=seed
    )


def test_fuzz_mgvq_lookup():
    for seed, rng in iterations("mgvq_lookup"):
        g, k, d = rng.randint(1, 5), rng.randint(1, 70), rng.choice([1, 2, 3, 4, 5, 8, 16, 17, 32, 33])
        batch = rng.choice([(), (0,), (rng.randint(1, 30),), (rng.randint(1, 4), rng.randint(1, 7))])
        dtype = rng.choice([torch.float32] * 4 + [torch.bfloat16, torch.float16])
        normalize = rng.random() < 0.5
        big = 1e30 if dtype != torch.float16 else 1e4
        z = torch.randn(*batch, g, d) * rng.choice([1.0, 1e-20, big, 3.0])
        cb = torch.randn(g, k, d) * rng.choice([1.0, 1e-20, big, 0.1])
        if z.numel() and rng.random() < 0.1:
            z.view(-1)[rng.randrange(z.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        if rng.random() < 0.1:
            cb[rng.randrange(g), rng.randrange(k), rng.randrange(d)] = rng.choice([math.nan, math.inf])
        if rng.random() < 0.05:
            cb[rng.randrange(g)] = math.nan
        if not normalize and rng.random() < 0.1 and z.numel():
            z.view(-1)[rng.randrange(z.numel())] = 3e38 if dtype != torch.float16 else 6e4
        z, cb = z.to(dtype), cb.to(dtype)
        if rng.random() < 0.3 and z.dim() >= 3:  # non-contiguous z
            z = z.transpose(0, -2).contiguous().transpose(0, -2)
        expected = _mgvq_expected_errors(z, cb, normalize)
        try:
            codes, idx = torch.ops.htc.mgvq_lookup(z, cb, normalize)
        except ValueError as exc:
            assert any(e in str(exc) for e in expected), f"{seed}: raised {exc!r}, expected one of {expected}"
            continue
        assert not expected, f"{seed}: accepted; expected an error ({expected})"
        _check_mgvq_result(seed, z, cb, normalize, codes, idx)
        # Backward: valid indices, or corrupted ones (a clean error).
        grad = torch.randn(z.shape).to(dtype)
        bad_idx = rng.choice([None] * 3 + ["transposed", "out_of_range", "int32", "negative"])
        use = idx
        if bad_idx == "transposed" and idx.dim() >= 2 and idx.shape[0] != idx.shape[-1]:
            use = idx.transpose(0, -1).contiguous()
        elif bad_idx == "out_of_range" and idx.numel():
            use = idx.clone()
            use.view(-1)[0] = k
        elif bad_idx == "int32":
            use = idx.int()
        elif bad_idx == "negative" and idx.numel():
            use = idx.clone()
            use.view(-1)[-1] = -1
        else:
            bad_idx = None
        try:
            gz, gcb = torch.ops.htc.mgvq_lookup_backward(grad, z, cb, use, normalize)
        except CLEAN as exc:
            assert bad_idx is not None, f"{seed}: valid backward raised {exc!r}"
            continue
        assert bad_idx is None, f"{seed}: backward accepted {bad_idx} indices"
        g64, z64, cb64 = grad.double(), z.double(), cb.double()
        rz, rcb = mgvq_lookup_backward_reference(g64, z64, cb64, idx, normalize)
        # Error scale: the gradient before the normalisations' projections (which may cancel it to
        # rounding noise, e.g. d = 1), times their 1/max(|v|, eps).
        sz, scb = mgvq_lookup_backward_reference(g64, z64, cb64, idx, False)
        if normalize:
            sz = sz / z64.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scb = scb / cb64.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for name, ours, want, scale in (("grad_z", gz, rz, sz), ("grad_codebook", gcb, rcb, scb)):
            # NaN/Inf codebook rows have NaN gradients in both; |grad| beyond the dtype's range (e.g.
            # 1e12 dy through a clamped norm in float16) is Inf in both.
            ok = torch.isfinite(want.to(dtype))
            assert bool(torch.isfinite(ours[ok]).all()), f"{seed}: {name} not finite"
            if bool(ok.any()):
                scale = torch.nan_to_num(scale[ok], nan=0.0, posinf=0.0)  # NaN codes: 0 / |NaN|
                err = rel(ours[ok], want[ok], max(scale.norm().item() * 1e-3, 1e-30))
                assert err <= (1e-4 if dtype == torch.float32 else 2e-2), f"{seed}: {name} error {err:.2e}"
