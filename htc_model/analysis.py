"""Looking inside a running HTC model: ``<voco>`` attention maps (paper Fig. 3).

The language model normally runs on ``"htc_star"``, which never forms attention probabilities. To
read them for the ``<voco>`` rows only, the model runs once more on ``"htc_star_probe"``: the same
attention function (so every layer's output, hence the next layer's input, is unchanged), which also
receives a callback through the forward kwargs and hands it each layer's query and key tensors
(after RoPE, exactly what the kernel reads). The callback scores the few ``<voco>`` queries against
the keys and keeps the probabilities of their image's visual keys: O(rows x S) per layer, never S x S.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import htc_kernels.hf as hkhf
from htc_kernels.layout import TokenKind

_PROBE_IMPLEMENTATION = "htc_star_probe"


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``"htc_star"``'s attention, then ``kwargs["voco_probe"](module, query, key, scaling)``."""
    probe = kwargs.pop("voco_probe", None)
    out = hkhf.star_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    if probe is not None:
        probe(module, query, key, scaling)
    return out


def _register() -> None:
    AttentionInterface.register(_PROBE_IMPLEMENTATION, _probe_attention)
    AttentionMaskInterface.register(_PROBE_IMPLEMENTATION, hkhf.star_attention_mask)


class _VocoProbe:
    """Collects, per layer, the attention probabilities of every ``<voco>`` row over its image's
    VISUAL keys. Rows are ordered image by image (row-major over the batch), then ``<voco>`` by
    ``<voco>``; ``kinds`` / ``groups`` ``[B, S]`` describe the expanded sequence."""

    def __init__(self, kinds: torch.Tensor, groups: torch.Tensor, num_voco: int, num_visual: int):
        voco = (kinds == TokenKind.VOCO).nonzero()  # [R, 2] (b, i), row-major: image by image
        self.rows_b, self.rows_i = voco[:, 0], voco[:, 1]
        self.num_images = voco.shape[0] // num_voco
        s = kinds.shape[1]
        b_kinds, b_groups = kinds[self.rows_b], groups[self.rows_b]  # [R, S]
        own = groups[self.rows_b, self.rows_i]  # [R]
        j = torch.arange(s, device=kinds.device)
        # DESIGN.md §2 for a VOCO query: causal, no PAD key, a VISUAL key only of its own image.
        visual = b_kinds == TokenKind.VISUAL
        self.allowed = (
            (j[None] <= self.rows_i[:, None])
            & (b_kinds != TokenKind.PAD)
            & (~visual | (b_groups == own[:, None]))
        )
        # Its image's VISUAL positions, in order ([anchors; patches] with fusion="pre").
        own_visual = visual & (b_groups == own[:, None])
        self.columns = own_visual.nonzero()[:, 1].view(-1, num_visual)  # [R, num_visual]
        self.num_voco = num_voco
        self.layers: list[torch.Tensor] = []

    def __call__(self, module, query, key, scaling) -> None:
        # query [B, Hq, S, D], key [B, Hkv, S, D] (prefill without a cache: S = the whole sequence)
        hq, hkv, d = query.shape[1], key.shape[1], query.shape[3]
        scale = d**-0.5 if scaling is None else scaling
        scores = []
        for b in self.rows_b.unique_consecutive().tolist():  # per sample: K is never copied per row
            rows = self.rows_i[self.rows_b == b]
            q = query[b, :, rows].float().view(hkv, hq // hkv, rows.numel(), d)
            # GQA: query head h reads key head h // (Hq / Hkv), as transformers' repeat_kv does.
            s = torch.einsum("kgrd,ksd->rkgs", q, key[b].float()).flatten(1, 2)  # [r, Hq, S]
            scores.append(s * scale)
        probs = torch.cat(scores).masked_fill(~self.allowed[:, None], float("-inf")).softmax(-1)
        visual = probs.gather(2, self.columns[:, None].expand(-1, hq, -1))  # [R, Hq, num_visual]
        n, v = self.num_images, self.num_voco
        self.layers.append(visual.view(n, v, hq, -1).transpose(1, 2))  # [N, Hq, n_voco, num_visual]

    def result(self) -> torch.Tensor:
        return torch.stack(self.layers, dim=1)  # [N, L, Hq, n_voco, num_visual]


@torch.no_grad()
def voco_attention(model, pixel_values, input_ids=None, attention_mask=None) -> torch.Tensor:
    """See :meth:`HTCForConditionalGeneration.voco_attention`."""
    cfg = model.config
    if input_ids is None:
        model._check_pixels(pixel_values)
        n = pixel_values.shape[0]
        input_ids = torch.full((n, 1), cfg.image_token_id, dtype=torch.long, device=pixel_values.device)
    x = model._expand(input_ids, attention_mask, pixel_values)
    if not bool((x.kinds == TokenKind.VOCO).any()):
        raise ValueError("HTC.voco_attention: the input holds no image (no <image> token in input_ids)")
    probe = _VocoProbe(x.kinds, x.groups, cfg.num_voco_tokens, cfg.num_visual_tokens)
    lm = model.language_model
    _register()
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(_PROBE_IMPLEMENTATION)
    try:
        lm(
            inputs_embeds=x.inputs_embeds,
            attention_mask=x.attention_mask,
            position_ids=x.position_ids,
            htc_kinds=x.kinds,
            htc_groups=x.groups,
            htc_topology=cfg.topology,
            use_cache=False,
            logits_to_keep=1,
            voco_probe=probe,
        )
    finally:
        lm.set_attn_implementation(previous)
    if len(probe.layers) != cfg.text_config.num_hidden_layers:
        raise RuntimeError(
            f"HTC.voco_attention: saw {len(probe.layers)} attention calls for "
            f"{cfg.text_config.num_hidden_layers} layers; this language model does not route its "
            "attention through transformers' AttentionInterface"
        )
    return probe.result()
