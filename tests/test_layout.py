"""StarLayout, star_mask and the block plan (DESIGN.md §2, §4)."""

import itertools

import pytest
import torch

import htc_kernels as hk
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
