"""The MGVQ tokenizer's encoder path (``encoder`` -> ``quant_conv`` -> ``quantize``) in plain PyTorch.

HTC-VLM's four discrete anchor tokens come from MGVQ (``mgvq-f16c32-g8``: 16x down-sampling, a
32-channel latent, 8 groups x 2048 codes of 4 dims). The official code needs a GPU (a Triton RMSNorm
that allocates on "cuda") and sorts whole distance rows to take an argmax; this module loads the
official weights by name (``strict=True``) and runs on CPU or GPU, the quantization going through
:class:`htc_kernels.mgvq.GroupedQuantizer` (:func:`htc_kernels.mgvq_lookup`: no N x K matrix).

Quick use::

    from htc_model.mgvq import MGVQTokenizer, to_mgvq_pixels
    tok = MGVQTokenizer.from_pretrained("/ckpt/mgvq_f16c32_g8.pt", config="f16c32-g8")
    pixels = to_mgvq_pixels(clip_pixel_values, source="clip")  # CLIP-normalised -> [-1, 1]
    quant, indices = tok.encode(pixels)  # [B, 32, 21, 21] fp32, [B, 441, 8] int64 for 336x336

**Input contract.** ``pixels`` are RGB ``[B, 3, H, W]`` floats scaled to ``[-1, 1]`` (``x / 127.5 - 1``
for 8-bit images), *not* CLIP-normalised; H and W divisible by the down-sampling factor (16 for
f16c32: 336 -> 21). :func:`to_mgvq_pixels` converts uint8, ``[0, 1]`` or CLIP-normalised batches.
Values outside ``[-1, 1]`` (beyond a 1e-3 rounding tolerance) are refused by default, because that
is what CLIP-normalised (about ``[-1.8, 2.2]``) or 0..255 input looks like; ``out_of_range="clamp"``
clamps them instead (e.g. bicubic-resampling overshoot) and ``"allow"`` skips the check (no host
sync: for ``torch.compile(fullgraph=True)`` or GPU pipelines whose input comes from
:func:`to_mgvq_pixels`). NaN/Inf pixels are refused by ``"raise"``.

**Architecture** (``../shared/mgvq/ARCHITECTURE.md``): ``project_in`` (3x3 conv + pixel-unshuffle),
stages of ResBlocks (conv-SiLU-conv-RMSNorm2d) and EfficientViT blocks (ReLU linear attention with
32-dim heads + gated MBConv), each non-final stage ending in a down-sampling residual block (conv +
pixel-unshuffle, shortcut = pixel-unshuffle + channel-group averaging), ``project_out`` (3x3 conv to
the latent + channel-averaging shortcut). Module and parameter names equal the official ones.

**Precision.** The convolutions follow the ambient dtype (bf16/fp16 under ``torch.autocast``);
RMSNorm2d statistics and the linear attention are computed in fp32 (as the official code does) and
cast back; the quantization runs in the codebook's dtype with autocast off, so indices come from an
fp32 comparison even when the encoder ran in bf16.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from htc_kernels.mgvq import GroupedQuantizer
from htc_kernels.mgvq_lookup import mgvq_lookup

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PRESETS",
    "MGVQConfig",
    "MGVQEncoding",
    "MGVQTokenizer",
    "to_mgvq_pixels",
]

# OpenAI CLIP's normalisation (CLIPImageProcessor.image_mean / image_std of ViT-L/14-336, LLaVA's tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

HEAD_DIM = 32  # EfficientViT attention head width in every MGVQ config (LiteMLA dim=32)
EXPAND_RATIO = 4  # GLUMBConv expansion in every MGVQ config
NORM_EPS = 1e-5  # RMSNorm2d epsilon (TritonRMSNorm2d)
ATTN_EPS = 1e-15  # linear attention denominator epsilon (LiteMLA)
USAGE_HISTORY = 65536  # second dim of quantize.codebook_used in the official weights
RANGE_TOL = 1e-3  # slack on the [-1, 1] input range: float rounding of x / 127.5 - 1 and the like

BLOCK_TYPES = ("ResBlock", "EViT_GLU", "EViTS5_GLU")
_ACTS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hswish": nn.Hardswish,
    "gelu": lambda: nn.GELU(approximate="tanh"),  # efficientvit's "gelu" is the tanh approximation
}
_OUT_OF_RANGE = ("raise", "clamp", "allow")

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

_ARCHS = {  # the official mgvq_f{8,16,32}c32 encoder topologies
    "f8c32": ((128, 256, 512, 512), (0, 4, 8, 2), ("ResBlock",) * 3 + ("EViT_GLU",)),
    "f16c32": ((128, 256, 512, 512, 1024), (0, 4, 8, 2, 2), ("ResBlock",) * 3 + ("EViT_GLU",) * 2),
    "f32c32": (
        (128, 256, 512, 512, 1024, 1024),
        (0, 4, 8, 2, 2, 2),
        ("ResBlock",) * 3 + ("EViT_GLU",) * 3,
    ),
}
# The released checkpoints (MGVQ model zoo): name -> (arch, codebook_size, codebook_groups).
# "-mix" models share their arch with the ImageNet ones (different training data).
_RELEASED = {
    "f8c32-g4": ("f8c32", 32768, 4),
    "f8c32-g8": ("f8c32", 16384, 8),
    "f16c32-g4": ("f16c32", 32768, 4),
    "f16c32-g8": ("f16c32", 16384, 8),
    "f16c32-g4-mix": ("f16c32", 32768, 4),
    "f32c32-g8-mix": ("f32c32", 16384, 8),
}

# Official EncoderConfig options this module implements only at their default value.
_FIXED_ENCODER_OPTIONS = {
    "downsample_block_type": "ConvPixelUnshuffle",
    "downsample_match_channel": True,
    "downsample_shortcut": "averaging",
    "out_norm": None,
    "out_act": None,
    "out_shortcut": "averaging",
    "double_latent": False,
}
# Top-level keys of the official MGVQConfig that do not change the encoder path.
_IGNORED_TOP_KEYS = ("pretrained_path", "pretrained_source", "scaling_factor", "use_quant_conv")


@dataclasses.dataclass(frozen=True)
class MGVQConfig:
    """Encoder-path configuration of an MGVQ tokenizer (the decoder is not built).

    Field names follow the official ``MGVQConfig`` / ``EncoderConfig`` (``encoder.width_list`` ->
    ``width_list`` ...); :meth:`parse` reads the official config strings, :meth:`to_string` writes one.
    Defaults are the official dataclass defaults; a config string must name the codebook.
    """

    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (2, 2, 2, 2, 2, 2)
    block_type: tuple[str, ...] | str = "ResBlock"
    codebook_size: int = 0
    codebook_groups: int = 0
    latent_channels: int = 32
    in_channels: int = 3
    norm: str = "trms2d"
    act: str = "silu"
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        n = len(self.width_list)
        bt = self.block_type
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("width_list", tuple(int(w) for w in self.width_list))
        set_("depth_list", tuple(int(d) for d in self.depth_list))
        set_("block_type", (bt,) * n if isinstance(bt, str) else tuple(bt))
        self._validate()

    # ---- derived sizes ----
    @property
    def num_stages(self) -> int:
        return len(self.width_list)

    @property
    def downsample_factor(self) -> int:
        """Spatial down-sampling of the encoder: x2 in ``project_in`` when stage 0 is empty, and x2
        at the end of every non-final stage with blocks (f16c32: 16)."""
        n = int(self.depth_list[0] == 0) + sum(
            1 for i in range(self.num_stages - 1) if self.depth_list[i] > 0
        )
        return 2**n

    @property
    def group_dim(self) -> int:
        return self.latent_channels // self.codebook_groups

    @property
    def codes_per_group(self) -> int:
        return self.codebook_size // self.codebook_groups

    def _validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"MGVQConfig: {msg}")

        n = self.num_stages
        if n < 1 or len(self.depth_list) != n or len(self.block_type) != n:
            bad(
                f"width_list {list(self.width_list)}, depth_list {list(self.depth_list)} and block_type "
                f"{list(self.block_type)} must have the same length >= 1 (one entry per stage)"
            )
        if any(w < 1 for w in self.width_list) or any(d < 0 for d in self.depth_list):
            bad(f"widths must be >= 1 and depths >= 0, got {list(self.width_list)}, {list(self.depth_list)}")
        for b in self.block_type:
            if b not in BLOCK_TYPES:
                bad(f"block type {b!r} is not supported (supported: {', '.join(BLOCK_TYPES)})")
        if self.norm != "trms2d":
            bad(f"encoder.norm={self.norm!r} is not supported (MGVQ's encoder uses 'trms2d', RMSNorm2d)")
        if self.act not in _ACTS:
            bad(f"encoder.act={self.act!r} is not supported (supported: {', '.join(_ACTS)})")
        if self.in_channels < 1 or self.latent_channels < 1:
            bad(f"in_channels ({self.in_channels}) and latent_channels ({self.latent_channels}) must be >= 1")
        g, k, c = self.codebook_groups, self.codebook_size, self.latent_channels
        if g < 1 or k < 1:
            bad(
                f"codebook_size ({k}) and codebook_groups ({g}) must be >= 1: name the codebook, e.g. "
                "'codebook_size=16384 codebook_groups=8' or a released name such as 'f16c32-g8'"
            )
        if c % g or k % g:
            bad(f"latent_channels ({c}) and codebook_size ({k}) must be divisible by codebook_groups ({g})")
        if self.depth_list[0] == 0 and n < 2:
            bad("stage 0 has depth 0, so project_in maps to width_list[1], which needs >= 2 stages")
        # Channel flow (the official builder would fail at run time on these; refuse them up front).
        ch = self.width_list[0] if self.depth_list[0] > 0 else self.width_list[1]
        if self.depth_list[0] == 0 and ch % 4:
            bad(f"project_in's pixel-unshuffle needs width_list[1] ({ch}) divisible by 4")
        for i, (w, d, b) in enumerate(zip(self.width_list, self.depth_list, self.block_type)):
            if d == 0:
                continue
            if ch != w:
                bad(f"stage {i} ({d} blocks of width {w}) receives {ch} channels from the previous stage")
            if b != "ResBlock" and w < HEAD_DIM:
                bad(f"stage {i}: {b} needs width >= {HEAD_DIM} (one attention head of {HEAD_DIM}), got {w}")
            if i < n - 1:
                nxt = self.width_list[i + 1]
                if nxt % 4 or (4 * w) % nxt:
                    bad(
                        f"stage {i}'s down-sampling block {w} -> {nxt} needs the output width divisible "
                        f"by 4 and 4*{w} divisible by it"
                    )
                ch = nxt
        if ch % c:
            bad(f"project_out averages {ch} channels into {c} latent channels: {ch} % {c} != 0")

    # ---- parsing / printing ----
    @classmethod
    def from_name(cls, name: str) -> MGVQConfig:
        """A released MGVQ model: ``f8c32-g4``, ``f8c32-g8``, ``f16c32-g4``, ``f16c32-g8``,
        ``f16c32-g4-mix``, ``f32c32-g8-mix`` (a leading ``mgvq-``/``mgvq_`` and ``_`` for ``-`` are
        accepted, e.g. the checkpoint stem ``mgvq_f16c32_g8``)."""
        key = _normalise_name(name)
        if key not in _RELEASED:
            hint = ""
            if key in _ARCHS:
                hint = (
                    f" ({key!r} names only the topology: add the groups, e.g. "
                    f"{', '.join(repr(r) for r in _RELEASED if r.startswith(key + '-'))}, or "
                    "'codebook_size=... codebook_groups=...')"
                )
            raise ValueError(
                f"MGVQConfig: unknown MGVQ model {name!r}{hint}; released models: {', '.join(_RELEASED)}; "
                "any other topology can be given as an official config string (see MGVQConfig.parse)"
            )
        arch, k, g = _RELEASED[key]
        widths, depths, blocks = _ARCHS[arch]
        return cls(widths, depths, blocks, codebook_size=k, codebook_groups=g, name=key)

    @classmethod
    def parse(cls, text: str | MGVQConfig) -> MGVQConfig:
        """Parse any of the config forms the official code and its checkpoints carry:

        - a released name: ``"f16c32-g8"`` / ``"mgvq-f16c32-g8"`` (see :meth:`from_name`);
        - an official dotlist, as in the fixtures' safetensors metadata: ``"latent_channels=32
          encoder.block_type=[ResBlock,...] encoder.width_list=[16,32,64,64,64]
          encoder.depth_list=[0,1,1,1,1] decoder.... codebook_size=256 codebook_groups=8"``
          (``decoder.*`` keys are ignored: the decoder is not built);
        - a topology name plus overrides, as in the official shapes manifest:
          ``"mgvq-f16c32, codebook_size=16384, codebook_groups=8, latent_channels=32"``.

        Unknown keys, and encoder options this module does not implement at non-default values,
        raise ``ValueError``.
        """
        if isinstance(text, MGVQConfig):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"MGVQConfig.parse: expected a non-empty config string, got {text!r}")
        pairs = list(_KV_RE.finditer(text))
        rest = _KV_RE.sub(" ", text).replace(",", " ").split()
        if len(rest) > 1:
            raise ValueError(
                f"MGVQConfig.parse: cannot read {text!r}: expected 'key=value' pairs and at most one "
                f"model name, found the words {rest}"
            )
        if rest and not pairs:
            return cls.from_name(rest[0])
        fields: dict[str, Any] = {}
        if rest:  # topology name + overrides
            key = _normalise_name(rest[0])
            if key in _RELEASED:
                base = cls.from_name(key)
                fields.update(
                    width_list=base.width_list,
                    depth_list=base.depth_list,
                    block_type=base.block_type,
                    codebook_size=base.codebook_size,
                    codebook_groups=base.codebook_groups,
                )
            elif key in _ARCHS:
                fields.update(zip(("width_list", "depth_list", "block_type"), _ARCHS[key]))
            else:
                raise ValueError(
                    f"MGVQConfig.parse: unknown model name {rest[0]!r} in {text!r} (topologies: "
                    f"{', '.join(_ARCHS)}; released models: {', '.join(_RELEASED)})"
                )
        for m in pairs:
            key, raw = m.group(1), m.group(2)
            value = _parse_value(raw)
            sub = key.split(".", 1)
            if sub[0] == "decoder" or key in _IGNORED_TOP_KEYS:
                continue
            if key in ("latent_channels", "in_channels", "codebook_size", "codebook_groups"):
                fields[key] = _as_int(key, value)
            elif sub[0] == "encoder" and len(sub) == 2:
                opt = sub[1]
                if opt in ("width_list", "depth_list"):
                    if not isinstance(value, list):
                        value = [value]
                    fields[opt] = tuple(_as_int(key, v) for v in value)
                elif opt == "block_type":
                    fields[opt] = tuple(str(v) for v in value) if isinstance(value, list) else str(value)
                elif opt in ("norm", "act"):
                    fields[opt] = str(value)
                elif opt in ("in_channels", "latent_channels"):
                    if not (isinstance(value, str) and value.startswith("$")):  # "${..x}" interpolation
                        fields[f"encoder.{opt}"] = _as_int(key, value)
                elif opt in _FIXED_ENCODER_OPTIONS:
                    want = _FIXED_ENCODER_OPTIONS[opt]
                    if value != want:
                        raise ValueError(
                            f"MGVQConfig.parse: {key}={raw} is not supported by htc_model.mgvq (only the "
                            f"value every MGVQ model uses: {want})"
                        )
                else:
                    raise ValueError(f"MGVQConfig.parse: unknown encoder option {key!r} in {text!r}")
            else:
                raise ValueError(
                    f"MGVQConfig.parse: unknown key {key!r} in {text!r} (known: latent_channels, "
                    "in_channels, codebook_size, codebook_groups, encoder.width_list, encoder.depth_list, "
                    "encoder.block_type, encoder.norm, encoder.act; decoder.* is ignored)"
                )
        for opt in ("in_channels", "latent_channels"):
            enc = fields.pop(f"encoder.{opt}", None)
            if enc is not None and enc != fields.get(opt, getattr(cls, opt)):
                raise ValueError(f"MGVQConfig.parse: encoder.{opt}={enc} disagrees with {opt} in {text!r}")
        return cls(**fields)

    def to_string(self) -> str:
        """The official dotlist form (encoder and codebook keys); :meth:`parse` reads it back."""

        def lst(v):
            return "[" + ",".join(str(x) for x in v) + "]"

        return (
            f"latent_channels={self.latent_channels} in_channels={self.in_channels} "
            f"encoder.block_type={lst(self.block_type)} encoder.width_list={lst(self.width_list)} "
            f"encoder.depth_list={lst(self.depth_list)} encoder.norm={self.norm} encoder.act={self.act} "
            f"codebook_size={self.codebook_size} codebook_groups={self.codebook_groups}"
        )

    def same_encoder(self, other: MGVQConfig) -> bool:
        """True if both configs build the same encoder path (the name is not compared)."""
        return self == other


_KV_RE = re.compile(r"([A-Za-z_][\w.]*)\s*=\s*(\[[^\]]*\]|[^\s,\[\]]+)")


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return key[len("mgvq-") :] if key.startswith("mgvq-") else key


def _parse_value(raw: str):
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        return [_parse_value(x) for x in raw[1:-1].split(",") if x.strip()]
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw.strip("'\"")


def _as_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MGVQConfig.parse: {key} must be an integer (or a list of them), got {value!r}")
    return value


PRESETS: dict[str, MGVQConfig] = {name: MGVQConfig.from_name(name) for name in _RELEASED}

# --------------------------------------------------------------------------------------------------
# Building blocks (names of submodules and parameters equal the official ones)
# --------------------------------------------------------------------------------------------------


class RMSNorm2d(nn.Module):
    """Per-pixel RMS norm over channels: ``y = x * (mean_c(x^2) + eps)^-1/2 * weight_c + bias_c``.

    Input/output ``[B, C, H, W]``; statistics and affine in fp32 (like the official Triton kernel),
    output in x's dtype. Parameters ``weight [C]``, ``bias [C]``.
    """

    def __init__(self, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rrms = torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + self.eps)
        y = xf * rrms * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ConvLayer(nn.Module):
    """A "same"-padded conv, then optional RMSNorm2d, then optional activation (``conv``, ``norm``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        *,
        bias: bool,
        norm: bool = False,
        act: str | None = None,
        groups: int = 1,
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = RMSNorm2d(cout) if norm else None
        self.act = _ACTS[act]() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """Applies ``op_list`` in order (the official container; its name appears in parameter keys)."""

    def __init__(self, ops: Sequence[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResidualBlock(nn.Module):
    """``main(x) + shortcut(x)``; ``shortcut=None`` is the identity (no parameters either way)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class ConvPixelUnshuffleDown(nn.Module):
    """3x3 conv (with bias) to ``cout/4`` channels, then pixel-unshuffle by 2: ``[B, cin, H, W]`` ->
    ``[B, cout, H/2, W/2]``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvLayer(cin, cout // 4, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.conv(x), 2)


class ChannelAveragingDown(nn.Module):
    """Parameter-free shortcut: pixel-unshuffle by ``factor`` (1 = none), then average ``cout``
    consecutive, equal channel groups: ``[B, cin, H, W]`` -> ``[B, cout, H/f, W/f]``."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        self.cout, self.factor = cout, factor
        self.group = cin * factor * factor // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            x = F.pixel_unshuffle(x, self.factor)
        b, _, h, w = x.shape
        return x.view(b, self.cout, self.group, h, w).mean(dim=2)


class ResBlock(nn.Module):
    """``conv1`` 3x3 (bias) + act, ``conv2`` 3x3 (no bias) + RMSNorm2d; ``[B, C, H, W]`` -> same."""

    def __init__(self, channels: int, act: str):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=act)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """EfficientViT's lightweight ReLU linear attention, ``[B, C, H, W]`` -> same.

    ``qkv`` 1x1 conv (no bias) to ``3 * heads * 32`` channels laid out per head as ``[q, k, v]``
    (32 each), ``heads = C // 32``; ``scales`` add multi-scale branches (``aggreg``: depthwise
    ``s x s`` conv + grouped 1x1 conv, as in EViTS5) whose heads are concatenated. ReLU on q and k.
    With ``N = H*W > 32`` tokens: linear attention ``(v kᵀ) q`` normalised by ``(Σ_n k) q``;
    otherwise quadratic ``v · normalise_keys(kᵀ q)`` (the official code switches the same way; both
    are the same function, the quadratic form is cheaper for few tokens). Attention in fp32 with
    autocast off, cast back to the conv dtype; then ``proj`` 1x1 conv (no bias) + RMSNorm2d.
    """

    def __init__(self, channels: int, scales: tuple[int, ...] = ()):
        super().__init__()
        heads = channels // HEAD_DIM
        total = heads * HEAD_DIM
        self.qkv = ConvLayer(channels, 3 * total, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        )
        self.kernel_func = nn.ReLU()
        self.proj = ConvLayer(total * (1 + len(scales)), channels, 1, bias=False, norm=True)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv [B, 3*heads*32, H, W]`` (any float dtype) -> ``[B, heads*32, H, W]`` in qkv's dtype."""
        b, _, h, w = qkv.shape
        n, d = h * w, HEAD_DIM
        with torch.autocast(qkv.device.type, enabled=False):
            t = qkv.float().reshape(b, -1, 3 * d, n)  # [B, heads, 3*32, N]
            q, k, v = t[:, :, :d], t[:, :, d : 2 * d], t[:, :, 2 * d :]
            q, k = self.kernel_func(q), self.kernel_func(k)
            if n > d:
                # A row of ones appended to v makes the same matmul produce the normaliser Σ_n k·q.
                v1 = F.pad(v, (0, 0, 0, 1), value=1.0)  # [B, heads, 33, N]
                out = (v1 @ k.transpose(-1, -2)) @ q  # [B, heads, 33, N]
                out = out[:, :, :-1] / (out[:, :, -1:] + ATTN_EPS)
            else:
                att = k.transpose(-1, -2) @ q  # [B, heads, N keys, N queries]
                att = att / (att.sum(dim=2, keepdim=True) + ATTN_EPS)
                out = v @ att
        return out.reshape(b, -1, h, w).to(qkv.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        if len(self.aggreg):
            qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        return self.proj(self.attention(qkv))


class GLUMBConv(nn.Module):
    """Gated MBConv, ``[B, C, H, W]`` -> same: ``inverted_conv`` 1x1 (bias) to ``2 * 4C`` + act,
    ``depth_conv`` 3x3 depthwise (bias), split into (x, gate), ``x * act(gate)``, ``point_conv`` 1x1
    (no bias) to C + RMSNorm2d."""

    def __init__(self, channels: int, act: str):
        super().__init__()
        mid = round(channels * EXPAND_RATIO)
        self.glu_act = _ACTS[act]()
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, bias=True, act=act)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, bias=True, groups=2 * mid)
        self.point_conv = ConvLayer(mid, channels, 1, bias=False, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(x * self.glu_act(gate))


class EfficientViTBlock(nn.Module):
    """``context_module`` (residual LiteMLA) then ``local_module`` (residual GLUMBConv)."""

    def __init__(self, channels: int, act: str, scales: tuple[int, ...] = ()):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, scales))
        self.local_module = ResidualBlock(GLUMBConv(channels, act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


def _block(block_type: str, channels: int, act: str) -> nn.Module:
    if block_type == "ResBlock":
        return ResidualBlock(ResBlock(channels, act))
    if block_type == "EViT_GLU":
        return EfficientViTBlock(channels, act)
    if block_type == "EViTS5_GLU":
        return EfficientViTBlock(channels, act, scales=(5,))
    raise AssertionError(block_type)  # MGVQConfig validated it


def _downsample(cin: int, cout: int) -> nn.Module:
    return ResidualBlock(ConvPixelUnshuffleDown(cin, cout), ChannelAveragingDown(cin, cout, 2))


class MGVQEncoder(nn.Module):
    """MGVQ's ``Encoder``: ``[B, in_channels, H, W]`` -> ``[B, latent_channels, H/f, W/f]``
    (f = ``config.downsample_factor``). Stage indices start at 0; an empty stage is an empty
    ``op_list`` (as in the official module, so parameter names match)."""

    def __init__(self, cfg: MGVQConfig):
        super().__init__()
        w, d = cfg.width_list, cfg.depth_list
        if d[0] > 0:
            self.project_in = ConvLayer(cfg.in_channels, w[0], 3, bias=True)
        else:
            self.project_in = ConvPixelUnshuffleDown(cfg.in_channels, w[1])
        stages = []
        for i, (width, depth, block_type) in enumerate(zip(w, d, cfg.block_type)):
            ops = [_block(block_type, width, cfg.act) for _ in range(depth)]
            if depth > 0 and i < cfg.num_stages - 1:
                ops.append(_downsample(width, w[i + 1]))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = ResidualBlock(
            OpSequential([ConvLayer(w[-1], cfg.latent_channels, 3, bias=True)]),
            ChannelAveragingDown(w[-1], cfg.latent_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


# --------------------------------------------------------------------------------------------------
# Pixel conversion
# --------------------------------------------------------------------------------------------------


def to_mgvq_pixels(
    images: torch.Tensor,
    source: str | None = None,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Convert an image batch to MGVQ's input: RGB ``[B, 3, H, W]`` in ``[-1, 1]``, ``dtype``.

    Args:
        images: ``[B, 3, H, W]`` (or ``[3, H, W]``, given a batch dim), channels first.
        source: what ``images`` holds; required for floating-point input, where it cannot be guessed:

            - ``"uint8"``: 8-bit values 0..255 (a ``torch.uint8`` tensor, or floats holding 0..255);
              the default for ``torch.uint8`` tensors. ``x / 127.5 - 1``.
            - ``"unit"``: floats in ``[0, 1]`` (e.g. ``torchvision.transforms.ToTensor``). ``2x - 1``.
            - ``"clip"``: CLIP-normalised floats ``(x - mean) / std`` (e.g. ``CLIPImageProcessor``'s
              ``pixel_values``); ``mean``/``std`` default to OpenAI CLIP's (pass the processor's
              ``image_mean``/``image_std`` otherwise). Un-normalised to ``[0, 1]``, then ``2x - 1``.
        mean, std: per-channel CLIP normalisation (``source="clip"`` only).
        dtype: output float dtype.

    The values are checked against the declared source (1e-3 slack, then clamped to ``[-1, 1]``):
    values outside the source's range raise ``ValueError`` naming the observed range and the source
    they look like. Mix-ups that stay inside the range cannot all be told apart: ``[-1, 1]`` or
    ``[0, 1]`` floats declared ``"clip"`` pass; ``[0, 1]`` floats declared ``"uint8"`` pass with a
    warning. Note
    that resizing must happen before (MGVQ needs H, W divisible by its down-sampling factor; HTC
    uses the same 336x336 crop as CLIP).
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"to_mgvq_pixels: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        channels_last = images.dim() > 0 and images.shape[-1] == 3
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if channels_last else ""
        raise ValueError(
            f"to_mgvq_pixels: expected RGB [B, 3, H, W] (B >= 1) or [3, H, W], got shape "
            f"{tuple(images.shape)}{hint}"
        )
    if source is None:
        if images.dtype != torch.uint8:
            raise ValueError(
                f"to_mgvq_pixels: {images.dtype} input needs source='uint8' (0..255), 'unit' ([0, 1]) or "
                "'clip' (CLIP-normalised): float pixels cannot be told apart reliably"
            )
        source = "uint8"
    if source not in ("uint8", "unit", "clip"):
        raise ValueError(f"to_mgvq_pixels: source must be 'uint8', 'unit' or 'clip', got {source!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"to_mgvq_pixels: dtype must be a floating-point dtype, got {dtype}")
    if images.dtype == torch.uint8 and source != "uint8":
        raise ValueError(
            f"to_mgvq_pixels: a torch.uint8 tensor holds 0..255 values: use source='uint8', not {source!r}"
        )
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(f"to_mgvq_pixels: images must be uint8 or floating point, got {images.dtype}")
    x = images.to(torch.float32)  # compute in fp32 whatever the output dtype
    if source == "uint8":
        unit = x / 255.0
    elif source == "unit":
        unit = x
    else:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"to_mgvq_pixels: mean and std need 3 values (RGB), got {mean}, {std}")
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        unit = x * s + m
    if not torch.isfinite(unit).all():
        raise ValueError("to_mgvq_pixels: images contain NaN/Inf")
    lo, hi = (float(v) for v in torch.aminmax(unit))
    if source == "uint8" and images.dtype != torch.uint8 and 0 < float(x.amax()) <= 1 + RANGE_TOL:
        # Within range, so not an error, but 8-bit values that never exceed 1 are a black image:
        # far more likely [0, 1] floats declared as "uint8".
        warnings.warn(
            "to_mgvq_pixels: source='uint8' but every value is <= 1 (the image maps to [0, 1/255]); "
            "if these are [0, 1] floats use source='unit'",
            stacklevel=2,
        )
    if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
        raw_lo, raw_hi = (float(v) for v in torch.aminmax(x))
        raise ValueError(
            f"to_mgvq_pixels: with source={source!r} the images map to [{lo:.4g}, {hi:.4g}], not [0, 1] "
            f"(input range [{raw_lo:.4g}, {raw_hi:.4g}]); {_guess_source(raw_lo, raw_hi)}"
        )
    return (unit.clamp(0.0, 1.0) * 2.0 - 1.0).to(dtype)


def _guess_source(lo: float, hi: float) -> str:
    if lo >= -RANGE_TOL and hi <= 1 + RANGE_TOL:
        return "that range looks like source='unit' ([0, 1])"
    if lo >= -1 - RANGE_TOL and hi <= 1 + RANGE_TOL:
        return "that range looks like pixels already in MGVQ's [-1, 1]: pass them to encode() directly"
    if lo >= -RANGE_TOL and hi <= 255 + RANGE_TOL:
        return "that range looks like source='uint8' (0..255)"
    if lo >= -2.0 and hi <= 2.7:
        return "that range looks like source='clip' (check mean/std against the processor's)"
    return "check what the tensor holds"


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class MGVQEncoding(NamedTuple):
    quant: torch.Tensor  # [B, latent_channels, h, w], the unit-normalised codes (codebook dtype)
    indices: torch.Tensor  # [B, h*w, G] int64, row-major (h, w) tokens, index into group g's codes


_DROPPED_PREFIXES = ("decoder.", "post_quant_conv.")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


class MGVQTokenizer(nn.Module):
    """MGVQ's encoder path: ``encoder`` -> ``quant_conv`` (1x1, grouped) -> ``quantize``.

    Args:
        config: an :class:`MGVQConfig`, a released name (``"f16c32-g8"``, the default; ``"f16c32-g4"``,
            ``"f8c32-g4"``, ``"f8c32-g8"``, ``"f16c32-g4-mix"``, ``"f32c32-g8-mix"``) or an official
            config string (:meth:`MGVQConfig.parse`).
        backend: :func:`htc_kernels.mgvq_lookup` backend for the quantizer (``"auto"``).

    State dict: the official names and shapes (``encoder.*``, ``quant_conv.*``, ``quantize.*``);
    loading an official full-model state dict drops ``decoder.*`` / ``post_quant_conv.*`` with a
    one-line log message, and (``strict=True``) refuses missing, unexpected or mis-shaped encoder
    keys with a ``ValueError`` listing them.
    """

    def __init__(self, config: MGVQConfig | str = "f16c32-g8", backend: str = "auto"):
        super().__init__()
        cfg = MGVQConfig.parse(config)
        self.config = cfg
        self.encoder = MGVQEncoder(cfg)
        c, g = cfg.latent_channels, cfg.codebook_groups
        self.quant_conv = nn.Conv2d(c, c, 1, groups=g)
        self.quantize = GroupedQuantizer(
            groups=g,
            codes_per_group=cfg.codes_per_group,
            dim=cfg.group_dim,
            l2_norm=True,
            usage_history=USAGE_HISTORY,
            backend=backend,
        )
        # Also when this module is nested in a bigger model whose load_state_dict gets an official
        # full-model checkpoint: the decoder keys are dropped here, not reported as unexpected.
        self.register_load_state_dict_pre_hook(_drop_decoder_keys)

    # ---- shapes ----
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(latent_channels, h, w)`` of the quantized latent for an ``height x width`` input
        (336x336 with f16c32: ``(32, 21, 21)``, 14,112 values)."""
        f = self.downsample_factor
        self._check_size(height, width)
        return (self.config.latent_channels, height // f, width // f)

    def _check_size(self, height: int, width: int) -> None:
        f = self.downsample_factor
        for name, s in (("height", height), ("width", width)):
            if s < f or s % f:
                lo, hi = max(f, s // f * f), max(f, -(-s // f) * f)
                sizes = f"{lo}" if lo == hi else f"{lo} or {hi}"
                raise ValueError(
                    f"MGVQTokenizer: image {name} {s} is not a positive multiple of {f} (the encoder "
                    f"down-samples by {f}): resize, crop or pad to {sizes} (HTC uses 336 -> 21)"
                )

    # ---- input checks ----
    def check_pixels(self, pixels: torch.Tensor, out_of_range: str = "raise") -> torch.Tensor:
        """Validate ``pixels`` against the input contract (module docstring); returns them, clamped
        for ``out_of_range="clamp"``."""
        if out_of_range not in _OUT_OF_RANGE:
            raise ValueError(
                f"MGVQTokenizer: out_of_range must be one of {_OUT_OF_RANGE}, got {out_of_range!r}"
            )
        if not isinstance(pixels, torch.Tensor):
            raise ValueError(f"MGVQTokenizer: pixels must be a torch.Tensor, got {type(pixels).__name__}")
        cin = self.config.in_channels
        if pixels.dim() != 4 or pixels.shape[1] != cin:
            hint = ""
            if pixels.dim() == 4 and pixels.shape[-1] == cin:
                hint = " (channels last? use pixels.permute(0, 3, 1, 2))"
            elif pixels.dim() == 3 and pixels.shape[0] == cin:
                hint = " (a single image? use pixels.unsqueeze(0))"
            elif pixels.dim() == 4 and pixels.shape[1] == 1 and cin == 3:
                hint = " (grayscale? use pixels.expand(-1, 3, -1, -1))"
            raise ValueError(
                f"MGVQTokenizer: pixels must be [B, {cin}, H, W] (RGB, channels first), got shape "
                f"{tuple(pixels.shape)}{hint}"
            )
        if pixels.shape[0] == 0:
            raise ValueError("MGVQTokenizer: empty batch (B = 0)")
        self._check_size(pixels.shape[2], pixels.shape[3])
        if not pixels.dtype.is_floating_point:
            raise ValueError(
                f"MGVQTokenizer: pixels must be floating point in [-1, 1], got {pixels.dtype} "
                "(convert with htc_model.mgvq.to_mgvq_pixels(images))"
            )
        param = self.quant_conv.weight
        if pixels.device != param.device:
            raise ValueError(f"MGVQTokenizer: pixels are on {pixels.device} but the model on {param.device}")
        if pixels.dtype != param.dtype and not torch.is_autocast_enabled(pixels.device.type):
            raise ValueError(
                f"MGVQTokenizer: pixels are {pixels.dtype} but the model's weights {param.dtype}: cast "
                f"with pixels.to({param.dtype}), or run under torch.autocast for mixed precision"
            )
        if out_of_range == "clamp":
            return pixels.clamp(-1.0, 1.0)
        if out_of_range == "raise":
            lo, hi = (float(v) for v in torch.aminmax(pixels.detach()))
            if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
                raise ValueError("MGVQTokenizer: pixels contain NaN/Inf")
            if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
                raise ValueError(
                    f"MGVQTokenizer: pixels span [{lo:.4g}, {hi:.4g}], outside MGVQ's input range [-1, 1] "
                    f"({_guess_source(lo, hi)}). Convert with htc_model.mgvq.to_mgvq_pixels(images, "
                    "source=...), or pass out_of_range='clamp' if this is resampling overshoot"
                )
        return pixels

    # ---- forward ----
    def encode_latent(self, pixels: torch.Tensor, out_of_range: str = "raise") -> torch.Tensor:
        """Pre-quantization latent ``quant_conv(encoder(pixels))``: ``[B, 3, H, W]`` ->
        ``[B, latent_channels, H/f, W/f]`` in the conv dtype (bf16/fp16 under autocast)."""
        pixels = self.check_pixels(pixels, out_of_range)
        return self.quant_conv(self.encoder(pixels))

    def quantize_latent(self, latent: torch.Tensor) -> MGVQEncoding:
        """Nearest code per group (cosine) of ``latent [B, C, h, w]``, in the codebook's dtype with
        autocast off. Returns ``quant [B, C, h, w]`` (codebook dtype; straight-through gradient to
        the latent) and ``indices [B, h*w, G]`` int64."""
        q = self.quantize
        z = latent.to(q.embedding.weight.dtype)
        with torch.autocast(latent.device.type, enabled=False):
            if self.training or (torch.is_grad_enabled() and z.requires_grad):
                out = q(z)  # straight-through gradient (and the losses GroupedQuantizer computes)
                return MGVQEncoding(out.quant, out.indices)
            # Inference: the same lookup GroupedQuantizer.forward makes, without its training-only
            # work (two loss terms, re-normalising the latent and the selected codes), which costs
            # ~2x the lookup itself on CPU.
            tokens, _ = q._tokens(z)  # [B, h*w, C], with GroupedQuantizer's shape checks
            b, n, c = tokens.shape
            codes, indices = mgvq_lookup(
                tokens.reshape(b, n, q.groups, q.dim),
                q.codebook().detach(),
                normalize=q.l2_norm,
                backend=q.backend,
            )
            quant = codes.reshape(b, n, c).transpose(1, 2).reshape(z.shape)
        return MGVQEncoding(quant, indices)

    def encode(self, pixels: torch.Tensor, out_of_range: str = "raise") -> MGVQEncoding:
        """``pixels [B, 3, H, W]`` in ``[-1, 1]`` -> ``(quant [B, C, H/f, W/f], indices [B, H/f * W/f, G])``.

        336x336 with f16c32-g8: ``quant [B, 32, 21, 21]`` (14,112 values per image: the ``q`` HTC's
        discrete projector consumes, see ``GroupedQuantizer.flatten_for_projector``), ``indices
        [B, 441, 8]``. ``out_of_range``: ``"raise"`` (default: values beyond [-1, 1] + 1e-3 or
        NaN/Inf raise ``ValueError``; one host sync), ``"clamp"`` (clamp to [-1, 1]), ``"allow"`` (no
        check, no sync).
        """
        return self.quantize_latent(self.encode_latent(pixels, out_of_range))

    def forward(self, pixels: torch.Tensor, out_of_range: str = "raise") -> MGVQEncoding:
        return self.encode(pixels, out_of_range)

    # ---- loading ----
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that accepts an official full-model state dict.

        ``decoder.*`` and ``post_quant_conv.*`` keys are dropped (one log line says how many). With
        ``strict=True``, missing, unexpected or mis-shaped keys raise ``ValueError`` listing them
        (and, when the shapes fit a released model, naming it).
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"MGVQTokenizer.load_state_dict: expected a mapping, got {type(state_dict).__name__}"
            )
        if strict:
            self._check_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_state_dict(self, sd: Mapping[str, Any]) -> None:
        own = {k: tuple(v.shape) for k, v in self.state_dict(keep_vars=True).items()}
        theirs = {k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES)}
        not_tensors = [k for k, v in theirs.items() if not isinstance(v, torch.Tensor)]
        missing = [k for k in own if k not in theirs]
        unexpected = [k for k in theirs if k not in own]
        shapes = [
            f"{k}: checkpoint {list(theirs[k].shape)} vs model {list(own[k])}"
            for k in own
            if k in theirs and isinstance(theirs[k], torch.Tensor) and tuple(theirs[k].shape) != own[k]
        ]
        if not (missing or unexpected or shapes or not_tensors):
            return
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", shapes),
            ("not tensors", not_tensors),
        ):
            if items:
                more = f", ... ({len(items) - 6} more)" if len(items) > 6 else ""
                parts.append(f"{len(items)} {label}: " + "; ".join(items[:6]) + more)
        hints = []
        matches = matching_presets(sd)
        if matches:
            hints.append(f"the checkpoint's shapes match {', '.join(repr(m) for m in matches)}")
        prefix = _common_prefix(unexpected) if unexpected and len(missing) == len(unexpected) else ""
        if prefix:
            hints.append(f"its keys carry a {prefix!r} prefix: strip it")
        hint = (" (" + "; ".join(hints) + ")") if hints else ""
        raise ValueError(
            f"MGVQTokenizer({self.config.name or 'custom config'}): state dict does not fit this model"
            f"{hint}: " + " | ".join(parts)
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: MGVQConfig | str | None = None,
        *,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> MGVQTokenizer:
        """Load an official MGVQ checkpoint file (encoder path only), in eval mode.

        Args:
            path: ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` (``torch.load(weights_only=True)``) holding
                ``{"state_dict": sd}`` (the official release), ``{"model": sd}`` or a bare ``sd``; or a
                ``.safetensors`` file (bare). Decoder keys are dropped with a one-line message;
                ``fixture.*`` entries (test inputs/outputs stored beside the weights) are skipped.
            config: an :class:`MGVQConfig`, released name (``"f16c32-g8"``) or config string. If
                None, the file's own config is used: safetensors metadata key ``config``, or a
                string under the key ``"config"`` of a torch checkpoint. If both exist they must
                describe the same encoder. If neither does, ``ValueError`` (naming the released
                models whose shapes fit the weights).
            backend: quantizer backend (:func:`htc_kernels.mgvq_lookup`).
            dtype: cast the loaded floating-point weights (default: as stored).
            device: where the weights are loaded (``map_location``).
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            found = sorted(f for f in os.listdir(path) if f.endswith(_CHECKPOINT_SUFFIXES))
            raise ValueError(
                f"MGVQTokenizer.from_pretrained: {path!r} is a directory; pass the checkpoint file "
                f"(found: {found or 'no ' + '/'.join(_CHECKPOINT_SUFFIXES) + ' files'})"
            )
        if not os.path.isfile(path):
            raise ValueError(f"MGVQTokenizer.from_pretrained: no such file: {path!r}")
        sd, file_config = _read_checkpoint(path, device)
        # The team's fixtures (../shared/mgvq/) store their inputs and reference outputs beside the
        # weights under "fixture.*": data, not parameters.
        sd = {k: v for k, v in sd.items() if not k.startswith("fixture.")}
        if config is None and file_config is None:
            matches = matching_presets(sd)
            fits = f"; its weights' shapes fit {', '.join(repr(m) for m in matches)}" if matches else ""
            raise ValueError(
                f"MGVQTokenizer.from_pretrained: {path!r} carries no config: name it, e.g. "
                f"from_pretrained(path, config='f16c32-g8') (released: {', '.join(_RELEASED)}){fits}"
            )
        cfg = MGVQConfig.parse(config) if config is not None else None
        if file_config is not None:
            try:
                fcfg = MGVQConfig.parse(file_config)
            except ValueError as exc:
                # Even with config= given: the file's config may ask for what this module does not
                # implement and that adds no weight (an activation, a shortcut), so the strict key
                # check could not catch it.
                raise ValueError(f"MGVQTokenizer.from_pretrained: {path!r}: its config: {exc}") from exc
            if cfg is not None and fcfg is not None and not cfg.same_encoder(fcfg):
                raise ValueError(
                    f"MGVQTokenizer.from_pretrained: config {cfg.to_string()!r} differs from the file's "
                    f"{fcfg.to_string()!r}: pass config=None to use the file's"
                )
            cfg = cfg or fcfg
        with torch.device("meta"):  # no allocation or random init: the checkpoint supplies every tensor
            model = cls(cfg, backend=backend)
        model.load_state_dict(sd, strict=True, assign=True)
        if dtype is not None:
            model.to(dtype=dtype)
        return model.eval()


def _drop_decoder_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    dropped = [k for k in list(state_dict) if k.startswith(tuple(prefix + p for p in _DROPPED_PREFIXES))]
    for k in dropped:
        del state_dict[k]
    if dropped:
        logger.warning(
            "MGVQTokenizer: ignored %d decoder keys (decoder.*, post_quant_conv.*): only the encoder path "
            "is built",
            len(dropped),
        )


def _common_prefix(keys: Sequence[str]) -> str:
    first = keys[0].split(".", 1)[0] + "."
    return first if all(k.startswith(first) for k in keys) else ""


def _read_checkpoint(path: str, device) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict, config string or None) from an official checkpoint file."""
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover (a dev dependency)
            raise ValueError(
                "MGVQTokenizer.from_pretrained: reading .safetensors needs `pip install safetensors`"
            ) from exc
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return sd, meta.get("config")
    if not path.endswith(_CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"MGVQTokenizer.from_pretrained: {path!r}: unknown checkpoint format (expected "
            f"{', '.join(_CHECKPOINT_SUFFIXES)})"
        )
    obj = torch.load(path, map_location=device, weights_only=True)
    config = None
    if isinstance(obj, Mapping):
        if isinstance(obj.get("config"), str):
            config = obj["config"]
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"MGVQTokenizer.from_pretrained: {path!r} holds no state dict (expected {{'state_dict': sd}}, "
            f"{{'model': sd}} or a bare name -> tensor mapping; found {top})"
        )
    return dict(obj), config


def matching_presets(state_dict: Mapping[str, Any]) -> list[str]:
    """Released model names whose encoder-path names and shapes equal ``state_dict``'s (decoder keys
    ignored). Built on the meta device: no allocation."""
    theirs = {
        k: tuple(v.shape)
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and not k.startswith(_DROPPED_PREFIXES)
    }
    out = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            m = MGVQTokenizer(cfg)
        if {k: tuple(v.shape) for k, v in m.state_dict(keep_vars=True).items()} == theirs:
            out.append(name)
    return out
