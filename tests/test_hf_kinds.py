"""Kinds and groups from token ids for tiled / row-split images (htc_kernels.hf.kinds), CPU, offline.

One image is one group, however its processor expands it. Unit tests on hand-written sequences, then
exactness on tiny random SmolVLM (Idefics3 tiles) and Mistral3 (Pixtral rows) models: the language
model under "htc_star" against the same model under "sdpa" fed the dense 4-D star mask of the same
kinds and groups (only non-PAD positions are compared: fully masked PAD rows give finite garbage).
"""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlavaConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig  # noqa: E402
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string  # noqa: E402

import htc_kernels as hk  # noqa: E402
from htc_kernels.hf.kinds import image_tokens  # noqa: E402
from tests.accuracy import rel as _rel  # noqa: E402
from tests.hf_common import star_backend  # noqa: E402, F401

T, V, C, P = (int(k) for k in hk.TokenKind)
VOCAB = 64
IMG, VOCO = 63, 62
BRK, END = 61, 60  # Pixtral [IMG_BREAK], [IMG_END]
FAKE, GLOBAL, NL = 61, 60, 59  # Idefics3 <fake_token_around_image>, <global-img>, "\n"
START, STOP = 61, 60  # Qwen2-VL <|vision_start|>, <|vision_end|>


def _row_col(r: int, c: int) -> int:  # Idefics3 <row_r_col_c>, r and c in 1..3
    return 40 + 3 * (r - 1) + (c - 1)


ROW_COL = [_row_col(r, c) for r in range(1, 4) for c in range(1, 4)]
PIXTRAL = dict(image_token_id=IMG, image_break_token_id=BRK, image_end_token_id=END)
IDEFICS3 = dict(
    image_token_id=IMG,
    image_start_token_id=FAKE,
    image_break_token_id=ROW_COL,
    image_end_token_id=FAKE,
    image_last_tile_token_id=GLOBAL,
    image_filler_token_id=NL,
)
QWEN2_VL = dict(image_token_id=IMG, image_start_token_id=START, image_end_token_id=STOP)


# --------------------------------------------------------------------------------------------------
# Expanding images the way each processor does
# --------------------------------------------------------------------------------------------------

_IDEFICS3_VOCAB = {
    "<image>": IMG,
    "<fake_token_around_image>": FAKE,
    "<global-img>": GLOBAL,
    "\n": NL,
    **{f"<row_{r}_col_{c}>": _row_col(r, c) for r in range(1, 4) for c in range(1, 4)},
}


def _idefics3_image(rows: int, cols: int, seq_len: int) -> list[int]:
    """The ids of one image as SmolVLM's (= Idefics3's) processor expands it (its own helper)."""
    text = get_image_prompt_string(
        rows, cols, seq_len, "<fake_token_around_image>", "<image>", "<global-img>"
    )
    return [_IDEFICS3_VOCAB[t] for t in re.findall(r"<[^>]+>|\n", text)]


def _pixtral_image(h: int, w: int) -> list[int]:
    """The ids of one image as PixtralProcessor.replace_image_token expands an h x w token grid."""
    ids = ([IMG] * w + [BRK]) * h
    ids[-1] = END
    return ids


def test_expansions_are_what_the_processors_write():
    tiled = _idefics3_image(1, 2, 2)
    f, g = FAKE, GLOBAL
    r1, r2 = _row_col(1, 1), _row_col(1, 2)
    assert tiled == [f, r1, IMG, IMG, f, r2, IMG, IMG, NL, NL, f, g, IMG, IMG, f]
    assert _idefics3_image(0, 0, 3) == [f, g, IMG, IMG, IMG, f]
    assert _pixtral_image(2, 3) == [IMG, IMG, IMG, BRK, IMG, IMG, IMG, END]


# --------------------------------------------------------------------------------------------------
# Token ids -> kinds and groups
# --------------------------------------------------------------------------------------------------


def _layout(ids, **kw):
    return hk.hf.kinds_from_input_ids(torch.tensor(ids), voco_token_id=VOCO, return_groups=True, **kw)


def test_llava_runs_are_images():
    kinds, groups = _layout([5, IMG, IMG, VOCO, 6, IMG, VOCO, 7], image_token_id=IMG)
    assert kinds.tolist() == [T, V, V, C, T, V, C, T]
    assert groups.tolist() == [-1, 0, 0, 0, -1, 1, 1, -1]
    assert kinds.dtype == groups.dtype == torch.long


def test_llava_images_back_to_back_split_by_image_seq_length():
    """LLaVA-1.5 writes each image as image_seq_length placeholders and nothing else: two images
    written back to back are one run, which the length splits (the config's preset gives it)."""
    tokens = image_tokens(LlavaConfig(image_token_id=IMG, image_seq_length=2))
    ids, _ = hk.hf.insert_voco_tokens(
        torch.tensor([[5, IMG, IMG, IMG, IMG, 6]]), **tokens, voco_token_id=VOCO
    )
    assert ids[0].tolist() == [5, IMG, IMG, VOCO, IMG, IMG, VOCO, 6]
    kinds, groups = _layout(ids[0].tolist(), **tokens, num_voco=1)
    assert groups.tolist() == [-1, 0, 0, 0, 1, 1, 1, -1]
    with pytest.raises(ValueError, match="voco_token_id must be one id"):
        hk.hf.insert_voco_tokens(ids, image_token_id=IMG, voco_token_id=[VOCO, VOCO + 1])
    with pytest.raises(ValueError, match="is one of the image token ids"):
        hk.hf.insert_voco_tokens(ids, image_token_id=IMG, voco_token_id=torch.tensor(IMG))
    with pytest.raises(ValueError, match="num_voco must be None or an int >= 1"):
        _layout(ids[0].tolist(), **tokens, num_voco=1.9)


def test_pixtral_rows_are_one_image():
    ids = [5, *_pixtral_image(2, 2), VOCO, 6, *_pixtral_image(1, 3), *_pixtral_image(2, 1), VOCO, 7]
    kinds, groups = _layout(ids, **PIXTRAL)
    assert kinds.tolist() == [T, *[V] * 6, C, T, *[V] * 4, *[V] * 4, C, T]
    # the last two images touch: separate groups, the <voco> compresses the second only
    assert groups.tolist() == [-1, *[0] * 7, -1, *[1] * 4, *[2] * 5, -1]


def test_idefics3_tiles_are_one_image_and_touching_images_are_two():
    tiled, single = _idefics3_image(2, 2, 2), _idefics3_image(0, 0, 2)
    ids = [5, *tiled, *single, VOCO, 6]
    kinds, groups = _layout(ids, **IDEFICS3)
    n = len(tiled)
    assert kinds.tolist() == [T, *[V] * (n + len(single)), C, T]
    assert groups.tolist() == [-1, *[0] * n, *[1] * len(single), 1, -1]
    # <voco> after each image: then the kinds alone determine the groups (default rule)
    ids = [5, *tiled, VOCO, *single, VOCO, 6]
    kinds, groups = _layout(ids, **IDEFICS3, num_voco=1)
    assert kinds.tolist() == [T, *[V] * n, C, *[V] * len(single), C, T]
    assert torch.equal(hk.StarLayout(kinds).groups[0].long(), groups)
    only_kinds = hk.hf.kinds_from_input_ids(torch.tensor(ids), voco_token_id=VOCO, **IDEFICS3)
    assert torch.equal(only_kinds, kinds)


def test_qwen2_vl_wrappers():
    ids = [5, START, IMG, IMG, STOP, VOCO, 6, START, IMG, STOP, START, IMG, IMG, STOP, VOCO, 7]
    kinds, groups = _layout(ids, **QWEN2_VL)
    assert kinds.tolist() == [T, V, V, V, V, C, T, V, V, V, V, V, V, V, C, T]
    assert groups.tolist() == [-1, 0, 0, 0, 0, 0, -1, 1, 1, 1, 2, 2, 2, 2, 2, -1]
    # Without the wrapper ids (the pre-wrapper behaviour) Qwen2-VL still groups right: wrappers TEXT.
    kinds, groups = _layout(ids, image_token_id=IMG)
    assert kinds.tolist() == [T, T, V, V, T, C, T, T, V, T, T, V, V, T, C, T]
    assert groups.tolist() == [-1, -1, 0, 0, -1, 0, -1, -1, 1, -1, -1, 2, 2, -1, 2, -1]


def test_touching_images_need_return_groups():
    ids = torch.tensor([5, *_pixtral_image(1, 2), *_pixtral_image(1, 2), VOCO])
    with pytest.raises(ValueError, match="touches the image before it.*return_groups=True"):
        hk.hf.kinds_from_input_ids(ids, voco_token_id=VOCO, **PIXTRAL)


def test_padding_is_skipped_and_batches_are_per_sample():
    a = [5, *_pixtral_image(1, 2), VOCO, 6]
    b = [*_pixtral_image(2, 1), VOCO, 6, *_pixtral_image(1, 1), VOCO]
    ids = torch.tensor([[0] * (len(b) - len(a)) + a, b])
    mask = (torch.arange(len(b)) >= len(b) - len(a)).long().expand(2, -1).clone()
    mask[1] = 1
    kinds, groups = hk.hf.kinds_from_input_ids(
        ids, voco_token_id=VOCO, num_voco=1, attention_mask=mask, return_groups=True, **PIXTRAL
    )
    pad = len(b) - len(a)
    assert kinds.tolist() == [[P] * pad + [T, V, V, V, C, T], [V, V, V, V, C, T, V, V, C]]
    assert groups.tolist() == [[-1] * pad + [-1, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, -1, 1, 1, 1]]


BAD = {
    "break_outside_image": ([5, BRK, 6], PIXTRAL, "token 61 at position 1 of sample 0 is outside any image"),
    "end_outside_image": ([5, END, 6], PIXTRAL, "outside any image"),
    "image_with_no_end": (
        [5, IMG, IMG, BRK, IMG, 6, 7],
        PIXTRAL,
        "inside the image opened at position 1 .*cut short",
    ),
    "image_with_no_end_at_the_end": (
        [5, IMG, IMG, BRK, IMG],
        PIXTRAL,
        "opened at position 1 .* no end token",
    ),
    "tiles_with_no_global": ([5, *_idefics3_image(1, 2, 2)[:8], 6], IDEFICS3, "inside the image.*cut short"),
    # text written inside an image (Qwen2-VL, Idefics3) is not made VISUAL
    "text_inside_wrapper": (
        [5, START, 6, 7, IMG, IMG, STOP, VOCO],
        QWEN2_VL,
        "token 6 at position 2 .* inside",
    ),
    "text_between_tiles": (
        [5, FAKE, 6, 7, 8, FAKE, GLOBAL, IMG, IMG, FAKE, VOCO, 9],
        IDEFICS3,
        "token 6 at position 2 .* inside",
    ),
    # one id, one role (start = end is Idefics3's, and allowed)
    "break_is_end": ([5, IMG, END, VOCO], {**PIXTRAL, "image_break_token_id": END}, "share the id"),
    "filler_is_break": ([5, IMG, END, VOCO], {**PIXTRAL, "image_filler_token_id": BRK}, "share the id"),
    # LLaVA-1.5: images of image_seq_length placeholders, back to back
    "llava_run_not_a_multiple": (
        [5, IMG, IMG, IMG, VOCO],
        dict(image_token_id=IMG, image_seq_length=2),
        "3 tokens, not a multiple of image_seq_length=2",
    ),
    "two_last_tiles": (
        [FAKE, GLOBAL, IMG, GLOBAL, IMG, FAKE],
        IDEFICS3,
        "second last-tile marker at position 3",
    ),
    "qwen_start_before_end": ([START, IMG, START, IMG, STOP], QWEN2_VL, "no end token .* next image opens"),
    "qwen_empty_image": ([5, START, STOP, 6], QWEN2_VL, "without any image token"),
    "voco_inside_image": ([IMG, VOCO, BRK, IMG, END], PIXTRAL, "position 1 of sample 0 is inside an image"),
    "voco_before_image": ([5, VOCO, IMG, END], PIXTRAL, "no VISUAL run before it"),
    "voco_is_an_image_id": ([5, IMG, END], dict(PIXTRAL, image_break_token_id=VOCO), "overlaps"),
    "last_tile_without_end": ([5, IMG], dict(image_token_id=IMG, image_last_tile_token_id=GLOBAL), "needs"),
    "role_overlaps_image": ([5, IMG], dict(image_token_id=IMG, image_end_token_id=IMG), "overlaps"),
    # an image cut at its start: its placeholders were taken for an image
    "qwen_image_without_start": ([5, IMG, IMG, STOP, VOCO, 6], QWEN2_VL, "outside any image: images open"),
    # ids that int() would coerce: "63" was the ids 6 and 3, 63.7 was 63
    "string_id": ([5, 6, 3, IMG], dict(image_token_id=str(IMG)), "got the string"),
    "float_id": ([5, IMG], dict(image_token_id=[IMG + 0.7]), "integer token ids"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_inconsistent_input_is_a_value_error(case):
    ids, tokens, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        hk.hf.kinds_from_input_ids(torch.tensor(ids), voco_token_id=VOCO, **tokens)


def test_attention_mask_values_and_insert_refusals():
    """An additive mask (0 / -inf) read as keep/drop swapped padding and tokens; <voco> inserted twice
    doubled silently; a tokenizer without a pad token gave a raw TypeError."""
    ids = torch.tensor([[5, IMG, IMG, VOCO, 6]])
    additive = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="attention_mask must hold 0 .padding. and 1"):
        hk.hf.kinds_from_input_ids(ids, image_token_id=IMG, voco_token_id=VOCO, attention_mask=additive)
    with pytest.raises(ValueError, match="already holds voco_token_id"):
        hk.hf.insert_voco_tokens(ids, image_token_id=IMG, voco_token_id=VOCO)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        hk.hf.insert_voco_tokens(ids[:, :3], image_token_id=IMG, voco_token_id=VOCO, pad_token_id=None)
    empty, mask = hk.hf.insert_voco_tokens(
        torch.zeros(0, 3, dtype=torch.long), image_token_id=IMG, voco_token_id=VOCO
    )
    assert empty.shape[0] == mask.shape[0] == 0


def test_image_tokens_from_a_real_llava_processor():
    """transformers 5's LlavaProcessor has no image_seq_length (it counts each image's placeholders from
    the crop size): the preset read it and crashed."""
    pytest.importorskip("PIL")
    from transformers import CLIPImageProcessor, LlavaProcessor

    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(),  # crop 224
        tokenizer=_tokenizer(["<image>"]),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    assert image_tokens(proc) == {"image_token_id": 1, "image_seq_length": (224 // 14) ** 2}


def test_num_voco_counts_per_image():
    ids = torch.tensor([5, *_pixtral_image(1, 2), VOCO, VOCO, 6, *_pixtral_image(1, 1), 7])
    with pytest.raises(ValueError, match="image at position 7 of sample 0 is not followed by 2"):
        hk.hf.kinds_from_input_ids(ids, voco_token_id=VOCO, num_voco=2, **PIXTRAL)
    with pytest.raises(ValueError, match="has 2 <voco> tokens at position 4, expected num_voco=1"):
        hk.hf.kinds_from_input_ids(ids, voco_token_id=VOCO, num_voco=1, **PIXTRAL)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_insert_voco_tokens_goes_after_the_whole_image(padding_side):
    tiled, single = _idefics3_image(1, 2, 2), _idefics3_image(0, 0, 2)
    rows = [[5, *tiled, *single, 6], [7, *single, 8]]
    ids = torch.zeros(2, len(rows[0]), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, -len(r) :], mask[b, -len(r) :] = torch.tensor(r), 1
    new_ids, new_mask = hk.hf.insert_voco_tokens(
        ids, voco_token_id=VOCO, num_voco=2, attention_mask=mask, padding_side=padding_side, **IDEFICS3
    )
    want = [[5, *tiled, VOCO, VOCO, *single, VOCO, VOCO, 6], [7, *single, VOCO, VOCO, 8]]
    length = len(want[0])
    assert new_ids.shape == (2, length)
    for b, w in enumerate(want):
        sl = slice(length - len(w), None) if padding_side == "left" else slice(0, len(w))
        assert new_ids[b, sl].tolist() == w
        assert new_mask[b].sum() == len(w) and bool(new_mask[b, sl].all())
    # round trip: every image followed by its <voco> tokens
    hk.hf.kinds_from_input_ids(new_ids, voco_token_id=VOCO, num_voco=2, attention_mask=new_mask, **IDEFICS3)
    with pytest.raises(ValueError, match="outside any image"):
        hk.hf.insert_voco_tokens(torch.tensor([5, GLOBAL, 6]), voco_token_id=VOCO, **IDEFICS3)


# --------------------------------------------------------------------------------------------------
# Presets from configs and processors
# --------------------------------------------------------------------------------------------------


def _tokenizer(tokens: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(["<unk>", *tokens])}
    model = models.WordLevel(vocab, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), unk_token="<unk>")


def _processor(name: str, **attrs):
    """A stand-in with the class name and the attributes the real processor sets in __init__ (the
    real ones need torchvision / PIL / num2words, absent here)."""
    return type(name, (), attrs)()


def test_image_tokens_from_configs():
    assert image_tokens(LlavaConfig(image_token_id=IMG)) == {"image_token_id": IMG, "image_seq_length": 576}
    qwen = Qwen2VLConfig(
        image_token_id=IMG, video_token_id=58, vision_start_token_id=START, vision_end_token_id=STOP
    )
    assert image_tokens(qwen) == {
        "image_token_id": [IMG, 58],
        "image_start_token_id": START,
        "image_end_token_id": STOP,
    }
    for config in (Mistral3Config(), SmolVLMConfig()):
        with pytest.raises(ValueError, match="pass the processor"):
            image_tokens(config)
    with pytest.raises(ValueError, match="no preset for LlamaConfig"):
        image_tokens(LlamaConfig())


def test_image_tokens_from_processors():
    markers = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = _tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", *markers])
    smol = _processor(
        "SmolVLMProcessor",
        tokenizer=tok,
        image_token="<image>",
        fake_image_token="<fake_token_around_image>",
        global_image_token="<global-img>",
    )
    assert image_tokens(smol) == {
        "image_token_id": 1,
        "image_start_token_id": 2,
        "image_break_token_id": list(range(4, 40)),
        "image_end_token_id": 2,
        "image_last_tile_token_id": 3,
        "image_filler_token_id": [0],  # this word-level stand-in writes "\n" as <unk>
    }
    pixtral = _processor(
        "PixtralProcessor",
        tokenizer=tok,
        image_token_id=IMG,
        image_break_token_id=BRK,
        image_end_token_id=END,
    )
    assert image_tokens(pixtral) == PIXTRAL
    qwen_tok = _tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    qwen = _processor("Qwen2VLProcessor", tokenizer=qwen_tok, image_token_id=1, video_token_id=2)
    assert image_tokens(qwen) == {
        "image_token_id": [1, 2],
        "image_start_token_id": 3,
        "image_end_token_id": 4,
    }
    with pytest.raises(ValueError, match="has no token '<\\|vision_start\\|>'"):
        image_tokens(_processor("Qwen2VLProcessor", tokenizer=tok, image_token_id=1, video_token_id=2))
    with pytest.raises(ValueError, match="no preset for FuyuProcessor"):
        image_tokens(_processor("FuyuProcessor", tokenizer=tok))


# --------------------------------------------------------------------------------------------------
# Exactness on tiny VLMs
# --------------------------------------------------------------------------------------------------

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    eos_token_id=None,
)
TILE = 4  # SmolVLM tokens per tile: (16 / 4) ** 2 patches / scale_factor ** 2


def _smolvlm():
    vision = SmolVLMVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    cfg = SmolVLMConfig(
        vision_config=vision, text_config=LlamaConfig(**_TEXT), scale_factor=2, image_token_id=IMG
    )
    return SmolVLMForConditionalGeneration(cfg).eval()


def _mistral3():
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        head_dim=8,
    )
    text = MistralConfig(**_TEXT, head_dim=8)
    cfg = Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMG, spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(cfg).eval()


def _smolvlm_batch():
    """Two samples, two images each (tiled 1x2 and single touching; single, text, tiled 2x2)."""
    images = [[(1, 2), (0, 0)], [(0, 0), (2, 2)]]
    rows = [
        [5, 6, *_idefics3_image(1, 2, TILE), *_idefics3_image(0, 0, TILE), 7, 8],
        [9, *_idefics3_image(0, 0, TILE), 10, *_idefics3_image(2, 2, TILE), 11],
    ]
    tiles = [sum(r * c + 1 for r, c in sample) for sample in images]
    pixels = torch.zeros(2, max(tiles), 3, 16, 16)  # all-zero tiles are padding to SmolVLM
    for b, n in enumerate(tiles):
        pixels[b, :n] = torch.randn(n, 3, 16, 16)
    return rows, {"pixel_values": pixels}, IDEFICS3


# Mistral3: (h, w) token grids; the model sees (8h x 8w)-pixel images (patch 4, spatial merge 2).
_GRIDS = [[(2, 2), (2, 3)], [(1, 2), (3, 1)]]


def _mistral3_batch():
    """Two samples, two images each (touching in the first, text between in the second)."""
    rows = [
        [5, 6, *_pixtral_image(*_GRIDS[0][0]), *_pixtral_image(*_GRIDS[0][1]), 7],
        [8, *_pixtral_image(*_GRIDS[1][0]), 9, 10, *_pixtral_image(*_GRIDS[1][1]), 11, 12],
    ]
    grids = [g for sample in _GRIDS for g in sample]
    pixels = torch.zeros(len(grids), 3, 8 * max(h for h, _ in grids), 8 * max(w for _, w in grids))
    for i, (h, w) in enumerate(grids):
        pixels[i, :, : 8 * h, : 8 * w] = torch.randn(3, 8 * h, 8 * w)
    sizes = torch.tensor([[8 * h, 8 * w] for h, w in grids])
    return rows, {"pixel_values": pixels, "image_sizes": sizes}, PIXTRAL


# Per <voco> (sample 0's two images, then sample 1's): the placeholders of its image, and those the old
# per-run groups let it see (its image's last tile / row only).
PLACEHOLDERS_SEEN = {"smolvlm": ([12, 4, 4, 20], [4, 4, 4, 4]), "mistral3": ([4, 6, 2, 3], [2, 3, 2, 1])}
CASES = {"smolvlm": (_smolvlm, _smolvlm_batch), "mistral3": (_mistral3, _mistral3_batch)}


def _prompts(batch, num_voco):
    """Left-padded ids and mask with <voco> tokens after each image, plus the model's image inputs."""
    rows, images, tokens = batch()
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :], mask[b, length - len(r) :] = torch.tensor(r), 1
    ids, mask = hk.hf.insert_voco_tokens(
        ids, voco_token_id=VOCO, num_voco=num_voco, attention_mask=mask, **tokens
    )
    return ids, mask, images, tokens


def _position_ids(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _dense_logits(model, ids, mask, images, kinds, groups):
    allowed = hk.star_mask(hk.StarLayout(kinds, groups))[:, None]
    dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    model.set_attn_implementation("sdpa")
    return model(input_ids=ids, attention_mask=dense, position_ids=_position_ids(mask), **images).logits


def _star_logits(model, ids, mask, images, **htc):
    hk.hf.enable_star_attention(model)
    return model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), **images, **htc).logits


@pytest.mark.parametrize("num_voco", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_dense_sdpa(case, num_voco):
    make_model, batch = CASES[case]
    model = make_model()
    ids, mask, images, tokens = _prompts(batch, num_voco)
    kinds, groups = hk.hf.kinds_from_input_ids(
        ids, voco_token_id=VOCO, num_voco=num_voco, attention_mask=mask, return_groups=True, **tokens
    )
    assert groups.max(1).values.tolist() == [1, 1]  # two images per sample
    with torch.no_grad():
        ref = _dense_logits(model, ids, mask, images, kinds, groups)
        out = _star_logits(model, ids, mask, images, htc_kinds=kinds, htc_groups=groups)
    keep = mask.bool()
    assert out[keep].isfinite().all()
    assert _rel(out[keep], ref[keep]) <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_voco_sees_the_whole_image_not_its_last_tile_or_row(case):
    make_model, batch = CASES[case]
    model = make_model()
    ids, mask, images, tokens = _prompts(batch, 1)
    kinds, groups = hk.hf.kinds_from_input_ids(
        ids, voco_token_id=VOCO, num_voco=1, attention_mask=mask, return_groups=True, **tokens
    )
    # The old behaviour: only the placeholders are VISUAL, each run of them an image.
    per_run = hk.hf.kinds_from_input_ids(ids, image_token_id=IMG, voco_token_id=VOCO, attention_mask=mask)
    voco = (kinds == C).nonzero().tolist()
    assert voco == (per_run == C).nonzero().tolist() and len(voco) == 4

    def visual_keys_seen(layout):  # per <voco>: the placeholder positions it attends
        seen = hk.star_mask(layout) & (ids == IMG)[:, None, :]
        return [seen[b, i].sum().item() for b, i in voco]

    # the placeholders of each image, in order of the <voco> tokens
    whole = [int(((groups[b] == groups[b, i]) & (ids[b] == IMG)).sum()) for b, i in voco]
    assert visual_keys_seen(hk.StarLayout(kinds, groups)) == whole
    old_seen = visual_keys_seen(hk.StarLayout(per_run))
    assert (whole, old_seen) == PLACEHOLDERS_SEEN[case]

    with torch.no_grad():
        new = _star_logits(model, ids, mask, images, htc_kinds=kinds, htc_groups=groups)
        default = _star_logits(model, ids, mask, images, htc_kinds=kinds)  # <voco> separates images
        old = _star_logits(model, ids, mask, images, htc_kinds=per_run)
        ref = _dense_logits(model, ids, mask, images, kinds, groups)
    rows, cols = zip(*voco)
    assert _rel(default[rows, cols], new[rows, cols]) <= 1e-6
    assert _rel(new[rows, cols], ref[rows, cols]) <= 1e-4
    assert _rel(old[rows, cols], ref[rows, cols]) > 1e-2


def test_generate_drops_the_whole_image_from_the_cache():
    model = hk.hf.enable_star_attention(_mistral3())
    ids, mask, images, tokens = _prompts(_mistral3_batch, 1)
    kinds, groups = hk.hf.kinds_from_input_ids(
        ids, voco_token_id=VOCO, num_voco=1, attention_mask=mask, return_groups=True, **tokens
    )
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **images,
        htc_kinds=kinds,
        htc_groups=groups,
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
    )
    seen = ids.shape[1] + 2  # the prompt (PAD slots stay) + the 2 generated tokens fed back
    visual = (kinds == V).sum(1)  # placeholders, [IMG_BREAK] and [IMG_END]
    assert torch.equal(gen.past_key_values.valid_lengths(), seen - visual)


def test_qwen2_vl_generate_with_wrapped_images_and_inserted_voco():
    """Qwen2-VL end to end as docs/hf.md shows it: a new <voco> embedding row, <voco> inserted after
    each <|vision_end|>, mm_token_type_ids rebuilt for M-RoPE, kinds and groups from the config."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    text = Qwen2VLTextConfig(
        **{**_TEXT, "eos_token_id": None},
        bos_token_id=None,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    vision = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=2)
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMG,
        video_token_id=58,
        vision_start_token_id=START,
        vision_end_token_id=STOP,
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.resize_token_embeddings(VOCAB + 1)
    voco = VOCAB
    image = [START, *[IMG] * 4, STOP]  # a 4 x 4 patch grid, spatial merge 2 -> 4 tokens
    ids = torch.tensor([[0, 5, *image, *image, 7], [5, 6, *image, 8, *image]])
    mask = (ids != 0).long()
    tokens = image_tokens(model.config)
    ids, mask = hk.hf.insert_voco_tokens(ids, **tokens, voco_token_id=voco, attention_mask=mask)
    mm_token_type_ids = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
    kinds, groups = hk.hf.kinds_from_input_ids(
        ids, **tokens, voco_token_id=voco, num_voco=1, attention_mask=mask, return_groups=True
    )
    assert kinds[1].tolist() == [T, T, *[V] * 6, C, T, *[V] * 6, C]
    pixels = torch.randn(4 * 16, 3 * 2 * 2 * 2)  # 4 images x 16 patches (temporal 2, 2 x 2)
    grid = torch.tensor([[1, 4, 4]] * 4)
    # Oracle: sdpa with the dense star mask. A 4-D mask defeats Qwen2-VL's own M-RoPE position
    # computation, so both runs get the 3-D position ids the model computes from the 2-D mask.
    pos = model.model.compute_3d_position_ids(
        input_ids=ids,
        inputs_embeds=model.get_input_embeddings()(ids),
        image_grid_thw=grid,
        attention_mask=mask,
        mm_token_type_ids=mm_token_type_ids,
    )
    images = dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm_token_type_ids)
    with torch.no_grad():
        allowed = hk.star_mask(hk.StarLayout(kinds, groups))[:, None]
        dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids, attention_mask=dense, position_ids=pos, **images).logits
        hk.hf.enable_star_attention(model)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, htc_kinds=kinds, htc_groups=groups, **images
        )
    keep = mask.bool()
    assert _rel(out.logits[keep], ref[keep]) <= 1e-4
    # The whole model under htc_star (docs/hf.md "Other ways in"): the model passes the htc_* kwargs
    # on to its vision tower, whose patches are a sequence htc_kinds does not describe: SDPA there.
    model.set_attn_implementation("htc_star")
    with torch.no_grad():
        whole = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, htc_kinds=kinds, htc_groups=groups, **images
        )
    assert torch.equal(whole.logits, out.logits)
    hk.hf.enable_star_attention(model)
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        image_grid_thw=grid,
        mm_token_type_ids=mm_token_type_ids,
        htc_kinds=kinds,
        htc_groups=groups,
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
    )
    seen = ids.shape[1] + 2
    assert torch.equal(gen.past_key_values.valid_lengths(), seen - (kinds == V).sum(1))
