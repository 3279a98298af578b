"""Building ``htc_kinds`` from token ids: which tokens are images, ``<voco>`` tokens, padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from htc_kernels.layout import StarLayout, TokenKind


def _as_id_list(ids, name: str) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
        return [int(ids)]
    if isinstance(ids, (Sequence, torch.Tensor)):
        out = [int(i) for i in ids]
        if not out:
            raise ValueError(f"kinds_from_input_ids: {name} is empty")
        return out
    raise ValueError(
        f"kinds_from_input_ids: {name} must be an int or a sequence of ints, got {type(ids).__name__}"
    )


def kinds_from_input_ids(
    input_ids: torch.Tensor,
    *,
    image_token_id: int | Sequence[int],
    voco_token_id: int | Sequence[int] | None = None,
    num_voco: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``htc_kinds`` (LongTensor ``[B, S]``) for LLaVA-style ``input_ids``.

    Args:
        input_ids: ``[B, S]`` (or ``[S]``) token ids in which every image is already expanded into
            its visual tokens (what LLaVA's processor produces: ``image_seq_length`` copies of the
            image token). Tokens equal to any of ``image_token_id`` become VISUAL (pass several ids
            when the MGVQ anchor tokens and the CLIP patch placeholders have different ids).
        image_token_id: the id(s) of visual tokens. No default: models differ.
        voco_token_id: the id(s) of ``<voco>`` tokens (VOCO). ``None``: no VOCO tokens.
        num_voco: if given, every VOCO run must have exactly this many tokens and every VISUAL run
            must be followed by one (a ``ValueError`` says where not).
        attention_mask: optional ``[B, S]``; zeros become PAD.

    Everything else is TEXT. Groups follow the default rule (each VISUAL run is an image; a VOCO run
    belongs to the image before it); the result is validated with :class:`~htc_kernels.StarLayout`.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
        raise ValueError("kinds_from_input_ids: input_ids must be an integer tensor")
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    if ids.dim() != 2:
        raise ValueError(
            f"kinds_from_input_ids: input_ids must be [B, S] or [S], got {tuple(input_ids.shape)}"
        )
    image_ids = _as_id_list(image_token_id, "image_token_id")
    if not image_ids:
        raise ValueError("kinds_from_input_ids: image_token_id is required")
    voco_ids = _as_id_list(voco_token_id, "voco_token_id")
    if set(image_ids) & set(voco_ids):
        raise ValueError("kinds_from_input_ids: image_token_id and voco_token_id overlap")
    kinds = torch.full(ids.shape, int(TokenKind.TEXT), dtype=torch.long, device=ids.device)
    kinds[torch.isin(ids, torch.tensor(image_ids, device=ids.device))] = int(TokenKind.VISUAL)
    if voco_ids:
        kinds[torch.isin(ids, torch.tensor(voco_ids, device=ids.device))] = int(TokenKind.VOCO)
    if attention_mask is not None:
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(
                f"kinds_from_input_ids: attention_mask {tuple(attention_mask.shape)} "
                "does not match "
                f"input_ids {tuple(input_ids.shape)}"
            )
        kinds[mask.to(ids.device) == 0] = int(TokenKind.PAD)
    if num_voco is not None:
        _check_voco_runs(kinds, int(num_voco))
    StarLayout(kinds)  # validates (e.g. a VOCO run with no image before it)
    return kinds[0] if squeeze else kinds


def _runs(row: list[int]) -> list[tuple[int, int, int]]:
    """(kind, start, length) of the maximal runs of one row."""
    runs, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            runs.append((row[start], start, i - start))
            start = i
    return runs


def _check_voco_runs(kinds: torch.Tensor, num_voco: int) -> None:
    for b, row in enumerate(kinds.tolist()):
        runs = _runs(row)
        for r, (kind, start, length) in enumerate(runs):
            if kind == TokenKind.VOCO and length != num_voco:
                raise ValueError(
                    f"kinds_from_input_ids: sample {b} has {length} <voco> tokens "
                    f"at position {start}, "
                    f"expected num_voco={num_voco}"
                )
            if kind == TokenKind.VISUAL and (r + 1 >= len(runs) or runs[r + 1][0] != TokenKind.VOCO):
                raise ValueError(
                    f"kinds_from_input_ids: the image at position {start} of sample {b} "
                    "is not followed by "
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert ``num_voco`` copies of ``voco_token_id`` after every image (VISUAL run).

    Returns ``(input_ids, attention_mask)`` re-padded on ``padding_side`` with ``pad_token_id``
    (the input's padding, given by ``attention_mask``, is removed first).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"insert_voco_tokens: padding_side must be 'left' or 'right', got {padding_side!r}")
    if not isinstance(num_voco, int) or num_voco < 1:
        raise ValueError(f"insert_voco_tokens: num_voco must be an int >= 1, got {num_voco!r}")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
    ):
        raise ValueError("insert_voco_tokens: input_ids must be an integer torch.Tensor [B, S] or [S]")
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"insert_voco_tokens: input_ids must be [B, S] or [S], got shape {tuple(input_ids.shape)} "
            "(one row of token ids per sample)"
        )
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(
                "insert_voco_tokens: attention_mask must be a torch.Tensor, "
                f"got {type(attention_mask).__name__}"
            )
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(
                f"insert_voco_tokens: attention_mask {tuple(attention_mask.shape)} must have the shape of "
                f"input_ids {tuple(input_ids.shape)}"
            )
    image_ids = set(_as_id_list(image_token_id, "image_token_id"))
    rows = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep]
        out = []
        for i, t in enumerate(toks):
            out.append(t)
            if t in image_ids and (i + 1 == len(toks) or toks[i + 1] not in image_ids):
                out.extend([voco_token_id] * num_voco)
        rows.append(out)
    length = max(len(r) for r in rows)
    new_ids = torch.full((len(rows), length), pad_token_id, dtype=ids.dtype, device=ids.device)
    new_mask = torch.zeros((len(rows), length), dtype=mask.dtype, device=ids.device)
    for b, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        new_ids[b, sl] = torch.tensor(r, dtype=ids.dtype)
        new_mask[b, sl] = 1
    return new_ids, new_mask
