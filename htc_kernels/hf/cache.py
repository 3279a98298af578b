"""KV compaction: the rule (which VISUAL keys no later token can attend) and :class:`StarCache`.

The attention function learns about a :class:`StarCache` through a hand-off, not through the
tensors: ``StarCache.update`` (called by every Hugging Face attention layer right before its
attention function) leaves a :class:`_StarStep` in a thread-local slot, and the attention function
takes it if it is for the key tensor it was given. Nothing is attached to tensors, so ``torch.compile``
sees plain tensors (both functions run eagerly: ``torch.compiler.disable``).
"""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicCache,
    DynamicLayer,
    StaticLayer,
    get_layer_types_and_kwargs,
)

from htc_kernels.layout import _PAD, _TEXT, _VISUAL, _VOCO, StarLayout, _check_int_tensor

_HANDOFF = threading.local()


# --------------------------------------------------------------------------------------------------
# The rule (pure functions of the layout of the absolute sequence)
# --------------------------------------------------------------------------------------------------


def _droppable(kinds: torch.Tensor, groups: torch.Tensor, processed: int) -> torch.Tensor:
    """``[B, S]`` bool: VISUAL positions no query at position >= ``processed`` can attend.

    ``kinds``/``groups`` (``[B, S]``) describe the positions known so far: the prompt, or only its
    first chunks (chunked prefill). A VISUAL key of group g is visible only to VISUAL/VOCO queries of
    g (DESIGN.md §2). g is finished, and its VISUAL keys may go, once (1) a VOCO token of g has been
    processed and (2) the position after g's last member is known not to belong to g: described by
    ``kinds``, or processed beyond them (positions after the prompt are TEXT). Until then a later
    chunk may still bring g's VOCO tokens (or more of them), which need every VISUAL key of g. An
    image without VOCO tokens is never dropped (it costs memory, never exactness).
    """
    b, s = kinds.shape
    visual = kinds == _VISUAL
    if not bool(visual.any()):
        return torch.zeros_like(visual)
    g = groups.long().clamp(min=0)
    member = groups >= 0
    n_groups = int(g.max()) + 1
    pos = torch.arange(s, device=kinds.device).expand(b, s)
    last = torch.full((b, n_groups), -1, dtype=torch.long, device=kinds.device)
    last = last.scatter_reduce(1, g, torch.where(member, pos, -1), reduce="amax")
    voco = (member & (kinds == _VOCO)).long()
    has_voco = torch.zeros_like(last).scatter_reduce(1, g, voco, reduce="amax") > 0
    finished = has_voco & (last < processed) & (last + 1 < max(s, processed))
    return visual & finished.gather(1, g)


class _Compaction:
    """What one forward does to every :class:`StarLayer`: keep the ``index`` slots (``[B, n]``,
    along the sequence), whose absolute positions are ``slots`` (``[B, n]``, -1 = filler: a PAD
    slot). ``visual_free``: no kept slot is VISUAL; ``filler_free``: no kept slot is filler."""

    __slots__ = ("index", "slots", "visual_free", "filler_free")

    def __init__(self, index: torch.Tensor, slots: torch.Tensor, visual_free: bool):
        self.index = index
        self.slots = slots
        self.visual_free = visual_free
        self.filler_free = not bool((slots < 0).any())


def _compaction(slots_full: torch.Tensor, drop: torch.Tensor, visual: torch.Tensor) -> _Compaction:
    """Slots ``[B, Skv]`` (absolute positions, -1 filler) less droppable ones, right-aligned.
    ``drop``/``visual``: ``[B, S]`` bool over absolute positions."""
    valid = slots_full >= 0
    safe = slots_full.clamp(min=0)
    keep = valid & ~drop.gather(1, safe)
    visual_free = not bool((keep & visual.gather(1, safe)).any())
    if bool(keep.all()):
        return _Compaction(None, slots_full, visual_free)
    n_keep = int(keep.sum(1).max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, kept last, in order
    index = order[:, order.shape[1] - n_keep :]
    kept = keep.gather(1, index)
    slots = torch.where(kept, slots_full.gather(1, index), torch.full_like(index, -1))
    return _Compaction(index.contiguous(), slots.contiguous(), visual_free)


def _full_layout(kinds, groups, topology, padding_mask, batch, length, device) -> StarLayout:
    """Layout of the absolute positions ``[0, max(len(kinds), length))``: ``kinds`` (positions after
    them TEXT), PAD where the 2-D ``padding_mask`` ``[B, >= length]`` is False."""
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
            f"htc_star: htc_kinds must be [B, S] with B = {batch} (or 1), got {tuple(kinds.shape)} "
            "(beam search and num_return_sequences multiply the batch: generate expands htc_kinds "
            "after enable_star_attention; the kinds of a StarCache(kinds=...) must be given expanded, "
            "e.g. kinds.repeat_interleave(num_beams, dim=0))"
        )
    # Validated before any cast: a cast to int8/int32 would truncate floats and wrap 257 to VISUAL.
    _check_int_tensor("htc_kinds", kinds)
    s0 = kinds.shape[1]
    total = max(s0, length)
    kinds = kinds.long().expand(batch, -1)
    if total > s0:
        kinds = torch.cat([kinds, kinds.new_full((batch, total - s0), _TEXT)], dim=1)
    if groups is not None:
        if not isinstance(groups, torch.Tensor) or groups.shape[-1] != s0:
            raise ValueError("htc_star: htc_groups must have the shape of htc_kinds")
        _check_int_tensor("htc_groups", groups)
        groups = groups.long().expand(batch, -1)
        if total > s0:
            groups = torch.cat([groups, groups.new_full((batch, total - s0), -1)], dim=1)
    if padding_mask is not None:
        pad = ~padding_mask.to(device=device, dtype=torch.bool).expand(batch, -1)
        if pad.shape[1] < total:
            pad = torch.nn.functional.pad(pad, (0, total - pad.shape[1]), value=False)
        pad = pad[:, :total]
        # Padding comes from attention_mask; a PAD kind at a token it keeps would drop that token.
        conflict = (kinds == _PAD) & ~pad
        if bool(conflict.any()):
            b, p = (int(x) for x in conflict.nonzero()[0])
            raise ValueError(
                f"htc_star: htc_kinds[{b}, {p}] is PAD but attention_mask keeps that token; padding "
                "comes from attention_mask (make the two agree, or mark the token's kind)"
            )
        kinds = torch.where(pad, torch.full_like(kinds, _PAD), kinds)
    return StarLayout(kinds, groups, topology)


# --------------------------------------------------------------------------------------------------
# StarCache
# --------------------------------------------------------------------------------------------------


class _StarStep:
    """What ``StarCache.update`` (or ``StarStaticCache.update``) hands to the attention function that
    follows it: the layer, its index, the absolute position before this update, the slots' absolute
    positions after it (``None``: slot i holds position i; -1: filler or empty) and the key tensor it
    returned (to match the hand-off)."""

    __slots__ = ("layer", "layer_idx", "p_before", "keys", "cache", "written")

    def __init__(self, cache, layer, layer_idx, p_before, keys, written=None):
        self.cache = cache
        self.layer = layer
        self.layer_idx = layer_idx
        self.p_before = p_before
        self.keys = keys
        self.written = written  # static buffers: slots [0, written) hold tokens, the rest is empty

    @property
    def slots(self) -> torch.Tensor | None:
        return self.layer.slots  # read when the forward's context is built (once, not per layer)


def _take_step(key: torch.Tensor, module) -> _StarStep | None:
    """The hand-off for this attention call, if the keys come from a :class:`StarCache`."""
    step = getattr(_HANDOFF, "step", None)
    _HANDOFF.step = None
    if step is None or step.keys is not key:
        return None
    layer_idx = getattr(module, "layer_idx", step.layer_idx)
    if layer_idx != step.layer_idx:
        raise RuntimeError(
            f"htc_star: StarCache updated layer {step.layer_idx} but attention runs for layer {layer_idx}"
        )
    return step


def _check_batch(layer, key_states) -> None:
    """A cache filled for one batch size, then fed another (reset() first): a clear error, not torch's."""
    if layer.is_initialized and layer.keys.numel() and key_states.shape[0] != layer.keys.shape[0]:
        raise ValueError(
            f"StarCache: this cache holds a batch of {layer.keys.shape[0]} but the forward has "
            f"{key_states.shape[0]} rows; reset() it (or use a new cache) for another batch"
        )


class StarLayer(DynamicLayer):
    """A ``DynamicLayer`` that can drop slots. ``get_seq_length()`` is the number of tokens seen
    (absolute), ``stored_length`` the number of slots held; ``slots`` (``[B, stored_length]`` int64,
    -1 = filler) maps slots to absolute positions once anything was dropped (``None`` before).
    ``visual_free``: holds no VISUAL key (empty, or so compaction found; VISUAL keys enter only
    through a forward with kinds, which compacts)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cumulative_length = 0
        self._slots: torch.Tensor | None = None
        self._tail = 0  # slots appended after _slots: the positions just before cumulative_length
        self.visual_free = True
        self.filler_free = True  # no filler slot (appended tokens never are)

    @property
    def slots(self) -> torch.Tensor | None:
        # Built on demand: a forward's context reads the first layer's map once, so update() stays
        # a DynamicLayer update (no per-layer, per-token tensor work on decode steps).
        if self._slots is not None and self._tail:
            start = self.cumulative_length - self._tail
            new = torch.arange(start, self.cumulative_length, device=self._slots.device)
            self._slots = torch.cat([self._slots, new.expand(self._slots.shape[0], -1)], dim=1)
            self._tail = 0
        return self._slots

    @slots.setter
    def slots(self, value: torch.Tensor | None) -> None:
        self._slots, self._tail = value, 0

    def update(self, key_states, value_states, *args, **kwargs):
        _check_batch(self, key_states)
        keys, values = super().update(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if self._slots is not None:
            self._tail += key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def seen_tokens(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    @property
    def stored_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def compact(self, comp: _Compaction) -> None:
        self.visual_free = comp.visual_free
        self.filler_free = comp.filler_free
        if comp.index is None:
            return
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
        self.visual_free = True
        self.filler_free = True

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


# transformers' ``layer_types`` whose keys and values a StarLayer / StarStaticLayer holds.
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Cache layer types (transformers' ``layer_types``) StarCache keeps as transformers builds them: they
# hold no keys and values (a recurrent or convolution state, or nothing).
_STATE_LAYER_TYPES = ("conv", "linear_attention", "dummy")


def _star_layers(config) -> list:
    """The layers of a :class:`StarCache` for ``config`` (see its ``config`` argument)."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    layers = []
    for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
        if kind in _ATTENTION_LAYER_TYPES:
            layers.append(StarLayer())
        elif kind in _STATE_LAYER_TYPES:
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
        else:
            raise NotImplementedError(
                f"StarCache: layer {i} is of type {kind!r}, whose cache htc_star cannot hold; supported: "
                f"full_attention and sliding_attention layers, beside {', '.join(_STATE_LAYER_TYPES)} layers"
            )
    return layers


class _StarCacheBase:
    """What :class:`StarCache` and :class:`StarStaticCache` share: the layout they carry (``kinds``,
    ``groups``, ``topology``: validated at construction, ``None`` when the forward passes it) and an
    ``update`` that stores the tokens as their transformers base class does, then leaves the step for
    the attention call (``_HANDOFF``)."""

    def _set_layout(self, kinds, groups, topology: str) -> None:
        if kinds is not None:
            StarLayout(kinds, groups, topology)  # validate early
        self.kinds = kinds
        self.groups = groups
        self.topology = topology

    @torch.compiler.disable
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        stale = getattr(_HANDOFF, "step", None)
        if stale is not None and stale.cache is self:
            # The previous layer's attention never took its step: not "htc_star" (e.g. "sdpa"), which
            # would attend causally over every kept key, ignoring the star mask and the compaction.
            _HANDOFF.step = None
            raise RuntimeError(
                f"htc_star: {type(self).__name__} layer {stale.layer_idx} was updated but its attention did "
                "not read the update: the model's attention implementation is not 'htc_star'. Use "
                "attn_implementation='htc_star' (hk.hf.enable_star_attention(model)) with a StarCache, or a "
                "DynamicCache with other implementations"
            )
        p_before = self.layers[layer_idx].seen_tokens() if layer_idx < len(self.layers) else 0
        # The transformers class after this one in the MRO (DynamicCache, or Cache for the static one).
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        written = getattr(layer, "write_pos", None)
        _HANDOFF.step = _StarStep(self, layer, layer_idx, p_before, keys, written)
        return keys, values


class StarCache(_StarCacheBase, DynamicCache):
    """A ``DynamicCache`` that drops the VISUAL keys/values no later token can attend (DESIGN §2).

    Use it with ``attn_implementation="htc_star"``: after each layer's attention the attention
    function drops the slots of every finished image (see :func:`_droppable`: its ``<voco>`` tokens
    were processed, and so was the token after them, or ``htc_kinds`` says what follows). Each
    sample then holds the non-VISUAL slots (samples with fewer are left-filled with PAD slots up to
    the longest). ``get_seq_length()`` stays the number of tokens seen, so position ids remain
    absolute. With another attention implementation nothing is dropped. Every attention layer is
    a full (growing) :class:`StarLayer`; a sliding-window model is exact while the tokens seen fit
    its window, and refused beyond (the rule lives in the mask function).

    Args:
        kinds, groups, topology: optional layout of the prompt, used when a forward gets no
            ``htc_kinds`` (so ``model.generate(ids, past_key_values=StarCache(kinds=kinds))`` works
            without ``enable_star_attention``). A forward's ``htc_kinds`` takes precedence.
        config: the model config, for models whose decoder mixes attention with other layers
            (convolutions, linear attention, layers without a cache, e.g. LFM2, Qwen3.5): those get
            transformers' own cache layers (as ``DynamicCache(config=...)`` builds them), every
            attention layer a :class:`StarLayer`. Without it every layer is a :class:`StarLayer`.
            Layer types whose cache holds more than keys and values (``"hybrid"``,
            ``"indexed_attention"``, ...) are refused.
    """

    def __init__(self, kinds=None, groups=None, topology: str = "star", config=None, **kwargs):
        if kwargs:
            raise TypeError(f"StarCache: unexpected arguments {sorted(kwargs)}")
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=StarLayer)
        else:
            Cache.__init__(self, layers=_star_layers(config))
        self._set_layout(kinds, groups, topology)

    @classmethod
    def from_slots(
        cls, keys, values, positions: torch.Tensor, seq_length: int, has_visual: bool = False, **kwargs
    ) -> StarCache:
        """A cache holding given slots, e.g. KV saved after compaction (compress once, ask many).

        Args:
            keys, values: one ``[B, Hkv, n, D]`` tensor per layer.
            positions: ``[B, n]`` or ``[n]`` int64, the absolute position of each slot (-1: filler).
            seq_length: tokens seen so far (the next token's position).
            has_visual: whether any slot holds a VISUAL token (``False`` lets decode steps skip
                the layout: plain causal attention).
            kwargs: ``kinds``/``groups``/``topology`` as for the constructor.
        """
        if len(keys) != len(values) or not keys:
            raise ValueError("StarCache.from_slots: one keys and one values tensor per layer")
        if "config" in kwargs:
            raise TypeError("StarCache.from_slots: the layers are the given tensors; no config")
        cache = cls(**kwargs)
        for k, v in zip(keys, values):
            if k.dim() != 4 or k.shape[:3] != v.shape[:3]:
                raise ValueError(
                    f"StarCache.from_slots: keys {tuple(k.shape)} and values {tuple(v.shape)} "
                    "must be [B, Hkv, n, D] with equal B, Hkv, n"
                )
            pos = positions.to(device=k.device, dtype=torch.long)
            pos = pos.expand(k.shape[0], -1) if pos.dim() == 1 else pos
            if pos.shape != (k.shape[0], k.shape[2]):
                raise ValueError(
                    f"StarCache.from_slots: positions {tuple(positions.shape)} do not match "
                    f"{k.shape[2]} slots"
                )
            if bool((pos >= seq_length).any()):
                raise ValueError(f"StarCache.from_slots: a position is >= seq_length={seq_length}")
            layer = StarLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            layer.cumulative_length = int(seq_length)
            layer.slots = pos
            layer.visual_free = not has_visual
            layer.filler_free = not bool((pos < 0).any())
            cache.layers.append(layer)
        return cache

    def _star_layer(self, layer_idx: int | None) -> StarLayer | None:
        """Layer ``layer_idx``, or with ``None`` the first attention layer (``None`` if none yet)."""
        if layer_idx is None:
            return next((layer for layer in self.layers if isinstance(layer, StarLayer)), None)
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is not None and not isinstance(layer, StarLayer):
            name = type(layer).__name__
            raise ValueError(f"StarCache: layer {layer_idx} is a {name}, not an attention layer")
        return layer

    def stored_length(self, layer_idx: int | None = None) -> int:
        """Slots held by layer ``layer_idx`` (default: the first attention layer;
        ``get_seq_length()`` is the number of tokens seen)."""
        layer = self._star_layer(layer_idx)
        return 0 if layer is None else layer.stored_length

    def valid_lengths(self, layer_idx: int | None = None) -> torch.Tensor | None:
        """Per sample, the number of non-filler slots held by ``layer_idx`` (default: the first
        attention layer) (``[B]``)."""
        layer = self._star_layer(layer_idx)
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
            if isinstance(layer, StarLayer) and layer.is_initialized
        )


class StarStaticLayer(StaticLayer):
    """A preallocated layer (``[B, H, max_cache_len, D]``, updated in place: static addresses, as
    transformers' ``StaticLayer``) that can drop slots. Tokens are written at ``write_pos`` (a Python
    int), not at their position: ``cumulative_length`` (a tensor, as in ``StaticLayer``) stays the
    absolute number of tokens seen, for RoPE. ``slots`` (``[B, max_cache_len]`` int64) holds each
    slot's absolute position, -1 for empty or filler slots."""

    filler_free = False  # empty slots past write_pos: a decode step always needs its mask

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.write_pos = 0
        self.seen = 0
        self.slots: torch.Tensor | None = None
        self.visual_free = True

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.slots = torch.full(
            (self.batch_size, self.max_cache_len), -1, dtype=torch.long, device=self.device
        )

    def update(self, key_states, value_states, *args, **kwargs):
        _check_batch(self, key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.write_pos + n > self.max_cache_len:
            raise ValueError(
                f"StarStaticCache: {self.write_pos} slots held + {n} new tokens exceed max_cache_len="
                f"{self.max_cache_len}"
            )
        index = torch.arange(self.write_pos, self.write_pos + n, device=self.device)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        positions = self.cumulative_length + torch.arange(n, device=self.device)
        self.slots[:, self.write_pos : self.write_pos + n] = positions.expand(self.slots.shape[0], n)
        self.cumulative_length.add_(n)
        self.write_pos += n
        self.seen += n
        return self.keys, self.values

    def seen_tokens(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # absolute: the buffer holds fewer slots once compacted

    def compact(self, comp: _Compaction) -> None:
        self.visual_free = comp.visual_free
        if comp.index is None:
            return
        b, h, _, d = self.keys.shape
        n = comp.index.shape[1]
        index = comp.index.to(self.device)[:, None, :, None].expand(b, h, n, d)
        # gather copies first, so moving the kept slots to the front cannot overwrite a source
        self.keys[:, :, :n].copy_(self.keys.gather(2, index))
        self.values[:, :, :n].copy_(self.values.gather(2, index))
        self.slots[:, :n].copy_(comp.slots)
        self.slots[:, n:] = -1
        self.write_pos = n

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "StarStaticCache: cropping (assisted or prompt-lookup decoding) is not supported; use a "
            "StarCache, which crops until it compacts"
        )

    def reset(self) -> None:
        super().reset()
        self.write_pos = self.seen = 0
        if self.slots is not None:
            self.slots.fill_(-1)
        self.visual_free = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.slots is not None:
            self.slots = self.slots.index_select(0, beam_idx.to(self.slots.device))


class StarStaticCache(_StarCacheBase, Cache):
    """A static (preallocated, compile-friendly) cache that drops finished images like
    :class:`StarCache`: after prefill the kept slots move to the front of the buffer once, and
    decoding writes after them, so ``max_cache_len`` only needs to hold the kept tokens plus the
    generated ones (plus the prompt during its prefill). Decode steps after compaction run plain
    causal attention over the whole buffer with a mask: fixed shapes, no host sync on CUDA.

    Args:
        config: the model config (its decoder's number of layers is used).
        max_cache_len: slots per layer.
        kinds, groups, topology: as for :class:`StarCache`.
    """

    is_compileable = True

    def __init__(self, config, max_cache_len: int, kinds=None, groups=None, topology: str = "star"):
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        other = sorted({t for t in layer_types if t not in _ATTENTION_LAYER_TYPES})
        if other:
            raise NotImplementedError(
                f"StarStaticCache: the decoder has {other} layers; a StarStaticCache holds attention "
                "layers only (use StarCache(config=model.config), which keeps their state)"
            )
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        Cache.__init__(self, layers=[StarStaticLayer(max_cache_len) for _ in range(n_layers)])
        self._set_layout(kinds, groups, topology)

    def valid_lengths(self, layer_idx: int = 0) -> torch.Tensor | None:
        """Per sample, the number of slots holding a token in layer ``layer_idx`` (``[B]``)."""
        layer = self.layers[layer_idx]
        return None if layer.slots is None else (layer.slots >= 0).sum(1).cpu()


def compact_cache(
    past_key_values: Cache, kinds, groups=None, topology: str = "star", attention_mask=None
) -> StarCache:
    """Drop, from every layer, the VISUAL slots no later token can attend; returns the cache to use.

    ``kinds`` (``[B, S]``) describes the positions known so far (the prompt, or its first chunks;
    positions after them are TEXT once processed). The rule is :func:`_droppable`: an image whose
    ``<voco>`` run ends the known positions is kept until the next token is processed, since a later
    chunk may still bring more of its ``<voco>`` tokens. A :class:`StarCache` is compacted in place
    and returned; a plain ``DynamicCache`` (full-attention layers only) is converted into a
    :class:`StarCache` that takes over its tensors (keep using the returned object: it keeps the
    position count absolute, a compacted plain ``DynamicCache`` could not).
    """
    if not isinstance(past_key_values, Cache):
        raise ValueError(
            f"compact_cache: expected a transformers Cache, got {type(past_key_values).__name__}"
        )
    if isinstance(past_key_values, StarCache):
        cache = past_key_values
    else:
        state_types = tuple(DYNAMIC_LAYER_TYPE_MAPPING[t] for t in _STATE_LAYER_TYPES)
        for layer in past_key_values.layers:
            if type(layer) is not DynamicLayer and type(layer) not in state_types:
                raise NotImplementedError(
                    f"compact_cache: cannot compact a {type(layer).__name__} (only DynamicCache's "
                    "DynamicLayer and StarCache: a static or sliding-window buffer cannot drop slots)"
                )
        cache = StarCache(kinds, groups, topology)
        for layer in past_key_values.layers:
            if type(layer) in state_types:  # no keys: kept as it is
                cache.layers.append(layer)
                continue
            new = StarLayer()
            if layer.is_initialized:
                new.lazy_initialization(layer.keys, layer.values)
                new.keys, new.values = layer.keys, layer.values
                new.cumulative_length = layer.get_seq_length()
            cache.layers.append(new)
    for layer in cache.layers:
        if not isinstance(layer, StarLayer) or not layer.is_initialized or layer.stored_length == 0:
            continue
        p = layer.cumulative_length
        b = layer.keys.shape[0]
        full = _full_layout(kinds, groups, topology, attention_mask, b, p, layer.keys.device)
        slots = layer.slots
        if slots is None:
            slots = torch.arange(p, device=layer.keys.device).expand(b, p)
        visual = full.kinds == _VISUAL
        layer.compact(_compaction(slots, _droppable(full.kinds, full.groups, p), visual))
    return cache
