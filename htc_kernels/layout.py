"""Star-graph layouts: token kinds, groups, the dense mask and the block plan (DESIGN.md §2, §4).

A layout describes the *key* sequence of each sample. Queries may be its last ``q_len`` positions
(decode, bottom-right aligned). Everything derived from a layout (default groups, validation, block
plans) is computed once, eagerly, so that kernels and ``torch.compile`` only ever see tensors.
"""

from __future__ import annotations

import enum

import torch

from htc_kernels import _ext


class TokenKind(enum.IntEnum):
    TEXT = 0
    VISUAL = 1
    VOCO = 2
    PAD = 3


class TileKind(enum.IntEnum):
    """What a kernel does for one (query tile, key tile) pair; mirrors csrc/star_attention/star_mask.h."""

    SKIP = 0
    FULL = 1  # no mask
    CAUSAL = 2  # j <= i only
    DIAG = 3  # only j == i (visual self-attention): a row-wise dot, no GEMM
    MASKED = 4  # evaluate the rule per element from kinds/groups


TOPOLOGIES = {"star": 0, "group": 1}


def _default_groups(kinds: torch.Tensor) -> torch.Tensor:
    """Each maximal VISUAL run is a new group 0, 1, ...; a VOCO run joins the last VISUAL run before it.
    TEXT/PAD get -1; VOCO with no image before it gets -1 (rejected by validation)."""
    visual = kinds == TokenKind.VISUAL
    prev = torch.zeros_like(visual)
    prev[:, 1:] = visual[:, :-1]
    run_index = torch.cumsum((visual & ~prev).to(torch.int32), dim=1) - 1
    has_group = visual | (kinds == TokenKind.VOCO)
    return torch.where(has_group, run_index, torch.full_like(run_index, -1)).to(torch.int32)


class StarLayout:
    """Token kinds (and groups) of a batch of key sequences.

    Args:
        kinds: integer tensor ``[B, S]`` or ``[S]`` of :class:`TokenKind` values.
        groups: optional integer tensor of the same shape: the image each VISUAL/VOCO token belongs to
            (compared for equality within a sample only). Default: see :func:`_default_groups`.
        topology: ``"star"`` (visual tokens see only themselves, the paper's mask) or ``"group"``
            (visual tokens see their whole image, the "full graph" ablation).

    Attributes: ``kinds`` int8 ``[B, S]``, ``groups`` int32 ``[B, S]`` (both contiguous, on the
    device of the input), ``topology`` (str), ``topology_id`` (int), ``batch_size``, ``seq_len``.
    """

    def __init__(self, kinds: torch.Tensor, groups: torch.Tensor | None = None, topology: str = "star"):
        if not isinstance(kinds, torch.Tensor):
            raise ValueError(f"StarLayout: kinds must be a torch.Tensor, got {type(kinds).__name__}")
        if kinds.dtype.is_floating_point or kinds.dtype.is_complex or kinds.dtype == torch.bool:
            raise ValueError(f"StarLayout: kinds must be an integer tensor, got {kinds.dtype}")
        if kinds.dim() == 1:
            kinds = kinds.unsqueeze(0)
            groups = groups.unsqueeze(0) if groups is not None and groups.dim() == 1 else groups
        if kinds.dim() != 2 or kinds.shape[1] == 0:
            raise ValueError(f"StarLayout: kinds must be [B, S] or [S] with S >= 1, got {tuple(kinds.shape)}")
        if topology not in TOPOLOGIES:
            raise ValueError(
                f"StarLayout: unknown topology {topology!r}; expected one of {sorted(TOPOLOGIES)}"
            )
        bad = (kinds < 0) | (kinds > TokenKind.PAD)
        if bool(bad.any()):
            b, p = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"StarLayout: kinds[{b}, {p}] = {int(kinds[b, p])} is not a TokenKind (0..3)")
        kinds = kinds.to(torch.int8).contiguous()
        has_group = (kinds == TokenKind.VISUAL) | (kinds == TokenKind.VOCO)
        if groups is None:
            groups = _default_groups(kinds)
            orphan = (kinds == TokenKind.VOCO) & (groups < 0)
            if bool(orphan.any()):
                b, p = (int(x) for x in orphan.nonzero()[0])
                raise ValueError(
                    f"StarLayout: VOCO token at position {p} of sample {b} has no VISUAL run before it "
                    "(a <voco> token compresses the image that precedes it)"
                )
        else:
            if not isinstance(groups, torch.Tensor) or groups.shape != kinds.shape:
                shape = tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__
                raise ValueError(
                    f"StarLayout: groups {shape} must have the shape of kinds {tuple(kinds.shape)}"
                )
            if groups.dtype.is_floating_point or groups.dtype == torch.bool:
                raise ValueError(f"StarLayout: groups must be an integer tensor, got {groups.dtype}")
            if groups.device != kinds.device:
                raise ValueError(f"StarLayout: groups on {groups.device}, kinds on {kinds.device}")
            if bool((has_group & (groups < 0)).any()):
                raise ValueError("StarLayout: VISUAL and VOCO tokens need a group >= 0")
            groups = torch.where(has_group, groups, torch.full_like(groups, -1)).to(torch.int32).contiguous()
        self.kinds = kinds
        self.groups = groups
        self.topology = topology
        self.topology_id = TOPOLOGIES[topology]
        self.batch_size, self.seq_len = kinds.shape
        self._plans: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.kinds.device

    def to(self, device) -> StarLayout:
        """The same layout on another device (block plans are rebuilt there on demand)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return StarLayout(self.kinds.to(device), self.groups.to(device), self.topology)

    def plan(self, q_len: int, block_q: int, block_k: int) -> torch.Tensor:
        """Block plan ``[B, ceil(q_len/block_q), ceil(S/block_k)]`` uint8 of :class:`TileKind`.

        Computed once per (q_len, block sizes) and cached. The backward pass reads the same tensor
        column-wise (its transpose); the tile kinds are symmetric, so no second plan is needed.
        """
        if not 1 <= q_len <= self.seq_len:
            raise ValueError(f"StarLayout.plan: q_len {q_len} must be in [1, {self.seq_len}]")
        key = (q_len, block_q, block_k)
        cached = self._plans.get(key)
        if cached is None:
            cached = build_plan(self.kinds, self.groups, q_len, block_q, block_k, self.topology_id)
            self._plans[key] = cached
        return cached

    def __repr__(self) -> str:
        return f"StarLayout(batch={self.batch_size}, seq_len={self.seq_len}, topology={self.topology!r})"


def build_plan(kinds, groups, q_len: int, block_q: int, block_k: int, topology_id: int) -> torch.Tensor:
    """The block plan via the compiled op, or the dense mask when the extension is unavailable."""
    if _ext.available():
        return torch.ops.htc.star_plan(kinds, groups, q_len, block_q, block_k, topology_id)
    return _plan_from_mask(kinds, groups, q_len, block_q, block_k, topology_id)


def _allowed(kinds: torch.Tensor, groups: torch.Tensor, q_len: int, topology_id: int) -> torch.Tensor:
    """The normative rule of DESIGN.md §2, vectorised: BoolTensor ``[B, q_len, S]``."""
    s = kinds.shape[1]
    pos_q = torch.arange(s - q_len, s, device=kinds.device)
    pos_k = torch.arange(s, device=kinds.device)
    kq, gq = kinds[:, s - q_len :, None].long(), groups[:, s - q_len :, None]
    kk, gk = kinds[:, None, :].long(), groups[:, None, :]
    causal = (pos_k[None, :] <= pos_q[:, None])[None]
    not_pad = (kq != TokenKind.PAD) & (kk != TokenKind.PAD)
    same_group = gq == gk
    if topology_id == TOPOLOGIES["star"]:
        visual_visual = (pos_k[None, :] == pos_q[:, None])[None]
    else:
        visual_visual = same_group
    key_visual = kk == TokenKind.VISUAL
    visual_ok = torch.where(kq == TokenKind.VISUAL, visual_visual, (kq == TokenKind.VOCO) & same_group)
    return causal & not_pad & torch.where(key_visual, visual_ok, torch.ones_like(visual_ok))


def _plan_from_mask(kinds, groups, q_len, block_q, block_k, topology_id) -> torch.Tensor:
    """Pure-PyTorch block plan (same classification as star_mask.h, from the dense mask)."""
    allowed = _allowed(kinds, groups, q_len, topology_id)
    b, sq, s = allowed.shape
    n_qt, n_kt = -(-sq // block_q), -(-s // block_k)
    pos_q = torch.arange(s - sq, s, device=kinds.device)[:, None]
    pos_k = torch.arange(s, device=kinds.device)[None, :]
    causal = pos_k <= pos_q
    diag = pos_k == pos_q

    def tiles(x: torch.Tensor) -> torch.Tensor:  # [B, sq, s] bool -> [B, n_qt, n_kt, bq*bk] padded
        x = torch.nn.functional.pad(x, (0, n_kt * block_k - s, 0, n_qt * block_q - sq))
        return x.view(x.shape[0], n_qt, block_q, n_kt, block_k).transpose(2, 3).flatten(3)

    valid = tiles(torch.ones(1, sq, s, dtype=torch.bool, device=kinds.device))
    a = tiles(allowed)
    any_ = a.any(-1)
    all_ = (a | ~valid).all(-1)
    causal_eq = ((a == tiles(causal.expand(1, sq, s))) | ~valid).all(-1)
    diag_only = (~a | tiles(diag.expand(1, sq, s))).all(-1)
    plan = torch.full(any_.shape, TileKind.MASKED, dtype=torch.uint8, device=kinds.device)
    plan[diag_only.expand_as(plan)] = TileKind.DIAG
    plan[causal_eq.expand_as(plan)] = TileKind.CAUSAL
    plan[all_] = TileKind.FULL
    plan[~any_] = TileKind.SKIP
    return plan


def star_mask(layout: StarLayout, q_len: int | None = None) -> torch.Tensor:
    """Dense mask ``[B, Sq, Skv]`` bool, True = may attend (for tests and debugging: O(S²) memory)."""
    q_len = layout.seq_len if q_len is None else q_len
    if not 1 <= q_len <= layout.seq_len:
        raise ValueError(f"star_mask: q_len {q_len} must be in [1, {layout.seq_len}]")
    return _allowed(layout.kinds, layout.groups, q_len, layout.topology_id)
