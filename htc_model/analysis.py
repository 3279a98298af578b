"""Looking inside a running HTC model: ``<voco>`` attention maps (paper Fig. 3) and the latency
of each inference stage (paper Table 11).

The language model normally runs on ``"htc_star"``, which never forms attention probabilities. To
read them for the ``<voco>`` rows only, the model runs once more on ``"htc_star_probe"``: the same
attention function (so every layer's output, hence the next layer's input, is unchanged), which also
receives a callback through the forward kwargs and hands it each layer's query and key tensors
(after RoPE, exactly what the kernel reads). The callback scores the few ``<voco>`` queries against
the keys and keeps the probabilities of their image's visual keys: O(rows x S) per layer, never S x S.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import htc_kernels.hf as hkhf
from htc_kernels.layout import _PAD, _VISUAL, _VOCO

_PROBE_IMPLEMENTATION = "htc_star_probe"


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``"htc_star"``'s attention, then ``kwargs["voco_probe"](module, query, key, scaling)``."""
    probe = kwargs.pop("voco_probe", None)
    out = hkhf.star_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    if probe is not None:
        probe(module, query, key, scaling, kwargs.get("softcap"))
    return out


def _register() -> None:
    hkhf.attention.STAR_IMPLEMENTATIONS.add(_PROBE_IMPLEMENTATION)
    AttentionInterface.register(_PROBE_IMPLEMENTATION, _probe_attention)
    AttentionMaskInterface.register(_PROBE_IMPLEMENTATION, hkhf.star_attention_mask)


class _VocoProbe:
    """Collects, per layer, the attention probabilities of every ``<voco>`` row over its image's
    VISUAL keys. Rows are ordered image by image (row-major over the batch), then ``<voco>`` by
    ``<voco>``; ``kinds`` / ``groups`` ``[B, S]`` describe the expanded sequence."""

    def __init__(self, kinds: torch.Tensor, groups: torch.Tensor, num_voco: int, num_visual: int):
        voco = (kinds == _VOCO).nonzero()  # [R, 2] (b, i), row-major: image by image
        self.rows_b, self.rows_i = voco[:, 0], voco[:, 1]
        self.num_images = voco.shape[0] // num_voco
        s = kinds.shape[1]
        b_kinds, b_groups = kinds[self.rows_b], groups[self.rows_b]  # [R, S]
        own = groups[self.rows_b, self.rows_i]  # [R]
        j = torch.arange(s, device=kinds.device)
        # DESIGN.md §2 for a VOCO query: causal, no PAD key, a VISUAL key only of its own image.
        visual = b_kinds == _VISUAL
        self.allowed = (
            (j[None] <= self.rows_i[:, None]) & (b_kinds != _PAD) & (~visual | (b_groups == own[:, None]))
        )
        # Its image's VISUAL positions, in order ([anchors; patches] with fusion="pre").
        own_visual = visual & (b_groups == own[:, None])
        self.columns = own_visual.nonzero()[:, 1].view(-1, num_visual)  # [R, num_visual]
        self.num_voco = num_voco
        self.layers: list[torch.Tensor] = []

    def __call__(self, module, query, key, scaling, softcap=None) -> None:
        # query [B, Hq, S, D], key [B, Hkv, S, D] (prefill without a cache: S = the whole sequence)
        hq, hkv, d = query.shape[1], key.shape[1], query.shape[3]
        scale = d**-0.5 if scaling is None else scaling
        scores = []
        for b in self.rows_b.unique_consecutive().tolist():  # per sample: K is never copied per row
            rows = self.rows_i[self.rows_b == b]
            q = query[b, :, rows].float().view(hkv, hq // hkv, rows.numel(), d)
            # GQA: query head h reads key head h // (Hq / Hkv), as transformers' repeat_kv does.
            s = torch.einsum("kgrd,ksd->rkgs", q, key[b].float()).flatten(1, 2) * scale  # [r, Hq, S]
            if softcap is not None:  # the model's soft-capping (Gemma2), as the attention applies it
                s = softcap * torch.tanh(s / softcap)
            scores.append(s)
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
    if not bool((x.kinds == _VOCO).any()):
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


# --------------------------------------------------------------------------------------------------
# latency_breakdown (paper Table 11)
# --------------------------------------------------------------------------------------------------

MODES = ("htc", "vanilla")
_NVTX_DOMAIN = "htc_model"


@dataclass(frozen=True)
class LatencyBreakdown:
    """Milliseconds per inference stage (paper Table 11), each the median over the timed repeats.

    Attributes:
        vision_encoder_ms: CLIP tower (and feature selection).
        mgvq_encoder_ms: MGVQ encoder and quantization (0 without a discrete channel).
        encoders_ms: wall time of both encoders together: overlapped on two CUDA streams when
            ``encoders_parallel``, else sequential (about the sum of the two).
        projection_fusion_ms: P_v, P_d, fusion and building the LM's input (embeddings, kinds).
        prefill_ms: the LM over the whole expanded prompt, to the first token (argmax).
        decode_ms_per_token: one greedy decode step with the cache (the mean over ``decode_tokens``).
        time_to_first_token_ms: wall time from pixels to the first token, measured around the stages
            (so it is about ``encoders_ms + projection_fusion_ms + prefill_ms``).
        kv_bytes: bytes of keys and values the cache holds after the decode steps ("htc": the
            ``<voco>`` and text slots; "vanilla": every position, the visual tokens included).
        mode: ``"htc"`` or ``"vanilla"``; device: where it ran; encoders_parallel: see ``encoders_ms``.
        prompt_length: positions of the expanded prompt (text + visual + ``<voco>``, padded);
        decode_tokens: decode steps timed per repeat; repeats: timed runs (after the warm-up ones).
    """

    vision_encoder_ms: float
    mgvq_encoder_ms: float
    encoders_ms: float
    projection_fusion_ms: float
    prefill_ms: float
    decode_ms_per_token: float
    time_to_first_token_ms: float
    kv_bytes: int
    mode: str
    device: str
    encoders_parallel: bool
    prompt_length: int
    decode_tokens: int
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def _annotate():
    """``name -> context manager``: an NVTX range (the ``nvtx`` package; ``torch.cuda.nvtx`` when it
    is missing on CUDA). Without a profiler attached a range costs about a microsecond."""
    try:
        import nvtx
    except ImportError:
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range
        return lambda name: contextlib.nullcontext()
    return lambda name: nvtx.annotate(name, domain=_NVTX_DOMAIN)


class _Clock:
    """Wall-clock stages in ms; on CUDA each boundary waits for the device (so a stage's time is its
    kernels' time, not their launch)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1e3


def _kv_bytes(cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if layer.is_initialized
        for t in (layer.keys, layer.values)
    )


def _encoders(model, pixel_values, parallel: bool, clock: _Clock, rng) -> tuple:
    """``(vision_features, q, vision_ms, mgvq_ms, wall_ms)``; q is ``None`` without a quantizer."""
    has_q = model.discrete_projector is not None
    if not parallel:
        t0 = clock.now()
        with rng("htc.vision_encoder"):
            feats = model._vision_features(pixel_values)
        t1 = clock.now()
        q = None
        if has_q:
            with rng("htc.mgvq_encoder"):
                q = model._quantized_latent(pixel_values)
        t2 = clock.now()
        return feats, q, t1 - t0, (t2 - t1) if has_q else 0.0, t2 - t0
    # The paper's "parallelism potential": the two encoders on their own CUDA streams, each timed by
    # events on its stream, the pair by the wall clock.
    main = torch.cuda.current_stream(clock.device)
    streams = [torch.cuda.Stream(clock.device), torch.cuda.Stream(clock.device)]
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    t0 = clock.now()
    for stream in streams:
        stream.wait_stream(main)
    with torch.cuda.stream(streams[0]):
        events[0].record()
        with rng("htc.vision_encoder"):
            feats = model._vision_features(pixel_values)
        events[1].record()
    with torch.cuda.stream(streams[1]):
        events[2].record()
        with rng("htc.mgvq_encoder"):
            q = model._quantized_latent(pixel_values)
        events[3].record()
    for stream in streams:
        main.wait_stream(stream)
    t1 = clock.now()
    return feats, q, events[0].elapsed_time(events[1]), events[2].elapsed_time(events[3]), t1 - t0


def _run_once(model, ids, mask, pixel_values, mode, decode_tokens, parallel, clock, rng) -> dict:
    lm, cfg = model.language_model, model.config
    t = {}
    start = clock.now()
    feats, q, t["vision_encoder_ms"], t["mgvq_encoder_ms"], t["encoders_ms"] = _encoders(
        model, pixel_values, parallel, clock, rng
    )
    t0 = clock.now()
    with rng("htc.projection_fusion"):
        x = model._expand(ids, mask, pixel_values, visual=model._fuse(feats, q))
    t1 = clock.now()
    # "htc": the star mask and a StarCache (each image's visual KV dropped after its <voco>);
    # "vanilla": LLaVA's causal attention over every token and a cache that keeps them all.
    if mode == "htc":
        cache = hkhf.StarCache()
        star = dict(htc_kinds=x.kinds, htc_groups=x.groups, htc_topology=cfg.topology)
    else:
        cache, star = DynamicCache(), {}
    with rng("htc.prefill"):
        out = lm(
            inputs_embeds=x.inputs_embeds,
            attention_mask=x.attention_mask,
            position_ids=x.position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **star,
        )
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = clock.now()
    attention_mask, position = x.attention_mask, x.position_ids[:, -1:]
    with rng("htc.decode"):
        for _ in range(decode_tokens):
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], 1)
            position = position + 1
            out = lm(
                input_ids=token,
                attention_mask=attention_mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
                **star,
            )
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    t3 = clock.now()
    t.update(
        projection_fusion_ms=t1 - t0,
        prefill_ms=t2 - t1,
        decode_ms_per_token=(t3 - t2) / decode_tokens,
        time_to_first_token_ms=t2 - start,
    )
    return t, _kv_bytes(cache), x.input_ids.shape[1]


@torch.no_grad()
def latency_breakdown(
    model,
    pixel_values,
    input_ids=None,
    attention_mask=None,
    mode: str = "htc",
    decode_tokens: int = 8,
    warmup: int = 1,
    repeats: int = 3,
    parallel_encoders: bool | None = None,
) -> LatencyBreakdown:
    """See :meth:`HTCForConditionalGeneration.latency_breakdown`."""
    if mode not in MODES:
        raise ValueError(f"HTC.latency_breakdown: mode must be one of {MODES}, got {mode!r}")
    for name, value, least in (
        ("decode_tokens", decode_tokens, 1),
        ("warmup", warmup, 0),
        ("repeats", repeats, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"HTC.latency_breakdown: {name} must be an int >= {least}, got {value!r}")
    if pixel_values is None or (isinstance(pixel_values, torch.Tensor) and pixel_values.shape[0] == 0):
        raise ValueError(
            "HTC.latency_breakdown: it times the image encoders too; pass pixel_values [N >= 1, 3, H, W] "
            "(text-only prompts have no breakdown to take)"
        )
    device = model.voco_embeddings.device
    cuda = device.type == "cuda"
    if parallel_encoders is None:
        parallel_encoders = cuda and model.discrete_projector is not None
    if parallel_encoders and not cuda:
        raise ValueError(
            f"HTC.latency_breakdown: parallel_encoders=True needs CUDA streams; the model is on {device} "
            "(on the CPU the encoders run one after the other: pass parallel_encoders=None or False)"
        )
    if parallel_encoders and model.discrete_projector is None:
        raise ValueError("HTC.latency_breakdown: parallel_encoders=True, but the model has no MGVQ encoder")
    if input_ids is None:
        model._check_pixels(pixel_values)
        input_ids = torch.full((pixel_values.shape[0], 1), model.config.image_token_id, device=device)
    model._check_inputs(input_ids, attention_mask, pixel_values)
    lm = model.language_model
    previous = lm.config._attn_implementation
    lm.set_attn_implementation("sdpa" if mode == "vanilla" else hkhf.ATTN_IMPLEMENTATION)
    clock, rng = _Clock(device), _annotate()
    runs = []
    try:
        for i in range(warmup + repeats):
            times, kv_bytes, length = _run_once(
                model,
                input_ids,
                attention_mask,
                pixel_values,
                mode,
                decode_tokens,
                parallel_encoders,
                clock,
                rng,
            )
            if i >= warmup:
                runs.append(times)
    finally:
        lm.set_attn_implementation(previous)
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return LatencyBreakdown(
        **medians,
        kv_bytes=kv_bytes,
        mode=mode,
        device=str(device),
        encoders_parallel=parallel_encoders,
        prompt_length=length,
        decode_tokens=decode_tokens,
        repeats=repeats,
    )
