"""HTC-VLM on transformers: CLIP + MGVQ + projectors + any causal LM run with the star mask.

One image becomes ``[anchors (N_d); patches (576); <voco> (n)]`` inside the language model's input
(paper §4, Alg. 2): the CLIP vision tower and the continuous projector P_v give the patches, the MGVQ
tokenizer and the discrete projector P_d give the anchors, and ``n`` learned ``<voco>`` embeddings
follow. The language model runs on ``"htc_star"`` (``htc_kernels.hf``): visual tokens see only
themselves (or their image, ``topology="group"``), ``<voco>`` sees its image, text sees no visual
token (DESIGN.md §2). The model builds that sequence, its kinds and groups from ``input_ids`` with one
``<image>`` token per image; users never write a kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

import htc_kernels.hf as hkhf
from htc_kernels.layout import _TEXT, _VISUAL

from .compression import CompressedImages, CompressedPrompt, model_fingerprint
from .configuration_htc import HTCConfig
from .mgvq import MGVQTokenizer, to_mgvq_pixels

__all__ = ["HTCCausalLMOutputWithPast", "HTCForConditionalGeneration"]

IGNORE_INDEX = -100
# Forward kwargs the model computes itself: passing them would silently disagree with its layout.
_OWN_KWARGS = ("inputs_embeds", "position_ids", "past_key_values", "cache_position")


@dataclass
class HTCCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` over the *expanded* sequence (each ``<image>`` replaced by its
    visual and ``<voco>`` tokens, rows re-padded on the left), plus what describes that sequence.

    Args:
        attention_mask: ``[B, S']`` int64, 1 = token, 0 = padding (left).
        kinds: ``[B, S']`` int64 ``htc_kernels.TokenKind`` of every position (what the LM ran with).
        groups: ``[B, S']`` int64 image index within the sample for VISUAL/VOCO positions, else -1.
    """

    attention_mask: torch.LongTensor | None = None
    kinds: torch.LongTensor | None = None
    groups: torch.LongTensor | None = None


@dataclass
class _Expanded:
    """The language model's input for a batch (all ``[B, S']``, S' = expanded length)."""

    inputs_embeds: torch.Tensor  # [B, S', hidden], the LM's dtype
    input_ids: torch.LongTensor  # text ids; image_token_id / voco_token_id at their positions; pad id
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    kinds: torch.LongTensor
    groups: torch.LongTensor
    labels: torch.LongTensor | None


class _Projector(nn.Module):
    """``linear_1 -> act -> linear_2 [-> act]`` (LLaVA's names, so LLaVA-1.5 weights load by name);
    ``hidden=None`` is a single ``linear_1``."""

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None, act_out: bool = False):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out if hidden is None else hidden)
        if hidden is not None:
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(hidden, d_out)
        self.act_out = act_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if hasattr(self, "linear_2"):
            x = self.linear_2(self.act(x))
        return nn.functional.gelu(x) if self.act_out else x


class HTCForConditionalGeneration(PreTrainedModel):
    """HTC-VLM: ``vision_tower`` (CLIP), ``quantizer`` (MGVQ encoder, frozen), ``continuous_projector``
    (P_v), ``discrete_projector`` (P_d), ``voco_embeddings`` and ``language_model`` (any
    ``AutoModelForCausalLM``, run on ``"htc_star"``).

    Inputs follow LLaVA's conventions: ``input_ids`` ``[B, S]`` with one ``image_token_id`` per image
    (padding on either side, given by ``attention_mask``), ``pixel_values`` ``[N, 3, H, W]`` CLIP-
    normalised, one per ``<image>`` in row-major order, ``labels`` ``[B, S]`` with -100 where no loss
    is wanted (the prompt): the loss is on the remaining (answer) tokens only.

    The quantizer is pluggable: any module mapping MGVQ pixels (``[N, 3, H, W]`` in ``[-1, 1]``) to a
    latent ``[N, C, h, w]`` (or a tuple whose first item is one) with ``C*h*w ==
    config.num_discrete_features``; assign it to ``model.quantizer``. It always runs without gradient
    and in eval mode (the paper's frozen tokenizer).
    """

    config_class = HTCConfig
    config: HTCConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: HTCConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.continuous_projector = _Projector(
            config.vision_config.hidden_size,
            hidden,
            hidden=hidden if config.continuous_projector == "mlp2x_gelu" else None,
        )
        if config.num_discrete_tokens > 0:
            self.quantizer = MGVQTokenizer(config.quantizer_config.mgvq)
            # Eq. 4: GELU(W2 GELU(W1 q)); W2 has N_d * hidden outputs, one hidden-sized slice per anchor.
            self.discrete_projector = _Projector(
                config.num_discrete_features,
                config.num_discrete_tokens * hidden,
                hidden=config.discrete_projector_hidden_size,
                act_out=True,
            )
        else:
            self.quantizer = None
            self.discrete_projector = None
        self.voco_embeddings = nn.Parameter(torch.empty(config.num_voco_tokens, hidden))
        asked = getattr(config.text_config, "_attn_implementation_internal", None)
        if asked is not None and asked not in hkhf.attention.STAR_IMPLEMENTATIONS:
            raise ValueError(
                f"HTC: attn_implementation {asked!r} was asked for the language model, which always attends "
                "under the star mask ('htc_star'); choose the vision tower's only, e.g. "
                "attn_implementation={'vision_config': 'sdpa'}"
            )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        hkhf.enable_star_attention(self.language_model)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HTCForConditionalGeneration):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            init.normal_(module.voco_embeddings, mean=0.0, std=std)

    # ---- embeddings (delegated, so resize_token_embeddings and PEFT work as on the LM) ----
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.quantizer is not None:
            self.quantizer.eval()  # frozen tokenizer: no codebook losses or usage statistics
        return self

    # ---- the image features ----
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The hybrid visual tokens of each image.

        Args:
            pixel_values: ``[N, 3, H, W]`` float, CLIP-normalised (``config.quantizer_config``'s
                mean/std), H = W = ``config.vision_config.image_size``.

        Returns:
            ``[N, config.num_visual_tokens, hidden]`` in the LM's dtype: ``[anchors; patches]``
            (``fusion="pre"``), ``[patches; anchors]`` (``"post"``) or ``patches + mean(anchors)``
            (``"mean"``); patches only when ``num_discrete_tokens == 0``.
        """
        self._check_pixels(pixel_values)
        q = self._quantized_latent(pixel_values) if self.discrete_projector is not None else None
        return self._fuse(self._vision_features(pixel_values), q)

    def _check_pixels(self, pixel_values) -> None:
        size = self.config.vision_config.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            raise ValueError("HTC: pixel_values must be a floating-point tensor [N, 3, H, W]")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"HTC: pixel_values must be [N, 3, {size}, {size}] (CLIP-normalised images), got "
                f"{tuple(pixel_values.shape)}"
            )
        if self.discrete_projector is None:  # the MGVQ branch checks the range itself (to_mgvq_pixels)
            qcfg = self.config.quantizer_config
            to_mgvq_pixels(pixel_values, source="clip", mean=qcfg.image_mean, std=qcfg.image_std)

    # The three stages below are separate so that latency_breakdown can time them (paper Table 11).
    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, P, vision_hidden]``: CLIP hidden state ``vision_feature_layer`` (CLS dropped)."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer]
        return feats[:, 1:] if self.config.vision_feature_select_strategy == "default" else feats

    def _quantized_latent(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, num_discrete_features]``: q, the frozen MGVQ quantized latent flattened in
        ``[C, h, w]`` order (``GroupedQuantizer.flatten_for_projector``), the quantizer's dtype."""
        cfg = self.config
        qcfg = cfg.quantizer_config
        weight = next(self.quantizer.parameters())
        with torch.no_grad():
            pixels = to_mgvq_pixels(
                pixel_values, source="clip", mean=qcfg.image_mean, std=qcfg.image_std, dtype=weight.dtype
            )
            latent = self.quantizer(pixels)
            latent = latent[0] if isinstance(latent, (tuple, list)) else latent
        n = pixel_values.shape[0]
        if (
            not isinstance(latent, torch.Tensor)
            or latent.shape[0] != n
            or latent[0].numel() != (cfg.num_discrete_features)
        ):
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(
                f"HTC: the quantizer returned {shape}; the discrete projector needs [{n}, C, h, w] with "
                f"C*h*w = {cfg.num_discrete_features} (config.num_discrete_features)"
            )
        return latent.flatten(1)

    def _fuse(self, vision_features: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """P_v and P_d, then the fusion: ``[N, num_visual_tokens, hidden]`` in the LM's dtype."""
        patches = self.continuous_projector(vision_features).to(self.language_model.dtype)
        if q is None:
            return patches
        anchors = self._project_discrete(q).to(patches.dtype)
        if self.config.fusion == "pre":
            return torch.cat([anchors, patches], dim=1)
        if self.config.fusion == "post":
            return torch.cat([patches, anchors], dim=1)
        return patches + anchors.mean(dim=1, keepdim=True)

    def _project_discrete(self, q: torch.Tensor) -> torch.Tensor:
        """``[N, N_d, hidden]``: q through P_d, split into N_d hidden-sized anchors."""
        proj_dtype = self.discrete_projector.linear_1.weight.dtype
        anchors = self.discrete_projector(q.to(proj_dtype))
        return anchors.view(q.shape[0], self.config.num_discrete_tokens, -1)

    def _continuous_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, P, hidden]``: the patches (CLIP features through P_v), the LM's dtype."""
        return self.continuous_projector(self._vision_features(pixel_values)).to(self.language_model.dtype)

    def _discrete_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, N_d, hidden]``: the anchors (the MGVQ quantized latent through P_d)."""
        return self._project_discrete(self._quantized_latent(pixel_values))

    # ---- the language model's input ----
    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Every check on a batch, before any compute: ``(ids, mask, spans)`` with ids/mask ``[B, S]``
        int64 and ``spans[b] = (lo, hi)``, the tokens of row b; or a ValueError naming the problem."""
        cfg = self.config
        ids, mask = _check_ids(input_ids, attention_mask, labels)
        img_id, voco_id = cfg.image_token_id, cfg.voco_token_id
        valid = mask.bool()
        if bool(((ids == voco_id) & valid).any()):
            raise ValueError(
                f"HTC: input_ids contain the <voco> token ({voco_id}); the model inserts the <voco> tokens "
                "after each <image> itself: remove them"
            )
        n_images = int(((ids == img_id) & valid).sum())
        n_pixels = 0 if pixel_values is None else int(pixel_values.shape[0])
        if n_images != n_pixels:
            raise ValueError(
                f"HTC: input_ids hold {n_images} <image> token(s) ({img_id}) but pixel_values has "
                f"{n_pixels} image(s); write one <image> per image (in row-major order)"
            )
        if n_images:
            self._check_pixels(pixel_values)
        return ids, mask, [_span(row) for row in valid]

    def _expand(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
    ) -> _Expanded:
        """Replace each ``<image>`` by its visual tokens and ``<voco>`` tokens; re-pad on the left.

        ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, S]`` (padding on either side, one
        contiguous run of tokens per row), ``pixel_values`` ``[N, 3, H, W]`` with N = the number of
        ``<image>`` tokens. Validates everything before running an encoder. ``visual``: the images'
        ``get_image_features`` when already computed (``[N, num_visual_tokens, hidden]``).
        """
        cfg = self.config
        ids, mask, spans = self._check_inputs(input_ids, attention_mask, pixel_values, labels)
        img_id, voco_id = cfg.image_token_id, cfg.voco_token_id
        valid = mask.bool()
        if visual is None and pixel_values is not None and pixel_values.shape[0]:  # as many as <image>s
            visual = self.get_image_features(pixel_values)

        embed = self.language_model.get_input_embeddings()
        # <image> (and padding) may lie beyond the LM's vocabulary: embed a harmless id there.
        text_embeds = embed(ids.masked_fill((ids == img_id) | ~valid, 0))
        voco = self.voco_embeddings.to(text_embeds.dtype)
        if visual is not None:
            visual = visual.to(text_embeds.dtype)
        n_vis, n_voco = cfg.num_visual_tokens, cfg.num_voco_tokens
        image_ids = ids.new_tensor([img_id] * n_vis + [voco_id] * n_voco)
        no_loss = ids.new_full((n_vis + n_voco,), IGNORE_INDEX)

        rows = []  # per sample: (embeds, ids, labels) lists of pieces
        image = 0
        for b, (lo, hi) in enumerate(spans):
            cut = [lo] + [int(p) for p in (ids[b, lo:hi] == img_id).nonzero().flatten() + lo]
            e, t, lab = [], [], []
            for k, (start, p) in enumerate(zip(cut, cut[1:] + [hi])):
                first = start if k == 0 else start + 1  # skip the <image> token itself
                e.append(text_embeds[b, first:p])
                t.append(ids[b, first:p])
                if labels is not None:
                    lab.append(labels[b, first:p])
                if p < hi:
                    e += [visual[image], voco]
                    t.append(image_ids)
                    lab.append(no_loss)
                    image += 1
            rows.append((torch.cat(e), torch.cat(t), torch.cat(lab) if labels is not None else None))

        length = max(r[1].shape[0] for r in rows)
        b, hidden = len(rows), text_embeds.shape[-1]
        pad_id = getattr(cfg.text_config, "pad_token_id", None) or 0
        out_embeds = text_embeds.new_zeros((b, length, hidden))
        out_ids = ids.new_full((b, length), pad_id)
        out_mask = ids.new_zeros((b, length))
        out_labels = ids.new_full((b, length), IGNORE_INDEX) if labels is not None else None
        for i, (e, t, lab) in enumerate(rows):
            n = t.shape[0]
            out_embeds[i, length - n :] = e
            out_ids[i, length - n :] = t
            out_mask[i, length - n :] = 1
            if lab is not None:
                out_labels[i, length - n :] = lab
        kinds, groups = hkhf.kinds_from_input_ids(
            out_ids,
            image_token_id=img_id,
            voco_token_id=voco_id,
            num_voco=n_voco,
            attention_mask=out_mask,
            return_groups=True,
        )
        position_ids = (out_mask.cumsum(-1) - 1).masked_fill(out_mask == 0, 0)
        return _Expanded(out_embeds, out_ids, out_mask, position_ids, kinds, groups, out_labels)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> HTCCausalLMOutputWithPast:
        """Full-sequence forward (training, scoring): one prefill of the expanded sequence.

        Args:
            input_ids: ``[B, S]`` int64 with one ``<image>`` per image.
            pixel_values: ``[N, 3, H, W]`` float, CLIP-normalised, one per ``<image>`` (row-major).
            attention_mask: ``[B, S]`` 0/1 (padding left or right); default: no padding.
            labels: ``[B, S]`` int64, -100 where no loss is wanted (prompt tokens).
            kwargs: passed to the language model (``num_items_in_batch``, ``output_hidden_states``,
                ``logits_to_keep``...).

        Returns:
            :class:`HTCCausalLMOutputWithPast` over the expanded sequence ``[B, S']``: ``logits``
            ``[B, S', vocab]``, ``loss`` (mean next-token cross-entropy over the labelled tokens).
        """
        bad = sorted(k for k in kwargs if k in _OWN_KWARGS or k.startswith("htc_"))
        if bad:
            raise ValueError(
                f"HTC: {bad} are computed by the model from input_ids and pixel_values; do not pass them "
                "(for incremental decoding use generate())"
            )
        self._check_attention("forward")
        x = self._expand(input_ids, attention_mask, pixel_values, labels)
        kwargs.setdefault("use_cache", False)
        out = self.language_model(**self._lm_inputs(x), labels=x.labels, **kwargs)
        return HTCCausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            attention_mask=x.attention_mask,
            kinds=x.kinds,
            groups=x.groups,
        )

    # ---- analysis ----
    def voco_attention(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention of each ``<voco>`` token over its image's hybrid tokens, per layer and head
        (the paper's Figure 3), from one prefill that forms the ``<voco>`` rows only (no S x S map).

        Args:
            pixel_values: ``[N, 3, H, W]`` CLIP-normalised images.
            input_ids: ``[B, S]`` with one ``<image>`` per image (e.g. ``[BOS; prompt; <image>;
                question]``); ``None``: each image alone (``[<image>]``, one row per image).
            attention_mask: ``[B, S]`` 0/1 (padding left or right).

        Returns:
            ``[N, layers, heads, num_voco_tokens, num_visual_tokens]`` float32: row ``[n, l, h, v]``
            is the softmax probability that query head ``h`` of layer ``l`` at image ``n``'s ``v``-th
            ``<voco>`` gives each of the image's visual tokens (580: ``[anchors; patches]`` with
            ``fusion="pre"``). The rest of each row's mass (1 - the sum) is on the text and earlier
            ``<voco>`` tokens before it. Images are in the order of ``pixel_values``.
        """
        from .analysis import voco_attention

        return voco_attention(self, pixel_values, input_ids, attention_mask)

    def latency_breakdown(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "htc",
        decode_tokens: int = 8,
        warmup: int = 1,
        repeats: int = 3,
        parallel_encoders: bool | None = None,
    ):
        """Time the paper's Table 11 stages (vision encoder, MGVQ encoder, projection and fusion,
        prefill, decode per token), each inside an NVTX range (``htc.<stage>``, domain
        ``htc_model``), greedy, without gradient.

        Args:
            pixel_values: ``[N, 3, H, W]`` CLIP-normalised images.
            input_ids: ``[B, S]`` with one ``<image>`` per image; ``None``: ``[<image>]`` per image.
            attention_mask: ``[B, S]`` 0/1.
            mode: ``"htc"`` (the star mask; each image's visual KV is dropped once its ``<voco>``
                tokens are read) or ``"vanilla"`` (the same weights and sequence with LLaVA's causal
                attention: every visual token stays in the KV cache and every decode step reads it).
            decode_tokens: greedy decode steps after the first token (>= 1).
            warmup, repeats: untimed runs, then timed runs (each stage's median is reported).
            parallel_encoders: run CLIP and MGVQ on two CUDA streams (default: on CUDA with a
                quantizer); on the CPU they run one after the other (``True`` there is a ValueError).

        Returns:
            :class:`htc_model.analysis.LatencyBreakdown` (milliseconds; ``as_dict()``).
        """
        from .analysis import latency_breakdown

        return latency_breakdown(
            self,
            pixel_values,
            input_ids,
            attention_mask,
            mode,
            decode_tokens,
            warmup,
            repeats,
            parallel_encoders,
        )

    # ---- starting from LLaVA-1.5 (how the paper starts) ----
    @classmethod
    def from_llava(
        cls, llava_dir: str, mgvq_checkpoint: str | None = None, **config_overrides
    ) -> HTCForConditionalGeneration:
        """An HTC model from a local LLaVA(-1.5) checkpoint directory (``LlavaForConditionalGeneration``).

        The vision tower, the language model and LLaVA's projector (as P_v, ``"mlp2x_gelu"``) are
        LLaVA's; the MGVQ tokenizer comes from ``mgvq_checkpoint`` (an official MGVQ file, see
        ``htc_model.mgvq.MGVQTokenizer.from_pretrained``; ``None`` leaves it random: only for tests);
        the discrete projector and the ``<voco>`` embeddings are new (the ``<voco>`` embeddings start
        at the mean of LLaVA's token embeddings). ``<voco>`` gets the id after ``<image>`` unless
        ``voco_token_id`` is given; ``config_overrides`` set any other :class:`HTCConfig` field.
        """
        from transformers import LlavaForConditionalGeneration

        llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True)
        lc = llava.config
        fields = dict(
            vision_config=lc.vision_config.to_dict(),
            text_config=lc.text_config.to_dict(),
            image_token_id=lc.image_token_id,
            voco_token_id=lc.image_token_id + 1,
            vision_feature_layer=lc.vision_feature_layer,
            vision_feature_select_strategy=lc.vision_feature_select_strategy,
            continuous_projector="mlp2x_gelu",
        )
        if mgvq_checkpoint is not None:
            tokenizer = MGVQTokenizer.from_pretrained(mgvq_checkpoint)
            fields["quantizer_config"] = {"mgvq": tokenizer.config.to_string()}
        fields.update(config_overrides)
        if not isinstance(fields["vision_feature_layer"], int):
            raise ValueError("HTC.from_llava: only a single vision_feature_layer (an int) is supported")
        model = cls(HTCConfig(**fields))
        model.vision_tower.load_state_dict(llava.model.vision_tower.state_dict())
        model.continuous_projector.load_state_dict(llava.model.multi_modal_projector.state_dict())
        model.language_model.get_decoder().load_state_dict(llava.model.language_model.state_dict())
        model.language_model.get_output_embeddings().load_state_dict(llava.lm_head.state_dict())
        if mgvq_checkpoint is not None and model.quantizer is not None:
            model.quantizer.load_state_dict(tokenizer.state_dict())
        with torch.no_grad():
            mean = llava.get_input_embeddings().weight.mean(0)
            model.voco_embeddings.copy_(mean.expand_as(model.voco_embeddings))
        return model.to(llava.dtype).eval()

    def _check_attention(self, where: str) -> None:
        """Before any encoder runs: the language model must attend under the star mask (another
        implementation would ignore the mask and the compaction)."""
        impl = self.language_model.config._attn_implementation
        if impl not in hkhf.attention.STAR_IMPLEMENTATIONS:
            raise ValueError(
                f"HTC.{where}: the language model's attention implementation is {impl!r}; the model needs "
                f"'htc_star' (set at construction): model.language_model.set_attn_implementation('htc_star')"
            )

    # ---- generation: one-shot, or from compressed images ----
    def _pad_id(self) -> int:
        return getattr(self.config.text_config, "pad_token_id", None) or 0

    def _lm_inputs(self, x: _Expanded, positions: bool = True) -> dict:
        """The language model's keyword arguments for the expanded prompt ``x``: its embeddings, mask
        and star layout (``htc_*``, read by the htc_star attention), and its position ids unless
        ``positions`` is False (generate derives them from the mask)."""
        kw = dict(
            inputs_embeds=x.inputs_embeds,
            attention_mask=x.attention_mask,
            htc_kinds=x.kinds,
            htc_groups=x.groups,
            htc_topology=self.config.topology,
        )
        if positions:
            kw["position_ids"] = x.position_ids
        return kw

    def _prefill(self, x: _Expanded) -> DynamicCache:
        """The language model's KV cache of the expanded prompt ``x`` (star mask, every slot kept)."""
        cache = DynamicCache()
        self.language_model(**self._lm_inputs(x), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    @torch.no_grad()
    def compress(
        self, pixel_values: torch.Tensor, prefix_ids: torch.Tensor | None = None
    ) -> CompressedImages:
        """Run ``[prefix; <image>]`` for each image once and keep the KV of the prefix and ``<voco>``.

        Args:
            pixel_values: ``[N, 3, H, W]`` CLIP-normalised images.
            prefix_ids: ``[P]`` int64 text before the image (e.g. BOS and a system prompt), shared by
                all images; ``None``: no prefix.

        Returns:
            :class:`CompressedImages` (the LM's dtype and device); ``generate(compressed=c,
            input_ids=question)`` then gives exactly the tokens of ``generate(pixel_values=...,
            input_ids=[prefix; <image>; question])``.
        """
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("HTC.compress: pixel_values must be [N, 3, H, W]")
        if pixel_values.shape[0] == 0:
            raise ValueError("HTC.compress: pixel_values holds no image (N = 0)")
        self._check_attention("compress")
        n = pixel_values.shape[0]
        device = self.voco_embeddings.device
        if prefix_ids is None:
            prefix_ids = torch.zeros(0, dtype=torch.long, device=device)
        if (
            not isinstance(prefix_ids, torch.Tensor)
            or prefix_ids.dim() != 1
            or prefix_ids.dtype.is_floating_point
        ):
            raise ValueError(
                "HTC.compress: prefix_ids must be a 1-D integer tensor [P] (shared by every image)"
            )
        if bool(
            ((prefix_ids == self.config.image_token_id) | (prefix_ids == self.config.voco_token_id)).any()
        ):
            raise ValueError("HTC.compress: prefix_ids must be text: no <image> or <voco> token")
        prefix_ids = prefix_ids.long().to(device)
        p = prefix_ids.numel()
        ids = torch.cat([prefix_ids.expand(n, p), prefix_ids.new_full((n, 1), self.config.image_token_id)], 1)
        x = self._expand(ids, None, pixel_values)
        cache = self._prefill(x)
        # The prompt ends with the <voco> tokens: select the kept slots here (compact_cache would keep
        # the image until a next token is known not to be another <voco>).
        voco = slice(p + self.config.num_visual_tokens, x.input_ids.shape[1])
        return CompressedImages(
            prefix_keys=[layer.keys[:1, :, :p].clone() for layer in cache.layers],
            prefix_values=[layer.values[:1, :, :p].clone() for layer in cache.layers],
            voco_keys=[layer.keys[:, :, voco].clone() for layer in cache.layers],
            voco_values=[layer.values[:, :, voco].clone() for layer in cache.layers],
            prefix_ids=prefix_ids,
            num_visual_tokens=self.config.num_visual_tokens,
            model=model_fingerprint(self),
        )

    @torch.no_grad()
    def compress_prompt(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> CompressedPrompt:
        """Run one prompt with any number of images once and keep the KV of its text and ``<voco>``
        tokens (what serving needs for a request about several images; :meth:`compress` shares one
        prefix among single-image prompts).

        Args:
            input_ids: ``[S]`` int64, text with one ``<image>`` per image, e.g. ``[BOS; system;
                <image>; text; <image>]``; the question follows it at serving time.
            pixel_values: ``[N, 3, H, W]`` CLIP-normalised, one per ``<image>`` in order.

        Returns:
            :class:`CompressedPrompt` (LM dtype and device): the kept slots at their absolute positions
            in the expanded prompt; a question continuing it reads exactly what it would read after
            the one-shot prompt (DESIGN.md §2, "Compaction").
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError("HTC.compress_prompt: input_ids must be a 1-D integer tensor [S]")
        self._check_attention("compress_prompt")
        x = self._expand(input_ids[None].to(self.voco_embeddings.device), None, pixel_values)
        cache = self._prefill(x)
        keep = (x.kinds[0] != _VISUAL).nonzero().flatten()
        return CompressedPrompt(
            keys=[layer.keys[0].index_select(1, keep) for layer in cache.layers],
            values=[layer.values[0].index_select(1, keep) for layer in cache.layers],
            positions=x.position_ids[0, keep].clone(),
            seq_length=x.input_ids.shape[1],
            model=model_fingerprint(self),
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        compressed: CompressedImages | None = None,
        **kwargs,
    ):
        """Decode with the language model's ``generate`` (a ``StarCache``: each image's visual KV is
        dropped once its ``<voco>`` tokens are read; decoding then attends the kept tokens only).

        Args:
            input_ids: ``[B, S]`` with one ``<image>`` per image (``pixel_values``), or, with
                ``compressed``, the text that follows the compressed images (one image per sample,
                no ``<image>``).
            pixel_values: ``[N, 3, H, W]`` as in :meth:`forward`.
            attention_mask: ``[B, S]`` (padding on either side).
            compressed: :class:`CompressedImages` from :meth:`compress`, one per sample.
            kwargs: generation arguments (``max_new_tokens``, ``do_sample``, ``return_dict_in_generate``...).

        Returns:
            ``[B, S + new]``: ``input_ids`` followed by the generated tokens (LLaVA's convention), or
            the language model's ``GenerateOutput`` with those ``sequences``.
        """
        bad = sorted(k for k in kwargs if k in _OWN_KWARGS or k.startswith("htc_"))
        if bad:
            raise ValueError(f"HTC.generate: {bad} are computed by the model; do not pass them")
        self._check_attention("generate")
        lm = self.language_model
        # The language model sees a longer prompt (visual and <voco> tokens, or the compressed
        # positions): lengths counted from the caller's input_ids become counts of new tokens.
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if kwargs.get(total) is not None:
                if kwargs.get(new) is not None:
                    raise ValueError(f"HTC.generate: pass {total} or {new}, not both")
                count = int(kwargs.pop(total)) - input_ids.shape[-1]
                if total == "max_length" and count < 1:
                    raise ValueError(
                        f"HTC.generate: max_length={count + input_ids.shape[-1]} leaves no new token after "
                        f"the {input_ids.shape[-1]} of input_ids"
                    )
                kwargs[new] = max(count, 0)
        if compressed is None:
            x = self._expand(input_ids, attention_mask, pixel_values)
            # Ids for generate's bookkeeping only (embeddings come from inputs_embeds): text ids, and the
            # pad id at visual/<voco> positions, whose ids may lie beyond the LM's vocabulary.
            prompt = x.input_ids.masked_fill(x.kinds != _TEXT, self._pad_id())
            out = lm.generate(input_ids=prompt, **self._lm_inputs(x, positions=False), **kwargs)
        else:
            if pixel_values is not None:
                raise ValueError("HTC.generate: pass pixel_values or compressed, not both")
            ids, mask = _check_ids(input_ids, attention_mask, None)
            if bool(((ids == self.config.image_token_id) | (ids == self.config.voco_token_id)).any()):
                raise ValueError(
                    "HTC.generate(compressed=...): input_ids are the text after the compressed image; they "
                    "cannot hold <image> or <voco> tokens"
                )
            compressed._check(self.config, lm.dtype, ids.shape[0], model_fingerprint(self))
            gen = kwargs.get("generation_config") or lm.generation_config
            if kwargs.get("use_cache", gen.use_cache) is False:
                raise ValueError(
                    "HTC.generate(compressed=...): the images live only in the compressed cache; "
                    "use_cache=False would recompute the prompt without them (drop use_cache=False)"
                )
            compressed = compressed.to(device=ids.device)
            # The question continues the compressed prompt: its tokens must end the row (left padding).
            ids, mask = _left_align(ids, mask, self._pad_id())
            # generate repeats each sample for beams / returned sequences but not a given cache.
            expand = max(
                int(kwargs.get("num_beams", gen.num_beams) or 1),
                int(kwargs.get("num_return_sequences", gen.num_return_sequences) or 1),
            )
            if expand > 1:
                compressed = compressed.select(torch.arange(ids.shape[0]).repeat_interleave(expand))
            b, past = ids.shape[0], compressed.seq_length
            # The compressed positions as generate sees them: the prefix ids, then the pad id.
            head = ids.new_full((b, past), self._pad_id())
            head[:, : compressed.prefix_ids.numel()] = compressed.prefix_ids
            prompt = torch.cat([head, ids], 1)
            out = lm.generate(
                input_ids=prompt,
                attention_mask=torch.cat([torch.ones_like(head), mask], 1),
                past_key_values=compressed._cache(),
                **kwargs,
            )
        sequences = out.sequences if isinstance(out, ModelOutput) else out
        per_sample = sequences.shape[0] // input_ids.shape[0]  # num_return_sequences
        given = input_ids.repeat_interleave(per_sample, 0)
        sequences = torch.cat([given, sequences[:, prompt.shape[1] :]], 1)
        if isinstance(out, ModelOutput):
            out.sequences = sequences
            return out
        return sequences


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _check_ids(input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` as ``[B, S]`` int64 tensors, or a ValueError naming what is wrong."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"HTC: input_ids must be an integer tensor [B, S], got {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input_ids.shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"HTC: {name} must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}"
            )
    return input_ids.long(), attention_mask.long()


def _left_align(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids``/``mask`` ``[B, S]`` with each row's tokens moved to its end (one contiguous run per
    row, as :func:`_span` checks)."""
    spans = [_span(row) for row in mask]
    width = ids.shape[1]
    if all(hi == width for _, hi in spans):
        return ids, mask
    out_ids, out_mask = torch.full_like(ids, pad_id), torch.zeros_like(mask)
    for b, (lo, hi) in enumerate(spans):
        out_ids[b, width - (hi - lo) :] = ids[b, lo:hi]
        out_mask[b, width - (hi - lo) :] = 1
    return out_ids, out_mask


def _span(valid_row: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the row's tokens, which must be one contiguous run (left or right padding)."""
    pos = valid_row.nonzero().flatten()
    if pos.numel() == 0:
        raise ValueError("HTC: a sample has no tokens (its attention_mask is all zeros)")
    lo, hi = int(pos[0]), int(pos[-1]) + 1
    if hi - lo != pos.numel():
        raise ValueError("HTC: attention_mask has padding inside a sample; pad on the left or the right only")
    return lo, hi
