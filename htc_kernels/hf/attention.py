"""The ``"htc_star"`` attention and mask functions, and ``enable_star_attention``.

One forward (all layers) shares one :class:`_ForwardContext`: the layout of its keys, or, for a
decode step whose cache holds no VISUAL key, the plain causal mask (that step is ordinary causal
attention: no layout, no plan). It is built at the first layer and found again through the
attention mask tensor of that forward (a fresh tensor per forward, made by the mask function),
kept in a small table keyed by that tensor's identity.
"""

from __future__ import annotations

import collections
import functools
import sys
import threading
import warnings
import weakref

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from htc_kernels.backends import BACKEND_NAMES
from htc_kernels.layout import _PAD, _TEXT, _VISUAL, TOPOLOGIES, StarLayout, orphan_voco
from htc_kernels.star_attention import star_attention

from .cache import StarCache, StarStaticCache, _compaction, _droppable, _full_layout, _take_step

ATTN_IMPLEMENTATION = "htc_star"
# Implementations that run star_attention_forward (htc_model.analysis adds its probe).
STAR_IMPLEMENTATIONS = {ATTN_IMPLEMENTATION}
#: Forward kwargs this module reads (``enable_star_attention`` lets ``generate`` accept them).
HTC_KWARGS = ("htc_kinds", "htc_groups", "htc_topology", "htc_backend")

_STATE = threading.local()  # .generating: inside enable_star_attention's generate(use_cache=False)
_MEMO_SIZE = 8
_MEMO: collections.OrderedDict = collections.OrderedDict()  # id(mask) -> (weakref(mask), {key: ctx})


# --------------------------------------------------------------------------------------------------
# The context of one forward
# --------------------------------------------------------------------------------------------------


class _ForwardContext:
    """Built once per forward. ``layout``: of the keys the kernel gets (``None`` on the plain path);
    ``plain_mask``: ``[B, 1, Sq, Skv]`` bool for plain causal attention (with the PAD-query rows
    given their own key, so no row is empty), ``query_valid`` ``[B, 1, Sq, 1]`` (both ``None``
    with no ``layout``: no padding, ``is_causal`` for Sq = Skv); ``key_len``: slice
    the keys to this many slots (a static buffer longer than the tokens seen); ``compaction``: what
    each StarCache layer drops after its attention."""

    __slots__ = ("layout", "plain_mask", "query_valid", "key_len", "compaction", "is_causal")

    def __init__(
        self, layout=None, plain_mask=None, query_valid=None, key_len=None, compaction=None, is_causal=False
    ):
        self.is_causal = is_causal
        self.layout = layout
        self.plain_mask = plain_mask
        self.query_valid = query_valid
        self.key_len = key_len
        self.compaction = compaction


def _check_kinds_length(s0: int, p_before: int, length: int, has_cache: bool) -> None:
    """htc_kinds describes the prompt (or, in chunked prefill, at least everything seen so far).
    A forward may start past its end (decode: those positions are TEXT), and may cross its end only
    inside ``generate(use_cache=False)`` (each step re-reads prompt + generated tokens)."""
    if p_before < s0 < length and not getattr(_STATE, "generating", False):
        raise ValueError(
            f"htc_star: htc_kinds has {s0} positions but this forward covers positions "
            f"[{p_before}, {length}): htc_kinds must describe the whole prompt (its length must "
            "equal the input length)"
        )
    if s0 > length and not has_cache:
        raise ValueError(
            f"htc_star: htc_kinds has {s0} positions but the input has {length} tokens "
            "(htc_kinds must describe the input: one kind per token)"
        )


_PAD_FREE: collections.OrderedDict = collections.OrderedDict()  # id(kinds) -> (ref, version, bool)


def _pad_free(kinds: torch.Tensor | None) -> bool:
    """No PAD in ``kinds`` (memoised per tensor and in-place version: decode steps reuse one)."""
    if kinds is None:
        return True
    entry = _PAD_FREE.get(id(kinds))
    version = None if kinds.is_inference() else kinds._version
    if entry is not None and entry[0]() is kinds and entry[1] == version:
        return entry[2]
    free = not bool((kinds == _PAD).any())
    _PAD_FREE[id(kinds)] = (weakref.ref(kinds), version, free)
    while len(_PAD_FREE) > _MEMO_SIZE:
        _PAD_FREE.popitem(last=False)
    return free


def _plain_context(padding, kinds, slots, b, sq, skv, length, key_len) -> _ForwardContext:
    """Plain causal attention with padding: every query is past the prompt (TEXT) and no key is
    VISUAL, so the star mask is the causal mask over positions (DESIGN.md §2). ``slots``: each key
    slot's absolute position (-1: empty or filler; ``None``: slot i is position i). On CUDA: tensor
    ops only, no host sync, fixed shapes (CUDA-graph friendly); on the CPU, where a sync is free, a
    one-query step over valid keys drops the mask (SDPA's unmasked path, as transformers' sdpa mask)."""
    valid = padding.to(torch.bool).expand(b, -1)[:, :length]
    if kinds is not None:
        s0 = min(kinds.shape[1], length)
        valid = valid.clone()
        valid[:, :s0] &= kinds.expand(b, -1)[:, :s0] != _PAD
    device = valid.device
    kpos = torch.arange(skv, device=device).expand(b, skv) if slots is None else slots
    key_valid = (kpos >= 0) & valid.gather(1, kpos.clamp(min=0))
    query_valid = valid[:, length - sq : length]
    if device.type == "cpu" and (sq == 1 or (slots is None and sq == skv)):
        if bool(key_valid.all()) and bool(query_valid.all()):  # no padding: SDPA's own causal path
            return _ForwardContext(key_len=key_len, is_causal=sq > 1)
    qpos = torch.arange(length - sq, length, device=device)[None, :, None]
    kpos = kpos[:, None, :]
    # A PAD query keeps its own key (an empty row would be NaN); its output is zeroed afterwards.
    mask = (key_valid[:, None, :] & (kpos <= qpos)) | ((kpos == qpos) & ~query_valid[:, :, None])
    return _ForwardContext(
        plain_mask=mask[:, None], query_valid=query_valid[:, None, :, None], key_len=key_len
    )


def _tokens_seen(step, padding, sq: int, skv: int) -> int:
    """Positions seen once this forward's queries are in: a cache's count before them plus Sq, else
    the 2-D padding mask's length (htc_star's mask function makes it exactly that), else the keys'."""
    if step is not None:
        return step.p_before + sq
    return padding.shape[1] if padding is not None else skv


def _refuse_beyond_window(window, length: int) -> None:
    if window is None or length > window:
        raise NotImplementedError(
            f"htc_star: {length} tokens exceed the model's sliding window ({window}); star "
            "attention is exact only while the window covers every token seen"
        )


def _context(query, key, padding, kinds, groups, topology, step, softcap) -> _ForwardContext:
    """The context of this forward (see :class:`_ForwardContext`); raises on inconsistent inputs."""
    b, sq, skv = query.shape[0], query.shape[2], key.shape[2]
    device = query.device
    key_len = None
    length = _tokens_seen(step, padding, sq, skv)
    if step is not None:
        p_before = step.p_before
    else:
        p_before = length - sq
        slots = None
        if skv > length:  # a preallocated (static) buffer: slot i is position i, written up to length
            key_len = skv = length
        elif skv < length:
            raise ValueError(
                f"htc_star: the keys hold {skv} positions but {length} tokens were seen; a compacted "
                "cache must be a hk.hf.StarCache (compact_cache returns one)"
            )
    if padding is not None and padding.shape[1] < length:
        padding = torch.nn.functional.pad(padding, (0, length - padding.shape[1]), value=True)
    if kinds is not None:
        if not isinstance(kinds, torch.Tensor):
            raise ValueError(f"htc_star: htc_kinds must be a torch.Tensor, got {type(kinds).__name__}")
        _check_kinds_length(kinds.shape[-1], p_before, length, step is not None or p_before > 0)
    s0 = 0 if kinds is None else kinds.shape[-1]
    if kinds is None and step is not None and not step.layer.visual_free:
        raise ValueError(
            "htc_star: this cache still holds image (VISUAL) keys, which a forward without htc_kinds "
            "would attend as text; pass the htc_kinds of the whole sequence so far (or use "
            "StarCache(kinds=...), which carries them)"
        )
    visual_free = kinds is None or (step is not None and step.layer.visual_free)
    if softcap is None and p_before >= s0 and visual_free and padding is not None:
        k = None if kinds is None else (kinds[None] if kinds.dim() == 1 else kinds)
        if k is not None and k.device != device:
            raise ValueError(f"htc_star: htc_kinds is on {k.device} but the model runs on {device}")
        if (
            device.type == "cpu"
            and sq == 1
            and (step is None or step.layer.filler_free)
            and _pad_free(k)
            and bool(padding.all())
        ):
            # The common CPU decode step: one query over every held key, no mask. Settled from
            # flags kept by the cache and a memo per kinds tensor: one check of the padding mask.
            return _ForwardContext(key_len=key_len)
        return _plain_context(padding, k, None if step is None else step.slots, b, sq, skv, length, key_len)
    slots = None if step is None else step.slots
    if step is not None and step.written is not None and step.written < skv:
        # a static buffer: the star kernel takes its queries to be the last written slots
        key_len = skv = step.written
        slots = slots[:, :skv]

    full = _full_layout(kinds, groups, topology, padding, b, length, device)
    if slots is None:
        layout = (
            full if full.seq_len == skv else StarLayout(full.kinds[:, :skv], full.groups[:, :skv], topology)
        )
    else:
        safe = slots.clamp(min=0)
        filler = slots < 0
        k = torch.where(filler, torch.full_like(safe, _PAD), full.kinds.long().gather(1, safe))
        g = torch.where(filler, torch.full_like(safe, -1), full.groups.long().gather(1, safe))
        # Compaction dropped the images of processed <voco> tokens. Without its image's VISUAL keys a
        # VOCO key attends exactly what a TEXT key does (DESIGN.md §2), and StarLayout rejects a VOCO
        # token without its image, so those become TEXT. Not a VOCO *query* of this forward: its image
        # was dropped after an earlier chunk or turn whose kinds ended the image's <voco> run (a group's
        # <voco> tokens split by text), and as TEXT it would not see the image it compresses.
        orphan = orphan_voco(k, g)
        late = orphan & (slots >= p_before)
        if bool(late.any()):
            row, col = (int(x) for x in late.nonzero()[0])
            raise ValueError(
                f"htc_star: the <voco> token at position {int(slots[row, col])} of sample {row} compresses "
                "an image whose visual keys this cache already dropped (its <voco> tokens are not one run "
                "after it, and an earlier chunk or turn ended them); pass the whole prompt's htc_kinds at "
                "every chunk, or keep an image's <voco> tokens together"
            )
        k = torch.where(orphan, torch.full_like(k, _TEXT), k)
        layout = StarLayout(k, g.to(torch.int32), topology)
    compaction = None
    if step is not None:
        if slots is None:
            slots = torch.arange(skv, device=device).expand(b, skv)
        visual = full.kinds == _VISUAL
        compaction = _compaction(slots, _droppable(full.kinds, full.groups, length), visual)
    return _ForwardContext(layout=layout, key_len=key_len, compaction=compaction)


def _memo_get(mask, key):
    entry = _MEMO.get(id(mask)) if mask is not None else None
    if entry is None or entry[0]() is not mask:
        return None
    return entry[1].get(key)


def _memo_put(mask, key, ctx) -> None:
    if mask is None:
        return
    entry = _MEMO.get(id(mask))
    if entry is None or entry[0]() is not mask:
        # The entry leaves with its forward's mask (CPython frees it, and calls this, before the id
        # can be reused), so a context (e.g. a prefill's [B, 1, S, S] mask) outlives no forward.
        key_id = id(mask)
        entry = (weakref.ref(mask, lambda _: _MEMO.pop(key_id, None)), {})
        _MEMO[key_id] = entry
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    entry[1][key] = ctx


# --------------------------------------------------------------------------------------------------
# The attention and mask functions
# --------------------------------------------------------------------------------------------------


def _mask_parts(fn, seen=None) -> set[str]:
    """Qualified names of a transformers mask function and of the mask functions it combines
    (``and_masks``/``or_masks`` keep them in closures)."""
    seen = set() if seen is None else seen
    if not callable(fn) or id(fn) in seen:
        return set()
    seen.add(id(fn))
    names = {getattr(fn, "__qualname__", type(fn).__name__)}
    for cell in getattr(fn, "__closure__", None) or ():
        content = cell.cell_contents
        items = content if isinstance(content, (tuple, list)) else (content,)
        for item in items:
            if callable(item) and hasattr(item, "__qualname__"):
                names |= _mask_parts(item, seen)
    return names


_MASK_REFUSALS = (
    (
        "blockwise_overlay",
        "a bidirectional prefix (prefix-LM, e.g. PaliGemma's token_type_ids/block_sequence_ids); "
        "the star mask is defined on causal attention only",
    ),
    (
        "packed_sequence",
        "packed sequences (position_ids restarting inside a row); unpack them into a padded batch (one "
        "sequence per row, with a 2-D attention_mask)",
    ),
    ("chunked", "chunked attention (e.g. Llama 4); star attention supports full causal attention only"),
)


def star_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """``AttentionMaskInterface`` entry for ``"htc_star"``: the 2-D padding mask ``[B, L]`` (bool,
    True = token), ``L`` = tokens seen once this forward's queries are in, as a fresh tensor per
    forward. ``L = q_offset + q_length``: with a static cache that is shorter than the buffer the
    mask would otherwise span, and the attention function slices the keys to it.

    Sliding windows: exact while ``L`` fits the window, refused beyond (here, and in the attention
    function for a layer that passes ``sliding_window`` with a mask this function did not make).
    Bidirectional masks (a vision encoder running under ``"htc_star"``) get SDPA's mask, and the
    attention function runs SDPA for them (encoders only; a decoder layer is refused).
    Any other mask (prefix-LM, packed sequences, chunked attention, custom overlays) is refused.
    """
    parts = _mask_parts(mask_function)
    if any("bidirectional" in p for p in parts) and not any("causal" in p for p in parts):
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
    # Tokens seen: a static cache's mask spans its whole buffer (kv_length = max_cache_len), so
    # bound it by the queries' end (q_offset is a tensor there: one host sync per forward).
    length = min(kv_offset + kv_length, int(q_offset) + q_length)
    for part, reason in _MASK_REFUSALS:
        if any(part in p for p in parts):
            raise NotImplementedError(f"htc_star: this model asked for {reason}")
    config = kwargs.get("config")
    if "reuse" in (getattr(config, "kv_sharing_modes", None) or ()):
        raise NotImplementedError(
            "htc_star: this model's layers share keys and values across layers (kv_sharing_modes "
            "'reuse', e.g. Gemma 4's num_kv_shared_layers); htc_star's cache compaction and masks are "
            "per layer"
        )
    if any("sliding_window" in p for p in parts):
        _refuse_beyond_window(getattr(config, "sliding_window", None) if config is not None else None, length)
    known = {"causal_mask_function", "padding_mask_function"}
    unknown = sorted(p for p in parts if "sliding_window" not in p and p.split(".")[0] not in known)
    unknown = [p for p in unknown if not p.startswith(("and_masks", "or_masks"))]
    if unknown:
        raise NotImplementedError(
            f"htc_star: this model asked for a mask htc_star cannot express exactly ({', '.join(unknown)}); "
            "star attention supports causal attention with a 2-D padding mask"
        )
    device = kwargs.get("device", "cpu")
    if attention_mask is None:
        return torch.ones((batch_size, length), dtype=torch.bool, device=device)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if mask.shape[-1] < length:
        mask = torch.nn.functional.pad(mask, (0, length - mask.shape[-1]), value=True)
    return mask[:, :length].clone()


def _check_kwargs(kwargs) -> None:
    unknown = sorted(k for k in kwargs if k.startswith("htc_") and k not in HTC_KWARGS)
    if unknown:
        raise ValueError(
            f"htc_star: unknown keyword argument(s) {unknown}; expected some of {list(HTC_KWARGS)}"
        )
    for name, allowed in (("htc_topology", tuple(TOPOLOGIES)), ("htc_backend", BACKEND_NAMES)):
        value = kwargs.get(name)
        if value is not None and value not in allowed:
            raise ValueError(f"htc_star: {name}={value!r}; expected one of {allowed}")


# Attention kwargs some models pass that change the scores or the rows they mix, and that the star
# kernel does not compute: (name, what it is, whether the bidirectional encoder path's SDPA applies it).
_UNSUPPORTED_KWARGS = (
    ("s_aux", "attention sinks (s_aux, e.g. GPT-OSS)", False),
    ("sinks", "attention sinks (sinks)", False),
    ("position_bias", "an additive position bias on the scores (position_bias)", True),
    ("cu_seq_lens_q", "packed sequences (cu_seq_lens_q)", False),
    ("cu_seq_lens_k", "packed sequences (cu_seq_lens_k)", False),
)


def _refuse_unsupported(kwargs, encoder: bool) -> None:
    for name, what, sdpa_has_it in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None and not (encoder and sdpa_has_it):
            raise NotImplementedError(
                f"htc_star: this model's attention asks for {what}, which htc_star does not compute; "
                "use an attention implementation that does (e.g. 'eager')"
            )


@torch.compiler.disable
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
    Reads ``htc_kinds`` / ``htc_groups`` / ``htc_topology`` / ``htc_backend`` from the kwargs (any
    other ``htc_*`` is an error); without ``htc_kinds`` it is causal attention with padding (every
    token TEXT). Passes the model's ``softcap`` through. Runs eagerly under ``torch.compile`` (the
    layout is Python-side work; the kernel is a custom op either way). A forward whose star mask is
    the causal mask (no VISUAL key, every query TEXT: decode after compaction, or no ``htc_kinds``)
    runs SDPA instead of the star kernel (``htc_backend`` picks the star kernel's backend only).
    """
    _check_kwargs(kwargs)
    step = _take_step(key, module)
    is_causal = kwargs.get("is_causal")
    if is_causal is False or (is_causal is None and not getattr(module, "is_causal", True)):
        # A decoder layer, a cache, or htc_kinds describing this very sequence: a bidirectional text
        # model. Not htc_kinds of another sequence: some VLMs (Qwen2-VL) pass the text forward's
        # kwargs on to their vision tower, whose patches are a sequence of their own.
        kinds = kwargs.get("htc_kinds")
        if (
            getattr(module, "layer_idx", None) is not None
            or step is not None
            or (isinstance(kinds, torch.Tensor) and kinds.shape[-1] == key.shape[2])
            or (kinds is not None and not isinstance(kinds, torch.Tensor))
        ):
            raise NotImplementedError(
                f"htc_star: {type(module).__name__} attends bidirectionally (is_causal=False, e.g. a "
                "prefix-LM text model); the star mask is defined on causal attention only"
            )
        # A bidirectional encoder (e.g. the vision tower) under "htc_star": its own SDPA attention.
        _refuse_unsupported(kwargs, encoder=True)
        kwargs = {k: v for k, v in kwargs.items() if k not in HTC_KWARGS}
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    _refuse_unsupported(kwargs, encoder=False)
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
    ):
        shape = (
            tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        )
        raise ValueError(
            f"htc_star: got an attention mask of shape {shape}; htc_star builds the mask from htc_kinds and "
            "takes padding from a 2-D attention_mask [B, S] (pass that, not a 4-D mask)"
        )
    if dropout and module.training:
        raise NotImplementedError("htc_star: attention dropout is not supported (set attention_dropout=0)")
    if kwargs.get("output_attentions"):
        warnings.warn(
            "htc_star does not return attention weights (output_attentions=True): like sdpa, the "
            "attentions are None",
            stacklevel=2,
        )
    softcap = kwargs.get("softcap")
    kinds, groups, topology = kwargs.get("htc_kinds"), kwargs.get("htc_groups"), kwargs.get("htc_topology")
    if kinds is None and step is not None and step.cache.kinds is not None:
        kinds, groups = step.cache.kinds, step.cache.groups
        topology = topology or step.cache.topology
    topology = topology or "star"
    backend = kwargs.get("htc_backend") or sys.modules["htc_kernels.hf"].DEFAULT_BACKEND

    # All layers of one forward share a context (the memo is per attention-mask tensor, i.e. per
    # forward); the key guards against a model calling attention with different shapes inside one.
    memo_key = (id(kinds), id(groups), topology, softcap, query.shape[0], query.shape[2], key.shape[2])
    if step is not None:
        memo_key += (step.p_before,)
    ctx = _memo_get(attention_mask, memo_key)
    if ctx is None:
        ctx = _context(query, key, attention_mask, kinds, groups, topology, step, softcap)
        _memo_put(attention_mask, memo_key, ctx)
    window = kwargs.get("sliding_window")
    if window is not None:  # per layer (Gemma alternates), and a mask dict skips the mask function
        _refuse_beyond_window(window, _tokens_seen(step, attention_mask, query.shape[2], key.shape[2]))
    if ctx.key_len is not None:
        key, value = key[:, :, : ctx.key_len], value[:, :, : ctx.key_len]
    if ctx.layout is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=ctx.plain_mask,
            is_causal=ctx.is_causal,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        if ctx.query_valid is not None:
            out = torch.where(ctx.query_valid, out, 0)
    else:
        out = star_attention(query, key, value, ctx.layout, scale=scaling, softcap=softcap, backend=backend)
    if step is not None and ctx.compaction is not None:
        step.layer.compact(ctx.compaction)
    return out.transpose(1, 2).contiguous(), None


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
    unless the call gives ``past_key_values``, ``cache_implementation`` or ``use_cache=False``,
    or the generation config names a cache other than ``"dynamic"``: then transformers builds
    that cache, the attention stays exact and nothing is dropped). Only this instance is
    changed (instance attributes ``generate`` and ``_validate_model_kwargs``, one forward pre-hook,
    and its attention implementation). Returns ``model``.

    ``backend``: the star_attention backend for this model's calls (default:
    ``hk.hf.DEFAULT_BACKEND``, read at each call).
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
            _check_kwargs(kwargs)
            kinds = kwargs.get("htc_kinds")
            if kinds is not None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                _validate_generate_kinds(kinds, ids, kwargs.get("htc_groups"), kwargs.get("htc_topology"))
                kwargs.update(_per_sample(kwargs, ids))
            if model._htc_star_backend is not None and "htc_backend" not in kwargs:
                kwargs["htc_backend"] = model._htc_star_backend
            no_cache = kwargs.get("use_cache", True) is False
            own_cache = kwargs.get("past_key_values") is not None or "cache_implementation" in kwargs
            # The generation config's cache: none, "dynamic" (what StarCache is) and the deprecated
            # "hybrid" (transformers drops it) get a StarCache; any other (static, offloaded,
            # quantized) is built by transformers as asked: exact attention, nothing dropped.
            gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
            implementation = getattr(gen_config, "cache_implementation", None)
            if not own_cache and not no_cache and implementation in (None, "dynamic", "hybrid"):
                kwargs["past_key_values"] = StarCache(config=model.config)
                if implementation == "dynamic":
                    kwargs["cache_implementation"] = None  # transformers refuses both a cache and a name
            outer = getattr(_STATE, "generating", False)
            _STATE.generating = no_cache
            try:
                return original_generate(*args, **kwargs)
            finally:
                _STATE.generating = outer

        model.generate = generate

    def _pre_hook(module, args, kwargs):
        _check_kwargs(kwargs)
        _check_implementation(module, kwargs)
        if module._htc_star_backend is not None and "htc_backend" not in kwargs:
            kwargs["htc_backend"] = module._htc_star_backend
        return args, kwargs

    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return model


def _check_implementation(model, kwargs) -> None:
    """A star argument (``htc_*``, a star cache) reaching a model whose text attention is not a star
    implementation would be ignored: that attention attends causally. Refuse instead."""
    cfg = model.config
    cfg = cfg.text_config if "text_config" in (getattr(cfg, "sub_configs", {}) or {}) else cfg
    impl = cfg._attn_implementation
    if impl in STAR_IMPLEMENTATIONS:
        return
    given = sorted(k for k in kwargs if k.startswith("htc_") and kwargs[k] is not None)
    cache = kwargs.get("past_key_values")
    if isinstance(cache, (StarCache, StarStaticCache)):
        given.append(f"past_key_values={type(cache).__name__}")
    if given:
        raise ValueError(
            f"htc_star: {given} given, but the model's attention implementation is {impl!r}, which "
            "would ignore them and attend causally; call hk.hf.enable_star_attention(model) (or "
            "set_attn_implementation back to 'htc_star') first"
        )


def _per_sample(kwargs, input_ids) -> dict:
    """htc_kinds / htc_groups as ``[B, S]``: generate repeats batch tensors per beam and returned
    sequence along dim 0, which would interleave the positions of a 1-D ``[S]`` tensor and leave a
    batch-1 one for B > 1 at the wrong batch."""
    rows = next(
        (t.shape[0] for t in (input_ids, kwargs.get("inputs_embeds")) if isinstance(t, torch.Tensor)), 1
    )
    out = {}
    for name in ("htc_kinds", "htc_groups"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor):
            t = t.reshape(1, -1) if t.dim() == 1 else t
            out[name] = t.expand(rows, -1) if t.shape[0] == 1 else t
    return out


def _validate_generate_kinds(kinds, input_ids, groups, topology) -> None:
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
