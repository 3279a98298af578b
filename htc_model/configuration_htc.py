"""HTC-VLM configuration: CLIP vision tower + MGVQ quantizer + any causal LM (paper Table 6).

The defaults are the paper's model: CLIP ViT-L/14-336 (layer -2, CLS dropped: 576 patches), MGVQ
f16c32-g8 on the same 336x336 image (a ``[32, 21, 21]`` quantized latent, 14,112 values), a
LLaMA/Vicuna-7B-shaped language model, 4 discrete anchor tokens, one ``<voco>`` token, the star
mask, a linear continuous projector and the 14112 -> 8192 -> 4 x 4096 GELU discrete projector.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .mgvq import CLIP_MEAN, CLIP_STD, MGVQConfig

FUSIONS = ("pre", "post", "mean")
TOPOLOGIES = ("star", "group")
CONTINUOUS_PROJECTORS = ("linear", "mlp2x_gelu")

# CLIP ViT-L/14-336 (LLaVA-1.5's tower), as LlavaConfig writes it.
_CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}


@strict
class HTCQuantizerConfig(PreTrainedConfig):
    r"""The discrete channel's tokenizer: an MGVQ encoder (``htc_model.mgvq.MGVQTokenizer``).

    Args:
        mgvq (`str`, defaults to `"f16c32-g8"`):
            A released MGVQ name or an official config string (``htc_model.mgvq.MGVQConfig.parse``).
            The quantization is cosine (MGVQ's ``l2_norm`` mode).
        image_mean (`list[float]`), image_std (`list[float]`):
            The normalisation of the model's ``pixel_values`` (CLIP's by default). MGVQ reads the
            same image un-normalised to ``[-1, 1]``, so one ``pixel_values`` feeds both encoders.
    """

    model_type = "htc_quantizer"
    base_config_key = "quantizer_config"

    mgvq: str = "f16c32-g8"
    image_mean: list[float] | tuple[float, ...] = CLIP_MEAN
    image_std: list[float] | tuple[float, ...] = CLIP_STD

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Here rather than in a strict validator, so that a bad value is a plain ValueError.
        MGVQConfig.parse(self.mgvq)  # raises ValueError naming the problem
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"HTCQuantizerConfig: image_mean and image_std need 3 values (RGB), got "
                f"{list(self.image_mean)}, {list(self.image_std)}"
            )

    @property
    def mgvq_config(self) -> MGVQConfig:
        return MGVQConfig.parse(self.mgvq)


@strict
class HTCConfig(PreTrainedConfig):
    r"""Configuration of :class:`~htc_model.modeling_htc.HTCForConditionalGeneration`.

    Args:
        vision_config (`dict` or `PreTrainedConfig`): the CLIP vision tower (ViT-L/14-336 by default).
        text_config (`dict` or `PreTrainedConfig`): any causal LM's config (LLaMA-7B shape by default).
        quantizer_config (`dict` or `HTCQuantizerConfig`): the MGVQ tokenizer (f16c32-g8).
        image_token_id (`int`): the ``<image>`` placeholder in ``input_ids`` (one token per image).
        voco_token_id (`int`): the ``<voco>`` id; the model writes it after each image itself (a user's
            ``input_ids`` must not contain it). It marks positions only: the ``<voco>`` embeddings are
            the model's own ``voco_embeddings`` parameter, not rows of the LM's vocabulary.
        vision_feature_layer (`int`): CLIP hidden state to use (-2, as LLaVA-1.5).
        vision_feature_select_strategy (`"default"` or `"full"`): "default" drops the CLS feature.
        num_discrete_tokens (`int`): N_d anchor tokens from the discrete projector (4). 0 builds no
            quantizer and no discrete projector: the continuous-only VoCo-LLaMA baseline.
        num_voco_tokens (`int`): ``<voco>`` tokens per image (1; the paper's token-budget sweep uses more).
        fusion (`"pre"`, `"post"`, `"mean"`): anchors before the patches (the paper's), after them, or
            their mean added to every patch (no anchor positions; see docs/htc_model.md).
        topology (`"star"`, `"group"`): visual tokens see only themselves (the paper's mask) or their
            whole image (the "full graph" ablation).
        continuous_projector (`"linear"`, `"mlp2x_gelu"`): P_v, the paper's linear map or LLaVA-1.5's MLP.
        discrete_projector_hidden_size (`int`): hidden width of P_d (8192): q -> 8192 -> N_d * hidden.
    """

    model_type = "htc"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=_CLIP_L_336
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "quantizer_config": SubConfigSpec(config_class=HTCQuantizerConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    quantizer_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    voco_token_id: int = 32001
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    num_discrete_tokens: int = 4
    num_voco_tokens: int = 1
    fusion: Literal["pre", "post", "mean"] = "pre"
    topology: Literal["star", "group"] = "star"
    continuous_projector: Literal["linear", "mlp2x_gelu"] = "linear"
    discrete_projector_hidden_size: int = 8192
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check()

    def _check(self):
        def bad(msg):
            raise ValueError(f"HTCConfig: {msg}")

        for name, allowed in (
            ("fusion", FUSIONS),
            ("topology", TOPOLOGIES),
            ("continuous_projector", CONTINUOUS_PROJECTORS),
        ):
            if getattr(self, name) not in allowed:
                bad(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_discrete_tokens < 0:
            bad(f"num_discrete_tokens must be >= 0, got {self.num_discrete_tokens}")
        if self.num_voco_tokens < 1:
            bad(f"num_voco_tokens must be >= 1 (they carry the image), got {self.num_voco_tokens}")
        if self.discrete_projector_hidden_size < 1:
            bad(f"discrete_projector_hidden_size must be >= 1, got {self.discrete_projector_hidden_size}")
        if self.image_token_id == self.voco_token_id:
            bad(f"image_token_id and voco_token_id must differ, both are {self.image_token_id}")
        layers = self.vision_config.num_hidden_layers  # hidden_states: the embeddings, then each layer
        if (
            not isinstance(self.vision_feature_layer, int)
            or not -(layers + 1) <= self.vision_feature_layer <= layers
        ):
            bad(
                f"vision_feature_layer must index the vision tower's {layers + 1} hidden states "
                f"([{-(layers + 1)}, {layers}]), got {self.vision_feature_layer!r}"
            )
        if self.vision_feature_select_strategy not in ("default", "full"):
            strategy = self.vision_feature_select_strategy
            bad(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        if self.num_discrete_tokens > 0:
            size, factor = self.vision_config.image_size, self.quantizer_config.mgvq_config.downsample_factor
            if size % factor:
                bad(f"the image size {size} is not a multiple of MGVQ's down-sampling factor {factor}")

    # ---- derived sizes ----
    @property
    def num_patches(self) -> int:
        """Continuous tokens per image (576 for ViT-L/14-336 with the CLS feature dropped)."""
        n = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return n + (self.vision_feature_select_strategy == "full")

    @property
    def num_discrete_features(self) -> int:
        """Size of the flattened quantized latent q (32 x 21 x 21 = 14,112 for f16c32 at 336)."""
        mgvq = self.quantizer_config.mgvq_config
        side = self.vision_config.image_size // mgvq.downsample_factor
        return mgvq.latent_channels * side * side

    @property
    def num_visual_tokens(self) -> int:
        """VISUAL positions per image: anchors + patches (580), or patches only with ``fusion="mean"``."""
        anchors = self.num_discrete_tokens if self.fusion != "mean" else 0
        return anchors + self.num_patches

    @property
    def image_seq_length(self) -> int:
        """Positions one ``<image>`` expands to: the visual tokens and the ``<voco>`` tokens (581)."""
        return self.num_visual_tokens + self.num_voco_tokens

    @classmethod
    def tiny(cls, **overrides) -> HTCConfig:
        """A tiny random-weight configuration for tests: 32x32 images, CLIP 2 layers / patch 8 (16
        patches), MGVQ's tiny-width f16 topology (a ``[32, 2, 2]`` latent), a 2-layer LLaMA with
        hidden 32 and GQA, vocabulary 64 (``<image>`` = 62, ``<voco>`` = 63). ``overrides`` replace
        top-level fields (e.g. ``num_voco_tokens=2``)."""
        vision = {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        }
        text = {
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        quantizer = {
            "mgvq": "latent_channels=32 encoder.block_type=[ResBlock,ResBlock,ResBlock,EViT_GLU,EViT_GLU] "
            "encoder.width_list=[16,32,64,64,64] encoder.depth_list=[0,1,1,1,1] "
            "codebook_size=256 codebook_groups=8"
        }
        args = dict(
            vision_config=vision,
            text_config=text,
            quantizer_config=quantizer,
            image_token_id=62,
            voco_token_id=63,
            discrete_projector_hidden_size=64,
        )
        return cls(**{**args, **overrides})


__all__ = ["HTCConfig", "HTCQuantizerConfig"]
