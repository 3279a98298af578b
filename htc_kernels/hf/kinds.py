"""Building ``htc_kinds`` / ``htc_groups`` from token ids: which tokens are images, ``<voco>``, padding.

One image is one group (DESIGN.md §2), whatever its processor wrote for it. Processors expand an
image into more than a run of placeholder tokens:

* LLaVA, LLaVA-NeXT: ``<image>*N`` (one run).
* Qwen2-VL / Qwen2.5-VL: ``<|vision_start|> <|image_pad|>*N <|vision_end|>``.
* Pixtral / Mistral3: ``[IMG]*w [IMG_BREAK] [IMG]*w [IMG_BREAK] ... [IMG]*w [IMG_END]`` (row by row).
* Idefics3 / SmolVLM: ``<fake_token_around_image> <row_1_col_1> <image>*N <fake_token_around_image>
  <row_1_col_2> ... \\n\\n <fake_token_around_image> <global-img> <image>*N <fake_token_around_image>``
  (tile by tile; the global image is always the last tile).

Splitting at every maximal run of placeholders (the default groups of :class:`~htc_kernels.StarLayout`)
would make each row or tile an image, and the ``<voco>`` after the image would compress only the last
one. So the functions here parse images with a small grammar given by token ids:

* ``image_token_id``: placeholders (the image's features go there).
* ``image_start_token_id``: tokens that open an image (``<|vision_start|>``,
  ``<fake_token_around_image>``).
* ``image_break_token_id``: tokens that occur only inside an image, between placeholder runs
  (``[IMG_BREAK]``, ``<row_i_col_j>``). Outside an image they are an error.
* ``image_end_token_id``: tokens that close an image (``[IMG_END]``, ``<|vision_end|>``,
  ``<fake_token_around_image>``). When given, every image must end with one.
* ``image_last_tile_token_id``: a marker before the last tile (``<global-img>``): the image ends at
  the first end token after that tile's placeholders (before it, end tokens separate tiles).
* ``image_filler_token_id``: other tokens the processor writes inside an image (Idefics3's newlines
  between tile rows). With end tokens given, any token inside an image that has no role here is an
  error (text inside an image would otherwise become VISUAL).
* ``image_seq_length``: placeholders per image when every image has the same count and no wrapper
  (LLaVA-1.5: 576): a run of ``k * image_seq_length`` placeholders is ``k`` images (two images written
  back to back); any other run length is an error. Without it (and without end tokens) a run is one
  image, whatever its length (LLaVA-NeXT: write text between images, or pass the groups yourself).

An image spans from its opening token to its end token (or, without end tokens, to the end of its
placeholders and break tokens), and **every token in the span is VISUAL**, wrappers, breaks, tile
markers and the newlines Idefics3 puts between rows included. Why VISUAL and not TEXT: the tokens are
part of the image as its processor wrote it; as VISUAL they are seen by the image's ``<voco>`` tokens
(so the row/tile structure is compressed with the pixels) and are dropped from the KV cache with the
image, which then costs exactly its ``<voco>`` tokens; as TEXT they would stay in the cache forever and
be attended by all later text although (TEXT never seeing VISUAL) they carry no image content. And
each image is one contiguous VISUAL span, followed by its ``<voco>`` tokens.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from htc_kernels.layout import _PAD, _TEXT, _VISUAL, _VOCO, StarLayout, _default_groups

_ROLES = ("image_start_token_id", "image_break_token_id", "image_end_token_id", "image_last_tile_token_id")


def _as_id(i, name: str, fn: str) -> int:
    """One token id; ValueError for anything int() would coerce (63.7, True, a float tensor)."""
    integral = isinstance(i, numbers.Integral) and not isinstance(i, bool)
    if isinstance(i, torch.Tensor):
        integral = i.dim() == 0 and not (
            i.dtype.is_floating_point or i.dtype.is_complex or i.dtype == torch.bool
        )
    if not integral:
        raise ValueError(f"{fn}: {name} must hold integer token ids, got {i!r}")
    return int(i)


def _as_id_list(ids, name: str, fn: str = "kinds_from_input_ids") -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, (str, bytes)):  # a Sequence, of characters: "63" would be the ids 6 and 3
        raise ValueError(
            f"{fn}: {name} must be token ids, got the string {ids!r} (tokenizer.convert_tokens_to_ids)"
        )
    if isinstance(ids, numbers.Number) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
        return [_as_id(ids, name, fn)]
    if isinstance(ids, (Sequence, torch.Tensor)):
        out = [_as_id(i, name, fn) for i in ids]
        if not out:
            raise ValueError(f"{fn}: {name} is empty")
        return out
    raise ValueError(f"{fn}: {name} must be an int or a sequence of ints, got {type(ids).__name__}")


class _ImageGrammar:
    """Token-id sets of one model family's image expansion; :meth:`spans` finds the images of a row."""

    def __init__(self, fn: str, image_token_id, **roles):
        self.fn = fn
        self.image = set(_as_id_list(image_token_id, "image_token_id", fn))
        if not self.image:
            raise ValueError(f"{fn}: image_token_id is required")
        start, brk, end, last = (set(_as_id_list(roles.get(r), r, fn)) for r in _ROLES)
        self.start, self.end, self.last_tile = start, end, last
        self.inside_only = brk | last  # may occur only inside an image
        self.filler = set(_as_id_list(roles.get("image_filler_token_id"), "image_filler_token_id", fn))
        length = roles.get("image_seq_length")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise ValueError(f"{fn}: image_seq_length must be an int >= 1, got {length!r}")
        if length is not None and (start or brk or end or last):
            raise ValueError(f"{fn}: image_seq_length is for images that are one run of placeholders only")
        self.seq_length = length
        if last and not end:
            raise ValueError(f"{fn}: image_last_tile_token_id needs image_end_token_id (what ends the image)")
        named = dict(zip(_ROLES, (start, brk, end, last)))
        named["image_filler_token_id"] = self.filler
        for name, ids in named.items():
            if ids & self.image:
                raise ValueError(f"{fn}: {name} overlaps image_token_id {sorted(ids & self.image)}")
        # One id, one role; the only exception: a token that both opens and closes (Idefics3's
        # <fake_token_around_image>, which also separates tiles).
        names = list(named)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                both = named[a] & named[b]
                if both and {a, b} != {"image_start_token_id", "image_end_token_id"}:
                    raise ValueError(
                        f"{fn}: {a} and {b} share the id(s) {sorted(both)}; each id has one role"
                    )
        self.all_ids = self.image | start | brk | end | last | self.filler
        self.voco: set[int] = set()  # <voco> ids: inside an image they get their own error (the caller's)

    def spans(self, toks: list[int], pos: list[int], b: int) -> list[tuple[int, int]]:
        """Images of one sample as ``(first, last)`` indices into ``toks`` (inclusive), in order.

        ``toks`` are the sample's non-PAD token ids and ``pos`` their positions (for messages).
        """
        spans: list[tuple[int, int]] = []
        open_at = None  # index where the current image opened
        seen_content = seen_last = content_after_last = False

        def where(i):
            return f"position {pos[i]} of sample {b}"

        for i, t in enumerate(toks):
            if open_at is not None and not self.end and t not in self.image and t not in self.inside_only:
                self._close_without_end(spans, open_at, i - 1, seen_content, where)
                open_at = None
            if open_at is None:
                if t in self.image and self.start:
                    raise ValueError(
                        f"{self.fn}: image token {t} at {where(i)} is outside any image: images open with "
                        f"{sorted(self.start)} (an image cut at its start?)"
                    )
                if t in self.image or t in self.start:
                    open_at, seen_content, seen_last, content_after_last = i, t in self.image, False, False
                elif t in self.end or t in self.inside_only:
                    raise ValueError(
                        f"{self.fn}: image token {t} at {where(i)} is outside any image (it may only "
                        "follow an image's placeholders or opening token); check the image_*_token_id "
                        "arguments against the processor's expansion"
                    )
                continue
            if self.end and t not in self.all_ids and t not in self.voco:
                raise ValueError(
                    f"{self.fn}: token {t} at {where(i)} is inside the image opened at {where(open_at)} "
                    "but is none of its tokens (text inside an image, or an image cut short?); if the "
                    "processor writes it inside images, pass it as image_filler_token_id"
                )
            if t in self.image:
                seen_content = True
                content_after_last = content_after_last or seen_last
            elif t in self.last_tile:
                if seen_last:
                    raise ValueError(
                        f"{self.fn}: the image opened at {where(open_at)} has a second last-tile marker "
                        f"at {where(i)}: its end token ({sorted(self.end)}) is missing"
                    )
                seen_last = True
            elif t in self.end and (content_after_last if self.last_tile else seen_content):
                spans.append((open_at, i))
                open_at = None
            elif t in self.end and not self.last_tile:
                raise ValueError(
                    f"{self.fn}: the image opened at {where(open_at)} ends at {where(i)} "
                    f"without any image token ({sorted(self.image)})"
                )
            elif t in self.start and t not in self.end and t not in self.inside_only:
                raise ValueError(
                    f"{self.fn}: the image opened at {where(open_at)} has no end token "
                    f"({sorted(self.end)}) before the next image opens at {where(i)}"
                )
        if open_at is not None:
            if self.end:
                raise ValueError(
                    f"{self.fn}: the image opened at {where(open_at)} has no end token "
                    f"({sorted(self.end)}); was the prompt truncated?"
                )
            self._close_without_end(spans, open_at, len(toks) - 1, seen_content, where)
        return spans

    def _close_without_end(self, spans, first, last, seen_content, where) -> None:
        """Without end tokens an image ends with its last placeholder or break token; with
        ``image_seq_length`` a run of several images' placeholders is split into them."""
        if not seen_content:
            raise ValueError(
                f"{self.fn}: the image opened at {where(first)} has no image token ({sorted(self.image)})"
            )
        n = self.seq_length
        if n is None:
            spans.append((first, last))
            return
        length = last + 1 - first
        if length % n:
            raise ValueError(
                f"{self.fn}: the placeholder run at {where(first)} has {length} tokens, not a multiple of "
                f"image_seq_length={n}: an image cut short, or images of other sizes"
            )
        spans.extend((i, i + n - 1) for i in range(first, last + 1, n))


def _batch(input_ids, attention_mask, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` as ``[B, S]`` tensors (mask all ones when ``attention_mask`` is None)."""
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
        or input_ids.dtype == torch.bool
    ):
        raise ValueError(f"{fn}: input_ids must be an integer torch.Tensor [B, S] or [S]")
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"{fn}: input_ids must be [B, S] or [S], got shape {tuple(input_ids.shape)} "
            "(one row of token ids per sample)"
        )
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"{fn}: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
    if mask.shape != ids.shape:
        raise ValueError(
            f"{fn}: attention_mask {tuple(attention_mask.shape)} must have the shape of "
            f"input_ids {tuple(input_ids.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):  # an additive mask (0 / -inf) would read backwards
        bad = sorted({float(x) for x in mask.unique()} - {0.0, 1.0})[:4]
        raise ValueError(f"{fn}: attention_mask must hold 0 (padding) and 1 (token), got {bad}")
    return ids, mask


def _rows(ids: torch.Tensor, mask: torch.Tensor):
    """Per sample: (non-PAD token ids, their positions)."""
    for row, m in zip(ids.tolist(), mask.tolist()):
        pos = [p for p, keep in enumerate(m) if keep]
        yield [row[p] for p in pos], pos


def kinds_from_input_ids(
    input_ids: torch.Tensor,
    *,
    image_token_id: int | Sequence[int],
    voco_token_id: int | Sequence[int] | None = None,
    num_voco: int | None = None,
    attention_mask: torch.Tensor | None = None,
    image_start_token_id: int | Sequence[int] | None = None,
    image_break_token_id: int | Sequence[int] | None = None,
    image_end_token_id: int | Sequence[int] | None = None,
    image_last_tile_token_id: int | Sequence[int] | None = None,
    image_filler_token_id: int | Sequence[int] | None = None,
    image_seq_length: int | None = None,
    return_groups: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``htc_kinds`` (and ``htc_groups``) for ``input_ids`` in which every image is already expanded.

    Args:
        input_ids: ``[B, S]`` (or ``[S]``) integer token ids, as the model's processor produced them.
        image_token_id: the id(s) of the image placeholders (pass several when e.g. the MGVQ anchor
            tokens and the CLIP patch placeholders have different ids). No default: models differ.
        voco_token_id: the id(s) of ``<voco>`` tokens (VOCO). ``None``: no VOCO tokens.
        num_voco: if given, every image must be followed by exactly this many ``<voco>`` tokens and
            every ``<voco>`` run have this length (a ``ValueError`` says where not).
        attention_mask: optional ``[B, S]``; zeros become PAD (and are skipped when parsing images).
        image_start_token_id, image_break_token_id, image_end_token_id, image_last_tile_token_id,
        image_filler_token_id, image_seq_length:
            the image grammar of the model family (see the module docstring; :func:`image_tokens`
            gives it for a transformers config or processor). Without them each maximal run of
            ``image_token_id`` is one image, which is right for LLaVA-style models whose images are
            separated by text and wrong for tiled or row-split images.
        return_groups: also return the groups (one group per image, numbered 0, 1, ... in each sample;
            ``<voco>`` tokens take the group of the image before them; -1 elsewhere).

    Returns:
        ``kinds`` (int64, shape of ``input_ids``), or ``(kinds, groups)`` (both int64) with
        ``return_groups=True``: pass them as ``htc_kinds=kinds, htc_groups=groups``.

    Everything in an image's span is VISUAL, ``<voco>`` tokens are VOCO, padding PAD, the rest TEXT.
    Without ``return_groups`` the kinds must determine the groups by themselves (the default rule:
    each VISUAL run an image); when two images touch (no ``<voco>`` or text between them) they do not,
    and a ``ValueError`` asks for ``return_groups=True``.
    """
    fn = "kinds_from_input_ids"
    if num_voco is not None and (not isinstance(num_voco, int) or isinstance(num_voco, bool) or num_voco < 1):
        raise ValueError(f"{fn}: num_voco must be None or an int >= 1, got {num_voco!r}")
    ids, mask = _batch(input_ids, attention_mask, fn)
    grammar = _ImageGrammar(
        fn,
        image_token_id,
        image_start_token_id=image_start_token_id,
        image_break_token_id=image_break_token_id,
        image_end_token_id=image_end_token_id,
        image_last_tile_token_id=image_last_tile_token_id,
        image_filler_token_id=image_filler_token_id,
        image_seq_length=image_seq_length,
    )
    voco_ids = set(_as_id_list(voco_token_id, "voco_token_id", fn))
    if voco_ids & grammar.all_ids:
        raise ValueError(
            f"{fn}: voco_token_id overlaps the image token ids {sorted(voco_ids & grammar.all_ids)}"
        )
    grammar.voco = voco_ids
    kinds = torch.full(ids.shape, _PAD, dtype=torch.long)
    groups = torch.full(ids.shape, -1, dtype=torch.long)
    for b, (toks, pos) in enumerate(_rows(ids, mask)):
        k_row, g_row = _layout_row(grammar, voco_ids, num_voco, toks, pos, b)
        kinds[b, pos] = torch.tensor(k_row, dtype=torch.long)
        groups[b, pos] = torch.tensor(g_row, dtype=torch.long)
    kinds, groups = kinds.to(ids.device), groups.to(ids.device)
    if return_groups:
        StarLayout(kinds, groups)  # validates
    else:
        merged = (kinds == _VISUAL) & (_default_groups(kinds) != groups)
        if bool(merged.any()):
            b, p = (int(x) for x in merged.nonzero()[0])
            raise ValueError(
                f"{fn}: the image at position {p} of sample {b} touches the image before it (no "
                "<voco> or text between them), so htc_kinds alone would make them one group; pass "
                "return_groups=True and htc_groups=groups (or insert <voco> tokens after each image)"
            )
    if input_ids.dim() == 1:
        kinds, groups = kinds[0], groups[0]
    return (kinds, groups) if return_groups else kinds


def _layout_row(grammar, voco_ids, num_voco, toks, pos, b) -> tuple[list[int], list[int]]:
    """Kinds and groups of one sample's non-PAD tokens."""
    fn = grammar.fn
    kinds = [_TEXT] * len(toks)
    groups = [-1] * len(toks)
    spans = grammar.spans(toks, pos, b)
    for g, (first, last) in enumerate(spans):
        kinds[first : last + 1] = [_VISUAL] * (last + 1 - first)
        groups[first : last + 1] = [g] * (last + 1 - first)
    image = -1  # the last image that ended before the current token
    for i, t in enumerate(toks):
        if kinds[i] == _VISUAL:
            if t in voco_ids:
                raise ValueError(
                    f"{fn}: <voco> token at position {pos[i]} of sample {b} is inside an image; "
                    "<voco> tokens go after the image's end token (insert_voco_tokens puts them there)"
                )
            image = groups[i] if i == spans[groups[i]][1] else -1
        elif t in voco_ids:
            if image < 0:
                raise ValueError(
                    f"{fn}: <voco> token at position {pos[i]} of sample {b} has no VISUAL run before it "
                    "(a <voco> token compresses the image that precedes it)"
                )
            kinds[i], groups[i] = _VOCO, image
    if num_voco is not None:
        _check_num_voco(kinds, spans, int(num_voco), pos, b, fn)
    return kinds, groups


def _check_num_voco(kinds, spans, num_voco, pos, b, fn) -> None:
    i = 0
    while i < len(kinds):
        if kinds[i] != _VOCO:
            i += 1
            continue
        j = i
        while j < len(kinds) and kinds[j] == _VOCO:
            j += 1
        if j - i != num_voco:
            raise ValueError(
                f"{fn}: sample {b} has {j - i} <voco> tokens at position {pos[i]}, "
                f"expected num_voco={num_voco}"
            )
        i = j
    for first, last in spans:
        if last + 1 >= len(kinds) or kinds[last + 1] != _VOCO:
            raise ValueError(
                f"{fn}: the image at position {pos[first]} of sample {b} is not followed by "
                f"{num_voco} <voco> token(s); use insert_voco_tokens(...) to add them"
            )


def insert_voco_tokens(
    input_ids: torch.Tensor,
    *,
    image_token_id: int | Sequence[int],
    voco_token_id: int,
    num_voco: int = 1,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str = "left",
    image_start_token_id: int | Sequence[int] | None = None,
    image_break_token_id: int | Sequence[int] | None = None,
    image_end_token_id: int | Sequence[int] | None = None,
    image_last_tile_token_id: int | Sequence[int] | None = None,
    image_filler_token_id: int | Sequence[int] | None = None,
    image_seq_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert ``num_voco`` copies of ``voco_token_id`` after every image (after its end token).

    Images are found as in :func:`kinds_from_input_ids` (same ``image_*`` arguments). Returns
    ``(input_ids, attention_mask)``, ``[B, S']`` with the dtypes of the inputs, re-padded on
    ``padding_side`` with ``pad_token_id`` (the input's padding, given by ``attention_mask``, is
    removed first).
    """
    fn = "insert_voco_tokens"
    if padding_side not in ("left", "right"):
        raise ValueError(f"{fn}: padding_side must be 'left' or 'right', got {padding_side!r}")
    if not isinstance(num_voco, int) or isinstance(num_voco, bool) or num_voco < 1:
        raise ValueError(f"{fn}: num_voco must be an int >= 1, got {num_voco!r}")
    if pad_token_id is None:
        raise ValueError(f"{fn}: pad_token_id is None (a tokenizer without a pad token?); pass an id")
    pad_token_id = _as_id(pad_token_id, "pad_token_id", fn)
    ids, mask = _batch(input_ids, attention_mask, fn)
    grammar = _ImageGrammar(
        fn,
        image_token_id,
        image_start_token_id=image_start_token_id,
        image_break_token_id=image_break_token_id,
        image_end_token_id=image_end_token_id,
        image_last_tile_token_id=image_last_tile_token_id,
        image_filler_token_id=image_filler_token_id,
        image_seq_length=image_seq_length,
    )
    voco = _as_id_list(voco_token_id, "voco_token_id", fn)
    if len(voco) != 1:
        raise ValueError(f"{fn}: voco_token_id must be one id, got {voco}")
    voco_token_id = voco[0]
    if voco_token_id in grammar.all_ids:
        raise ValueError(f"{fn}: voco_token_id {voco_token_id} is one of the image token ids")
    rows = []
    for b, (toks, pos) in enumerate(_rows(ids, mask)):
        if voco_token_id in toks:  # inserting again would double the image's <voco> tokens
            raise ValueError(
                f"{fn}: sample {b} already holds voco_token_id {voco_token_id} at position "
                f"{pos[toks.index(voco_token_id)]}; insert <voco> tokens once"
            )
        ends = {last for _, last in grammar.spans(toks, pos, b)}
        out = []
        for i, t in enumerate(toks):
            out.append(t)
            if i in ends:
                out.extend([voco_token_id] * num_voco)
        rows.append(out)
    length = max((len(r) for r in rows), default=0)
    new_ids = torch.full((len(rows), length), pad_token_id, dtype=ids.dtype, device=ids.device)
    new_mask = torch.zeros((len(rows), length), dtype=mask.dtype, device=ids.device)
    for b, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        new_ids[b, sl] = torch.tensor(r, dtype=ids.dtype)
        new_mask[b, sl] = 1
    return new_ids, new_mask


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

# Families whose images are one run of placeholders (LLaVA-NeXT's row newlines are image features too).
_RUN_CONFIGS = ("llava", "llava_next")
_WRAPPED_CONFIGS = ("qwen2_vl", "qwen2_5_vl")  # <|vision_start|> ... <|vision_end|>
# Families whose config does not name the wrapper tokens: only the processor knows them.
_PROCESSOR_ONLY_CONFIGS = {
    "mistral3": "PixtralProcessor",
    "idefics3": "Idefics3Processor",
    "smolvlm": "SmolVLMProcessor",
}


def image_tokens(source) -> dict[str, int | list[int]]:
    """The ``image_*`` keyword arguments of :func:`kinds_from_input_ids` / :func:`insert_voco_tokens`
    for a transformers config or processor::

        kinds, groups = kinds_from_input_ids(ids, **image_tokens(processor), voco_token_id=VOCO,
                                             attention_mask=mask, return_groups=True)

    Supported: configs of LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL (``image_token_id``; Qwen also its
    video token and ``vision_start/end_token_id``), and processors of those plus Pixtral/Mistral3
    (``[IMG_BREAK]``, ``[IMG_END]``), Idefics3 and SmolVLM (``<fake_token_around_image>``,
    ``<row_i_col_j>``, ``<global-img>``). Mistral3, Idefics3 and SmolVLM configs do not hold their
    wrapper ids, so they raise a ``ValueError`` asking for the processor; so does anything else (pass
    the ids yourself: a guessed grammar would group silently wrong).
    """
    tokenizer = getattr(source, "tokenizer", None)
    if tokenizer is not None:
        return _from_processor(source, tokenizer)
    model_type = getattr(source, "model_type", None)
    if model_type in _PROCESSOR_ONLY_CONFIGS:
        raise ValueError(
            f"image_tokens: a {model_type} config does not name the tokens around its images; pass the "
            f"processor ({_PROCESSOR_ONLY_CONFIGS[model_type]}) or the image_*_token_id arguments"
        )
    if model_type == "llava":  # every image is image_seq_length placeholders (576 for LLaVA-1.5)
        return {
            "image_token_id": int(source.image_token_id),
            "image_seq_length": int(source.image_seq_length),
        }
    if model_type in _RUN_CONFIGS:
        return {"image_token_id": int(source.image_token_id)}
    if model_type in _WRAPPED_CONFIGS:
        return {
            "image_token_id": [int(source.image_token_id), int(source.video_token_id)],
            "image_start_token_id": int(source.vision_start_token_id),
            "image_end_token_id": int(source.vision_end_token_id),
        }
    raise ValueError(
        f"image_tokens: no preset for {type(source).__name__} (model_type {model_type!r}); "
        "supported configs: "
        f"{sorted(_RUN_CONFIGS + _WRAPPED_CONFIGS)}, processors: LLaVA(-NeXT), Qwen2(.5)-VL, Pixtral, "
        "Idefics3, SmolVLM; otherwise pass image_token_id (and the image_*_token_id arguments) yourself"
    )


def _from_processor(processor, tokenizer) -> dict[str, int | list[int]]:
    name = type(processor).__name__

    def token_id(token: str) -> int:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"image_tokens: the {name} tokenizer has no token {token!r}")
        return int(i)

    if name == "LlavaProcessor":
        length = getattr(processor, "image_seq_length", None)
        if length is None and getattr(processor, "patch_size", None):
            # transformers 5 counts each image's placeholders from the crop size (fixed for LLaVA)
            length = processor._get_num_multimodal_tokens(image_sizes=[[1, 1]]).num_image_tokens[0]
        if length is None:
            raise ValueError(
                "image_tokens: this LlavaProcessor has neither image_seq_length nor patch_size; pass "
                "image_token_id and image_seq_length (placeholders per image) yourself"
            )
        return {"image_token_id": int(processor.image_token_id), "image_seq_length": int(length)}
    if name == "LlavaNextProcessor":  # per-image counts vary (anyres): images must not touch
        return {"image_token_id": int(processor.image_token_id)}
    if name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"):
        return {
            "image_token_id": [int(processor.image_token_id), int(processor.video_token_id)],
            "image_start_token_id": token_id("<|vision_start|>"),
            "image_end_token_id": token_id("<|vision_end|>"),
        }
    if name == "PixtralProcessor":
        return {
            "image_token_id": int(processor.image_token_id),
            "image_break_token_id": int(processor.image_break_token_id),
            "image_end_token_id": int(processor.image_end_token_id),
        }
    if name in ("Idefics3Processor", "SmolVLMProcessor"):
        fake = token_id(processor.fake_image_token)
        glob = getattr(processor, "global_image_tag", None) or processor.global_image_token
        # Markers the tokenizer does not know are split into text pieces: inside an image they are
        # still part of it, they just cannot be checked for occurring outside one.
        markers = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
        known = [tokenizer.convert_tokens_to_ids(m) for m in markers]
        # The processor also writes newlines between tile rows, and the pieces of unknown markers.
        pieces = ["\n", "\n\n"] + [
            m for m, i in zip(markers, known) if i is None or i == tokenizer.unk_token_id
        ]
        filler = {int(t) for text in pieces for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
        return {
            "image_token_id": token_id(processor.image_token),
            "image_start_token_id": fake,
            "image_break_token_id": sorted(
                {int(i) for i in known if i is not None and i != tokenizer.unk_token_id}
            )
            or None,
            "image_end_token_id": fake,
            "image_last_tile_token_id": token_id(glob),
            "image_filler_token_id": sorted(filler - {fake, token_id(glob), token_id(processor.image_token)})
            or None,
        }
    raise ValueError(
        f"image_tokens: no preset for {name}; supported processors: LlavaProcessor, LlavaNextProcessor, "
        "Qwen2VLProcessor, Qwen2_5_VLProcessor, PixtralProcessor, Idefics3Processor, SmolVLMProcessor "
        "(otherwise pass image_token_id and the image_*_token_id arguments yourself)"
    )
