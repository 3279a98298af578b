"""htc_model.mgvq: the MGVQ tokenizer's encoder path against the official fixtures and manifest.

Fixtures (``../shared/mgvq/``, made by the official code): tiny-width models of the f16 (8 groups,
quadratic attention at 4x4) and f8 (4 groups, linear attention at 6x6) topologies with their inputs
and outputs. The manifest lists every parameter name and shape of the full official f16c32-g8 model.
"""

import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from htc_kernels.mgvq import GroupedQuantizer
from htc_model.mgvq import (
    CLIP_MEAN,
    CLIP_STD,
    PRESETS,
    MGVQConfig,
    MGVQTokenizer,
    matching_presets,
    to_mgvq_pixels,
)
from tests.shared_data import MGVQ_FIXTURE, MGVQ_FIXTURE_F8, MGVQ_MANIFEST

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

FIXTURES = [
    pytest.param(MGVQ_FIXTURE, 16, 8, id="f16-g8-quadratic"),
    pytest.param(MGVQ_FIXTURE_F8, 8, 4, id="f8-g4-linear"),
]


def _need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"shared MGVQ data not found: {path} (set HTC_SHARED_DIR)")
    return path


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm())


def _fixture(path):
    t = load_file(_need(path))
    weights = {k: v for k, v in t.items() if not k.startswith("fixture.")}
    with safe_open(path, framework="pt") as f:
        config = f.metadata()["config"]
    return weights, {k[len("fixture.") :]: v for k, v in t.items() if k.startswith("fixture.")}, config


@pytest.fixture(scope="module")
def tiny():
    """The f16-topology fixture's model (fp32, eval) and its data."""
    model = MGVQTokenizer.from_pretrained(_need(MGVQ_FIXTURE))
    return model, _fixture(MGVQ_FIXTURE)[1]


# --------------------------------------------------------------------------------------------------
# Parity with the official code
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, factor, groups", FIXTURES)
def test_fixture_parity(path, factor, groups):
    """from_pretrained(fixture) reads the config from the file; every stage output matches."""
    model = MGVQTokenizer.from_pretrained(_need(path))
    _, fx, _ = _fixture(path)
    assert not model.training
    assert model.downsample_factor == factor and model.config.codebook_groups == groups
    x = fx["input"]
    with torch.no_grad():
        enc = model.encoder(x)
        latent = model.quant_conv(enc)
        quant, indices = model.encode(x)
    b, c, h, w = fx["latent"].shape
    assert rel(enc, fx["encoder_out"]) <= 1e-5
    assert rel(latent, fx["latent"]) <= 1e-5
    assert rel(quant, fx["quant"]) <= 1e-5
    assert quant.shape == (b, c, h, w) and quant.dtype == torch.float32
    assert indices.shape == (b, h * w, groups) and indices.dtype == torch.int64
    assert torch.equal(indices, fx["indices"].reshape(b, h * w, groups))  # [B, H, W, G] row-major
    # The quantized vectors are unit-norm codes, group by group.
    norms = quant.view(b, groups, c // groups, h, w).norm(dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("path, factor, groups", FIXTURES)
def test_fixture_config_strings_parse(path, factor, groups):
    _, _, config = _fixture(path)
    cfg = MGVQConfig.parse(config)
    assert cfg.downsample_factor == factor and cfg.codebook_groups == groups
    assert MGVQConfig.parse(cfg.to_string()) == cfg  # round trip (decoder keys dropped)


# --------------------------------------------------------------------------------------------------
# The full-size model: names and shapes equal the official manifest
# --------------------------------------------------------------------------------------------------


def _manifest() -> dict:
    with open(_need(MGVQ_MANIFEST)) as f:
        return json.load(f)


def _meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_full_size_names_and_shapes_equal_manifest():
    man = _manifest()
    official = {k: tuple(v) for k, v in man["state_dict"].items()}
    with torch.device("meta"):  # no allocation or init of the ~88M encoder parameters
        model = MGVQTokenizer("f16c32-g8")
    ours = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    encoder_path = {k: v for k, v in official.items() if not k.startswith(("decoder.", "post_quant_conv."))}
    assert ours == encoder_path
    assert len(ours) == 119  # 114 encoder + quant_conv (2) + quantize (3)
    assert ours["quantize.embedding.weight"] == (16384, 4)
    # The manifest's config string names the same model.
    assert MGVQConfig.parse(man["config"]) == PRESETS["f16c32-g8"] == model.config
    assert model.downsample_factor == 16


def test_full_official_state_dict_loads_strict_and_drops_decoder(caplog):
    """load_state_dict(official full model, strict=True): encoder subset loads, decoder keys are
    dropped with one message saying how many."""
    official = {k: tuple(v) for k, v in _manifest()["state_dict"].items()}
    n_decoder = sum(k.startswith(("decoder.", "post_quant_conv.")) for k in official)
    with torch.device("meta"):
        model = MGVQTokenizer("f16c32-g8")
    with caplog.at_level(logging.WARNING, logger="htc_model.mgvq"):
        result = model.load_state_dict(_meta_state_dict(official), strict=True, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    msgs = [r.getMessage() for r in caplog.records if r.name == "htc_model.mgvq"]
    assert msgs == [
        f"MGVQTokenizer: ignored {n_decoder} decoder keys (decoder.*, post_quant_conv.*): only the "
        "encoder path is built"
    ]
    assert matching_presets(_meta_state_dict(official)) == ["f16c32-g8"]


def test_336_gives_21x21_latent_of_14112_values():
    """The real f16c32-g8 module at 336x336 (shapes only: fake tensors, nothing computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = MGVQTokenizer("f16c32-g8")
        quant, indices = model.encode(torch.empty(2, 3, 336, 336), out_of_range="allow")
    assert quant.shape == (2, 32, 21, 21) and quant.dtype == torch.float32
    assert indices.shape == (2, 441, 8) and indices.dtype == torch.int64
    assert quant[0].numel() == 14112
    assert model.latent_shape(336, 336) == (32, 21, 21)


def test_336_real_compute_small_widths():
    """The same topology computed for real at 336x336 (tiny widths, to stay fast)."""
    cfg = MGVQConfig(
        width_list=(8, 32, 32, 32, 32),
        depth_list=(0, 1, 1, 1, 1),
        block_type=("ResBlock",) * 3 + ("EViT_GLU",) * 2,
        codebook_size=16384,
        codebook_groups=8,
    )
    model = MGVQTokenizer(cfg).eval()
    with torch.no_grad():
        quant, indices = model.encode(torch.rand(1, 3, 336, 336) * 2 - 1)
    assert quant.shape == (1, 32, 21, 21) and indices.shape == (1, 441, 8)
    assert GroupedQuantizer.flatten_for_projector(quant).shape == (1, 14112)
    assert int(indices.min()) >= 0 and int(indices.max()) < 2048


@pytest.mark.parametrize(
    "name, factor, groups, codes",
    [
        ("f16c32-g8", 16, 8, 2048),
        ("f16c32-g4", 16, 4, 8192),
        ("f8c32-g4", 8, 4, 8192),
        ("f8c32-g8", 8, 8, 2048),
        ("mgvq_f16c32_g4_mix", 16, 4, 8192),
        ("mgvq-f32c32-g8-mix", 32, 8, 2048),
    ],
)
def test_released_configs(name, factor, groups, codes):
    cfg = MGVQConfig.parse(name)
    assert (cfg.downsample_factor, cfg.codebook_groups, cfg.codes_per_group) == (factor, groups, codes)
    assert cfg.group_dim * groups == 32
    with torch.device("meta"):
        model = MGVQTokenizer(name)
    sd = model.state_dict(keep_vars=True)
    assert sd["quantize.embedding.weight"].shape == (groups * codes, 32 // groups)
    assert sd["quant_conv.weight"].shape == (32, 32 // groups, 1, 1)
    assert MGVQConfig.parse(cfg.to_string()) == cfg


def test_custom_block_types_and_widths():
    """Arbitrary widths/depths/block types: EViTS5 (multi-scale aggregation), a non-empty stage 0
    (plain project_in conv), widths that are not multiples of the head dim, other activations."""
    cfg = MGVQConfig.parse(
        "latent_channels=16 encoder.block_type=[EViTS5_GLU,ResBlock,EViT_GLU] "
        "encoder.width_list=[48,64,64] encoder.depth_list=[1,2,1] encoder.act=relu "
        "codebook_size=64 codebook_groups=2 decoder.width_list=[1,2,3]"
    )
    assert cfg.downsample_factor == 4
    model = MGVQTokenizer(cfg).eval()
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names["encoder.project_in.conv.weight"] == (48, 3, 3, 3)
    # 48 channels -> one 32-dim head (+ one aggregated head): qkv 96 channels, proj 64 -> 48.
    assert names["encoder.stages.0.op_list.0.context_module.main.qkv.conv.weight"] == (96, 48, 1, 1)
    assert names["encoder.stages.0.op_list.0.context_module.main.aggreg.0.0.weight"] == (96, 1, 5, 5)
    assert names["encoder.stages.0.op_list.0.context_module.main.aggreg.0.1.weight"] == (96, 32, 1, 1)
    assert names["encoder.stages.0.op_list.0.context_module.main.proj.conv.weight"] == (48, 64, 1, 1)
    with torch.no_grad():
        quant, indices = model.encode(torch.rand(2, 3, 24, 24) * 2 - 1)
    assert quant.shape == (2, 16, 6, 6) and indices.shape == (2, 36, 2)


# --------------------------------------------------------------------------------------------------
# from_pretrained: the official checkpoint layouts
# --------------------------------------------------------------------------------------------------


def _decoder_keys() -> dict:
    return {"decoder.project_in.conv.weight": torch.randn(4, 4), "post_quant_conv.bias": torch.randn(32)}


@pytest.mark.parametrize(
    "filename, wrap",
    [
        ("official.pt", lambda sd: {"state_dict": {**sd, **_decoder_keys()}}),  # the MGVQ release
        ("lightning.ckpt", lambda sd: {"state_dict": sd, "epoch": 3}),
        ("model.pth", lambda sd: {"model": sd}),
        ("bare.pt", lambda sd: sd),
        ("bare.bin", lambda sd: {**sd, **_decoder_keys()}),
    ],
)
def test_from_pretrained_torch_layouts(tmp_path, tiny, filename, wrap):
    model, fx = tiny
    weights, _, config = _fixture(MGVQ_FIXTURE)
    path = tmp_path / filename
    torch.save(wrap(weights), path)
    # Torch checkpoints carry no config: the caller names it (a config string here; a released
    # name such as "f16c32-g8" for the official files).
    with pytest.raises(ValueError, match="carries no config: name it"):
        MGVQTokenizer.from_pretrained(path)
    loaded = MGVQTokenizer.from_pretrained(path, config=config)
    with torch.no_grad():
        quant, indices = loaded.encode(fx["input"])
    assert rel(quant, fx["quant"]) <= 1e-5
    assert torch.equal(indices, model.encode(fx["input"]).indices)


def test_from_pretrained_config_inside_torch_file(tmp_path, tiny):
    weights, _, config = _fixture(MGVQ_FIXTURE)
    torch.save({"state_dict": weights, "config": config}, tmp_path / "with_config.pt")
    loaded = MGVQTokenizer.from_pretrained(tmp_path / "with_config.pt")
    assert loaded.config == MGVQConfig.parse(config)


def test_from_pretrained_safetensors_and_config_conflicts(tmp_path, tiny):
    weights, fx, config = _fixture(MGVQ_FIXTURE)
    save_file(weights, tmp_path / "plain.safetensors")  # no metadata
    with pytest.raises(ValueError, match="carries no config"):
        MGVQTokenizer.from_pretrained(tmp_path / "plain.safetensors")
    loaded = MGVQTokenizer.from_pretrained(tmp_path / "plain.safetensors", config=config)
    assert torch.equal(loaded.encode(fx["input"]).indices, tiny[0].encode(fx["input"]).indices)
    # A named config that contradicts the file's is refused, one that agrees is fine.
    MGVQTokenizer.from_pretrained(MGVQ_FIXTURE, config=config)
    with pytest.raises(ValueError, match="differs from the file's"):
        MGVQTokenizer.from_pretrained(
            MGVQ_FIXTURE, config=config.replace("codebook_size=256", "codebook_size=512")
        )
    # A file config asking for what this module does not implement (and that adds no weight) is
    # refused even when config= names a readable one.
    save_file(weights, tmp_path / "relu.safetensors", metadata={"config": config + " encoder.out_act=relu"})
    for named in (None, config):
        with pytest.raises(ValueError, match="its config: .*out_act"):
            MGVQTokenizer.from_pretrained(tmp_path / "relu.safetensors", config=named)
    with pytest.raises(ValueError, match="is a directory"):
        MGVQTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        MGVQTokenizer.from_pretrained(tmp_path / "missing.pt")
    torch.save({"epoch": 1, "optimizer": {"lr": 1.0}}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        MGVQTokenizer.from_pretrained(tmp_path / "junk.pt", config=config)


def test_from_pretrained_dtype(tiny):
    model = MGVQTokenizer.from_pretrained(MGVQ_FIXTURE, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    quant, indices = model.encode(tiny[1]["input"].bfloat16())
    assert quant.dtype == torch.bfloat16 and indices.shape == (2, 16, 8)


# --------------------------------------------------------------------------------------------------
# Bad inputs: errors that say what is wrong and what would work
# --------------------------------------------------------------------------------------------------


def test_bad_state_dicts(tiny):
    weights, _, config = _fixture(MGVQ_FIXTURE)
    model = MGVQTokenizer(config)
    missing = dict(weights)
    del missing["encoder.stages.2.op_list.0.main.conv2.norm.bias"]
    with pytest.raises(
        ValueError, match=r"1 missing: encoder\.stages\.2\.op_list\.0\.main\.conv2\.norm\.bias"
    ):
        model.load_state_dict(missing)
    bad_shape = dict(weights)
    bad_shape["quant_conv.weight"] = torch.randn(32, 8, 1, 1)
    with pytest.raises(
        ValueError,
        match=r"mis-shaped: quant_conv\.weight: checkpoint \[32, 8, 1, 1\] vs model \[32, 4, 1, 1\]",
    ):
        model.load_state_dict(bad_shape)
    extra = {**weights, "encoder.stages.9.op_list.0.conv.weight": torch.randn(1)}
    with pytest.raises(ValueError, match=r"1 unexpected: encoder\.stages\.9"):
        model.load_state_dict(extra)
    prefixed = {"module." + k: v for k, v in weights.items()}
    with pytest.raises(ValueError, match="'module.' prefix: strip it"):
        model.load_state_dict(prefixed)
    # The wrong released config for a checkpoint: the error names the one that fits.
    official = _meta_state_dict({k: tuple(v) for k, v in _manifest()["state_dict"].items()})
    with torch.device("meta"):
        wrong = MGVQTokenizer("f16c32-g4")
    with pytest.raises(ValueError, match="shapes match 'f16c32-g8'"):
        wrong.load_state_dict(official, assign=True)
    # strict=False keeps nn.Module semantics (report, do not raise).
    res = model.load_state_dict(missing, strict=False)
    assert res.missing_keys == ["encoder.stages.2.op_list.0.main.conv2.norm.bias"]


def test_bad_pixels(tiny):
    model, fx = tiny
    x = fx["input"]
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\].*got shape \(2, 1, 64, 64\).*grayscale"):
        model.encode(x[:, :1])
    with pytest.raises(ValueError, match=r"got shape \(2, 4, 64, 64\)"):
        model.encode(torch.cat([x, x[:, :1]], 1))
    with pytest.raises(ValueError, match="channels last"):
        model.encode(x.permute(0, 2, 3, 1).contiguous())
    with pytest.raises(ValueError, match="single image"):
        model.encode(x[0])
    with pytest.raises(ValueError, match="height 56 is not a positive multiple of 16.*to 48 or 64"):
        model.encode(x[:, :, :56])
    with pytest.raises(ValueError, match="width 8 is not a positive multiple of 16.*to 16"):
        model.encode(x[:, :, :, :8])
    with pytest.raises(ValueError, match="uint8.*to_mgvq_pixels"):
        model.encode(((x + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="pixels are torch.float64 but the model's weights torch.float32"):
        model.encode(x.double())
    with pytest.raises(ValueError, match="empty batch"):
        model.encode(x[:0])
    with pytest.raises(ValueError, match="out_of_range must be one of"):
        model.encode(x, out_of_range="ignore")
    with pytest.raises(ValueError, match="latent has|channels, expected groups"):
        model.quantize_latent(torch.randn(1, 16, 4, 4))


def test_bad_configs():
    with pytest.raises(
        ValueError, match="names only the topology: add the groups, e.g. 'f16c32-g4', 'f16c32-g8'"
    ):
        MGVQConfig.parse("mgvq-f16c32")
    with pytest.raises(ValueError, match="unknown MGVQ model 'f64c128'"):
        MGVQTokenizer("f64c128")
    with pytest.raises(ValueError, match="encoder.out_norm=trms2d is not supported"):
        MGVQConfig.parse("f16c32-g8 encoder.out_norm=trms2d")
    with pytest.raises(ValueError, match="unknown key 'codebook_dim'"):
        MGVQConfig.parse("f16c32-g8 codebook_dim=8")
    with pytest.raises(ValueError, match="name the codebook"):
        MGVQConfig.parse("encoder.width_list=[16,32] encoder.depth_list=[0,1]")
    with pytest.raises(ValueError, match="block type 'Swin' is not supported"):
        MGVQConfig.parse("f16c32-g8 encoder.block_type=Swin")
    with pytest.raises(ValueError, match="must have the same length"):
        MGVQConfig.parse("f16c32-g8 encoder.depth_list=[0,1]")
    with pytest.raises(ValueError, match="receives 64 channels"):
        MGVQConfig(width_list=(16, 64, 32), depth_list=(0, 0, 1), codebook_size=8, codebook_groups=8)
    with pytest.raises(ValueError, match="must be divisible by codebook_groups"):
        MGVQConfig.parse("f16c32-g8 codebook_groups=3")
    # The manifest's "name, key=value" form.
    assert MGVQConfig.parse("mgvq-f16c32, codebook_size=32768, codebook_groups=4") == PRESETS["f16c32-g4"]


# --------------------------------------------------------------------------------------------------
# Input range and the pixel conversion helper
# --------------------------------------------------------------------------------------------------


def _unit_images(b=2, s=64):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(7))


def test_out_of_range_behaviour(tiny):
    model, fx = tiny
    x = fx["input"]
    clip = (((x + 1) / 2) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    # Default "raise": CLIP-normalised pixels are refused, naming the range and the fix.
    with pytest.raises(
        ValueError, match=r"outside MGVQ's input range \[-1, 1\].*source='clip'.*to_mgvq_pixels"
    ):
        model.encode(clip)
    with pytest.raises(ValueError, match="source='uint8'"):
        model.encode((x + 1) * 127.5)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.encode(bad)
    # Rounding slack (1e-3) is accepted as is.
    edge = x.clone()
    edge[0, 0, 0, 0], edge[1, 2, 5, 5] = 1.0005, -1.0005
    assert torch.equal(model.encode(edge).indices, model.encode(edge, out_of_range="allow").indices)
    # "clamp" clamps; "allow" feeds the values unchanged (no check, no host sync).
    over = x * 1.5
    q_clamp = model.encode(over, out_of_range="clamp")
    q_ref = model.encode(over.clamp(-1, 1))
    assert torch.equal(q_clamp.quant, q_ref.quant) and torch.equal(q_clamp.indices, q_ref.indices)
    with torch.no_grad():
        latent = model.quant_conv(model.encoder(over))
    assert torch.equal(
        model.encode(over, out_of_range="allow").indices, model.quantize_latent(latent).indices
    )


def test_to_mgvq_pixels():
    u = _unit_images()
    u8 = (u * 255).round().to(torch.uint8)
    out = to_mgvq_pixels(u8)  # uint8 needs no source
    assert out.dtype == torch.float32 and out.shape == u.shape
    torch.testing.assert_close(out, u8.float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    torch.testing.assert_close(to_mgvq_pixels(u8.float(), source="uint8"), out)
    torch.testing.assert_close(to_mgvq_pixels(u, source="unit"), u * 2 - 1, rtol=0, atol=1e-6)
    # CLIP-normalised (CLIPImageProcessor's pixel_values) -> the same [-1, 1] image.
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    clip = (u - mean) / std
    torch.testing.assert_close(to_mgvq_pixels(clip, source="clip"), u * 2 - 1, rtol=0, atol=1e-5)
    other = (u - 0.5) / 0.5  # a processor with other mean/std
    torch.testing.assert_close(
        to_mgvq_pixels(other, source="clip", mean=(0.5,) * 3, std=(0.5,) * 3), u * 2 - 1, rtol=0, atol=1e-6
    )
    assert to_mgvq_pixels(u8[0]).shape == (1, 3, 64, 64)
    assert to_mgvq_pixels(u8, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_to_mgvq_pixels_refuses_mismatches():
    u = _unit_images()
    clip = (u - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with pytest.raises(ValueError, match="needs source='uint8'.*'unit'.*'clip'"):
        to_mgvq_pixels(u)
    with pytest.raises(ValueError, match="with source='unit'.*looks like source='clip'"):
        to_mgvq_pixels(clip, source="unit")
    with pytest.raises(ValueError, match="with source='unit'.*looks like source='uint8'"):
        to_mgvq_pixels(u * 255, source="unit")
    with pytest.raises(ValueError, match="already in MGVQ's \\[-1, 1\\]"):
        to_mgvq_pixels(u * 2 - 1, source="unit")
    with pytest.raises(ValueError, match="use source='uint8'"):
        to_mgvq_pixels((u * 255).to(torch.uint8), source="clip")
    with pytest.raises(ValueError, match="channels last"):
        to_mgvq_pixels((u * 255).to(torch.uint8).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="source must be"):
        to_mgvq_pixels(u, source="imagenet")
    with pytest.raises(ValueError, match=r"B >= 1"):
        to_mgvq_pixels(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected RGB"):
        to_mgvq_pixels(torch.tensor(1.0), source="unit")
    with pytest.warns(UserWarning, match="use source='unit'"):  # in range, but a black 8-bit image
        to_mgvq_pixels(u, source="uint8")


# --------------------------------------------------------------------------------------------------
# Precision, compile, gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(tiny, dtype):
    """Convolutions in bf16/fp16, RMSNorm statistics and attention in fp32, quantization in fp32."""
    model, fx = tiny
    x = fx["input"][:1]  # one image: fp16 convolutions are slow on CPUs without AVX512-FP16
    with torch.no_grad():
        ref_latent = model.encode_latent(x)
        with torch.autocast("cpu", dtype=dtype):
            latent = model.encode_latent(x)
            quant, indices = model.quantize_latent(latent)  # what encode() does
    assert latent.dtype == dtype  # the convolutions really ran in low precision
    assert quant.dtype == torch.float32 and indices.dtype == torch.int64
    err = rel(latent, ref_latent)
    # The same module with its weights cast to dtype, run without autocast: the error floor of
    # doing this math in that dtype. Autocast must not be much worse.
    low = MGVQTokenizer.from_pretrained(MGVQ_FIXTURE, dtype=dtype)
    with torch.no_grad():
        low_err = rel(low.encode_latent(x.to(dtype)), ref_latent)
    assert err <= 2 * low_err + 2e-3, (err, low_err)
    # Indices: the fp32 comparison on a slightly perturbed latent agrees almost everywhere.
    agree = (indices == fx["indices"][:1].reshape(indices.shape)).float().mean().item()
    assert agree >= 0.9, agree


def test_torch_compile_fullgraph(tiny):
    """torch.compile traces the whole encode (custom lookup op included) without graph breaks."""
    model, fx = tiny
    x = fx["input"]
    torch._dynamo.reset()
    compiled = torch.compile(model.encode, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        quant, indices = compiled(x, out_of_range="clamp")
        ref = model.encode(x)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(quant, ref.quant, rtol=1e-5, atol=1e-6)


def test_lookup_fake_strides_match_the_kernel():
    """torch.compile(backend="inductor") asserts that a custom op's outputs have the strides its
    fake implementation promised. The encoder hands mgvq_lookup a transposed view of the latent;
    the kernels return contiguous outputs, so the fakes must too (they used to mirror z's strides,
    and compiling MGVQTokenizer.encode with inductor failed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import htc_kernels as hk

    z = torch.randn(2, 32, 5, 5).flatten(2).transpose(1, 2).reshape(2, 25, 8, 4)  # as in encode()
    assert not z.is_contiguous()
    cb = torch.randn(8, 16, 4)
    codes, idx = hk.mgvq_lookup(z, cb, backend="cpu")
    grads = torch.ops.htc.mgvq_lookup_backward(torch.randn_like(codes), z, cb, idx, True)
    with FakeTensorMode() as mode:
        fz, fcb = mode.from_tensor(z), mode.from_tensor(cb)
        fcodes, fidx = hk.mgvq_lookup(fz, fcb, backend="cpu")
        fgrads = torch.ops.htc.mgvq_lookup_backward(mode.from_tensor(codes), fz, fcb, fidx, True)
    assert (fcodes.stride(), fidx.stride()) == (codes.stride(), idx.stride())
    assert [g.stride() for g in fgrads] == [g.stride() for g in grads]
    from htc_kernels.mgvq_lookup import _triton_mgvq

    if _triton_mgvq() is not None:  # the Triton op's fake (its kernel allocates contiguous outputs)
        with FakeTensorMode() as mode:
            tcodes, tidx = torch.ops.htc.mgvq_lookup_triton(mode.from_tensor(z), mode.from_tensor(cb), True)
        assert tcodes.is_contiguous() and tidx.is_contiguous()


def test_gradients_reach_the_encoder(tiny):
    """Straight-through: a loss on quant trains the encoder (e.g. fine-tuning the tokenizer)."""
    weights, fx, config = _fixture(MGVQ_FIXTURE)
    model = MGVQTokenizer(config)
    model.load_state_dict(weights)
    quant, _ = model.encode(fx["input"])
    (quant * torch.randn_like(quant)).sum().backward()
    for name in (
        "encoder.project_in.conv.conv.weight",
        "encoder.stages.4.op_list.0.context_module.main.qkv.conv.weight",
    ):
        g = model.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert model.quantize.embedding.weight.grad is None  # codes train through the losses only


def test_inference_path_equals_grouped_quantizer(tiny):
    """Without grad, quantize_latent calls mgvq_lookup directly (skipping the training losses):
    the same quant and indices as GroupedQuantizer.forward."""
    model, fx = tiny
    latent = fx["latent"]
    with torch.no_grad():
        fast = model.quantize_latent(latent)
    full = model.quantize(latent.clone().requires_grad_())
    assert torch.equal(fast.indices, full.indices)
    assert torch.equal(fast.quant, full.quant.detach())
    slow = model.quantize_latent(latent.clone().requires_grad_())  # grad path: through the module
    assert slow.quant.requires_grad and torch.equal(slow.indices, fast.indices)


def test_rmsnorm_and_attention_branches_match_definitions():
    """RMSNorm2d and both attention branches against direct float64 transcriptions of the spec."""
    from htc_model.mgvq import LiteMLA, RMSNorm2d

    norm = RMSNorm2d(6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 3, 5)
    ref = x.double() / (x.double().pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
    ref = ref * norm.weight.double().view(1, -1, 1, 1) + norm.bias.double().view(1, -1, 1, 1)
    assert rel(norm(x), ref) <= 1e-6
    att = LiteMLA(64)
    for h, w in ((4, 8), (7, 9)):  # 32 tokens: quadratic branch; 63: linear
        qkv = torch.randn(2, 192, h, w)
        t = qkv.double().reshape(2, 2, 96, h * w)
        q, k, v = F.relu(t[:, :, :32]), F.relu(t[:, :, 32:64]), t[:, :, 64:]
        a = k.transpose(-1, -2) @ q  # [B, heads, keys, queries]
        ref = (v @ (a / a.sum(2, keepdim=True))).reshape(2, 64, h, w)
        assert rel(att.attention(qkv), ref) <= 1e-5
