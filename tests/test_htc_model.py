"""htc_model: the thin HTC-VLM (tiny random configs, CPU, offline).

Oracle: the same language model weights run with attn_implementation="sdpa" on the same input
embeddings, fed a dense 4-D star mask built here from the paper's rule (DESIGN.md §2) and the
layout this file expects (not the model's own kinds).
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForImageTextToText  # noqa: E402

from htc_model import HTCConfig, HTCForConditionalGeneration  # noqa: E402
from tests.accuracy import rel as _rel  # noqa: E402
from tests.hf_common import star_backend  # noqa: E402, F401

T, V, C, P = 0, 1, 2, 3
IMG, VOCO = 62, 63


def _model(**overrides) -> HTCForConditionalGeneration:
    torch.manual_seed(0)
    return HTCForConditionalGeneration(HTCConfig.tiny(**overrides)).eval()


def _pixels(cfg: HTCConfig, n: int) -> torch.Tensor:
    """``n`` random images, CLIP-normalised as a processor would give them."""
    q = cfg.quantizer_config
    mean, std = torch.tensor(q.image_mean).view(1, 3, 1, 1), torch.tensor(q.image_std).view(1, 3, 1, 1)
    size = cfg.vision_config.image_size
    return (torch.rand(n, 3, size, size) - mean) / std


def _batch():
    """Left padding, two images in each sample, an image first in a row, text between images."""
    ids = torch.tensor(
        [
            [0, 0, 0, 1, 5, IMG, 7, 8, IMG, 9, 10],
            [1, IMG, 11, 12, IMG, 13, 14, 15, 16, 17, 18],
        ]
    )
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 9:] = ids[0, 9:]  # answer tokens only
    labels[1, 6:] = ids[1, 6:]
    return ids, mask, labels


def _expected_layout(ids, mask, cfg):
    """Kinds and groups of the expanded, left-padded sequence, written out from the inputs."""
    n_vis, n_voco = cfg.num_visual_tokens, cfg.num_voco_tokens
    rows = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        kinds, groups, image = [], [], 0
        for t, keep in zip(row, m):
            if not keep:
                continue
            if t == IMG:
                kinds += [V] * n_vis + [C] * n_voco
                groups += [image] * (n_vis + n_voco)
                image += 1
            else:
                kinds.append(T)
                groups.append(-1)
        rows.append((kinds, groups))
    length = max(len(k) for k, _ in rows)
    kinds = torch.tensor([[P] * (length - len(k)) + k for k, _ in rows])
    groups = torch.tensor([[-1] * (length - len(g)) + g for _, g in rows])
    return kinds, groups


def _dense_mask(kinds, groups, topology):
    """Additive ``[B, 1, S, S]`` mask of the star rule, element by element."""
    b, s = kinds.shape
    allowed = torch.zeros(b, s, s, dtype=torch.bool)
    for n in range(b):
        k, g = kinds[n].tolist(), groups[n].tolist()
        for i in range(s):
            for j in range(i + 1):
                if P in (k[i], k[j]):
                    continue
                if k[j] == V:
                    if k[i] == V:
                        ok = j == i if topology == "star" else g[j] == g[i]
                    else:
                        ok = k[i] == C and g[j] == g[i]
                else:
                    ok = True
                allowed[n, i, j] = ok
    return torch.zeros(b, 1, s, s).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


def _oracle_logits(model, x, topology):
    """The LM on sdpa with the dense mask, fed the model's expanded input embeddings."""
    lm = model.language_model
    lm.set_attn_implementation("sdpa")
    try:
        return lm(
            inputs_embeds=x.inputs_embeds,
            attention_mask=_dense_mask(x.kinds, x.groups, topology),
            position_ids=x.position_ids,
        ).logits
    finally:
        lm.set_attn_implementation("htc_star")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_default_config_is_the_paper_model():
    cfg = HTCConfig()
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert cfg.vision_feature_layer == -2 and cfg.num_patches == 576
    assert cfg.num_discrete_features == 14112  # MGVQ f16c32: 32 x 21 x 21
    assert cfg.num_visual_tokens == 580 and cfg.image_seq_length == 581
    assert cfg.text_config.model_type == "llama" and cfg.text_config.hidden_size == 4096
    assert cfg.quantizer_config.mgvq_config.codebook_groups == 8
    assert cfg.quantizer_config.mgvq_config.codebook_size == 16384
    assert (cfg.fusion, cfg.topology, cfg.continuous_projector) == ("pre", "star", "linear")
    assert cfg.discrete_projector_hidden_size == 8192


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(fusion="middle"), "fusion"),
        (dict(topology="ring"), "topology"),
        (dict(continuous_projector="mlp3"), "continuous_projector"),
        (dict(num_voco_tokens=0), "num_voco_tokens"),
        (dict(num_discrete_tokens=-1), "num_discrete_tokens"),
        (dict(voco_token_id=IMG), "must differ"),
        (dict(quantizer_config={"mgvq": "f99"}), "MGVQ"),
        (dict(vision_feature_layer=7), "vision_feature_layer must index"),
    ],
)
def test_bad_config_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        HTCConfig.tiny(**bad)


def test_config_round_trip(tmp_path):
    cfg = HTCConfig.tiny(num_voco_tokens=2, fusion="post", topology="group")
    cfg.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, HTCConfig)
    drop = ("_name_or_path",)
    assert {k: v for k, v in back.to_dict().items() if k not in drop} == {
        k: v for k, v in cfg.to_dict().items() if k not in drop
    }


# --------------------------------------------------------------------------------------------------
# The expanded sequence, logits and gradients against SDPA with the dense star mask
# --------------------------------------------------------------------------------------------------


def test_expanded_sequence_layout_and_embeddings():
    model = _model()
    cfg = model.config
    ids, mask, labels = _batch()
    px = _pixels(cfg, 4)
    with torch.no_grad():
        x = model._expand(ids, mask, px, labels)
        kinds, groups = _expected_layout(ids, mask, cfg)
        assert torch.equal(x.kinds, kinds) and torch.equal(x.groups, groups)
        assert torch.equal(x.attention_mask, (kinds != P).long())
        # Visual positions hold [anchors; patches] computed here from the parts, <voco> its embedding.
        tower = model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        patches = model.continuous_projector(tower)
        from htc_model.mgvq import to_mgvq_pixels

        q = model.quantizer.encode(to_mgvq_pixels(px, source="clip")).quant.flatten(1)
        assert q.shape[1] == cfg.num_discrete_features
        anchors = model.discrete_projector(q).view(4, cfg.num_discrete_tokens, -1)
        visual = x.inputs_embeds[x.kinds == V].view(4, cfg.num_visual_tokens, -1)
        assert torch.allclose(visual, torch.cat([anchors, patches], 1))
        assert torch.equal(x.inputs_embeds[x.kinds == C], model.voco_embeddings.expand(4, -1))
        # labels follow their tokens; every non-text position is ignored
        text = x.kinds == T
        assert torch.equal(x.labels[text], labels[ids != IMG][mask[ids != IMG].bool()])
        assert (x.labels[~text] == -100).all()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(topology="group"),
        dict(fusion="post", num_voco_tokens=2),
        dict(fusion="mean"),
        dict(num_discrete_tokens=0),  # continuous only: the VoCo-LLaMA baseline
        dict(continuous_projector="mlp2x_gelu", num_discrete_tokens=2),
    ],
    ids=["pre-star", "group", "post-2voco", "mean", "voco-llama", "mlp-nd2"],
)
def test_logits_match_dense_sdpa(overrides):
    model = _model(**overrides)
    ids, mask, labels = _batch()
    px = _pixels(model.config, 4)
    with torch.no_grad():
        out = model(ids, pixel_values=px, attention_mask=mask, labels=labels)
        x = model._expand(ids, mask, px, labels)
        ref = _oracle_logits(model, x, model.config.topology)
    kinds, _ = _expected_layout(ids, mask, model.config)
    assert torch.equal(out.kinds, kinds)
    keep = out.attention_mask.bool()
    assert out.logits[keep].isfinite().all()
    assert _rel(out.logits[keep], ref[keep]) <= 1e-4


def test_gradients_match_dense_sdpa():
    model = _model().train()
    ids, mask, labels = _batch()
    px = _pixels(model.config, 4)

    def grads(run):
        model.zero_grad()
        run().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def htc_loss():
        return model(ids, pixel_values=px, attention_mask=mask, labels=labels).loss

    def oracle_loss():
        x = model._expand(ids, mask, px, labels)
        logits = _oracle_logits(model, x, "star")
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), x.labels[:, 1:].flatten(), ignore_index=-100
        )

    out, ref = grads(htc_loss), grads(oracle_loss)
    assert out.keys() == ref.keys()
    trained = {
        "voco_embeddings",
        "continuous_projector.linear_1.weight",
        "discrete_projector.linear_1.weight",
    }
    assert trained <= out.keys()
    assert any(n.startswith("vision_tower.") for n in out)
    assert not any(n.startswith("quantizer.") for n in out)  # frozen tokenizer
    for name in ref:
        # (+ a floor: some gradients are zero in exact arithmetic, e.g. attention key biases)
        assert (out[name] - ref[name]).norm() <= 1e-4 * ref[name].norm() + 1e-8, name


def test_loss_is_on_answer_tokens_only():
    model = _model()
    ids, mask, labels = _batch()
    px = _pixels(model.config, 4)
    with torch.no_grad():
        out = model(ids, pixel_values=px, attention_mask=mask, labels=labels)
        # by hand: next-token cross-entropy over the labelled (answer) tokens of the expanded sequence
        logp = out.logits.log_softmax(-1)
        nll = []
        for b in range(ids.shape[0]):
            expanded = out.attention_mask[b].nonzero().flatten()
            text = expanded[out.kinds[b, expanded] == T]  # the input's text tokens, in order
            original = [p for p in range(ids.shape[1]) if mask[b, p] and ids[b, p] != IMG]
            for pos, p in zip(text.tolist(), original):
                if labels[b, p] != -100:
                    nll.append(-logp[b, pos - 1, ids[b, p]])
        assert len(nll) == int((labels != -100).sum())
        assert torch.allclose(out.loss, torch.stack(nll).mean(), rtol=1e-5)
        # prompt labels do not matter once ignored
        other = labels.clone()
        other[labels == -100] = -100
        out2 = model(ids, pixel_values=px, attention_mask=mask, labels=other)
        assert torch.equal(out.loss, out2.loss)


def test_right_padding_gives_the_same_logits_as_left_padding():
    model = _model()
    ids, mask, _ = _batch()
    right_ids = torch.cat([ids[:1, 3:], torch.zeros_like(ids[:1, :3])], 1)
    right_mask = torch.cat([mask[:1, 3:], mask[:1, :3]], 1)
    px = _pixels(model.config, 2)
    with torch.no_grad():
        a = model(ids[:1], pixel_values=px, attention_mask=mask[:1]).logits
        b = model(right_ids, pixel_values=px, attention_mask=right_mask).logits
    assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad inputs: a ValueError before any encoder runs
# --------------------------------------------------------------------------------------------------


def test_another_attention_implementation_is_refused():
    """Switched to "sdpa", the language model would attend causally over every token: forward,
    compress and generate refuse before any encoder runs; latency_breakdown sets its own."""
    model = _model()
    ids, mask, _ = _batch()
    px = _pixels(model.config, 4)
    model.language_model.set_attn_implementation("sdpa")
    for call in (
        lambda: model(ids, pixel_values=px, attention_mask=mask),
        lambda: model.compress(px[:1]),
        lambda: model.generate(ids, pixel_values=px, attention_mask=mask, max_new_tokens=1),
    ):
        with torch.no_grad(), pytest.raises(ValueError, match="attention implementation is 'sdpa'"):
            call()
    model.latency_breakdown(px[:1], decode_tokens=1, warmup=0, repeats=1)  # mode="htc" sets htc_star
    assert model.language_model.config._attn_implementation == "sdpa"  # and restores the user's choice
    model.language_model.set_attn_implementation("htc_star")
    with torch.no_grad():
        model(ids, pixel_values=px, attention_mask=mask)


@pytest.mark.parametrize(
    "case, match",
    [
        ("voco_in_ids", "<voco>"),
        ("too_few_images", "pixel_values has"),
        ("pad_inside", "padding inside"),
        ("wrong_size", r"\[N, 3, 32, 32\]"),
        ("not_clip_normalised", "source='clip'"),
        ("labels_shape", "labels must have the shape"),
        ("float_ids", "integer tensor"),
        ("position_ids", "computed by the model"),
    ],
)
def test_bad_inputs_raise(case, match):
    model = _model()
    ids, mask, labels = _batch()
    px = _pixels(model.config, 4)
    kw = dict(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels)
    if case == "voco_in_ids":
        kw["input_ids"] = ids.clone()
        kw["input_ids"][1, 3] = VOCO
    elif case == "too_few_images":
        kw["pixel_values"] = px[:3]
    elif case == "pad_inside":
        kw["attention_mask"] = mask.clone().index_put_(
            (torch.tensor([1]), torch.tensor([6])), torch.tensor(0)
        )
    elif case == "wrong_size":
        kw["pixel_values"] = torch.zeros(4, 3, 28, 28)
    elif case == "not_clip_normalised":
        kw["pixel_values"] = px * 10
    elif case == "labels_shape":
        kw["labels"] = labels[:, 1:]
    elif case == "float_ids":
        kw["input_ids"] = ids.float()
    elif case == "position_ids":
        kw["position_ids"] = torch.zeros_like(ids)
    with pytest.raises(ValueError, match=match):
        model(**kw)


# --------------------------------------------------------------------------------------------------
# Saving and loading (offline)
# --------------------------------------------------------------------------------------------------


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = _model()
    ids, mask, _ = _batch()
    px = _pixels(model.config, 4)
    model.save_pretrained(tmp_path)
    for cls in (HTCForConditionalGeneration, AutoModelForImageTextToText):
        back = cls.from_pretrained(tmp_path).eval()
        assert isinstance(back, HTCForConditionalGeneration)
        assert back.language_model.config._attn_implementation == "htc_star"
        sd, back_sd = model.state_dict(), back.state_dict()
        assert sd.keys() == back_sd.keys()
        assert all(torch.equal(sd[k], back_sd[k]) for k in sd)
        with torch.no_grad():
            a = model(ids, pixel_values=px, attention_mask=mask).logits
            b = back(ids, pixel_values=px, attention_mask=mask).logits
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# generate, and compress once / ask many
# --------------------------------------------------------------------------------------------------

PREFIX = torch.tensor([1, 5])
QUESTIONS = (torch.tensor([[7, 8, 9], [0, 10, 11]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
OTHER_QUESTIONS = (torch.tensor([[12, 13], [14, 15]]), torch.ones(2, 2, dtype=torch.long))


def _one_shot_prompt(questions, mask):
    """``[prefix; <image>; question]`` per row, left-padded like the questions."""
    n = questions.shape[0]
    head = torch.cat([PREFIX.expand(n, -1), torch.full((n, 1), IMG)], 1)
    ids, am = [], []
    for q, m in zip(questions, mask):
        row = torch.cat([head[0], q[m.bool()]])
        ids.append(row)
        am.append(torch.ones_like(row))
    length = max(r.numel() for r in ids)
    pad = [length - r.numel() for r in ids]
    ids = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pad, ids)])
    am = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pad, am)])
    return ids, am


def _dense_greedy(model, ids, mask, px, steps):
    """Oracle: no cache; the LM on sdpa with the dense star mask over the whole sequence each step."""
    x = model._expand(ids, mask, px)
    embeds, kinds, groups, am = x.inputs_embeds, x.kinds, x.groups, x.attention_mask
    embed = model.language_model.get_input_embeddings()
    new = []
    lm = model.language_model
    lm.set_attn_implementation("sdpa")
    try:
        for _ in range(steps):
            pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
            logits = lm(
                inputs_embeds=embeds, attention_mask=_dense_mask(kinds, groups, "star"), position_ids=pos
            ).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            new.append(nxt)
            embeds = torch.cat([embeds, embed(nxt)], 1)
            kinds = torch.cat([kinds, torch.full_like(nxt, T)], 1)
            groups = torch.cat([groups, torch.full_like(nxt, -1)], 1)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
    finally:
        lm.set_attn_implementation("htc_star")
    return torch.cat(new, 1)


def _tiny_no_eos(**overrides):
    # no eos: every run generates the same number of tokens, so sequences compare whole
    model = _model(**overrides)
    model.language_model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize(
    "overrides", [{}, dict(num_voco_tokens=2, topology="group")], ids=["star", "group-2voco"]
)
def test_generate_matches_dense_greedy(overrides):
    model = _tiny_no_eos(**overrides)
    ids, mask, _ = _batch()
    px = _pixels(model.config, 4)
    steps = 5
    with torch.no_grad():
        expected = _dense_greedy(model, ids, mask, px, steps)
    out = model.generate(
        ids,
        pixel_values=px,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert torch.equal(out.sequences[:, ids.shape[1] :], expected)
    # the visual keys left the cache (2 images per row): each image costs its <voco> tokens only
    seen = out.past_key_values.get_seq_length()
    kept = out.past_key_values.valid_lengths()
    assert torch.equal(kept, torch.full((2,), seen - 2 * model.config.num_visual_tokens))


def test_compress_once_ask_many_equals_one_shot(tmp_path):
    model = _tiny_no_eos()
    px = _pixels(model.config, 2)
    steps = 6
    compressed = model.compress(px, prefix_ids=PREFIX)
    before = [t.clone() for t in compressed.voco_keys]
    compressed.save(tmp_path / "images.safetensors")
    loaded = type(compressed).load(tmp_path / "images.safetensors")
    for questions, qmask in (QUESTIONS, OTHER_QUESTIONS):
        ids, mask = _one_shot_prompt(questions, qmask)
        one_shot = model.generate(
            ids, pixel_values=px, attention_mask=mask, max_new_tokens=steps, do_sample=False
        )
        for c in (compressed, loaded):
            out = model.generate(
                questions, attention_mask=qmask, compressed=c, max_new_tokens=steps, do_sample=False
            )
            assert torch.equal(out[:, : questions.shape[1]], questions)
            assert torch.equal(out[:, questions.shape[1] :], one_shot[:, ids.shape[1] :])
    assert all(torch.equal(a, b) for a, b in zip(before, compressed.voco_keys))  # never modified
    # two questions about the same image in one batch
    questions, qmask = OTHER_QUESTIONS
    ids, mask = _one_shot_prompt(questions, qmask)
    same = model.generate(
        ids, pixel_values=px[[1, 1]], attention_mask=mask, max_new_tokens=steps, do_sample=False
    )
    out = model.generate(
        questions,
        attention_mask=qmask,
        compressed=compressed.select([1, 1]),
        max_new_tokens=steps,
        do_sample=False,
    )
    assert torch.equal(out[:, questions.shape[1] :], same[:, ids.shape[1] :])


def test_compressed_right_padded_questions_and_returned_sequences():
    """Questions padded on the right continue the compressed prompt like left-padded ones; beams,
    sampled sequences per sample and max_length counted from the caller's input_ids."""
    model = _tiny_no_eos()
    px = _pixels(model.config, 2)
    compressed = model.compress(px, prefix_ids=PREFIX)
    questions, qmask = QUESTIONS  # row 1 left-padded
    right = torch.stack([questions[0], questions[1].roll(-1)]), torch.stack([qmask[0], qmask[1].roll(-1)])
    left = model.generate(
        questions, attention_mask=qmask, compressed=compressed, max_new_tokens=5, do_sample=False
    )
    out = model.generate(
        *right[:1], attention_mask=right[1], compressed=compressed, max_new_tokens=5, do_sample=False
    )
    assert torch.equal(out[:, :3], right[0]) and torch.equal(out[:, 3:], left[:, 3:])
    with pytest.raises(ValueError, match="padding inside"):
        hole = torch.tensor([[1, 1, 1], [1, 0, 1]])
        model.generate(questions, attention_mask=hole, compressed=compressed, max_new_tokens=2)
    # beams and several sequences per sample: the compressed images repeated like generate's inputs
    ids, mask = _one_shot_prompt(questions, qmask)
    kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    one_shot = model.generate(ids, pixel_values=px, attention_mask=mask, **kw)
    beams = model.generate(questions, attention_mask=qmask, compressed=compressed, **kw)
    assert one_shot.shape == (4, ids.shape[1] + 4) and torch.equal(
        one_shot[:, : ids.shape[1]], ids.repeat_interleave(2, 0)
    )
    assert torch.equal(beams[:, 3:], one_shot[:, ids.shape[1] :])
    # max_length counts the caller's tokens, not the expanded prompt's
    out = model.generate(
        ids, pixel_values=px, attention_mask=mask, max_length=ids.shape[1] + 3, do_sample=False
    )
    assert out.shape[1] == ids.shape[1] + 3
    with pytest.raises(ValueError, match="leaves no new token"):
        model.generate(ids, pixel_values=px, attention_mask=mask, max_length=ids.shape[1])


def _kv_bytes_per_token(text_config, itemsize):
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    return 2 * text_config.num_hidden_layers * heads * head_dim * itemsize  # keys and values


def test_compressed_size():
    model = _model(num_voco_tokens=2)
    cfg = model.config
    compressed = model.compress(_pixels(cfg, 3), prefix_ids=PREFIX)
    per_token = _kv_bytes_per_token(cfg.text_config, 4)
    # the prefix once, the <voco> tokens per image
    assert compressed.nbytes == (PREFIX.numel() + 3 * cfg.num_voco_tokens) * per_token
    assert compressed.seq_length == PREFIX.numel() + cfg.num_visual_tokens + cfg.num_voco_tokens
    # The paper's 7B-shaped model in bf16, one image with a BOS prefix: the same formula, from shapes.
    big = HTCConfig()
    per_token = _kv_bytes_per_token(big.text_config, 2)
    visual_kv = big.num_visual_tokens * per_token  # 580 tokens x 32 layers x 4096 x 2 x 2 bytes
    compressed_kv = (1 + big.num_voco_tokens) * per_token
    assert visual_kv == 580 * 32 * 4096 * 2 * 2
    assert visual_kv / compressed_kv >= 100  # 290x


def test_generate_bad_inputs():
    model = _model()
    px = _pixels(model.config, 2)
    compressed = model.compress(px, prefix_ids=PREFIX)
    questions, qmask = QUESTIONS
    with pytest.raises(ValueError, match="1 image"):
        model.generate(questions, attention_mask=qmask, compressed=compressed.select([0]), max_new_tokens=2)
    with pytest.raises(ValueError, match="not both"):
        model.generate(questions, pixel_values=px, compressed=compressed, max_new_tokens=2)
    with pytest.raises(ValueError, match="cannot hold <image>"):
        model.generate(questions.masked_fill(questions == 7, IMG), compressed=compressed, max_new_tokens=2)
    with pytest.raises(ValueError, match="<voco> tokens per image"):
        _model(num_voco_tokens=2).generate(questions, compressed=compressed, max_new_tokens=2)
    with pytest.raises(ValueError, match="computed by the model"):
        model.generate(questions, compressed=compressed, htc_kinds=questions)
    with pytest.raises(ValueError, match="1-D"):
        model.compress(px, prefix_ids=PREFIX[None])
    with pytest.raises(ValueError, match="no image"):
        model.compress(px[:0])
    assert torch.equal(compressed.select([-1]).voco_keys[0], compressed.select([1]).voco_keys[0])


def test_continuous_only_model_refuses_unnormalised_pixels():
    model = _model(num_discrete_tokens=0)
    ids, mask, _ = _batch()
    px = _pixels(model.config, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="source='clip'"):
        model(ids, pixel_values=px * 10, attention_mask=mask)
    with pytest.raises(ValueError, match="source='clip'"):
        model.compress(px[:1] * 10)


def test_another_attention_implementation_at_construction_is_refused(tmp_path):
    _model().save_pretrained(tmp_path)
    for asked in ("eager", {"text_config": "sdpa"}):
        with pytest.raises(ValueError, match="always attends under the star mask"):
            HTCForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=asked)
    model = HTCForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation={"vision_config": "eager"}
    )
    assert model.language_model.config._attn_implementation == "htc_star"
    assert model.vision_tower.config._attn_implementation == "eager"


# --------------------------------------------------------------------------------------------------
# from_llava
# --------------------------------------------------------------------------------------------------


def _tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = HTCConfig.tiny()
    llava_cfg = LlavaConfig(
        vision_config=cfg.vision_config.to_dict(),
        text_config=cfg.text_config.to_dict(),
        image_token_id=IMG,
        vision_feature_layer=-2,
    )
    torch.manual_seed(1)
    return LlavaForConditionalGeneration(llava_cfg).eval()


def test_from_llava(tmp_path):
    from tests.shared_data import MGVQ_FIXTURE

    llava = _tiny_llava()
    llava.save_pretrained(tmp_path / "llava")
    mgvq = MGVQ_FIXTURE if os.path.exists(MGVQ_FIXTURE) else None  # official weights: tiny fixture
    model = HTCForConditionalGeneration.from_llava(str(tmp_path / "llava"), mgvq_checkpoint=mgvq)
    cfg = model.config
    assert (cfg.image_token_id, cfg.voco_token_id, cfg.continuous_projector) == (IMG, IMG + 1, "mlp2x_gelu")
    assert model.language_model.config._attn_implementation == "htc_star"
    px = _pixels(cfg, 2)
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with torch.no_grad():
        # LLaVA's tower and projector give the patches; text alone runs LLaVA's language model
        patches = model._continuous_tokens(px)
        ref = torch.stack(list(llava.get_image_features(px, vision_feature_layer=-2).pooler_output))
        assert torch.allclose(patches, ref, atol=1e-6)
        assert torch.allclose(model(ids).logits, llava(input_ids=ids).logits, atol=1e-5)
        if mgvq is not None:
            from htc_model.mgvq import MGVQTokenizer

            tok = MGVQTokenizer.from_pretrained(mgvq)
            assert all(
                torch.equal(a, b)
                for a, b in zip(tok.state_dict().values(), model.quantizer.state_dict().values())
            )
        mean = llava.get_input_embeddings().weight.mean(0)
        assert torch.allclose(model.voco_embeddings, mean.expand_as(model.voco_embeddings))
    out = model.generate(torch.tensor([[1, IMG, 5]]), pixel_values=px[:1], max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


# --------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "what", "colour", "is", "it", "?", "red", "blue", "and"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _processor():
    pytest.importorskip("PIL", reason="CLIPImageProcessor needs pillow")
    from transformers import CLIPImageProcessor

    from htc_model import HTCProcessor

    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = _tokenizer()
    tokenizer.padding_side = "left"
    return HTCProcessor(images, tokenizer)


def test_processor_adds_tokens_and_feeds_the_model(tmp_path):
    import numpy as np

    proc = _processor()
    assert proc.image_token_id == len(WORDS) and proc.voco_token_id == len(WORDS) + 1
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    batch = proc(text=["<image> what colour is it ?", "<image> and <image> ?"], images=images)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 3
    model = _model(image_token_id=proc.image_token_id, voco_token_id=proc.voco_token_id)
    with torch.no_grad():
        out = model(**batch)
    assert int((out.kinds == C).sum()) == 3
    with pytest.raises(ValueError, match="2 image"):
        proc(text=["<image> <image>", "<image>"], images=images[:2])
    with pytest.raises(ValueError, match="inserts the <voco>"):
        proc(text=["<image> <voco>"], images=images[:1])
    with pytest.raises(ValueError, match=r"per sample the text has \[2, 1\]"):  # same total, regrouped
        proc(text=["<image> <image> what", "<image> ?"], images=[images[:1], images[1:]])
    proc(text=["<image> <image> what", "<image> ?"], images=[images[:2], images[2:]])
    with pytest.raises(ValueError, match=r"ids keep \[0\] \(truncation"):  # the image's place was cut
        proc(text=["what colour is it ? <image>"], images=images[:1], truncation=True, max_length=3)
    for bad in ([], [5], 5):
        with pytest.raises(ValueError, match="text must be a string or a non-empty list of strings"):
            proc(text=bad)
    proc.save_pretrained(tmp_path)
    back = type(proc).from_pretrained(tmp_path)
    assert (back.image_token_id, back.voco_token_id) == (proc.image_token_id, proc.voco_token_id)


# --------------------------------------------------------------------------------------------------
# voco_attention: the <voco> rows of the attention probabilities (paper Fig. 3)
# --------------------------------------------------------------------------------------------------


def _eager_voco_rows(model, x, topology):
    """Oracle: the full ``[B, H, S, S]`` probabilities of the LM on "eager" with the dense star mask;
    then, image by image, its <voco> rows and its visual columns -> ``[N, L, H, n_voco, n_visual]``."""
    lm = model.language_model
    lm.set_attn_implementation("eager")
    try:
        attentions = lm(
            inputs_embeds=x.inputs_embeds,
            attention_mask=_dense_mask(x.kinds, x.groups, topology),
            position_ids=x.position_ids,
            output_attentions=True,
        ).attentions
    finally:
        lm.set_attn_implementation("htc_star")
    per_image = []
    for b in range(x.kinds.shape[0]):
        for g in range(int(x.groups[b].max()) + 1):
            rows = ((x.kinds[b] == C) & (x.groups[b] == g)).nonzero().flatten()
            cols = ((x.kinds[b] == V) & (x.groups[b] == g)).nonzero().flatten()
            per_image.append(torch.stack([a[b][:, rows][:, :, cols] for a in attentions]))
    return torch.stack(per_image)


@pytest.mark.parametrize(
    "overrides", [{}, dict(num_voco_tokens=2, topology="group", fusion="post")], ids=["star", "group-2voco"]
)
def test_voco_attention_equals_dense_eager_rows(overrides):
    model = _model(**overrides)
    cfg = model.config
    ids, mask, _ = _batch()
    px = _pixels(cfg, 4)
    att = model.voco_attention(px, ids, attention_mask=mask)
    heads = cfg.text_config.num_attention_heads
    assert att.shape == (4, 2, heads, cfg.num_voco_tokens, cfg.num_visual_tokens)
    assert att.dtype == torch.float32
    with torch.no_grad():
        ref = _eager_voco_rows(model, model._expand(ids, mask, px), cfg.topology)
    assert (att - ref).abs().max() <= 1e-5
    # a row's mass is its image plus the text/<voco> tokens before it: within (0, 1]
    total = att.sum(-1)
    assert (total > 0).all() and (total <= 1 + 1e-5).all()
    # the htc_star attention is back; right padding gives the same maps
    assert model.language_model.config._attn_implementation == "htc_star"


def test_voco_attention_applies_the_models_softcap():
    """Gemma2 soft-caps its attention scores: the probe's probabilities are the capped ones (eager)."""
    text = dict(
        model_type="gemma2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=None,
        sliding_window=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = _model(text_config=text)
    with torch.no_grad():  # scores large enough for a cap of 0.5 to matter
        for layer in model.language_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    ids = torch.tensor([[1, 5, IMG, 7]])
    px = _pixels(model.config, 1)
    att = model.voco_attention(px, ids)
    with torch.no_grad():
        ref = _eager_voco_rows(model, model._expand(ids, None, px), "star")
    torch.testing.assert_close(att, ref, rtol=1e-4, atol=1e-6)


def test_compressed_images_are_refused_by_another_model(tmp_path):
    """Same shapes, other weights or settings: the compressed KV is not this model's."""
    model = _model()
    px = _pixels(model.config, 2)
    compressed = model.compress(px, prefix_ids=PREFIX)
    compressed.save(tmp_path / "c.safetensors")
    loaded = type(compressed).load(tmp_path / "c.safetensors")
    questions, qmask = QUESTIONS
    model.generate(questions, attention_mask=qmask, compressed=loaded, max_new_tokens=1)  # its own: fine
    retrained = _model()  # the same seed: the same weights, until one changes
    with torch.no_grad():
        retrained.voco_embeddings.add_(1e-3)
    for other in (retrained, _model(topology="group")):
        with pytest.raises(ValueError, match="compressed by another model"):
            other.generate(questions, attention_mask=qmask, compressed=loaded, max_new_tokens=1)
    with pytest.raises(ValueError, match="indices must be integers"):
        compressed.select(torch.tensor([True, False]))
    # Changes no version counter sees: a .data write (fused optimizers step the same way) kept the
    # cached weights fingerprint, and the old images were accepted.
    with torch.no_grad():
        model.language_model.model.layers[0].self_attn.k_proj.weight.data.mul_(1.5)
    with pytest.raises(ValueError, match="compressed by another model"):
        model.generate(questions, attention_mask=qmask, compressed=loaded, max_new_tokens=1)
    # The text config's KV settings (same weights, same shapes): the norm epsilon.
    eps = _model(text_config={**HTCConfig.tiny().text_config.to_dict(), "rms_norm_eps": 0.5})
    with pytest.raises(ValueError, match="compressed by another model"):
        eps.generate(questions, attention_mask=qmask, compressed=compressed, max_new_tokens=1)


def test_compressed_generate_refuses_use_cache_false():
    """The images live only in the compressed cache: without a cache every step after the first re-read
    the placeholder ids standing for them as text (other tokens, silently)."""
    model = _model()
    compressed = model.compress(_pixels(model.config, 2), prefix_ids=PREFIX)
    questions, qmask = QUESTIONS
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(
            questions, attention_mask=qmask, compressed=compressed, max_new_tokens=3, use_cache=False
        )


def test_voco_attention_images_alone_and_bad_inputs():
    model = _model()
    px = _pixels(model.config, 3)
    att = model.voco_attention(px)
    # each image alone: the <voco> row sees only its image and itself
    alone = torch.stack([model.voco_attention(px[i : i + 1])[0] for i in range(3)])
    assert torch.allclose(att, alone, atol=1e-6)
    assert (att.sum(-1) < 1).all()
    with pytest.raises(ValueError, match="no image"):
        model.voco_attention(px[:0], torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        model.voco_attention(torch.zeros(2, 3, 28, 28))


# --------------------------------------------------------------------------------------------------
# latency_breakdown (paper Table 11)
# --------------------------------------------------------------------------------------------------

STAGES = ("vision_encoder", "mgvq_encoder", "projection_fusion", "prefill", "decode")


def test_latency_breakdown(monkeypatch):
    nvtx = pytest.importorskip("nvtx")
    ranges = []
    real = nvtx.annotate

    def annotate(message=None, **kw):
        ranges.append(message)
        return real(message, **kw)

    monkeypatch.setattr(nvtx, "annotate", annotate)
    model = _model()
    cfg = model.config
    ids, mask, _ = _batch()
    px = _pixels(cfg, 4)
    htc = model.latency_breakdown(px, ids, attention_mask=mask, decode_tokens=3, repeats=2)
    assert [f"htc.{s}" for s in STAGES] == ranges[: len(STAGES)]  # every stage inside its range
    assert len(ranges) == len(STAGES) * 3  # one warm-up run, two timed runs
    stages = (htc.vision_encoder_ms, htc.mgvq_encoder_ms, htc.projection_fusion_ms, htc.prefill_ms)
    assert all(t > 0 for t in stages) and htc.decode_ms_per_token > 0
    assert not htc.encoders_parallel and htc.device == "cpu"  # CPU: one encoder after the other
    assert htc.encoders_ms >= 0.9 * (htc.vision_encoder_ms + htc.mgvq_encoder_ms)
    first = htc.encoders_ms + htc.projection_fusion_ms + htc.prefill_ms
    assert 0.7 * htc.time_to_first_token_ms <= first <= 1.3 * htc.time_to_first_token_ms
    assert htc.prompt_length == model._expand(ids, mask, px).input_ids.shape[1]
    assert set(htc.as_dict()) >= {f"{s}_ms" for s in STAGES[:-1]} | {"decode_ms_per_token", "kv_bytes"}
    # vanilla keeps every visual token in the cache; htc keeps the text and <voco> slots only
    vanilla = model.latency_breakdown(
        px, ids, attention_mask=mask, mode="vanilla", decode_tokens=3, repeats=1
    )
    per_token = _kv_bytes_per_token(cfg.text_config, 4)
    assert vanilla.kv_bytes == 2 * (htc.prompt_length + 3) * per_token
    kept = [int(((k != P) & (k != V)).sum()) + 3 for k in model._expand(ids, mask, px).kinds]
    assert htc.kv_bytes == 2 * max(kept) * per_token  # rows left-filled to the longest
    assert model.language_model.config._attn_implementation == "htc_star"
    # no discrete channel: no MGVQ stage
    plain = _model(num_discrete_tokens=0).latency_breakdown(px[:1], repeats=1, decode_tokens=1)
    assert plain.mgvq_encoder_ms == 0 and plain.vision_encoder_ms > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="fast"), "mode"),
        (dict(decode_tokens=0), "decode_tokens"),
        (dict(repeats=0), "repeats"),
        (dict(parallel_encoders=True), "CUDA streams"),
        (dict(input_ids=torch.tensor([[1, IMG, 5, IMG]])), "pixel_values has 1"),
        (dict(decode_tokens=True), "decode_tokens"),  # was taken as 1
        (dict(pixel_values=None, input_ids=torch.tensor([[1, 5]])), "pass pixel_values"),  # AttributeError
        (dict(pixel_values=torch.zeros(0, 3, 32, 32)), "pass pixel_values"),  # a reshape error
    ],
)
def test_latency_breakdown_bad_inputs(kw, match):
    model = _model()
    kw = {"pixel_values": _pixels(model.config, 1), **kw}
    with pytest.raises(ValueError, match=match):
        model.latency_breakdown(**kw)
