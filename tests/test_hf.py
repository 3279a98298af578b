"""The Hugging Face drop-in (htc_kernels.hf): tiny random LLaMA / Qwen2 (GQA) / LLaVA models, CPU,
offline.

Oracle: the same model with attn_implementation="sdpa" fed the dense 4-D star mask (an additive
float
mask; fully masked PAD rows then give finite garbage, so only non-PAD positions are compared).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import htc_kernels as hk  # noqa: E402
import htc_kernels.hf as hkhf  # noqa: E402
from tests.accuracy import rel as _rel  # noqa: E402
from tests.hf_common import BACKEND, star_backend  # noqa: E402, F401

T, V, C, P = (int(k) for k in hk.TokenKind)
VOCAB = 64


def _tiny_config(config_cls, **overrides):
    """A tiny random config of `config_cls` (2 layers, 4 heads, hidden 32) with `overrides`."""
    args = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return config_cls(**{**args, **overrides})


_TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None)


def _llama(**kw):
    return LlamaForCausalLM(_tiny_config(LlamaConfig, **_TOKEN_IDS, **kw)).eval()


def _qwen2():  # GQA: 6 query heads over 2 key/value heads
    cfg = _tiny_config(
        Qwen2Config, hidden_size=48, num_attention_heads=6, num_key_value_heads=2, **_TOKEN_IDS
    )
    return Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": _llama, "qwen2_gqa": _qwen2}

# [B, S] kinds; left padding, right padding, several images, several voco tokens.
LAYOUTS = {
    "left_pad": [
        [P, P, P, T, V, V, V, C, T, T, T],
        [T, T, V, V, V, V, C, T, T, T, T],
    ],
    "right_pad": [
        [T, V, V, V, C, T, T, P, P, P, P],
        [T, T, T, V, V, C, C, T, T, T, T],
    ],
    "multi_image_multi_voco": [
        [T, V, V, V, C, C, T, V, V, C, C, T, T],
        [P, P, T, V, V, C, C, T, V, V, V, C, C],
    ],
}


def _position_ids(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _dense_mask(kinds, topology="star"):
    allowed = hk.star_mask(hk.StarLayout(kinds, topology=topology))[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _inputs(kinds):
    kinds = torch.tensor(kinds)
    mask = (kinds != P).long()
    ids = torch.randint(2, VOCAB, kinds.shape)
    return ids, mask, kinds


def _dense_logits(model, ids, mask, kinds, topology="star"):
    model.set_attn_implementation("sdpa")
    return model(ids, attention_mask=_dense_mask(kinds, topology), position_ids=_position_ids(mask)).logits


def _star_logits(model, ids, mask, kinds, topology="star"):
    model.set_attn_implementation("htc_star")
    return model(
        ids,
        attention_mask=mask,
        position_ids=_position_ids(mask),
        htc_kinds=kinds,
        htc_topology=topology,
    ).logits


# --------------------------------------------------------------------------------------------------
# Logits and gradients against SDPA with the dense star mask
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("case", sorted(LAYOUTS))
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_logits_match_dense_sdpa(arch, case, topology):
    model = MODELS[arch]()
    ids, mask, kinds = _inputs(LAYOUTS[case])
    with torch.no_grad():
        ref = _dense_logits(model, ids, mask, kinds, topology)
        out = _star_logits(model, ids, mask, kinds, topology)
    keep = mask.bool()
    assert out[keep].isfinite().all()
    assert _rel(out[keep], ref[keep]) <= 1e-4


@pytest.mark.parametrize("topology", ["star", "group"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gradients_match_dense_sdpa(arch, topology):
    model = MODELS[arch]().train()
    ids, mask, kinds = _inputs(LAYOUTS["multi_image_multi_voco"])
    keep = mask.bool()

    def grads(fn):
        model.zero_grad()
        logits = fn(model, ids, mask, kinds, topology)
        logits[keep].float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(_dense_logits)
    out = grads(_star_logits)
    assert ref.keys() == out.keys() and len(ref) > 0
    for name in ref:
        assert _rel(out[name], ref[name]) <= 1e-4, name


def test_without_kinds_is_causal_attention_with_padding():
    model = _qwen2()
    ids, mask, _ = _inputs(LAYOUTS["left_pad"])
    pos = _position_ids(mask)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        model.set_attn_implementation("htc_star")
        out = model(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) <= 1e-4


def test_layout_is_built_once_per_forward(monkeypatch):
    model = _llama(num_hidden_layers=3)
    model.set_attn_implementation("htc_star")
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    calls = []
    original = hkhf.attention._context
    monkeypatch.setattr(hkhf.attention, "_context", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        model(ids, attention_mask=mask, htc_kinds=kinds)
        assert len(calls) == 1
        cache = hk.hf.StarCache()
        out = model(ids, attention_mask=mask, htc_kinds=kinds, past_key_values=cache, use_cache=True)
        assert len(calls) == 2
        for step in range(3):  # decode steps, compacted cache: still one layout per forward
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, attention_mask=mask, htc_kinds=kinds, past_key_values=cache, use_cache=True)
            assert len(calls) == 3 + step


# --------------------------------------------------------------------------------------------------
# Cache compaction and generate
# --------------------------------------------------------------------------------------------------


def _dense_greedy(model, ids, mask, kinds, steps):
    """Oracle: no cache, dense star mask over the whole sequence, generated tokens are TEXT."""
    model.set_attn_implementation("sdpa")
    seq, k, am = ids, kinds, mask
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq, attention_mask=_dense_mask(k), position_ids=_position_ids(am)).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            k = torch.cat([k, torch.full_like(nxt, T)], 1)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
    return seq


@pytest.mark.parametrize("case", ["left_pad", "multi_image_multi_voco"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_generate_with_compaction_matches_dense_full_cache(arch, case):
    model = MODELS[arch]()
    ids, mask, kinds = _inputs(LAYOUTS[case])
    steps = 6
    expected = _dense_greedy(model, ids, mask, kinds, steps)
    hk.hf.enable_star_attention(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        htc_kinds=kinds,
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    cache = out.past_key_values
    assert isinstance(cache, hk.hf.StarCache)
    seen = ids.shape[1] + steps - 1  # the last generated token is never fed back
    n_visual = (kinds == V).sum(1)
    assert cache.get_seq_length() == seen
    assert torch.equal(cache.valid_lengths(), seen - n_visual)
    assert cache.stored_length() == int((seen - n_visual).max())
    # the full-cache htc_star run (plain DynamicCache, nothing dropped) agrees too
    full = model.generate(
        ids,
        attention_mask=mask,
        htc_kinds=kinds,
        max_new_tokens=steps,
        do_sample=False,
        past_key_values=DynamicCache(),
    )
    assert torch.equal(full, expected)


def test_cache_after_prefill_holds_s_minus_visual():
    model = _qwen2()
    model.set_attn_implementation("htc_star")
    ids, mask, kinds = _inputs(LAYOUTS["multi_image_multi_voco"])
    cache = hk.hf.StarCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, htc_kinds=kinds, past_key_values=cache, use_cache=True)
    s = ids.shape[1]
    n_visual = (kinds == V).sum(1)
    assert cache.get_seq_length() == s  # absolute: position ids are not shifted
    # Sample 1's prompt ends with a <voco> run: a later chunk could still bring more <voco> tokens of
    # that image, so its 3 VISUAL keys stay until the next token is processed.
    assert torch.equal(cache.valid_lengths(), s - n_visual + torch.tensor([0, 3]))
    with torch.no_grad():
        nxt = torch.full((2, 1), 5)
        model(
            nxt,
            attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
            htc_kinds=kinds,
            past_key_values=cache,
        )
    s += 1
    assert cache.get_seq_length() == s
    for layer_idx in range(len(cache.layers)):
        assert torch.equal(cache.valid_lengths(layer_idx), s - n_visual)
        assert cache.stored_length(layer_idx) == int((s - n_visual).max())
        slots = cache.layers[layer_idx].slots
        seen = torch.cat([kinds, torch.full_like(kinds[:, :1], T)], 1)
        kept_kinds = torch.where(slots >= 0, seen.gather(1, slots.clamp(min=0)), P)
        assert not (kept_kinds == V).any()


def test_generate_with_star_cache_kinds_without_enable():
    """StarCache(kinds=...) carries the layout: no htc_* kwarg, so generate's kwarg check is
    untouched."""
    model = _llama()
    ids, mask, kinds = _inputs(LAYOUTS["right_pad"][1:])  # one sample, no padding
    expected = _dense_greedy(model, ids, mask, kinds, 4)
    model.set_attn_implementation("htc_star")
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        past_key_values=hk.hf.StarCache(kinds=kinds),
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    assert out.past_key_values.stored_length() == ids.shape[1] + 3 - int((kinds == V).sum())


def test_hand_written_loop_with_compact_cache():
    model = _llama()
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    steps = 4
    expected = _dense_greedy(model, ids, mask, kinds, steps)
    model.set_attn_implementation("htc_star")
    cache = DynamicCache()
    seq, am = ids, mask
    with torch.no_grad():
        out = model(
            ids,
            attention_mask=am,
            position_ids=_position_ids(am),
            htc_kinds=kinds,
            past_key_values=cache,
            use_cache=True,
        )
        assert cache.get_seq_length() == ids.shape[1]  # a plain DynamicCache keeps everything
        cache = hk.hf.compact_cache(cache, kinds)
        assert isinstance(cache, hk.hf.StarCache)
        assert torch.equal(cache.valid_lengths(), ids.shape[1] - (kinds == V).sum(1))
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            out = model(
                nxt,
                attention_mask=am,
                position_ids=_position_ids(am)[:, -1:],
                htc_kinds=kinds,
                past_key_values=cache,
                use_cache=True,
            )
    assert torch.equal(seq, expected)


def test_mistral_sliding_window_wider_than_the_sequence():
    cfg = _tiny_config(MistralConfig, num_key_value_heads=2, sliding_window=16)
    model = MistralForCausalLM(cfg).eval()
    ids, mask, kinds = _inputs(LAYOUTS["multi_image_multi_voco"])  # 13 tokens <= 16
    with torch.no_grad():
        ref = _dense_logits(model, ids, mask, kinds)
        out = _star_logits(model, ids, mask, kinds)
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) <= 1e-4
    model.config.sliding_window = 8
    with torch.no_grad(), pytest.raises(NotImplementedError, match="sliding window"):
        _star_logits(model, ids, mask, kinds)


def test_sliding_window_one_rule_for_every_path():
    """Exact while the window covers every token seen, refused beyond it: the same rule with
    enable_star_attention + generate and with a StarCache passed by hand."""
    cfg = _tiny_config(MistralConfig, num_key_value_heads=2, sliding_window=16)
    model = MistralForCausalLM(cfg).eval()
    ids, mask, kinds = _inputs(LAYOUTS["multi_image_multi_voco"])  # 13 tokens
    expected = _dense_greedy(model, ids, mask, kinds, 4)  # 16 tokens at most: inside the window
    hk.hf.enable_star_attention(model)
    out = model.generate(ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)
    by_hand = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        past_key_values=hk.hf.StarCache(kinds=kinds),
    )
    assert torch.equal(by_hand, expected)
    for cache in (None, hk.hf.StarCache(kinds=kinds)):
        kw = {"htc_kinds": kinds} if cache is None else {"past_key_values": cache}
        with pytest.raises(NotImplementedError, match="sliding window"):
            model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kw)


# --------------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------------

IMAGE_ID, VOCO_ID = 63, 62


def _llava():
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=None,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-1
    )
    return LlavaForConditionalGeneration(cfg).eval()


def test_llava_runs_with_htc_star_on_its_text_model():
    model = _llava()
    n_patches = 4  # (16 / 8) ** 2, the CLS feature is dropped ("default" strategy)
    ids = torch.tensor([[5, 6, *[IMAGE_ID] * n_patches, VOCO_ID, 7, 8, 9]] * 2)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0  # left padding
    pixels = torch.randn(2, 3, 16, 16)
    kinds = hk.hf.kinds_from_input_ids(
        ids, image_token_id=IMAGE_ID, voco_token_id=VOCO_ID, num_voco=1, attention_mask=mask
    )
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=_dense_mask(kinds),
            position_ids=_position_ids(mask),
        ).logits
        hk.hf.enable_star_attention(model)
        assert model.config.text_config._attn_implementation == "htc_star"
        assert model.config.vision_config._attn_implementation == "sdpa"
        out = model(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=mask,
            position_ids=_position_ids(mask),
            htc_kinds=kinds,
        ).logits
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) <= 1e-4
    gen = model.generate(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=mask,
        htc_kinds=kinds,
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert gen.sequences.shape == (2, ids.shape[1] + 3)
    seen = ids.shape[1] + 2  # prompt + the 2 generated tokens fed back
    assert torch.equal(gen.past_key_values.valid_lengths(), torch.full((2,), seen - n_patches))


# --------------------------------------------------------------------------------------------------
# Bad inputs: a clear error before any attention runs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def attention_calls(monkeypatch):
    calls = []
    original = hkhf.attention.star_attention
    monkeypatch.setattr(
        hkhf.attention, "star_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    return calls


BAD_INPUTS = {
    "wrong_length": (lambda k: k[:, :-2], "htc_kinds has 9 positions"),
    "voco_without_image": (
        lambda k: torch.tensor([[T, C, T, T, T, T, T, T, T, T, T]] * 2),
        "no VISUAL run before",
    ),
    "other_device": (lambda k: k.to("meta"), "htc_kinds is on meta"),
    "bad_batch": (lambda k: torch.cat([k, k, k]), r"htc_kinds must be \[B, S\]"),
    # Cast before validation, these were truncated (1.6 -> VISUAL) or wrapped (257 -> VISUAL).
    "float_kinds": (lambda k: k.float() + 0.6 * (k == V), "must be an integer tensor"),
    "wrapping_kinds": (lambda k: k + 256 * (k == V), "257 is not a TokenKind"),
    # Padding comes from attention_mask: a PAD kind at a kept token dropped that token silently.
    "pad_at_a_token": (lambda k: torch.cat([k[:, :-1], torch.full_like(k[:, :1], P)], 1), "is PAD but"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_inputs_raise_before_attention(bad, attention_calls):
    model = _llama()
    model.set_attn_implementation("htc_star")
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    make, match = BAD_INPUTS[bad]
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        model(ids, attention_mask=mask, htc_kinds=make(kinds))
    assert attention_calls == []


@pytest.mark.parametrize("bad", ["wrong_length", "voco_without_image", "other_device"])
def test_bad_inputs_raise_in_generate(bad, attention_calls):
    model = hk.hf.enable_star_attention(_llama())
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    make, _ = BAD_INPUTS[bad]
    with pytest.raises(ValueError, match="htc_kinds|VISUAL"):
        model.generate(ids, attention_mask=mask, htc_kinds=make(kinds), max_new_tokens=2, do_sample=False)
    assert attention_calls == []


def test_four_d_mask_is_rejected():
    model = _llama()
    model.set_attn_implementation("htc_star")
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    with torch.no_grad(), pytest.raises(ValueError, match="2-D attention_mask"):
        model(ids, attention_mask=_dense_mask(kinds), htc_kinds=kinds)


# --------------------------------------------------------------------------------------------------
# Helpers and registration
# --------------------------------------------------------------------------------------------------


def test_kinds_from_input_ids():
    ids = torch.tensor([[0, 0, 5, 9, 9, 8, 9, 4, 4, 6], [5, 9, 9, 4, 4, 6, 9, 4, 4, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    kinds = hk.hf.kinds_from_input_ids(
        ids, image_token_id=[9, 8], voco_token_id=4, num_voco=2, attention_mask=mask
    )
    assert kinds.tolist() == [[P, P, T, V, V, V, V, C, C, T], [T, V, V, C, C, T, V, C, C, T]]
    assert kinds.dtype == torch.long
    with pytest.raises(ValueError, match="expected num_voco=3"):
        hk.hf.kinds_from_input_ids(ids[1:], image_token_id=[9, 8], voco_token_id=4, num_voco=3)
    with pytest.raises(ValueError, match="not followed by"):
        hk.hf.kinds_from_input_ids(torch.tensor([5, 9, 9, 6]), image_token_id=9, voco_token_id=4, num_voco=1)
    with pytest.raises(ValueError, match="no VISUAL run before"):
        hk.hf.kinds_from_input_ids(torch.tensor([5, 4, 9, 6]), image_token_id=9, voco_token_id=4)


def test_insert_voco_tokens():
    ids = torch.tensor([[0, 5, 9, 9, 6], [5, 9, 6, 9, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    new_ids, new_mask = hk.hf.insert_voco_tokens(
        ids, image_token_id=9, voco_token_id=4, num_voco=2, attention_mask=mask, pad_token_id=0
    )
    assert new_ids.tolist() == [[0, 0, 0, 5, 9, 9, 4, 4, 6], [5, 9, 4, 4, 6, 9, 4, 4, 6]]
    assert new_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9]
    right, _ = hk.hf.insert_voco_tokens(
        ids,
        image_token_id=9,
        voco_token_id=4,
        num_voco=1,
        attention_mask=mask,
        pad_token_id=0,
        padding_side="right",
    )
    assert right.tolist() == [[5, 9, 9, 4, 6, 0, 0], [5, 9, 4, 6, 9, 4, 6]]


def test_registration_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    hkhf._register()
    hkhf._register()
    assert AttentionInterface._global_mapping["htc_star"] is hkhf.star_attention_forward
    assert AttentionMaskInterface._global_mapping["htc_star"] is hkhf.star_attention_mask
    assert "htc_star" not in (
        set(AttentionInterface._global_mapping) - set(AttentionMaskInterface._global_mapping)
    )


def test_enable_star_attention_is_instance_local():
    a, b = _llama(), _llama()
    hk.hf.enable_star_attention(a)
    hk.hf.enable_star_attention(a)  # idempotent
    assert a.config._attn_implementation == "htc_star"
    assert b.config._attn_implementation != "htc_star"
    assert "generate" in a.__dict__ and "generate" not in b.__dict__
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    with pytest.raises(ValueError, match="not used by the model"):
        b.generate(ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=1)


def test_plain_import_does_not_import_transformers():
    code = (
        "import sys, htc_kernels; assert 'transformers' not in sys.modules; "
        "htc_kernels.hf; assert 'transformers' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_insert_voco_tokens_bad_inputs_are_value_errors():
    ids = torch.tensor([[5, 9, 9, 6]])
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\] or \[S\], got shape \(1, 1, 4\)"):
        hk.hf.insert_voco_tokens(ids[None], image_token_id=9, voco_token_id=4)
    with pytest.raises(ValueError, match="integer torch.Tensor"):
        hk.hf.insert_voco_tokens(ids.float(), image_token_id=9, voco_token_id=4)
    with pytest.raises(
        ValueError, match=r"attention_mask \(1, 3\) must have the shape of input_ids \(1, 4\)"
    ):
        hk.hf.insert_voco_tokens(ids, image_token_id=9, voco_token_id=4, attention_mask=torch.ones(1, 3))


# --------------------------------------------------------------------------------------------------
# Exact or refused (issue 14): every model gets the star mask it asked for, or an error first
# --------------------------------------------------------------------------------------------------


def _paligemma():
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    text = GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
    )
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, projection_dim=32)
    return PaliGemmaForConditionalGeneration(cfg).eval()


def test_bidirectional_text_models_are_refused(attention_calls):
    """PaliGemma's text model attends its image+prompt prefix bidirectionally: htc_star refuses it
    (with and without token_type_ids) instead of running another mask."""
    model = hk.hf.enable_star_attention(_paligemma())
    ids = torch.tensor([[IMAGE_ID] * 4 + [2, 3, VOCO_ID, 4, 5]] * 2)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    kinds = hk.hf.kinds_from_input_ids(
        ids, image_token_id=IMAGE_ID, voco_token_id=VOCO_ID, attention_mask=mask
    )
    pixels = torch.randn(2, 3, 16, 16)
    token_types = torch.tensor([[0] * 7 + [1, 1]] * 2)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="prefix-LM"):
        model(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=mask,
            token_type_ids=token_types,
            htc_kinds=kinds,
        )
    with torch.no_grad(), pytest.raises(NotImplementedError, match="bidirectional"):
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask, htc_kinds=kinds)
    assert attention_calls == []


def test_misspelled_htc_kwargs_are_refused(attention_calls):
    model = _llama()
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    model.set_attn_implementation("htc_star")
    with torch.no_grad(), pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['htc_kind'\]"):
        model(ids, attention_mask=mask, htc_kind=kinds)
    hk.hf.enable_star_attention(model)
    with pytest.raises(ValueError, match="htc_kind"):
        model.generate(ids, attention_mask=mask, htc_kind=kinds, max_new_tokens=2)
    assert attention_calls == []


def test_star_arguments_under_another_implementation_are_refused(attention_calls):
    """htc_* kwargs or a StarCache reaching "sdpa" would be ignored (causal attention over every key):
    an enabled model refuses them; any model refuses a StarCache whose update no star attention read."""
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    model = hk.hf.enable_star_attention(_llama())
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        with pytest.raises(
            ValueError, match=r"\['htc_kinds'\] given, but the model's attention implementation is 'sdpa'"
        ):
            model(ids, attention_mask=mask, htc_kinds=kinds)
        with pytest.raises(ValueError, match="past_key_values=StarCache"):
            model(ids, attention_mask=mask, past_key_values=hk.hf.StarCache(), use_cache=True)
        with pytest.raises(ValueError, match="htc_kinds"):
            model.generate(ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=2)
        model(ids, attention_mask=mask)  # no star argument: plain sdpa, as asked
        plain = _llama()  # not enabled: no pre-hook, but the cache notices its update went unread
        plain.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="layer 0 was updated but its attention did not read"):
            plain(ids, attention_mask=mask, past_key_values=hk.hf.StarCache(kinds=kinds), use_cache=True)
    assert attention_calls == []
    hk.hf.enable_star_attention(model)
    with torch.no_grad():  # the refusals left no stale state behind
        model(ids, attention_mask=mask, htc_kinds=kinds, past_key_values=hk.hf.StarCache(), use_cache=True)
    assert attention_calls


def test_output_attentions_behaves_like_sdpa():
    model = _llama()
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, attention_mask=mask, output_attentions=True)
        model.set_attn_implementation("htc_star")
        with pytest.warns(UserWarning, match="output_attentions"):
            out = model(ids, attention_mask=mask, output_attentions=True)
    keep = mask.bool()
    assert _rel(out.logits[keep], ref.logits[keep]) <= 1e-4
    assert out.attentions == ref.attentions


def test_generate_without_cache_matches_dense():
    model = _qwen2()
    ids, mask, kinds = _inputs(LAYOUTS["multi_image_multi_voco"])
    expected = _dense_greedy(model, ids, mask, kinds, 4)
    hk.hf.enable_star_attention(model)
    out = model.generate(
        ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=4, do_sample=False, use_cache=False
    )
    assert torch.equal(out, expected)
    # outside generate(use_cache=False), kinds shorter than the input stay an error
    with torch.no_grad(), pytest.raises(ValueError, match="htc_kinds has"):
        model(torch.cat([ids, ids[:, :1]], 1), htc_kinds=kinds)


def test_cache_refuses_what_it_cannot_compute_exactly():
    """(1) An image's <voco> tokens split by text: with the kinds seen so far a chunk ended the image's
    <voco> run and dropped it, and the later <voco> ran as TEXT (7e-2 rel. error): refused. A single
    prefill is exact. (2) A forward without htc_kinds on a cache still holding VISUAL keys attended
    them as text (2e-1): refused. (3) Another batch size, and cropping a StarStaticCache: clear errors."""
    model = _llama()
    model.set_attn_implementation("htc_star")
    kinds = torch.tensor([[T, V, V, V, C, T, T, C, T, T]])  # the second C is the image's (groups 0)
    ids, mask = torch.randint(2, VOCAB, kinds.shape), torch.ones_like(kinds)
    with torch.no_grad():
        ref = _dense_logits(model, ids, mask, kinds)
        model.set_attn_implementation("htc_star")
        one = model(ids, attention_mask=mask, htc_kinds=kinds, past_key_values=hk.hf.StarCache()).logits
        assert _rel(one, ref) <= 1e-4
        cache = hk.hf.StarCache()
        model(ids[:, :7], attention_mask=mask[:, :7], htc_kinds=kinds[:, :7], past_key_values=cache)
        with pytest.raises(ValueError, match="<voco> token at position 7 .* already dropped"):
            model(ids[:, 7:], attention_mask=mask, htc_kinds=kinds, past_key_values=cache)
        cache = hk.hf.StarCache()  # (2): the prompt ends with <voco>: the image stays until the next token
        model(ids[:, :5], attention_mask=mask[:, :5], htc_kinds=kinds[:, :5], past_key_values=cache)
        with pytest.raises(ValueError, match="still holds image .VISUAL. keys"):
            model(ids[:, 5:6], attention_mask=mask[:, :6], past_key_values=cache)
        with pytest.raises(ValueError, match="holds a batch of 1 but the forward has 2 rows"):
            model(ids[:, 5:6].expand(2, -1), htc_kinds=kinds[:, :6].expand(2, -1), past_key_values=cache)
    static = hk.hf.StarStaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(NotImplementedError, match="cropping"):
        static.crop(2)


@pytest.mark.parametrize("how", ["enable", "compact_cache"])
@pytest.mark.parametrize("cut", [4, 5])  # inside the image; inside its <voco> run
def test_chunked_prefill_keeps_images_until_their_voco(how, cut):
    """Kinds given per chunk: the image split by the chunk boundary must stay in the cache until
    its <voco> tokens (all of them) are processed."""
    model = _llama()
    kinds = torch.tensor([[T, V, V, V, C, C, T, T, T], [P, T, V, V, V, C, C, T, T]])
    ids, mask = torch.randint(2, VOCAB, kinds.shape), (kinds != P).long()
    pos = _position_ids(mask)
    with torch.no_grad():
        ref = _dense_logits(model, ids, mask, kinds)
        if how == "enable":
            hk.hf.enable_star_attention(model)
            cache = hk.hf.StarCache()
        else:
            model.set_attn_implementation("htc_star")
            cache = DynamicCache()
        first = model(
            ids[:, :cut],
            attention_mask=mask[:, :cut],
            position_ids=pos[:, :cut],
            htc_kinds=kinds[:, :cut],
            past_key_values=cache,
        )
        if how == "compact_cache":
            cache = hk.hf.compact_cache(cache, kinds[:, :cut], attention_mask=mask[:, :cut])
        assert torch.equal(cache.valid_lengths(), torch.full((2,), cut))  # nothing dropped yet
        second = model(
            ids[:, cut:],
            attention_mask=mask,
            position_ids=pos[:, cut:],
            htc_kinds=kinds,
            past_key_values=cache,
        )
    out = torch.cat([first.logits, second.logits], 1)
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) <= 1e-4
    assert torch.equal(cache.valid_lengths(), kinds.shape[1] - (kinds == V).sum(1))


def test_static_cache_is_exact():
    model = _qwen2()
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    # without htc_kinds: the same tokens as sdpa (the queries are not the end of the static buffer)
    model.set_attn_implementation("sdpa")
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model.set_attn_implementation("htc_star")
    static = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(static, plain)
    expected = _dense_greedy(model, ids, mask, kinds, 5)
    hk.hf.enable_star_attention(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        htc_kinds=kinds,
        max_new_tokens=5,
        do_sample=False,
        cache_implementation="static",
    )
    assert torch.equal(out, expected)
    with pytest.raises(NotImplementedError, match="StaticLayer"):
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        model(ids, attention_mask=mask, htc_kinds=kinds, past_key_values=cache)
        hk.hf.compact_cache(cache, kinds)


def test_decode_after_compaction_is_plain_causal_attention(monkeypatch):
    """After compaction no VISUAL key is left: a decode step builds no layout and runs no star
    kernel (plain causal attention over the kept keys), and stays exact."""
    model = _llama(num_hidden_layers=3)
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    expected = _dense_greedy(model, ids, mask, kinds, 5)
    hk.hf.enable_star_attention(model)
    calls = []
    for name in ("star_attention", "_full_layout", "StarLayout"):
        original = getattr(hkhf.attention, name)
        monkeypatch.setattr(
            hkhf.attention, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k)
        )
    cache = hk.hf.StarCache()
    seq, am = ids, mask
    with torch.no_grad():
        out = model(ids, attention_mask=am, htc_kinds=kinds, past_key_values=cache)
        assert calls.count("star_attention") == 3  # prefill: the star kernel in every layer
        for _ in range(4):
            calls.clear()
            nxt = out.logits[:, -1:].argmax(-1)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=am, htc_kinds=kinds, past_key_values=cache)
            assert calls == []
    seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(seq, expected)


def test_torch_compile_model():
    """torch.compile(model): forward and backward, a decode step with compaction, and a second
    layout of the same shape (the compiled graph must not keep the first call's mask)."""
    torch._dynamo.reset()
    model = hk.hf.enable_star_attention(_qwen2())
    compiled = torch.compile(model)
    first = LAYOUTS["multi_image_multi_voco"]
    second = [[T, T, V, V, V, V, V, C, T, V, C, T, T], [T, V, V, C, T, T, V, V, V, V, C, C, T]]
    for kinds_list in (first, second):
        ids, mask, kinds = _inputs(kinds_list)
        pos = _position_ids(mask)
        with torch.no_grad():
            ref = _dense_logits(model, ids, mask, kinds)
        hk.hf.enable_star_attention(model)
        out = compiled(ids, attention_mask=mask, position_ids=pos, htc_kinds=kinds).logits
        keep = mask.bool()
        assert _rel(out[keep], ref[keep]) <= 1e-4
        out[keep].pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.isfinite().all() for g in grads)
        model.zero_grad()
    cache = hk.hf.StarCache()
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask, position_ids=pos, htc_kinds=kinds, past_key_values=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        am = torch.cat([mask, torch.ones_like(nxt)], 1)
        step = compiled(
            nxt, attention_mask=am, position_ids=pos[:, -1:] + 1, htc_kinds=kinds, past_key_values=cache
        )
        ref = _dense_logits(
            model, torch.cat([ids, nxt], 1), am, torch.cat([kinds, torch.full_like(nxt, T)], 1)
        )
    assert _rel(step.logits[:, -1], ref[:, -1]) <= 1e-4
    assert torch.equal(cache.valid_lengths(), am.sum(1) - (kinds == V).sum(1))


def _gemma(config_name, model_name, **kw):
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    cfg = _tiny_config(config_cls, num_key_value_heads=2, head_dim=8, **_TOKEN_IDS, **kw)
    return model_cls(cfg).eval()


def test_gemma3_sliding_layers_inside_the_window():
    """Gemma3 (sliding-window layers, window 16): exact while every token seen fits the window,
    with enable_star_attention + generate too; refused past it."""
    model = _gemma("Gemma3TextConfig", "Gemma3ForCausalLM", sliding_window=16)
    ids, mask, kinds = _inputs(LAYOUTS["multi_image_multi_voco"])  # 13 tokens
    with torch.no_grad():
        ref = _dense_logits(model, ids, mask, kinds)
        out = _star_logits(model, ids, mask, kinds)
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) <= 1e-4
    expected = _dense_greedy(model, ids, mask, kinds, 3)
    hk.hf.enable_star_attention(model)
    assert torch.equal(
        model.generate(ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=3, do_sample=False), expected
    )
    with pytest.raises(NotImplementedError, match="sliding window"):
        model.generate(ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=8, do_sample=False)


def test_gemma2_logit_softcapping_is_applied():
    """Gemma2's attn_logit_softcapping reaches the kernel (oracle: eager attention, which caps, fed
    the dense star mask); at these score scales ignoring the cap would change the logits."""
    model = _gemma(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        sliding_window=64,
        attn_logit_softcapping=2.0,
        query_pre_attn_scalar=1,
    )
    with torch.no_grad():
        for layer in model.model.layers:  # trained-model score scales: the cap matters
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    ids, mask, kinds = _inputs(LAYOUTS["multi_image_multi_voco"])
    keep = mask.bool()

    def eager(softcap):
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = softcap
        model.set_attn_implementation("eager")
        return model(ids, attention_mask=_dense_mask(kinds), position_ids=_position_ids(mask)).logits

    with torch.no_grad():
        uncapped = eager(None)
    ref = eager(2.0)
    assert _rel(uncapped[keep], ref[keep]) > 1e-2
    out = _star_logits(model, ids, mask, kinds)
    assert _rel(out[keep], ref[keep]) <= 1e-4
    grads = []
    for logits in (ref, out):
        model.zero_grad()
        logits[keep].pow(2).mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert _rel(grads[1], grads[0]) <= 1e-4


def test_star_static_cache_compacts_once_and_decodes_plainly(monkeypatch):
    """StarStaticCache: a preallocated buffer as long as the prompt is enough, because the finished
    image leaves it after prefill; decode steps then run plain attention over the fixed buffer."""
    model = _qwen2()
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    steps = 4  # 3 tokens fed back: the kept S - 3 slots + 3 fit in S
    expected = _dense_greedy(model, ids, mask, kinds, steps)
    hk.hf.enable_star_attention(model)
    calls = []
    original = hkhf.attention.star_attention
    monkeypatch.setattr(
        hkhf.attention, "star_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    cache = hk.hf.StarStaticCache(model.config, max_cache_len=ids.shape[1])
    out = model.generate(
        ids,
        attention_mask=mask,
        htc_kinds=kinds,
        max_new_tokens=steps,
        do_sample=False,
        past_key_values=cache,
    )
    assert torch.equal(out, expected)
    assert len(calls) == model.config.num_hidden_layers  # the prefill only
    seen = ids.shape[1] + steps - 1
    assert int(cache.get_seq_length()) == seen
    assert torch.equal(cache.valid_lengths(), seen - (kinds == V).sum(1))
    assert cache.layers[0].keys.shape[2] == ids.shape[1]  # the buffer was never reallocated


# --------------------------------------------------------------------------------------------------
# Decoders beyond plain attention layers, and attention arguments htc_star does not compute
# --------------------------------------------------------------------------------------------------


def _lfm2():  # a hybrid decoder: a convolution layer, then an attention layer
    from transformers import Lfm2Config, Lfm2ForCausalLM

    types = ["conv", "full_attention"]
    cfg = _tiny_config(Lfm2Config, num_key_value_heads=2, layer_types=types, **_TOKEN_IDS)
    return Lfm2ForCausalLM(cfg).eval()


def test_hybrid_decoder_generate_compacts_its_attention_layers():
    """LFM2 (convolution + attention layers): enable_star_attention's StarCache holds transformers'
    own state for the convolution layer and drops finished images from the attention layer."""
    model = _lfm2()
    ids, mask, kinds = _inputs(LAYOUTS["right_pad"][1:])  # one sample, no padding
    steps = 4
    expected = _dense_greedy(model, ids, mask, kinds, steps)
    hk.hf.enable_star_attention(model)
    out = model.generate(
        ids, htc_kinds=kinds, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    cache = out.past_key_values
    assert isinstance(cache, hk.hf.StarCache)
    assert not isinstance(cache.layers[0], hk.hf.cache.StarLayer)
    assert isinstance(cache.layers[1], hk.hf.cache.StarLayer)
    seen = ids.shape[1] + steps - 1
    assert cache.get_seq_length() == seen
    assert torch.equal(cache.valid_lengths(), seen - (kinds == V).sum(1))  # the first attention layer
    with pytest.raises(ValueError, match="layer 0 is a"):
        cache.valid_lengths(0)


def test_star_cache_refuses_layer_types_it_cannot_hold():
    cfg = _tiny_config(LlamaConfig, **_TOKEN_IDS)
    cfg.layer_types = ["full_attention", "hybrid"]
    with pytest.raises(NotImplementedError, match="layer 1 is of type 'hybrid'"):
        hk.hf.StarCache(config=cfg)
    with pytest.raises(NotImplementedError, match=r"\['conv'\] layers"):
        hk.hf.StarStaticCache(_lfm2().config, max_cache_len=8)


@pytest.mark.parametrize("implementation", ["dynamic", "hybrid", "static"])
def test_generation_config_cache_implementation(implementation):
    """A generation config naming a cache: "dynamic" and the deprecated "hybrid" get a StarCache
    (compacted); "static" gets transformers' static cache (nothing dropped). Tokens are exact."""
    model = _llama()
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    steps = 4
    expected = _dense_greedy(model, ids, mask, kinds, steps)
    model.generation_config.cache_implementation = implementation
    hk.hf.enable_star_attention(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        htc_kinds=kinds,
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    assert isinstance(out.past_key_values, hk.hf.StarCache) == (implementation != "static")


def _gpt_oss():  # attention sinks (s_aux)
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = _tiny_config(
        GptOssConfig,
        intermediate_size=32,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention", "full_attention"],
        **_TOKEN_IDS,
    )
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 3)
    return model


def test_attention_sinks_are_refused(attention_calls):
    """GPT-OSS passes its sinks as s_aux: they change every row's softmax (checked here against
    the model's eager attention), so htc_star refuses them instead of attending without."""
    model = _gpt_oss()
    ids = torch.randint(2, VOCAB, (1, 10))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        with_sinks = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
        without = model(ids).logits
        assert _rel(with_sinks, without) > 0.01  # the case is one the refusal matters for
        model.set_attn_implementation("htc_star")
        with pytest.raises(NotImplementedError, match="attention sinks"):
            model(ids)
    assert attention_calls == []


@pytest.mark.parametrize("name", ["position_bias", "cu_seq_lens_q", "cu_seq_lens_k", "sinks"])
def test_attention_arguments_htc_star_does_not_compute_are_refused(name, attention_calls):
    """Arguments other models pass to their attention function (an additive position bias,
    flash-attention's packed-sequence offsets, sinks) are refused, not dropped."""

    class Attn(torch.nn.Module):
        is_causal = True
        layer_idx = 0

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    value = {
        "position_bias": torch.randn(1, 2, 6, 6),
        "cu_seq_lens_q": torch.tensor([0, 3, 6], dtype=torch.int32),
        "cu_seq_lens_k": torch.tensor([0, 3, 6], dtype=torch.int32),
        "sinks": torch.randn(2),
    }[name]
    mask = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match=name):
        hkhf.attention.star_attention_forward(Attn(), q, k, v, mask, **{name: value})
    assert attention_calls == []
    hkhf.attention.star_attention_forward(Attn(), q, k, v, mask, **{name: None})  # None: nothing asked


def test_packed_sequences_refusal_says_unpack(attention_calls):
    model = _llama()
    model.set_attn_implementation("htc_star")
    ids = torch.randint(2, VOCAB, (1, 8))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])  # two sequences packed in one row
    with torch.no_grad(), pytest.raises(NotImplementedError, match="unpack them into a padded batch"):
        model(ids, position_ids=position_ids, use_cache=False)  # transformers detects packing without a cache
    assert attention_calls == []


def test_cross_layer_kv_sharing_is_refused(attention_calls):
    """Gemma 4's last layers reuse earlier layers' keys and values (kv_sharing_modes "reuse")."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=8,
        layer_types=["full_attention"] * 4,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        **_TOKEN_IDS,
    )
    model = Gemma4ForCausalLM(cfg).eval()
    model.set_attn_implementation("htc_star")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="share keys and values across layers"):
        model(torch.randint(3, VOCAB, (1, 7)))
    assert attention_calls == []


def test_attention_dropout_in_training_is_refused(attention_calls):
    model = _llama(attention_dropout=0.1)
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    model.set_attn_implementation("htc_star")
    model(ids, attention_mask=mask, htc_kinds=kinds)  # eval: no dropout, runs
    assert attention_calls
    attention_calls.clear()
    model.train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        model(ids, attention_mask=mask, htc_kinds=kinds)
    assert attention_calls == []


def test_generate_takes_one_dimensional_and_batch_one_kinds_per_sample():
    """generate repeats htc_kinds along dim 0 per beam: a 1-D [S] tensor had its positions
    interleaved (silently, with a cache), and a [1, S] one over B > 1 met B * beams rows. Both are
    made [B, S] first."""
    model = hk.hf.enable_star_attention(_qwen2())
    kinds = torch.tensor(LAYOUTS["left_pad"][1])
    ids = torch.randint(2, VOCAB, (2, kinds.shape[0]))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    want = model.generate(ids, htc_kinds=kinds.expand(2, -1), **kw)
    for given in (kinds, kinds[None]):
        assert torch.equal(model.generate(ids, htc_kinds=given, **kw), want)


def test_window_of_a_layer_given_a_mask_dict_is_enforced():
    """A per-layer-type mask dict skips the mask function, where the window rule lived: the layer's
    sliding_window kwarg is checked in the attention function too (the window was dropped)."""
    cfg = _tiny_config(
        Qwen2Config, use_sliding_window=True, sliding_window=8, max_window_layers=1, **_TOKEN_IDS
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation("htc_star")
    ids = torch.randint(2, VOCAB, (1, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="sliding window"):
        model(ids, attention_mask={"full_attention": mask, "sliding_attention": mask})
    with torch.no_grad():  # inside the window: exact, as the plain path
        got = model(
            ids[:, :8], attention_mask={"full_attention": mask[:, :8], "sliding_attention": mask[:, :8]}
        )
        assert torch.equal(got.logits, model(ids[:, :8], attention_mask=mask[:, :8]).logits)


def test_topology_and_backend_values_are_checked_without_kinds(attention_calls):
    model = _llama()
    model.set_attn_implementation("htc_star")
    ids, mask, _ = _inputs(LAYOUTS["left_pad"])
    for kw, match in (
        (dict(htc_topology="stars"), "htc_topology='stars'"),
        (dict(htc_backend="gpu"), "htc_backend"),
    ):
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            model(ids, attention_mask=mask, **kw)
    assert attention_calls == []


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, num_return_sequences=3),
    ],
    ids=["beams", "sampled"],
)
def test_beams_and_several_sequences_with_compaction(kw):
    """generate repeats each sample (and htc_kinds) per beam / sequence and reorders the cache: the
    compacted StarCache gives the tokens of recomputing the whole sequence each step."""
    model = hk.hf.enable_star_attention(_qwen2())
    ids, mask, kinds = _inputs(LAYOUTS["left_pad"])
    outs = []
    for extra in ({}, {"use_cache": False}):
        torch.manual_seed(1)
        outs.append(
            model.generate(ids, attention_mask=mask, htc_kinds=kinds, max_new_tokens=6, **kw, **extra)
        )
    assert outs[0].shape[0] == 2 * kw["num_return_sequences"]
    assert torch.equal(outs[0], outs[1])
