"""StarLayout, star_mask and the block plan (DESIGN.md §2, §4)."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

import htc_kernels as hk
from htc_kernels import _ext
from htc_kernels.layout import TileKind, _plan_from_mask
from tests.layouts import C, P, T, V, llava_kinds, random_kinds


def brute_mask(kinds, groups, topology, q_len=None):
    """DESIGN.md §2 spelled out element by element (independent of layout._allowed)."""
    b, s = kinds.shape
    q_len = s if q_len is None else q_len
    out = torch.zeros(b, q_len, s, dtype=torch.bool)
    for n, r, j in itertools.product(range(b), range(q_len), range(s)):
        i = r + s - q_len
        ki, kj, gi, gj = int(kinds[n, i]), int(kinds[n, j]), int(groups[n, i]), int(groups[n, j])
        if j > i or ki == P or kj == P:
            continue
        if kj == V:
            if ki == V:
                ok = (j == i) if topology == "star" else gi == gj
            else:
                ok = ki == C and gi == gj
        else:
            ok = True
        out[n, r, j] = ok
    return out


def test_default_groups():
    kinds = torch.tensor([T, V, V, C, T, V, C, C, T, V, V])
    layout = hk.StarLayout(kinds)
    assert layout.groups.tolist() == [[-1, 0, 0, 0, -1, 1, 1, 1, -1, 2, 2]]
    assert layout.kinds.dtype == torch.int8 and layout.groups.dtype == torch.int32


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("seed", range(6))
def test_star_mask_matches_rule(seed, topology):
    kinds = random_kinds(seed, batch=2, max_visual=9)
    layout = hk.StarLayout(kinds, topology=topology)
    q_len = [None, 1, kinds.shape[1] // 2 or 1][seed % 3]
    assert torch.equal(hk.star_mask(layout, q_len), brute_mask(layout.kinds, layout.groups, topology, q_len))


def test_star_mask_semantics_llava():
    layout = hk.StarLayout(llava_kinds(prefix=3, visual=4, voco=1, suffix=2))
    m = hk.star_mask(layout)[0]
    assert m[3, :4].tolist() == [True] * 4  # first visual sees the prefix and itself
    assert not m[4, 3]  # visual never sees another visual token (star)
    assert m[7, :8].all()  # voco sees prefix, its image, itself
    assert m[9].tolist() == [True] * 3 + [False] * 4 + [True] * 3  # text skips raw visual tokens


def _tile_semantics(plan, kinds, exact, q_len, bq, bk):
    """What each element becomes when a kernel follows the plan (SKIP/FULL/CAUSAL/DIAG/MASKED);
    `exact` is the element-wise mask a MASKED tile evaluates."""
    b, s = kinds.shape
    r = torch.arange(q_len)[:, None]
    p = r + s - q_len
    j = torch.arange(s)[None, :]
    tk = plan[:, r // bq, j // bk].long()  # [B, q_len, s]
    out = torch.zeros(b, q_len, s, dtype=torch.bool)
    out |= tk == TileKind.FULL
    out |= (tk == TileKind.CAUSAL) & (j <= p)
    not_pad = kinds[:, s - q_len :, None] != P
    out |= (tk == TileKind.DIAG) & (j == p) & not_pad
    out |= (tk == TileKind.MASKED) & exact
    return out


def _tile_any(mask, bq, bk):
    b, sq, s = mask.shape
    n_qt, n_kt = -(-sq // bq), -(-s // bk)
    padded = torch.nn.functional.pad(mask, (0, n_kt * bk - s, 0, n_qt * bq - sq))
    return padded.view(b, n_qt, bq, n_kt, bk).any(4).any(2)


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("seed", range(8))
def test_plan_is_exact(seed, topology):
    kinds = random_kinds(seed, batch=3)
    layout = hk.StarLayout(kinds, topology=topology)
    s = layout.seq_len
    for q_len, bq, bk in [(s, 16, 16), (s, 7, 5), (1, 64, 64), (max(1, s // 3), 8, 32)]:
        mask = hk.star_mask(layout, q_len)
        for plan in (
            layout.plan(q_len, bq, bk),
            _plan_from_mask(layout.kinds, layout.groups, q_len, bq, bk, layout.topology_id),
        ):
            assert plan.shape == (3, -(-q_len // bq), -(-s // bk)) and plan.dtype == torch.uint8
            assert torch.equal(_tile_semantics(plan, layout.kinds, mask, q_len, bq, bk), mask)
            # Sparse, not just exact: a tile is SKIP exactly when it has no allowed element.
            any_allowed = _tile_any(mask, bq, bk)
            assert torch.equal(plan == TileKind.SKIP, ~any_allowed)


def _taken(plan, panel, kinds, mask, bq, bk):
    """How often a kernel following a key-panel plan computes each (query row, key position):
    int ``[B, q_len, S]``, from the tile kinds alone (a DIAG row also needs its own key not to be a
    hole, i.e. a VISUAL row); exact when it equals the mask (0 or 1 each)."""
    b, q_len, s = mask.shape
    n_panel = panel.shape[1]
    positions = torch.cat([panel.long(), torch.arange(s).expand(b, s)], dim=1)  # mapped key -> position
    kind_k = kinds.long().gather(1, positions.clamp(min=0))
    hole = (torch.arange(n_panel + s) >= n_panel) & ((kind_k == T) | (kind_k == C))
    live_k = (positions >= 0) & ~hole & (kind_k != P)
    p = torch.arange(s - q_len, s)[None, :, None]
    j = positions[:, None, :]
    tk = plan[:, torch.arange(q_len)[:, None] // bq, torch.arange(n_panel + s)[None, :] // bk].long()
    kind_q = kinds[:, s - q_len :, None].long()
    allowed_mapped = (
        mask.gather(2, positions.clamp(min=0)[:, None, :].expand(-1, q_len, -1)) & live_k[:, None]
    )
    computed = tk == TileKind.FULL
    computed |= (tk == TileKind.CAUSAL) & (j <= p) & (positions[:, None, :] >= 0)
    computed |= (tk == TileKind.DIAG) & (j == p) & (kind_q == V)
    computed |= (tk == TileKind.MASKED) & allowed_mapped
    assert not ((tk == TileKind.DIAG) & (torch.arange(n_panel + s) < n_panel)).any(), "DIAG panel tile"
    taken = torch.zeros(b, q_len, s + 1, dtype=torch.long)  # the last column collects empty slots
    taken.scatter_add_(
        2, torch.where(positions >= 0, positions, s)[:, None, :].expand(-1, q_len, -1), computed.long()
    )
    assert not taken[..., s].any(), "an empty panel slot was computed"
    return taken[..., :s]


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("seed", range(8))
def test_key_panel_plan_is_exact(seed, topology):
    """Plans in the key panel's order (C++ op and the dense-mask fallback): every allowed (row, key)
    computed exactly once, nothing else; and sparse (a tile is SKIP iff nothing in it is allowed)."""
    kinds = random_kinds(seed, batch=3)
    layout = hk.StarLayout(kinds, topology=topology)
    s = layout.seq_len
    for q_len, bq, bk in [(s, 16, 16), (s, 7, 5), (1, 64, 64), (max(1, s // 3), 8, 32)]:
        panel = layout.key_panel(bk)
        n = ((kinds == T) | (kinds == C)).sum(1)
        assert panel.shape == (3, -(-int(n.max()) // bk) * bk) and panel.dtype == torch.int32
        for b in range(3):
            want = torch.nonzero((layout.kinds[b] == T) | (layout.kinds[b] == C)).flatten()
            assert panel[b, : len(want)].tolist() == want.tolist() and (panel[b, len(want) :] == -1).all()
        mask = hk.star_mask(layout, q_len)
        for plan in (
            layout.plan(q_len, bq, bk, panel=True),
            _plan_from_mask(layout.kinds, layout.groups, q_len, bq, bk, layout.topology_id, panel),
        ):
            assert plan.shape == (3, -(-q_len // bq), panel.shape[1] // bk + -(-s // bk))
            assert torch.equal(_taken(plan, panel, layout.kinds, mask, bq, bk), mask.long())
            positions = torch.cat([panel.long(), torch.arange(s).expand(3, s)], dim=1)
            kind_k = layout.kinds.long().gather(1, positions.clamp(min=0))
            hole = (torch.arange(positions.shape[1]) >= panel.shape[1]) & ((kind_k == T) | (kind_k == C))
            mapped = mask.gather(2, positions.clamp(min=0)[:, None, :].expand(-1, q_len, -1))
            mapped &= ((positions >= 0) & ~hole)[:, None, :]
            assert torch.equal(plan == TileKind.SKIP, ~_tile_any(mapped, bq, bk))


@pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension")
def test_plan_op_refuses_a_wrong_panel():
    """The plan op checks the panel it is given (shape, dtype, and on CPU that it lists exactly the
    TEXT/VOCO positions in order): a wrong one would make kernels take keys twice or never."""
    layout = hk.StarLayout(torch.tensor([T, T, V, V, C, T, V, C, T]))
    args = (layout.kinds, layout.groups, 9, 4, 4, 0)
    good = layout.key_panel(4)
    assert good.tolist() == [[0, 1, 4, 5, 7, 8, -1, -1]]
    torch.ops.htc.star_plan(*args, good)
    for bad, match in [
        (good[:, :6], "multiple of block_k"),
        (good.long(), "int32"),
        (good.expand(2, -1), r"\[B, P\]"),
        (torch.tensor([[0, 1, 4, 5, 7, 8, 8, -1]], dtype=torch.int32), "must be -1"),
        (torch.tensor([[0, 4, 1, 5, 7, 8, -1, -1]], dtype=torch.int32), "must be position 1"),
        (torch.tensor([[0, 1, 4, 5, 7, -1, -1, -1]], dtype=torch.int32), "must be position 8"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.htc.star_plan(*args, bad)


def test_key_panel_decision_and_visits():
    """The panel is taken with >= 2 images in a sample, and then it cuts the tile visits."""
    one = hk.StarLayout(llava_kinds())
    assert not one.uses_key_panel
    images = [T] * 5 + ([V] * 100 + [C] + [T] * 13) * 6 + [T] * 20
    many = hk.StarLayout(torch.tensor(images))
    assert many.uses_key_panel
    s = many.seq_len
    visits = int((many.plan(s, 64, 64) != TileKind.SKIP).sum())
    with_panel = int((many.plan(s, 64, 64, panel=True) != TileKind.SKIP).sum())
    assert with_panel < visits, (with_panel, visits)


def test_plan_skips_and_diagonals_on_llava_shape():
    layout = hk.StarLayout(llava_kinds())
    plan = layout.plan(680, 64, 64)[0]
    assert (plan == TileKind.DIAG).sum() >= 8  # visual x visual diagonal tiles: row dots, no GEMM
    assert (plan == TileKind.SKIP).sum() > plan.numel() // 2
    assert layout.plan(680, 64, 64) is layout.plan(680, 64, 64)  # cached


@pytest.mark.parametrize(
    "kinds, groups, topology, match",
    [
        (
            torch.tensor([T, C, V]),
            None,
            "star",
            "VOCO token at position 1 of sample 0 has no VISUAL",
        ),
        (torch.tensor([T, 5]), None, "star", r"kinds\[0, 1\] = 5 is not a TokenKind"),
        (torch.tensor([T, V]), None, "ring", "unknown topology 'ring'"),
        (torch.tensor([0.0, 1.0]), None, "star", "integer tensor"),
        (torch.zeros(2, 3, 4, dtype=torch.long), None, "star", r"\[B, S\]"),
        (torch.tensor([T, V, C]), torch.tensor([0, 0]), "star", "must have the shape of kinds"),
        (torch.tensor([T, V, C]), torch.tensor([-1, -1, 0]), "star", "need a group >= 0"),
    ],
)
def test_layout_errors(kinds, groups, topology, match):
    with pytest.raises(ValueError, match=match):
        hk.StarLayout(kinds, groups, topology)


def test_explicit_groups_and_to():
    kinds = torch.tensor([[T, V, V, V, C, T]])
    groups = torch.tensor([[9, 0, 0, 1, 1, 9]])  # two images in one VISUAL run
    layout = hk.StarLayout(kinds, groups, topology="group")
    assert layout.groups.tolist() == [[-1, 0, 0, 1, 1, -1]]
    m = hk.star_mask(layout)[0]
    assert m[2, 1] and not m[3, 1] and m[4, 3] and not m[4, 1]
    assert layout.to("cpu") is layout


# --------------------------------------------------------------------------------------------------
# Hardening (issue 9)
# --------------------------------------------------------------------------------------------------


def test_huge_block_sizes_are_rejected_not_a_crash():
    """(S + block_k - 1) / block_k overflowed to 0 tiles and the plan builder wrote into an empty vector
    (SIGSEGV); a huge block_q gave a plan with 0 query tiles. Run in a subprocess: a crash must fail
    this test, not the test session."""
    code = (
        "import torch, htc_kernels as hk\n"
        "from htc_kernels import _ext\n"
        "from tests.layouts import random_kinds\n"
        "layout = hk.StarLayout(random_kinds(1, batch=2))\n"
        "s = layout.seq_len\n"
        "for bq, bk in [(64, 2**63 - 10), (2**63 - 10, 64), (1025, 64), (64, 0), (-1, 64)]:\n"
        "    try:\n"
        "        layout.plan(s, bq, bk)\n"
        "        raise SystemExit(f'plan accepted {bq}, {bk}')\n"
        "    except ValueError as e:\n"
        "        assert 'block sizes must be in [1, 1024]' in str(e), e\n"
        "    if _ext.available():\n"
        "        try:\n"
        "            torch.ops.htc.star_plan(layout.kinds, layout.groups, s, bq, bk, 0)\n"
        "            raise SystemExit(f'star_plan accepted {bq}, {bk}')\n"
        "        except RuntimeError as e:\n"
        "            assert 'block sizes must be in [1, 1024]' in str(e), e\n"
        "assert layout.plan(s, 1024, 1024).shape == (2, 1, 1)\n"
        "print('bounded-ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package_root = os.path.dirname(os.path.dirname(hk.__file__))  # this htc_kernels (e.g. make test-asan's)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=package_root
    )
    assert out.returncode == 0 and "bounded-ok" in out.stdout, (
        out.returncode,
        out.stdout,
        out.stderr[-2000:],
    )


def test_plan_rejects_non_int_sizes():
    layout = hk.StarLayout(llava_kinds(2, 3, 1, 2))
    for args in [(8.0, 4, 4), (8, True, 4), (8, 4, "4")]:
        with pytest.raises(ValueError, match="must be an int"):
            layout.plan(*args)
    for q_len in (True, 2.5):  # True was taken as q_len = 1
        with pytest.raises(ValueError, match="q_len must be an int or None"):
            hk.star_mask(layout, q_len)


def test_layout_owns_copies_of_its_tensors():
    """An int8 contiguous kinds tensor was kept by reference: editing it afterwards bypassed validation
    and left the cached plan stale (silently wrong attention)."""
    kinds = llava_kinds(3, 70, 1, 5).to(torch.int8)
    groups = hk.StarLayout(kinds).groups.clone()
    layout = hk.StarLayout(kinds, groups)
    before = layout.plan(layout.seq_len, 16, 16).clone()
    kinds[10] = 9  # not a TokenKind
    kinds[40:60] = T
    groups[5:8] = 7
    assert int(layout.kinds.max()) <= P and torch.equal(
        layout.kinds[0], llava_kinds(3, 70, 1, 5).to(torch.int8)
    )
    assert torch.equal(layout.plan(layout.seq_len, 16, 16), before)
    assert torch.equal(hk.star_mask(layout), brute_mask(layout.kinds, layout.groups, "star"))


def test_layout_tensors_modified_in_place_are_an_error():
    layout = hk.StarLayout(llava_kinds(3, 70, 1, 5))
    layout.plan(layout.seq_len, 16, 16)
    layout.kinds[0, 10] = T
    with pytest.raises(ValueError, match="modified in place"):
        layout.plan(layout.seq_len, 16, 16)
    with pytest.raises(ValueError, match="modified in place"):
        hk.star_mask(layout)


def test_layout_is_immutable():
    """The layout computes with private copies: its attributes cannot be reassigned, and edits that
    no version counter sees (``.data``, numpy) never reach a mask or a plan."""
    layout = hk.StarLayout(llava_kinds(3, 70, 1, 5))
    mask, plan = hk.star_mask(layout), layout.plan(layout.seq_len, 16, 16).clone()
    for name in ("kinds", "groups"):
        with pytest.raises(AttributeError):
            setattr(layout, name, torch.zeros_like(getattr(layout, name)))
    layout.kinds.data[0, 10:40] = T
    layout.groups.numpy()[0, :] = 0
    assert torch.equal(hk.star_mask(layout), mask)
    layout._plans.clear()  # built again: from the layout's own copies
    assert torch.equal(layout.plan(layout.seq_len, 16, 16), plan)


def test_layout_built_in_inference_mode_still_sees_edits():
    """Inference tensors keep no version counter: the layout's own copies are normal tensors."""
    with torch.inference_mode():
        layout = hk.StarLayout(llava_kinds(3, 70, 1, 5))
        layout.plan(layout.seq_len, 16, 16)
        layout.kinds[0, 10] = T
        with pytest.raises(ValueError, match="modified in place"):
            layout.plan(layout.seq_len, 16, 16)


def test_empty_batch_layout_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="a layout of batch 1 serves inputs of any batch"):
        hk.StarLayout(torch.zeros(0, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "groups, match",
    [
        ([9, 2**32, 2**32, 0, 0, 1, 9], r"groups\[0, 1\] = 4294967296 does not fit int32"),  # was 0: merged
        ([9, 2**31, 2**31, 0, 0, 1, 9], r"groups\[0, 1\] = 2147483648 does not fit int32"),  # was negative
        ([-(2**31) - 1, 0, 0, 1, 1, 1, 9], "does not fit int32"),  # TEXT: ignored, but still a bug
        ([9, 0, 0, -1, -1, 1, 9], r"need a group >= 0; groups\[0, 3\] = -1"),
    ],
)
def test_groups_out_of_int32_range_are_rejected(groups, match):
    kinds = torch.tensor([T, V, V, V, V, C, T])
    with pytest.raises(ValueError, match=match):
        hk.StarLayout(kinds, torch.tensor(groups, dtype=torch.int64), topology="group")


def test_explicit_groups_voco_needs_its_image_before_it():
    kinds = torch.tensor([[T, V, V, C, T, V, C, T]])
    ok = hk.StarLayout(kinds, torch.tensor([[0, 3, 3, 3, 0, 5, 5, 0]]))
    assert ok.groups.tolist() == [[-1, 3, 3, 3, -1, 5, 5, -1]]
    # Interleaved images: the voco of image 3 follows a token of image 5 (not its own image's last token).
    hk.StarLayout(torch.tensor([[T, V, V, C, C, T]]), torch.tensor([[0, 3, 5, 3, 5, 0]]), topology="group")
    with pytest.raises(
        ValueError, match="VOCO token at position 6 of sample 0 has no VISUAL token of its group 4"
    ):
        hk.StarLayout(kinds, torch.tensor([[0, 3, 3, 3, 0, 5, 4, 0]]))  # group 4 has no image
    with pytest.raises(
        ValueError, match="VOCO token at position 1 of sample 1 has no VISUAL token of its group 2"
    ):
        two = torch.tensor([[T, V, C, T], [T, C, V, T]])
        hk.StarLayout(two, torch.tensor([[0, 2, 2, 0], [0, 2, 2, 0]]))  # sample 1: image after its voco
    with pytest.raises(ValueError, match="sample 1 has no VISUAL token of its group 0"):
        two = torch.tensor([[T, V, C, T], [T, T, C, T]])
        hk.StarLayout(two, torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0]]))  # sample 0's image does not count


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kinds": torch.tensor([T, V, C], device="meta")}, "kinds is on the meta device"),
        (
            {"kinds": torch.tensor([T, V, C]), "groups": torch.tensor([0, 0, 0], device="meta")},
            "groups is on the meta device",
        ),
        ({"kinds": torch.tensor([T, V, C]), "groups": [0, 0, 0]}, r"groups must be a torch.Tensor, got list"),
        ({"kinds": [T, V, C]}, r"kinds must be a torch.Tensor, got list"),
        ({"kinds": torch.tensor([T, V, C]), "topology": ["star"]}, r"unknown topology \['star'\]"),
        ({"kinds": torch.tensor([T, V, C]), "groups": torch.tensor([0.0, 0.0, 0.0])}, "integer tensor"),
    ],
)
def test_unclear_layout_errors_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hk.StarLayout(**kwargs)


def test_layout_to_meta_is_a_value_error():
    layout = hk.StarLayout(torch.tensor([T, V, C]))
    with pytest.raises(ValueError, match="meta device"):
        layout.to("meta")


def test_layout_math_traces_under_torch_compile():
    """torch 2.14's dynamo traces ``tensor == IntEnum`` as the constant False when the tensor is made
    in the graph: star_mask, the group inference and the extension-free plan crashed under
    torch.compile (elsewhere such a comparison would be silently wrong); the library compares plain ints."""
    from htc_kernels.layout import _default_groups

    lay = hk.StarLayout(torch.tensor([[P, T, V, V, V, C, T, V, V, C, T, T]]), topology="group")
    mask = torch.compile(lambda: hk.star_mask(lay, 5), backend="eager", fullgraph=True)
    assert torch.equal(mask(), hk.star_mask(lay, 5))
    plan = torch.compile(_plan_from_mask, backend="eager", fullgraph=True)
    args = (lay.kinds, lay.groups, 12, 4, 4, lay.topology_id)
    assert torch.equal(plan(*args), _plan_from_mask(*args))
    groups = torch.compile(lambda k: _default_groups(k.long()), backend="eager", fullgraph=True)
    assert torch.equal(groups(lay.kinds), _default_groups(lay.kinds.long()))
