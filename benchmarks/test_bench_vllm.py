"""Serving with vLLM (CPU here): N concurrent requests about one image each, HTC-compressed through
HTCKVConnector vs the same language model served with the image's 580 visual tokens as plain prompt
tokens (placeholder ids: the same KV slots and prefill work as embeddings would cost).

Tiny random LLaMA (tests/test_serving.py's, head_dim 32), fp32, vLLM's offline ``LLM`` in its own venv
(``.venv-vllm``; tests/vllm_serving_child.py in a subprocess). One round per provider: the row's time
is the whole subprocess (start-up included); ``extra_info["vllm"]`` holds what matters: requests per
second of the timed batch (after a warm-up batch) and the KV blocks the batch occupies (computed
from each request's prompt and output length and vLLM's block size: what the paged cache allocates).
``HTC_BENCH_VLLM_N`` sets N (default 8).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm") / "bin" / "python"  # as setup_vllm.sh
N = int(os.environ.get("HTC_BENCH_VLLM_N", "8"))
VISUAL = 580  # the paper's visual tokens per image (4 anchors + 576 patches)
BLOCK = 32
OUT_TOKENS = 16


@pytest.fixture(scope="module")
def files():
    """The tiny model's language model and N compressed images (our venv, our torch)."""
    import torch

    from htc_model.serving.export import save_language_model
    from htc_model.serving.kv_format import request_inputs
    from tests.test_serving import PREFIX, _model, _pixels

    tmp = Path(tempfile.mkdtemp(prefix="htc-bench-vllm-"))
    model = _model()
    save_language_model(model, tmp / "lm")
    c = model.compress(_pixels(model.config, N), prefix_ids=torch.tensor(PREFIX))
    reqs = []
    for i in range(N):
        c.export_for_vllm(tmp / f"img{i}.safetensors", model, index=i)
        reqs.append(request_inputs(tmp / f"img{i}.safetensors", [9 + i % 40, 10]))
    return tmp, reqs


def _spec(tmp: Path, provider: str, reqs: list[dict]) -> dict:
    if provider == "htc":
        batch = [{**r, "max_tokens": OUT_TOKENS} for r in reqs]
    else:  # prefix + 580 visual placeholders + <voco> + question, computed by vLLM
        batch = [
            {"prompt_token_ids": [1] * (len(r["prompt_token_ids"]) - 3 + VISUAL) + r["prompt_token_ids"][-3:]}
            | {"max_tokens": OUT_TOKENS}
            for r in reqs
        ]
    llm = {"max_model_len": 1024, "block_size": BLOCK, "max_num_seqs": max(N, 8)}
    phases = [{"name": "warmup", "requests": batch[:2]}, {"name": "timed", "requests": batch}]
    return {
        "model": str(tmp / "lm"),
        "engines": [{"llm": llm, "phases": phases, "connector": provider == "htc"}],
    }


@pytest.mark.parametrize("provider", ["htc", "plain-580"])
def test_bench_vllm(benchmark, files, provider):
    benchmark.group = f"vllm: {N} requests, one image each"
    benchmark.extra_info["provider"] = provider
    if not VLLM_PY.exists():
        reason = f"no vLLM venv at {VLLM_PY} (bash scripts/setup_vllm.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    tmp, reqs = files
    spec = _spec(tmp, provider, reqs)
    (tmp / f"spec-{provider}.json").write_text(json.dumps(spec))
    out_path = tmp / f"out-{provider}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        str(VLLM_PY),
        str(ROOT / "tests" / "vllm_serving_child.py"),
        str(tmp / f"spec-{provider}.json"),
        str(out_path),
    ]

    def run():
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-6000:]

    benchmark.pedantic(run, rounds=1, iterations=1)
    timed = json.loads(out_path.read_text())["engines"][0]["phases"][1]
    assert all(len(r["tokens"]) == OUT_TOKENS for r in timed["requests"])
    batch = spec["engines"][0]["phases"][1]["requests"]
    blocks = sum(math.ceil((len(r["prompt_token_ids"]) + OUT_TOKENS) / BLOCK) for r in batch)
    benchmark.extra_info["vllm"] = {
        "requests": N,
        "requests_per_s": N / timed["wall_s"],
        "batch_s": timed["wall_s"],
        "prompt_tokens_per_request": len(batch[0]["prompt_token_ids"]),
        "kv_blocks": blocks,
        "block_size": BLOCK,
        "output_tokens": OUT_TOKENS,
    }
