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
  ``htc_groups``, ``htc_topology``, ``htc_backend``; any other ``htc_*`` is an error) is a forward
  kwarg; models built on ``AttentionInterface`` forward it unchanged to every attention call.
  Positions after the prompt (generated tokens) are TEXT. Padding comes from the 2-D
  ``attention_mask`` (a PAD kind at a token it keeps is an error). ``kinds_from_input_ids(...,
  return_groups=True)`` gives ``htc_kinds`` and ``htc_groups`` (one group per image, also for
  tiled and row-split images: Idefics3/SmolVLM, Pixtral/Mistral3); ``image_tokens(config or
  processor)`` gives its arguments for known families.
* The mask function (``attention.star_attention_mask``) returns the 2-D padding mask ``[B, L]``
  (``L`` = tokens seen, absolute), a fresh tensor per forward, and is where masks htc_star cannot
  express exactly are refused. The attention function builds the layout once per forward (found
  again through that mask tensor) and, on a decode step whose cache holds no VISUAL key, skips it:
  that step is plain causal attention (SDPA, no host sync).
* :class:`StarCache` (``cache.py``) is a ``DynamicCache`` whose layers remember the absolute
  position of every slot. After each layer's attention, the attention function asks the cache to
  drop the VISUAL keys that no later token can attend (DESIGN.md §2, "Compaction").
  ``get_seq_length()`` stays absolute, so position ids (RoPE) and ``generate``'s bookkeeping are
  unaffected by compaction.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import (
    ATTN_IMPLEMENTATION,
    HTC_KWARGS,
    enable_star_attention,
    star_attention_forward,
    star_attention_mask,
)
from .cache import StarCache, StarLayer, StarStaticCache, StarStaticLayer, compact_cache
from .kinds import image_tokens, insert_voco_tokens, kinds_from_input_ids

#: Backend used by the attention function unless a call passes ``htc_backend=...`` (read per call).
DEFAULT_BACKEND = "auto"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DEFAULT_BACKEND",
    "HTC_KWARGS",
    "StarCache",
    "StarLayer",
    "StarStaticCache",
    "StarStaticLayer",
    "compact_cache",
    "enable_star_attention",
    "image_tokens",
    "insert_voco_tokens",
    "kinds_from_input_ids",
    "star_attention_forward",
    "star_attention_mask",
]


def _register() -> None:
    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not star_attention_forward:
        AttentionInterface.register(ATTN_IMPLEMENTATION, star_attention_forward)
    if AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not star_attention_mask:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, star_attention_mask)


_register()
