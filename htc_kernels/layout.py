"""Star-graph layouts: token kinds, groups, the dense mask and the block plan (DESIGN.md §2, §4).

A layout describes the *key* sequence of each sample. Queries may be its last ``q_len`` positions
(decode, bottom-right aligned). Everything derived from a layout (default groups, validation, block
plans) is computed once, eagerly, so that kernels and ``torch.compile`` only ever see tensors.
"""

from __future__ import annotations

import enum

import torch

from htc_kernels import _ext
from htc_kernels.backends import compiled_runs_on


class TokenKind(enum.IntEnum):
    TEXT = 0
    VISUAL = 1
    VOCO = 2
    PAD = 3


# Plain ints for tensor expressions: torch.compile (torch 2.14's dynamo) traces a comparison of a
# tensor made inside the graph with an IntEnum member (`kinds.long() == TokenKind.VISUAL`) as the
# Python constant False, silently (its tensor rich-compare takes only tensors, SymInts and constants).
_TEXT, _VISUAL, _VOCO, _PAD = (int(k) for k in TokenKind)


class TileKind(enum.IntEnum):
    """What a kernel does for one (query tile, key tile) pair; mirrors csrc/star_attention/star_mask.h."""

    SKIP = 0
    FULL = 1  # no mask
    CAUSAL = 2  # j <= i only
    DIAG = 3  # only j == i (visual self-attention): a row-wise dot, no GEMM
    MASKED = 4  # evaluate the rule per element from kinds/groups


TOPOLOGIES = {"star": 0, "group": 1}
MAX_BLOCK = 1024  # largest block size of a plan; mirrors kMaxBlock in csrc/star_attention/star_mask.h
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _visual_run_starts(kinds: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool: the first token of each maximal VISUAL run."""
    visual = kinds == _VISUAL
    starts = visual.clone()
    starts[:, 1:] &= ~visual[:, :-1]
    return starts


def _default_groups(kinds: torch.Tensor) -> torch.Tensor:
    """Each maximal VISUAL run is a new group 0, 1, ...; a VOCO run joins the last VISUAL run before it.
    TEXT/PAD get -1; VOCO with no image before it gets -1 (rejected by validation)."""
    run_index = torch.cumsum(_visual_run_starts(kinds).to(torch.int32), dim=1) - 1
    has_group = (kinds == _VISUAL) | (kinds == _VOCO)
    return torch.where(has_group, run_index, torch.full_like(run_index, -1)).to(torch.int32)


def orphan_voco(kinds: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool: VOCO tokens with no VISUAL token of their group before them in their sample.

    ``kinds``/``groups`` are ``[B, S]`` integer tensors. Such a VOCO token sees no image: StarLayout
    rejects it. O(B*S), plus O(S) per VOCO token whose image is not the last one before it.
    """
    voco = kinds == _VOCO
    if not bool(voco.any()):
        return voco
    visual = kinds == _VISUAL
    pos = torch.arange(kinds.shape[1], device=kinds.device).expand_as(kinds)
    # Usually a VOCO token's image is the last VISUAL token before it: one cummax settles those.
    last = torch.where(visual, pos, -1).cummax(dim=1).values
    last_group = groups.gather(1, last.clamp(min=0))
    unresolved = voco & ~((last >= 0) & (last_group == groups))
    if not bool(unresolved.any()):
        return unresolved
    # The rest (interleaved images, or images dropped by compaction): search their sample's tokens.
    out = torch.zeros_like(voco)
    rows, cols = unresolved.nonzero(as_tuple=True)
    for i in range(0, rows.numel(), 1024):  # bounded memory: 1024 x S at a time
        r, c = rows[i : i + 1024], cols[i : i + 1024]
        mine = visual[r] & (groups[r] == groups[r, c][:, None]) & (pos[0][None, :] < c[:, None])
        out[r, c] = ~mine.any(1)
    return out


def _versions(*tensors: torch.Tensor) -> tuple:
    """In-place modification counters (a layout's own tensors are never inference tensors)."""
    return tuple(t._version for t in tensors)


def _check_int_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(
            f"StarLayout: {name} must be a torch.Tensor, got {type(t).__name__}; pass torch.tensor({name})"
        )
    if t.dtype not in _INT_DTYPES:
        raise ValueError(
            f"StarLayout: {name} must be an integer tensor (int8..int64 or uint8), got {t.dtype}"
        )
    if t.device.type == "meta":
        raise ValueError(
            f"StarLayout: {name} is on the meta device; a layout is validated and planned from its "
            "values, so build it from CPU or CUDA tensors (move it later with layout.to(device))"
        )


class StarLayout:
    """Token kinds (and groups) of a batch of key sequences.

    Args:
        kinds: integer tensor ``[B, S]`` or ``[S]`` of :class:`TokenKind` values.
        groups: optional integer tensor of the same shape: the image each VISUAL/VOCO token belongs to
            (compared for equality within a sample only; VISUAL/VOCO need ``0 <= group < 2**31``, and
            every VOCO token a VISUAL token of its group before it). Values at TEXT/PAD positions are
            ignored but must fit int32. Default: see :func:`_default_groups`.
        topology: ``"star"`` (visual tokens see only themselves, the paper's mask) or ``"group"``
            (visual tokens see their whole image, the "full graph" ablation).

    Attributes: ``kinds`` int8 ``[B, S]``, ``groups`` int32 ``[B, S]`` (both contiguous, on the
    device of the input; read-only), ``topology`` (str), ``topology_id`` (int), ``batch_size``,
    ``seq_len``, ``uses_key_panel`` (bool: some sample holds >= 2 images, so the Triton and CUDA
    backends plan in :meth:`key_panel` order; set it False to keep the plain order, e.g. to compare).
    A layout is immutable: it validates, plans and computes with copies of its own that nothing else
    references (the caller's tensors may change afterwards). ``layout.kinds``/``layout.groups`` are
    copies for reading; editing one in place changes nothing and is an error at the layout's next
    use in eager code (torch.compile cannot see the edit; it computes the layout as built).
    """

    def __init__(self, kinds: torch.Tensor, groups: torch.Tensor | None = None, topology: str = "star"):
        _check_int_tensor("kinds", kinds)
        if groups is not None:
            _check_int_tensor("groups", groups)
        if not isinstance(topology, str) or topology not in TOPOLOGIES:
            raise ValueError(
                f"StarLayout: unknown topology {topology!r}; expected one of {sorted(TOPOLOGIES)}"
            )
        if kinds.dim() == 1:
            kinds = kinds.unsqueeze(0)
            groups = groups.unsqueeze(0) if groups is not None and groups.dim() == 1 else groups
        if kinds.dim() != 2 or kinds.shape[0] == 0 or kinds.shape[1] == 0:
            raise ValueError(
                f"StarLayout: kinds must be [B, S] or [S] with B, S >= 1, got {tuple(kinds.shape)} "
                "(a layout of batch 1 serves inputs of any batch, B = 0 included)"
            )
        bad = (kinds < 0) | (kinds > _PAD)
        if bool(bad.any()):
            b, p = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"StarLayout: kinds[{b}, {p}] = {int(kinds[b, p])} is not a TokenKind (0..3)")
        # Owned copies: the caller's tensor (possibly already int8) may be edited after validation.
        kinds = kinds.contiguous().to(torch.int8, copy=True)
        has_group = (kinds == _VISUAL) | (kinds == _VOCO)
        explicit = groups is not None
        if not explicit:
            groups = _default_groups(kinds)
            # By construction a VOCO token's default group is the last VISUAL run before it, or -1.
            orphan = (kinds == _VOCO) & (groups < 0)
        else:
            if groups.shape != kinds.shape:
                raise ValueError(
                    f"StarLayout: groups {tuple(groups.shape)} must have the shape of kinds "
                    f"{tuple(kinds.shape)}"
                )
            if groups.device != kinds.device:
                raise ValueError(f"StarLayout: groups on {groups.device}, kinds on {kinds.device}")
            wide = groups.long()
            # Kernels keep groups in int32: a wider value would be truncated (2**32 -> 0 merges images).
            out_of_range = (wide < _INT32_MIN) | (wide > _INT32_MAX)
            if bool(out_of_range.any()):
                b, p = (int(x) for x in out_of_range.nonzero()[0])
                raise ValueError(
                    f"StarLayout: groups[{b}, {p}] = {int(wide[b, p])} does not fit int32; "
                    "use group ids in [0, 2**31) (e.g. the image index)"
                )
            negative = has_group & (wide < 0)
            if bool(negative.any()):
                b, p = (int(x) for x in negative.nonzero()[0])
                raise ValueError(
                    "StarLayout: VISUAL and VOCO tokens need a group >= 0; "
                    f"groups[{b}, {p}] = {int(wide[b, p])}"
                )
            groups = torch.where(has_group, wide, torch.full_like(wide, -1)).to(torch.int32).contiguous()
            orphan = orphan_voco(kinds, groups)
        if bool(orphan.any()):
            b, p = (int(x) for x in orphan.nonzero()[0])
            what = f"token of its group {int(groups[b, p])}" if explicit else "run"
            raise ValueError(
                f"StarLayout: VOCO token at position {p} of sample {b} has no VISUAL {what} before it "
                "(a <voco> token compresses the image that precedes it)"
            )
        if kinds.is_inference() or groups.is_inference():
            # Inference tensors cannot be saved for backward: a layout built under inference_mode
            # would fail a later training step (and they keep no version counter for check_unmodified).
            with torch.inference_mode(False):
                kinds, groups = kinds.clone(), groups.clone()
        # The tensors everything computes with (private), and the copies users read (check_unmodified
        # watches those for in-place edits: with their own storage, an edit can never reach a plan).
        self._kinds, self._groups = kinds, groups
        with torch.inference_mode(False):
            self._readable = (kinds.clone(), groups.clone())
        # The key panel's decision and size, fixed here (where the layout already synchronises) so that
        # key_panel() is a few torch ops with known shapes (torch.compile traces it). Worth it with
        # >= 2 images in a sample: without it every visual query tile visits one mostly masked key tile
        # per earlier image (its <voco> and the text after it); LLaVA's one image gains nothing (30 tile
        # visits -> 31; 16 images 1798 -> 697, csrc/star_attention/CUDA_NOTES.md).
        text_voco = (kinds == _TEXT) | (kinds == _VOCO)
        count = text_voco.sum(1, keepdim=True)
        runs, panel_keys = torch.stack([_visual_run_starts(kinds).sum(1), count[:, 0]]).amax(1).tolist()
        self.uses_key_panel = runs >= 2 and panel_keys > 0
        # Each sample's TEXT/VOCO positions in order, then -1 ([B, panel_keys] int32; a stable sort
        # moves them to the front); key_panel() pads it per block_k.
        order = torch.argsort((~text_voco).to(torch.int8), dim=1, stable=True)[:, :panel_keys]
        rank = torch.arange(panel_keys, device=kinds.device)
        self._panel = torch.where(rank < count, order, -1).to(torch.int32)
        self._panels: dict[int, torch.Tensor] = {}
        self._versions = _versions(*self._readable)
        self.topology = topology
        self.topology_id = TOPOLOGIES[topology]
        self.batch_size, self.seq_len = kinds.shape
        self._plans: dict[tuple, torch.Tensor] = {}

    @property
    def kinds(self) -> torch.Tensor:
        """int8 ``[B, S]`` token kinds (a copy: editing it changes nothing; see the class docstring)."""
        return self._readable[0]

    @property
    def groups(self) -> torch.Tensor:
        """int32 ``[B, S]`` groups, -1 at TEXT/PAD (a copy, like :attr:`kinds`)."""
        return self._readable[1]

    @property
    def device(self) -> torch.device:
        return self._kinds.device

    def check_unmodified(self) -> None:
        """ValueError if ``layout.kinds``/``layout.groups`` were edited in place: the layout never
        computes with them (it has its own copies), and a user who edits them expects it to. Eager
        only (the version counters are not traceable)."""
        if torch.compiler.is_compiling():
            return
        if _versions(*self._readable) != self._versions:
            raise ValueError(
                "StarLayout: layout.kinds or layout.groups was modified in place; a layout is immutable "
                "(it computes with its own validated copies): build a new StarLayout from the new "
                "kinds/groups"
            )

    def to(self, device) -> StarLayout:
        """The same layout on another device (block plans are rebuilt there on demand)."""
        self.check_unmodified()
        device = torch.device(device)
        if device == self.device:
            return self
        return StarLayout(self._kinds.to(device), self._groups.to(device), self.topology)

    def key_panel(self, block_k: int) -> torch.Tensor:
        """The TEXT/VOCO key panel: int32 ``[B, P]``, each sample's TEXT and VOCO positions in
        ascending order, then -1; ``P`` the largest count of a sample rounded up to a multiple of
        ``block_k`` (0 when there are none). Cached per block_k.

        A plan built with it (``plan(..., panel=True)``) orders the keys as the panel, then the whole
        sequence with its TEXT/VOCO keys as holes: a visual query tile then visits a few dense panel
        tiles instead of one mostly masked tile per earlier image. The Triton and CUDA backends take it
        when :attr:`uses_key_panel`; the CPU kernel reads the plain order.
        """
        cached = self._panels.get(block_k)
        if not _cache_hit(cached):
            pad = -self._panel.shape[1] % block_k
            cached = torch.nn.functional.pad(self._panel, (0, pad), value=-1).contiguous()
            self._panels[block_k] = cached
        return cached

    def plan(self, q_len: int, block_q: int, block_k: int, panel: bool = False) -> torch.Tensor:
        """Block plan ``[B, ceil(q_len/block_q), n_kt]`` uint8 of :class:`TileKind`.

        ``q_len`` in ``[1, S]``, block sizes in ``[1, MAX_BLOCK]`` (Python ints). Without ``panel``
        key tile ``kt`` holds positions ``[kt*block_k, (kt+1)*block_k)`` and ``n_kt = ceil(S/block_k)``;
        with it the key tiles follow :meth:`key_panel`'s mapped order (``P/block_k`` panel tiles, then
        ``ceil(S/block_k)`` sequence tiles whose TEXT/VOCO keys are holes; a panel tile is never DIAG).
        Computed once per arguments and cached. The backward pass reads the same tensor column-wise
        (its transpose); the tile kinds are symmetric, so no second plan is needed.
        """
        for name, value in (("q_len", q_len), ("block_q", block_q), ("block_k", block_k)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"StarLayout.plan: {name} must be an int, got {type(value).__name__}")
        if not 1 <= q_len <= self.seq_len:
            raise ValueError(f"StarLayout.plan: q_len {q_len} must be in [1, {self.seq_len}]")
        if not (1 <= block_q <= MAX_BLOCK and 1 <= block_k <= MAX_BLOCK):
            raise ValueError(
                f"StarLayout.plan: block sizes must be in [1, {MAX_BLOCK}], got block_q={block_q}, "
                f"block_k={block_k}"
            )
        self.check_unmodified()
        key = (q_len, block_q, block_k, bool(panel))
        cached = self._plans.get(key)
        if not _cache_hit(cached):
            key_panel = self.key_panel(block_k) if panel else None
            cached = build_plan(
                self._kinds, self._groups, q_len, block_q, block_k, self.topology_id, key_panel
            )
            self._plans[key] = cached
        return cached

    def __repr__(self) -> str:
        return f"StarLayout(batch={self.batch_size}, seq_len={self.seq_len}, topology={self.topology!r})"


def _cache_hit(cached: torch.Tensor | None) -> bool:
    """Whether a tensor a layout cached can serve this call. One made under inference_mode is an
    inference tensor, which autograd cannot save: outside inference mode it is built again (and
    replaces the cached one, which inference calls can use as well)."""
    if cached is None:
        return False
    return torch.compiler.is_compiling() or not cached.is_inference() or torch.is_inference_mode_enabled()


def build_plan(
    kinds, groups, q_len: int, block_q: int, block_k: int, topology_id: int, panel=None
) -> torch.Tensor:
    """The block plan via the compiled op, or the dense mask when the extension is unavailable. On a
    GPU the extension has no kernel for (built without CUDA, or for other architectures), the CPU
    op's plan, moved there: the same tiles (the Triton backend still runs)."""
    args = (q_len, block_q, block_k, topology_id)
    if not _ext.available():
        return _plan_from_mask(kinds, groups, *args, panel)
    if compiled_runs_on(kinds.device):
        return torch.ops.htc.star_plan(kinds, groups, *args, panel)
    cpu_panel = None if panel is None else panel.cpu()
    return torch.ops.htc.star_plan(kinds.cpu(), groups.cpu(), *args, cpu_panel).to(kinds.device)


def _allowed(kinds: torch.Tensor, groups: torch.Tensor, q_len: int, topology_id: int) -> torch.Tensor:
    """The normative rule of DESIGN.md §2, vectorised: BoolTensor ``[B, q_len, S]``."""
    s = kinds.shape[1]
    pos_q = torch.arange(s - q_len, s, device=kinds.device)
    pos_k = torch.arange(s, device=kinds.device)
    kq, gq = kinds[:, s - q_len :, None].long(), groups[:, s - q_len :, None]
    kk, gk = kinds[:, None, :].long(), groups[:, None, :]
    causal = (pos_k[None, :] <= pos_q[:, None])[None]
    not_pad = (kq != _PAD) & (kk != _PAD)
    same_group = gq == gk
    if topology_id == TOPOLOGIES["star"]:
        visual_visual = (pos_k[None, :] == pos_q[:, None])[None]
    else:
        visual_visual = same_group
    key_visual = kk == _VISUAL
    visual_ok = torch.where(kq == _VISUAL, visual_visual, (kq == _VOCO) & same_group)
    return causal & not_pad & torch.where(key_visual, visual_ok, torch.ones_like(visual_ok))


def _plan_from_mask(kinds, groups, q_len, block_q, block_k, topology_id, panel=None) -> torch.Tensor:
    """Pure-PyTorch block plan (same classification as star_mask.h, from the dense mask), in the
    identity key order or, with ``panel`` (:meth:`StarLayout.key_panel`), the mapped one."""
    allowed = _allowed(kinds, groups, q_len, topology_id)
    b, sq, s = allowed.shape
    pos_k = torch.arange(s, device=kinds.device).expand(b, s)
    n_panel = 0
    if panel is not None:  # mapped keys: the panel's positions, then the sequence with TEXT/VOCO holes
        n_panel = panel.shape[1]
        filled = panel >= 0
        holes = (kinds == _TEXT) | (kinds == _VOCO)
        from_panel = allowed.gather(2, panel.long().clamp(min=0)[:, None, :].expand(b, sq, -1))
        allowed = torch.cat([from_panel & filled[:, None, :], allowed & ~holes[:, None, :]], dim=2)
        no_pos = torch.full_like(pos_k[:, :1], 2**62)
        pos_k = torch.cat([torch.where(filled, panel.long(), no_pos), pos_k], dim=1)
    n_keys = n_panel + s
    n_qt, n_kt = -(-sq // block_q), -(-n_keys // block_k)
    pos_q = torch.arange(s - sq, s, device=kinds.device)[None, :, None]
    causal = pos_k[:, None, :] <= pos_q
    diag = pos_k[:, None, :] == pos_q

    def tiles(x: torch.Tensor) -> torch.Tensor:  # [B, sq, n_keys] bool -> [B, n_qt, n_kt, bq*bk] padded
        x = torch.nn.functional.pad(x, (0, n_kt * block_k - n_keys, 0, n_qt * block_q - sq))
        return x.view(x.shape[0], n_qt, block_q, n_kt, block_k).transpose(2, 3).flatten(3)

    valid = tiles(torch.ones(1, sq, n_keys, dtype=torch.bool, device=kinds.device))
    a = tiles(allowed)
    any_ = a.any(-1)
    all_ = (a | ~valid).all(-1)
    causal_eq = ((a == tiles(causal)) | ~valid).all(-1)
    diag_only = (~a | tiles(diag)).all(-1)
    diag_only[:, :, : n_panel // block_k] = False  # a panel tile is never DIAG (star_mask.h)
    plan = torch.full(any_.shape, int(TileKind.MASKED), dtype=torch.uint8, device=kinds.device)
    plan[diag_only] = int(TileKind.DIAG)
    plan[causal_eq] = int(TileKind.CAUSAL)
    plan[all_] = int(TileKind.FULL)
    plan[~any_] = int(TileKind.SKIP)
    return plan


def star_mask(layout: StarLayout, q_len: int | None = None) -> torch.Tensor:
    """Dense mask ``[B, Sq, Skv]`` bool, True = may attend (for tests and debugging: O(S²) memory)."""
    q_len = layout.seq_len if q_len is None else q_len
    if not isinstance(q_len, int) or isinstance(q_len, bool):
        raise ValueError(f"star_mask: q_len must be an int or None, got {type(q_len).__name__}")
    if not 1 <= q_len <= layout.seq_len:
        raise ValueError(f"star_mask: q_len {q_len} must be in [1, {layout.seq_len}]")
    layout.check_unmodified()
    return _allowed(layout._kinds, layout._groups, q_len, layout.topology_id)
