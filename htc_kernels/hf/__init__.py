"""Hugging Face ``transformers`` (5.x) drop-in: the ``"htc_star"`` attention and KV compaction.

Importing this module registers (idempotently) an attention implementation and an attention-mask
implementation named ``"htc_star"`` with ``transformers.AttentionInterface`` and
``transformers.masking_utils.AttentionMaskInterface``. Nothing else in transformers is changed.

Usage::

    import htc_kernels as hk
    import htc_kernels.hf  # registers "htc_star"

    hk.hf.enable_star_attention(model)  # "htc_star" on this instance's language model
    kinds = hk.hf.kinds_from_input_ids(
        ids, image_token_id=IMG, voco_token_id=VOCO, attention_mask=mask
    )
    out = model.generate(ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=32)

How the pieces fit (transformers 5.x):

* ``htc_kinds`` (``[B, S]`` :class:`~htc_kernels.TokenKind` of the prompt; optional
  ``htc_groups``, ``htc_topology``, ``htc_backend``) is a forward kwarg; models built on
  ``AttentionInterface`` forward it unchanged to every attention call. Positions after the prompt
  (generated tokens) are TEXT.
* The mask function returns the 2-D padding mask ``[B, L]`` (``L`` = tokens seen so far,
  absolute), a fresh tensor per forward; the attention function turns it into PAD kinds and caches
  the :class:`~htc_kernels.StarLayout` on it: one layout per forward, not one per layer.
* :class:`StarCache` is a ``DynamicCache`` whose layers remember the absolute position of every
  slot. After each layer's attention, the attention function asks the cache to drop the VISUAL keys
  that no later token can attend (DESIGN.md §2, "Compaction"). ``get_seq_length()`` stays absolute,
  so position ids (RoPE) and ``generate``'s bookkeeping are unaffected by compaction.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    sdpa_mask,
)

from htc_kernels.layout import StarLayout, TokenKind, orphan_voco
from htc_kernels.star_attention import star_attention

from .kinds import insert_voco_tokens, kinds_from_input_ids

ATTN_IMPLEMENTATION = "htc_star"
#: Backend used by the attention function unless a call passes ``htc_backend=...``.
DEFAULT_BACKEND = "auto"
#: Forward kwargs this module reads (``enable_star_attention`` lets ``generate`` accept them).
HTC_KWARGS = ("htc_kinds", "htc_groups", "htc_topology", "htc_backend")

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DEFAULT_BACKEND",
    "StarCache",
    "compact_cache",
    "enable_star_attention",
    "insert_voco_tokens",
    "kinds_from_input_ids",
    "star_attention_forward",
    "star_attention_mask",
]


# --------------------------------------------------------------------------------------------------
# Compaction rule (pure functions of the layout of the absolute sequence)
# --------------------------------------------------------------------------------------------------


def _droppable(kinds: torch.Tensor, groups: torch.Tensor, processed: int) -> torch.Tensor:
    """``[B, S]`` bool: VISUAL positions no query at position >= ``processed`` can attend.

    A VISUAL key of group g is visible only to VISUAL/VOCO queries of group g (DESIGN.md §2), so
    once the last member of g lies before ``processed`` its VISUAL keys can go. ``kinds``/``groups``
    describe the whole prompt (positions after it are TEXT and join no group).
    """
    b, s = kinds.shape
    visual = kinds == TokenKind.VISUAL
    if not bool(visual.any()):
        return torch.zeros_like(visual)
    g = groups.long().clamp(min=0)
    pos = torch.arange(s, device=kinds.device).expand(b, s)
    member = groups >= 0
    n_groups = int(g.max()) + 1
    last = torch.full((b, n_groups), -1, dtype=torch.long, device=kinds.device)
    last = last.scatter_reduce(1, g, torch.where(member, pos, torch.full_like(pos, -1)), reduce="amax")
    return visual & (last.gather(1, g) < processed)


class _Compaction:
    """What one forward does to a :class:`StarLayer`: keep ``index`` slots (along the sequence) and
    record their absolute positions ``slots`` (-1 = filler, a PAD slot)."""

    __slots__ = ("index", "slots")

    def __init__(self, index: torch.Tensor, slots: torch.Tensor):
        self.index = index
        self.slots = slots


def _compaction(slots_full: torch.Tensor, drop: torch.Tensor) -> _Compaction | None:
    """Slots ``[B, Skv]`` (absolute positions, -1 filler) less droppable ones, right-aligned."""
    valid = slots_full >= 0
    keep = valid & ~drop.gather(1, slots_full.clamp(min=0))
    if bool(keep.all()):
        return None
    n_keep = int(keep.sum(1).max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, kept last, in order
    index = order[:, order.shape[1] - n_keep :]
    kept = keep.gather(1, index)
    slots = torch.where(kept, slots_full.gather(1, index), torch.full_like(index, -1))
    return _Compaction(index.contiguous(), slots.contiguous())


# --------------------------------------------------------------------------------------------------
# StarCache
# --------------------------------------------------------------------------------------------------


class _StarStep:
    """Attached to the key tensor a :class:`StarLayer` returns: what the attention function needs to
    know about the cache (which absolute position each key slot holds) and whom to tell to compact.
    """

    __slots__ = ("layer", "owner", "p_before", "slots_prev", "slots_full")

    def __init__(self, layer, p_before, slots_prev, slots_full):
        self.layer = layer
        self.owner = None
        self.p_before = p_before
        self.slots_prev = slots_prev
        self.slots_full = slots_full


class StarLayer(DynamicLayer):
    """A ``DynamicLayer`` that can drop slots. ``get_seq_length()`` is the number of tokens seen
    (absolute), ``stored_length`` the number of slots held; ``slots`` (``[B, stored_length]`` int64,
    -1 = filler) maps slots to absolute positions once anything was dropped (``None`` before)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cumulative_length = 0
        self.slots: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        p_before = self.cumulative_length
        keys, values = super().update(key_states, value_states)
        self.cumulative_length = p_before + key_states.shape[-2]
        slots_prev, slots_full = self.slots, None
        if slots_prev is not None:
            new = torch.arange(p_before, self.cumulative_length, device=slots_prev.device)
            slots_full = torch.cat([slots_prev, new.expand(slots_prev.shape[0], -1)], dim=1)
            self.slots = slots_full
        # slots_prev is shared by all layers (see _ForwardContext.slots_after): the memo key
        keys._htc_star = _StarStep(self, p_before, slots_prev, slots_full)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    @property
    def stored_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def compact(self, comp: _Compaction) -> None:
        b, h, _, d = self.keys.shape
        index = comp.index.to(self.keys.device)
        if index.shape[0] != b:
            index = index.expand(b, -1)
        index = index[:, None, :, None].expand(b, h, index.shape[1], d)
        self.keys = self.keys.gather(2, index)
        self.values = self.values.gather(2, index)
        self.slots = comp.slots

    def crop(self, tokens_to_remove: int) -> None:
        if self.slots is not None and tokens_to_remove != 0:
            raise NotImplementedError("StarCache: cropping a compacted cache is not supported")
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.is_initialized:
            self.cumulative_length += tokens_to_remove

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.slots = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.slots is not None:
            self.slots = self.slots.index_select(0, beam_idx.to(self.slots.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.slots is not None:
            self.slots = self.slots.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.slots is not None:
            self.slots = self.slots[indices]


class StarCache(DynamicCache):
    """A ``DynamicCache`` that drops the VISUAL keys/values no later token can attend (DESIGN §2).

    Use it with ``attn_implementation="htc_star"``: after each layer's attention the attention
    function drops the slots of every image whose ``<voco>`` tokens (and visual tokens) have been
    processed. So after a prefill, each sample holds ``S - #VISUAL`` slots (samples with fewer are
    left-filled with PAD slots up to the longest). ``get_seq_length()`` stays the number of tokens
    seen, so position ids remain absolute. With another attention implementation nothing is dropped.

    Args:
        kinds, groups, topology: optional layout of the prompt, used when a forward gets no
            ``htc_kinds`` (so ``model.generate(ids, past_key_values=StarCache(kinds=kinds))`` works
            without ``enable_star_attention``). A forward's ``htc_kinds`` takes precedence.
        config: optional model config; only full-attention (no sliding-window) models are supported.
    """

    def __init__(self, kinds=None, groups=None, topology: str = "star", config=None, **kwargs):
        if kwargs:
            raise TypeError(f"StarCache: unexpected arguments {sorted(kwargs)}")
        if config is not None:
            text = config.get_text_config(decoder=True)
            bad = sorted({t for t in (getattr(text, "layer_types", None) or []) if t != "full_attention"})
            if bad:
                raise NotImplementedError(
                    f"StarCache: only full-attention layers are supported, the model has {bad}"
                )
        Cache.__init__(self, layer_class_to_replicate=StarLayer)
        if kinds is not None:
            StarLayout(kinds, groups, topology)  # validate early
        self.kinds = kinds
        self.groups = groups
        self.topology = topology

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys._htc_star.owner = self
        return keys, values

    def stored_length(self, layer_idx: int = 0) -> int:
        """Slots held by layer ``layer_idx`` (``get_seq_length()`` is the number of tokens seen)."""
        return self.layers[layer_idx].stored_length if layer_idx < len(self.layers) else 0

    def valid_lengths(self, layer_idx: int = 0) -> torch.Tensor | None:
        """Per sample, the number of non-filler slots held by ``layer_idx`` (``[B]``)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is None or not layer.is_initialized:
            return None
        if layer.slots is None:
            return torch.full((layer.keys.shape[0],), layer.stored_length, dtype=torch.long)
        return (layer.slots >= 0).sum(1).cpu()

    def nbytes(self) -> int:
        """Bytes held by the keys and values of all layers."""
        return sum(
            layer.keys.numel() * layer.keys.element_size()
            + layer.values.numel() * layer.values.element_size()
            for layer in self.layers
            if getattr(layer, "is_initialized", False)
        )


def compact_cache(
    past_key_values: Cache, kinds, groups=None, topology: str = "star", attention_mask=None
) -> StarCache:
    """Drop, from every layer, the VISUAL slots no later token can attend; returns the cache to use.

    ``kinds`` (``[B, S]``) describes the prompt (positions after it are TEXT). A :class:`StarCache`
    is compacted in place and returned; a plain ``DynamicCache`` (full-attention layers only) is
    converted into a :class:`StarCache` that takes over its tensors (keep using the returned object:
    it keeps the position count absolute, a compacted plain ``DynamicCache`` could not).
    """
    if not isinstance(past_key_values, Cache):
        raise ValueError(
            f"compact_cache: expected a transformers Cache, got {type(past_key_values).__name__}"
        )
    if isinstance(past_key_values, StarCache):
        cache = past_key_values
    else:
        cache = StarCache(kinds, groups, topology)
        for layer in past_key_values.layers:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(f"compact_cache: cannot compact a {type(layer).__name__}")
            new = StarLayer()
            if layer.is_initialized:
                new.lazy_initialization(layer.keys, layer.values)
                new.keys, new.values = layer.keys, layer.values
                new.cumulative_length = layer.get_seq_length()
            cache.layers.append(new)
    for layer in cache.layers:
        if not layer.is_initialized or layer.stored_length == 0:
            continue
        p = layer.cumulative_length
        b = layer.keys.shape[0]
        full = _full_layout(kinds, groups, topology, attention_mask, b, p, layer.keys.device, p)
        slots = layer.slots
        if slots is None:
            slots = torch.arange(p, device=layer.keys.device).expand(b, p)
        comp = _compaction(slots, _droppable(full.kinds, full.groups, p))
        if comp is not None:
            layer.compact(comp)
    return cache


# --------------------------------------------------------------------------------------------------
# Layout of one forward
# --------------------------------------------------------------------------------------------------


def _full_layout(kinds, groups, topology, padding_mask, batch, length, device, processed) -> StarLayout:
    """Layout of the absolute sequence ``[0, max(len(kinds), length))``, PAD from the mask."""
    if kinds is None:
        kinds = torch.zeros((batch, length), dtype=torch.int8, device=device)
    if not isinstance(kinds, torch.Tensor):
        raise ValueError(f"htc_star: htc_kinds must be a torch.Tensor, got {type(kinds).__name__}")
    if kinds.device != torch.device(device):
        raise ValueError(
            f"htc_star: htc_kinds is on {kinds.device} but the model runs on {device}; "
            f"pass htc_kinds=kinds.to({str(device)!r})"
        )
    if kinds.dim() == 1:
        kinds = kinds[None]
        groups = groups[None] if isinstance(groups, torch.Tensor) and groups.dim() == 1 else groups
    if kinds.dim() != 2 or kinds.shape[0] not in (1, batch):
        raise ValueError(
            f"htc_star: htc_kinds must be [B, S] with B = {batch} (or 1), got {tuple(kinds.shape)}"
        )
    s0 = kinds.shape[1]
    total = max(s0, length)
    kinds = kinds.to(torch.int8).expand(batch, -1)
    if total > s0:
        kinds = torch.cat([kinds, kinds.new_full((batch, total - s0), int(TokenKind.TEXT))], dim=1)
    if groups is not None:
        if not isinstance(groups, torch.Tensor) or groups.shape[-1] != s0:
            raise ValueError("htc_star: htc_groups must have the shape of htc_kinds")
        groups = groups.to(torch.int32).expand(batch, -1)
        if total > s0:
            groups = torch.cat([groups, groups.new_full((batch, total - s0), -1)], dim=1)
    if padding_mask is not None:
        pad = ~padding_mask.to(torch.bool)
        if pad.shape[1] < total:
            pad = torch.nn.functional.pad(pad, (0, total - pad.shape[1]), value=False)
        kinds = torch.where(pad[:, :total], torch.full_like(kinds, int(TokenKind.PAD)), kinds)
    return StarLayout(kinds, groups, topology)


def _check_kinds_length(s0: int, p_before: int, length: int, has_cache: bool) -> None:
    """htc_kinds describes the prompt. It must end where the input ends (or before it, for decode
    steps); it may be longer only when a cache carries the rest (chunked prefill)."""
    if s0 < length and s0 > p_before:
        raise ValueError(
            f"htc_star: htc_kinds has {s0} positions but this forward covers positions "
            f"[{p_before}, {length}): "
            "htc_kinds must describe the whole prompt (its length must equal the input length)"
        )
    if s0 > length and not has_cache:
        raise ValueError(
            f"htc_star: htc_kinds has {s0} positions but the input has {length} tokens "
            "(htc_kinds must describe the input: one kind per token)"
        )


class _ForwardContext:
    """Everything derived from the layout for one forward: built at layer 0, reused by the rest."""

    __slots__ = ("layout", "compaction", "slots_after", "refs")

    def __init__(self, layout, compaction, slots_after, refs):
        self.layout = layout
        self.compaction = compaction
        self.slots_after = slots_after  # shared by all layers (so the next forward's memo key matches)
        self.refs = refs  # keeps the tensors whose ids key the memo alive


def _context(query, key, padding_mask, kinds, groups, topology, step) -> _ForwardContext:
    b, sq, skv = query.shape[0], query.shape[2], key.shape[2]
    device = query.device
    if step is not None:
        p_before = step.p_before
        length = p_before + sq
    else:
        length = padding_mask.shape[1] if padding_mask is not None else skv
        p_before = length - sq
        if skv != length:
            raise ValueError(
                f"htc_star: the keys hold {skv} positions but {length} tokens were seen; "
                "a compacted cache "
                "must be a hk.hf.StarCache (compact_cache returns one)"
            )
    if padding_mask is not None and padding_mask.shape[1] < length:
        padding_mask = torch.nn.functional.pad(padding_mask, (0, length - padding_mask.shape[1]), value=True)
    if kinds is not None and isinstance(kinds, torch.Tensor):
        _check_kinds_length(kinds.shape[-1], p_before, length, step is not None)
    full = _full_layout(kinds, groups, topology, padding_mask, b, length, device, length)
    slots = None if step is None else step.slots_full
    if slots is None:
        if full.seq_len == skv:
            layout = full
        else:
            layout = StarLayout(full.kinds[:, :skv], full.groups[:, :skv], topology)
    else:
        if slots.device != device:
            slots = slots.to(device)
        safe = slots.clamp(min=0)
        filler = slots < 0
        k = torch.where(filler, torch.full_like(safe, int(TokenKind.PAD)), full.kinds.long().gather(1, safe))
        g = torch.where(filler, torch.full_like(safe, -1), full.groups.long().gather(1, safe))
        # Compaction dropped the images of processed <voco> tokens. Without its image's VISUAL keys a
        # VOCO token attends exactly what a TEXT token does, as query and as key (DESIGN.md §2), and
        # StarLayout rejects a VOCO token without its image, so those become TEXT.
        k = torch.where(orphan_voco(k, g), torch.full_like(k, int(TokenKind.TEXT)), k)
        layout = StarLayout(k, g.to(torch.int32), topology)
    compaction, slots_after = None, slots
    if step is not None:
        if slots is None:
            slots = torch.arange(skv, device=device).expand(b, skv)
        compaction = _compaction(slots, _droppable(full.kinds, full.groups, length))
        if compaction is not None:
            slots_after = compaction.slots
    return _ForwardContext(layout, compaction, slots_after, None)


# --------------------------------------------------------------------------------------------------
# The attention and mask functions
# --------------------------------------------------------------------------------------------------


def star_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """``AttentionMaskInterface`` entry for ``"htc_star"``: the 2-D padding mask ``[B, L]`` (bool,
    True = token), ``L = kv_offset + kv_length`` tokens seen so far, as a fresh tensor per forward.

    Non-causal masks (e.g. a vision encoder running under ``"htc_star"``) get SDPA's mask instead,
    and the attention function runs SDPA for them.
    """
    config = kwargs.get("config")
    window = getattr(config, "sliding_window", None) if config is not None else None
    if mask_function is not causal_mask_function and window is not None:
        if kv_offset + kv_length <= window:  # the window covers everything: the mask is causal
            mask_function = causal_mask_function
        else:
            raise NotImplementedError(
                f"htc_star: {kv_offset + kv_length} tokens exceed the model's sliding window "
                f"({window}); star attention supports full causal attention only"
            )
    if mask_function is not causal_mask_function:
        if getattr(mask_function, "__name__", "") == "bidirectional_mask_function":
            return sdpa_mask(
                batch_size=batch_size,
                q_length=q_length,
                kv_length=kv_length,
                q_offset=q_offset,
                kv_offset=kv_offset,
                mask_function=mask_function,
                attention_mask=attention_mask,
                **kwargs,
            )
        raise NotImplementedError(
            "htc_star: only causal full attention (plus the star mask) is supported; this model "
            f"asked for a different mask ({getattr(mask_function, '__name__', mask_function)}: "
            "sliding window, packed "
            "sequences or a custom overlay). Pass a 2-D attention_mask and no packed position_ids."
        )
    device = kwargs.get("device", "cpu")
    length = kv_offset + kv_length
    if attention_mask is None:
        return torch.ones((batch_size, length), dtype=torch.bool, device=device)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if mask.shape[-1] < length:
        mask = torch.nn.functional.pad(mask, (0, length - mask.shape[-1]), value=True)
    return mask[:, :length].clone()


def _sdpa_fallback(module, query, key, value, attention_mask, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in HTC_KWARGS}
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def star_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """``AttentionInterface`` entry for ``"htc_star"``.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (GQA not expanded) -> ``([B, Sq, Hq, D], None)``.
    Reads ``htc_kinds`` / ``htc_groups`` / ``htc_topology`` / ``htc_backend`` from the kwargs;
    without ``htc_kinds`` it is causal attention with padding (every token TEXT).
    """
    is_causal = kwargs.get("is_causal")
    if is_causal is False or (is_causal is None and not getattr(module, "is_causal", True)):
        return _sdpa_fallback(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
    ):
        shape = (
            tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        )
        raise ValueError(
            f"htc_star: got an attention mask of shape {shape}; htc_star builds the mask from "
            "htc_kinds and "
            "takes padding from a 2-D attention_mask [B, S] (pass that, not a 4-D mask)"
        )
    if dropout and module.training:
        raise NotImplementedError("htc_star: attention dropout is not supported (set attention_dropout=0)")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "htc_star: output_attentions=True is not supported (the kernel never forms them)"
        )
    step = getattr(key, "_htc_star", None)
    kinds = kwargs.get("htc_kinds")
    groups = kwargs.get("htc_groups")
    topology = kwargs.get("htc_topology")
    if kinds is None and step is not None:
        owner = step.owner
        if owner is not None and owner.kinds is not None:
            kinds, groups = owner.kinds, owner.groups
            topology = topology or owner.topology
    topology = topology or "star"
    backend = kwargs.get("htc_backend") or DEFAULT_BACKEND

    # Memo: the padding mask is one fresh tensor per forward, shared by all layers.
    memo_key = (
        id(kinds),
        id(groups),
        topology,
        query.shape[0],
        query.shape[2],
        key.shape[2],
        None if step is None else (step.p_before, id(step.slots_prev)),
    )
    memo = None
    if attention_mask is not None:
        memo = attention_mask.__dict__.setdefault("_htc_memo", {})
    ctx = memo.get(memo_key) if memo is not None else None
    if ctx is None:
        ctx = _context(query, key, attention_mask, kinds, groups, topology, step)
        ctx.refs = (kinds, groups, None if step is None else step.slots_prev)
        if memo is not None:
            memo[memo_key] = ctx

    out = star_attention(query, key, value, ctx.layout, scale=scaling, backend=backend)
    if step is not None:
        if ctx.compaction is not None:
            step.layer.compact(ctx.compaction)
        elif ctx.slots_after is not None:
            step.layer.slots = ctx.slots_after
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not star_attention_forward:
        AttentionInterface.register(ATTN_IMPLEMENTATION, star_attention_forward)
    if AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not star_attention_mask:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, star_attention_mask)


_register()


# --------------------------------------------------------------------------------------------------
# enable_star_attention
# --------------------------------------------------------------------------------------------------


def _language_model_impl(model) -> str | dict:
    sub = getattr(model.config, "sub_configs", {}) or {}
    if "text_config" in sub:
        return {"text_config": ATTN_IMPLEMENTATION}
    return ATTN_IMPLEMENTATION


def enable_star_attention(model, backend: str | None = None):
    """Switch ``model``'s language model to ``"htc_star"``; ``model.generate(..., htc_kinds=k)``
    then accepts ``htc_*`` kwargs and compacts the cache (it passes a fresh :class:`StarCache`
    unless the call gives ``past_key_values`` or ``use_cache=False``). Only this instance is
    changed (instance attributes ``generate`` and ``_validate_model_kwargs``, one forward pre-hook,
    and its attention implementation). Returns ``model``.

    ``backend``: the star_attention backend for this model's calls (default:
    ``hk.hf.DEFAULT_BACKEND``).
    """
    model.set_attn_implementation(_language_model_impl(model))
    if getattr(model, "_htc_star_enabled", False):
        model._htc_star_backend = backend
        return model
    model._htc_star_enabled = True
    model._htc_star_backend = backend
    cls = type(model)

    if hasattr(model, "_validate_model_kwargs"):
        original_validate = functools.partial(cls._validate_model_kwargs, model)

        def _validate_model_kwargs(model_kwargs):
            return original_validate({k: v for k, v in model_kwargs.items() if k not in HTC_KWARGS})

        model._validate_model_kwargs = _validate_model_kwargs

    if hasattr(model, "generate"):
        original_generate = functools.partial(cls.generate, model)

        @functools.wraps(cls.generate)
        def generate(*args, **kwargs):
            kinds = kwargs.get("htc_kinds")
            if kinds is not None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                _validate_generate_kinds(
                    model, kinds, ids, kwargs.get("htc_groups"), kwargs.get("htc_topology")
                )
            if model._htc_star_backend is not None and "htc_backend" not in kwargs:
                kwargs["htc_backend"] = model._htc_star_backend
            if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
                kwargs["past_key_values"] = StarCache(config=model.config)
            return original_generate(*args, **kwargs)

        model.generate = generate

    def _pre_hook(module, args, kwargs):
        if module._htc_star_backend is not None and "htc_backend" not in kwargs:
            kwargs["htc_backend"] = module._htc_star_backend
        return args, kwargs

    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return model


def _validate_generate_kinds(model, kinds, input_ids, groups, topology) -> None:
    if not isinstance(kinds, torch.Tensor):
        raise ValueError(f"htc_star: htc_kinds must be a torch.Tensor, got {type(kinds).__name__}")
    if isinstance(input_ids, torch.Tensor):
        if kinds.shape[-1] != input_ids.shape[-1]:
            raise ValueError(
                f"htc_star: htc_kinds has {kinds.shape[-1]} positions but input_ids has {input_ids.shape[-1]}"
            )
        if kinds.device != input_ids.device:
            raise ValueError(f"htc_star: htc_kinds is on {kinds.device}, input_ids on {input_ids.device}")
    StarLayout(kinds, groups, topology or "star")
