"""Hugging Face drop-in benchmark (issue 5): KV-cache bytes and decode time per token, with and
without compaction, on a small random LLaMA (GQA) with a LLaVA-shaped prompt
(35 text + 580 visual + 1 voco + 64 text = 680 tokens).

Providers (same weights, same prompt; checked to give the same next-token logits before timing):
    htc                         "htc_star" + hk.hf.StarCache (visual KV dropped after prefill)
    htc_star full cache         "htc_star" + a plain DynamicCache (nothing dropped)
    sdpa dense mask full cache  "sdpa" + the dense 4-D star mask + DynamicCache (VoCo-LLaMA's way)
    sdpa text-only prompt       "sdpa" + DynamicCache on the prompt less its visual tokens (100
                                text tokens): the yardstick of "decode is free" (target: htc within
                                5% of it per token)

One round = ``TOKENS`` greedy decode steps from a copy of the prefilled cache (the copy is made in
the untimed setup). ``extra_info``: ``cache_bytes`` after prefill, ``ms_per_token`` (mean round time
/ TOKENS), ``label`` (the provider's long name), ``backend`` (star_attention backend used).
Absolute times on the shared 2-core machines drift; compare providers within one run.

The decode-is-free target (htc within 5% of the text-only yardstick) is below this machine's drift
between two pytest-benchmark rows timed minutes apart, so the htc row also times the two providers
round by round in alternation (``extra_info["paired"]``: the median of the per-pair time ratios
yardstick / htc) and the target reads that paired ratio.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("pytest_benchmark")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import htc_kernels as hk  # noqa: E402
import htc_kernels.hf  # noqa: E402, F401
from benchmarks.common import paired_ratio, stat_ms  # noqa: E402
from benchmarks.star_peers import hf_additive_mask  # noqa: E402

T, V, C = int(hk.TokenKind.TEXT), int(hk.TokenKind.VISUAL), int(hk.TokenKind.VOCO)
TOKENS = 8
GROUP = "hf decode: llama-gqa 4L h512 llava-prompt 680"


def _backend() -> str:
    try:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key("htc::star_attention", "CPU")
    except RuntimeError:
        ok = False
    return "auto" if ok else "reference"


@pytest.fixture(scope="module")
def setup_case():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    kinds = torch.tensor([[T] * 35 + [V] * 580 + [C] + [T] * 64])
    ids = torch.randint(1, cfg.vocab_size, kinds.shape)
    return model, ids, kinds


TEXT_ONLY = "sdpa text-only prompt"


class _Provider:
    """One way to prefill and decode. ``TEXT_ONLY`` is the yardstick of the decode-is-free target:
    the same model (sdpa, DynamicCache) on a text-only prompt as long as HTC's compacted cache (the
    prompt less its visual tokens), so both decode over the same number of keys."""

    def __init__(self, name, label, model, ids, kinds, backend):
        self.name, self.label = name, label
        self.model, self.ids, self.kinds, self.backend = model, ids, kinds, backend
        self.star = name in ("htc", "htc_star full cache")
        if name == TEXT_ONLY:
            self.ids = ids[kinds != V][None]
            self.kinds = torch.full_like(self.ids, T)

    def _forward(self, ids, kinds_seen, cache):
        m = self.model
        if self.star:
            return m(
                ids,
                htc_kinds=self.kinds,
                htc_backend=self.backend,
                past_key_values=cache,
                use_cache=True,
            )
        if self.name == TEXT_ONLY:
            return m(ids, past_key_values=cache, use_cache=True)
        mask = hf_additive_mask(hk.StarLayout(kinds_seen), ids.shape[1])
        pos = torch.arange(kinds_seen.shape[1] - ids.shape[1], kinds_seen.shape[1])[None]
        return m(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)

    def prefill(self):
        self.model.set_attn_implementation("htc_star" if self.star else "sdpa")
        cache = hk.hf.StarCache() if self.name == "htc" else DynamicCache()
        with torch.no_grad():
            out = self._forward(self.ids, self.kinds, cache)
        return out.logits[:, -1], cache

    def decode(self, first_token, cache, steps):
        self.model.set_attn_implementation("htc_star" if self.star else "sdpa")
        kinds_seen = self.kinds
        tok, logits = first_token, []
        with torch.no_grad():
            for _ in range(steps):
                kinds_seen = torch.cat([kinds_seen, torch.full_like(tok, T)], 1)
                out = self._forward(tok, kinds_seen, cache)
                logits.append(out.logits[:, -1])
                tok = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits, 1)


PAIRS = 30  # ~2 s; the median of 30 per-pair ratios moved by < 1% between runs on an idle machine


def _paired_ratio(htc, first, cache, model, ids, kinds) -> dict:
    """The yardstick's round time over htc's, timed in alternation (common.paired_ratio)."""
    peer = _Provider(TEXT_ONLY, PROVIDERS[TEXT_ONLY], model, ids, kinds, "sdpa")
    peer_last, peer_cache = peer.prefill()
    peer_first = peer_last.argmax(-1, keepdim=True)

    def round_of(prov, tok, c):
        def round_ms():
            c_copy = copy.deepcopy(c)  # not timed
            t0 = time.perf_counter()
            prov.decode(tok, c_copy, TOKENS)
            return (time.perf_counter() - t0) * 1e3

        return round_ms

    return paired_ratio(round_of(htc, first, cache), round_of(peer, peer_first, peer_cache), PAIRS)


def _cache_bytes(cache) -> int:
    return sum(
        layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.is_initialized
    )


PROVIDERS = {
    "htc": "htc_star+compaction",
    "htc_star full cache": "htc_star full cache",
    "sdpa dense mask full cache": "sdpa dense mask full cache",
    TEXT_ONLY: "sdpa, text-only prompt of the compacted length",
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench_hf_decode(benchmark, setup_case, provider):
    model, ids, kinds = setup_case
    backend = _backend()
    prov = _Provider(provider, PROVIDERS[provider], model, ids, kinds, backend)
    last, cache = prov.prefill()
    first = last.argmax(-1, keepdim=True)

    # correctness before timing: the dense-mask full-cache run is the oracle (for the text-only
    # yardstick: the same model without a cache)
    got = prov.decode(first, copy.deepcopy(cache), 2)
    if provider == TEXT_ONLY:
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            seq = torch.cat([prov.ids, first, got[:, 0].argmax(-1, keepdim=True)], 1)
            ref = model(seq).logits[:, -2:]
            ref_last = model(prov.ids).logits[:, -1]
    else:
        oracle = _Provider("sdpa dense mask full cache", "", model, ids, kinds, backend)
        ref_last, ref_cache = oracle.prefill()
        ref = oracle.decode(first, ref_cache, 2)
    assert ((last - ref_last).norm() / ref_last.norm()).item() <= 1e-4
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-4

    n_visual = int((kinds == V).sum())
    expected_len = ids.shape[1] - (n_visual if provider in ("htc", TEXT_ONLY) else 0)
    assert cache.layers[0].keys.shape[-2] == expected_len

    benchmark.group = GROUP
    benchmark.extra_info.update(
        provider=provider,
        label=PROVIDERS[provider],
        backend=backend if prov.star else "sdpa",
        cache_bytes=_cache_bytes(cache),
        cache_positions=expected_len,
        tokens_per_round=TOKENS,
        threads=torch.get_num_threads(),
    )
    if provider == "htc":
        # Issue 14: once compacted, a decode step is plain causal attention over the kept keys, so
        # it costs what the same model costs on a text-only prompt of that length (within 5%).
        benchmark.extra_info["paired"] = {TEXT_ONLY: _paired_ratio(prov, first, cache, model, ids, kinds)}
        benchmark.extra_info["targets"] = [
            {"kind": "speedup", "peer": TEXT_ONLY, "min": round(1 / 1.05, 3), "paired": True}
        ]
    benchmark.pedantic(
        prov.decode,
        setup=lambda: ((first, copy.deepcopy(cache), TOKENS), {}),
        rounds=15,  # ~1 s: blocks of 5 drifted by more than the 5% the target allows
        warmup_rounds=2,
    )
    ms = stat_ms(benchmark, "mean")
    if ms is not None:
        benchmark.extra_info["ms_per_token"] = ms / TOKENS
