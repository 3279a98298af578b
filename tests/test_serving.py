"""htc_model.serving: compressed images served by vLLM (tiny random models, CPU).

Part (a), this venv: the export's re-rotation is exact (a plain LLaMA fed the exported KV at vLLM's
consecutive positions gives the one-shot prompt's logits), refusals, metadata, and the connector's
scheduler-side logic (LoadPlanner) without vLLM.

Part (b), vLLM's venv (``$VLLM_VENV``, default ``.venv-vllm``, relative to the repository root as in
scripts/setup_vllm.sh, which makes it): the same weights served by vLLM through HTCKVConnector
(tests/vllm_serving_child.py in a subprocess) against HF ``generate``, token for token and logprobs;
and the README's OpenAI-server example, run as written. Without that venv these tests skip locally
and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import htc_kernels.hf as hkhf  # noqa: E402
from htc_model import HTCConfig, HTCForConditionalGeneration  # noqa: E402
from htc_model.serving import export, kv_format  # noqa: E402
from htc_model.serving.export import rotate_keys, save_language_model  # noqa: E402
from htc_model.serving.kv_format import LoadPlanner, head_range, read_info, request_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm")  # as scripts/setup_vllm.sh: relative to ROOT
VLLM_PY = VLLM_VENV / "bin" / "python"
IMG = 62
PREFIX = [1, 5, 6, 7]
QUESTIONS = ([9, 10, 11], [12, 13], [14])


def _cpu_kernel_available() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("htc::star_attention", "CPU")
    except RuntimeError:
        return False


@pytest.fixture(autouse=True)
def _backend(monkeypatch):
    monkeypatch.setattr(hkhf, "DEFAULT_BACKEND", "auto" if _cpu_kernel_available() else "reference")


def _text_config(**overrides) -> dict:
    """A tiny LLaMA vLLM's CPU attention accepts (head_dim 32), GQA 4:2."""
    text = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return {**text, **overrides}


def _model(**text_overrides) -> HTCForConditionalGeneration:
    torch.manual_seed(0)
    model = HTCForConditionalGeneration(HTCConfig.tiny(text_config=_text_config(**text_overrides))).eval()
    model.language_model.generation_config.eos_token_id = None  # fixed-length generations compare whole
    return model


def _pixels(cfg: HTCConfig, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = cfg.quantizer_config
    mean, std = torch.tensor(q.image_mean).view(1, 3, 1, 1), torch.tensor(q.image_std).view(1, 3, 1, 1)
    size = cfg.vision_config.image_size
    return (torch.rand(n, 3, size, size, generator=g) - mean) / std


def _one_shot_logits(model, prompt_ids: list[int], px, question: list[int]) -> torch.Tensor:
    """``[len(question), vocab]``: the one-shot model's logits at the question's tokens."""
    ids = torch.tensor([prompt_ids + question])
    return model(ids, pixel_values=px).logits[0, -len(question) :].double()


def _served_logits(lm_dir, path, question: list[int]) -> torch.Tensor:
    """What vLLM computes, in plain transformers: the exported KV as the first n slots, the question
    at positions n.. (a plain LLaMA loaded from the checkpoint vLLM serves)."""
    from safetensors.torch import load_file
    from transformers import DynamicCache

    lm = LlamaForCausalLM.from_pretrained(lm_dir, attn_implementation="eager").eval()
    info = read_info(path)
    tensors = load_file(path)
    cache = DynamicCache()
    for i in range(info.num_layers):
        k = tensors[f"keys.{i}"].transpose(0, 1)[None]  # [n, Hkv, D] -> [1, Hkv, n, D]
        cache.update(k, tensors[f"values.{i}"].transpose(0, 1)[None], i)
    n = info.num_tokens
    pos = torch.arange(n, n + len(question))[None]
    with torch.no_grad():
        out = lm(torch.tensor([question]), past_key_values=cache, position_ids=pos)
    return out.logits[0].double()


# --------------------------------------------------------------------------------------------------
# (a) export and connector logic, this venv
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
    ],
    ids=["default", "linear", "llama3", "yarn"],
)
def test_export_rotation_exact(tmp_path, rope):
    """One image and two images per prompt: the exported KV at consecutive positions gives the one-shot
    logits; the unrotated KV does not."""
    model = _model(**({"rope_parameters": rope} if rope else {}))
    save_language_model(model, tmp_path / "lm")
    px = _pixels(model.config, 2)
    question = [9, 10, 11]
    c = model.compress(px[:1], prefix_ids=torch.tensor(PREFIX))
    info = c.export_for_vllm(tmp_path / "one.safetensors", model)
    assert info.num_tokens == len(PREFIX) + model.config.num_voco_tokens
    expected = _one_shot_logits(model, PREFIX + [IMG], px[:1], question)
    got = _served_logits(tmp_path / "lm", tmp_path / "one.safetensors", question)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

    two = PREFIX + [IMG, 20, 21, IMG]
    p = model.compress_prompt(torch.tensor(two), px)
    p.export_for_vllm(tmp_path / "two.safetensors", model)
    assert p.num_tokens == len(two) - 2 + 2 * model.config.num_voco_tokens
    expected = _one_shot_logits(model, two, px, question)
    got = _served_logits(tmp_path / "lm", tmp_path / "two.safetensors", question)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

    # the same prompt, keys left at their absolute positions: wrong logits
    from safetensors.torch import save_file

    unrotated = {f"keys.{i}": k.transpose(0, 1).contiguous() for i, k in enumerate(p.keys)}
    unrotated |= {f"values.{i}": v.transpose(0, 1).contiguous() for i, v in enumerate(p.values)}
    save_file(
        unrotated,
        tmp_path / "raw.safetensors",
        metadata=info.to_metadata() | {"num_tokens": str(p.num_tokens)},
    )
    wrong = _served_logits(tmp_path / "lm", tmp_path / "raw.safetensors", question)
    assert (wrong - expected).abs().max() > 1e-2 * expected.abs().max()


def test_rotate_keys_composes():
    """Rotating by -d then by +d gives the keys back; by 0 is the identity."""
    torch.manual_seed(0)
    k = torch.randn(2, 5, 8, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    assert torch.allclose(rotate_keys(rotate_keys(k, -37, inv), 37, inv), k, atol=1e-12)
    assert torch.equal(rotate_keys(k, 0, inv), k)


def test_export_metadata_and_request_inputs(tmp_path):
    model = _model()
    px = _pixels(model.config, 2)
    c = model.compress(px, prefix_ids=torch.tensor(PREFIX))
    a = c.export_for_vllm(tmp_path / "a.safetensors", model, index=0)
    b = c.export_for_vllm(tmp_path / "b.safetensors", model, index=1)
    assert read_info(tmp_path / "a.safetensors") == a
    text = model.config.text_config
    assert (a.num_layers, a.num_kv_heads, a.head_dim, a.dtype) == (2, 2, 32, "float32")
    assert a.rope_type == "default" and a.num_tokens == len(PREFIX) + 1
    assert a.hf_question_position == c.seq_length
    assert a.config_hash == kv_format.config_fingerprint(text.to_dict()) == b.config_hash
    assert a.kv_hash != b.kv_hash  # the cache salt tells the two images apart
    c.export_for_vllm(tmp_path / "a2.safetensors", model, index=0)
    assert read_info(tmp_path / "a2.safetensors").kv_hash == a.kv_hash  # and is deterministic
    assert a.weights_hash == export.weights_fingerprint(model.language_model) == b.weights_hash
    other = _model()  # the same config, other weights: a fine-tune, another seed
    with torch.no_grad():
        other.language_model.get_submodule("model.layers.0.self_attn.k_proj").weight.mul_(1.5)
    assert export.weights_fingerprint(other.language_model) != a.weights_hash
    save_language_model(model, tmp_path / "lm")  # what vLLM serves carries the same fingerprint
    saved = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert saved[kv_format.WEIGHTS_KEY] == a.weights_hash
    assert not hasattr(model.language_model.config, kv_format.WEIGHTS_KEY)
    r = request_inputs(tmp_path / "a.safetensors", [9, 10])
    assert r["prompt_token_ids"] == [a.placeholder_id] * a.num_tokens + [9, 10]
    assert r["cache_salt"] == "htc-kv:" + a.kv_hash
    assert r["kv_transfer_params"] == {"htc_kv_path": str((tmp_path / "a.safetensors").resolve())}
    with pytest.raises(ValueError, match="at least one token"):
        request_inputs(tmp_path / "a.safetensors", [])
    with pytest.raises(ValueError, match="format"):
        torch.save({}, tmp_path / "x.pt")
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
        read_info(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "rope, match",
    [
        ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "depend on the sequence length"),
        (
            {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0] * 16,
                "long_factor": [2.0] * 16,
                "original_max_position_embeddings": 128,
            },
            "depend on the sequence length",
        ),
        ({"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}, "mrope"),
    ],
    ids=["dynamic", "longrope", "mrope"],
)
def test_export_refuses_inexact_rope(tmp_path, rope, match):
    model = _model(rope_parameters=rope)
    c = model.compress(_pixels(model.config, 1), prefix_ids=torch.tensor(PREFIX))
    with pytest.raises(ValueError, match=match):
        c.export_for_vllm(tmp_path / "x.safetensors", model)
    assert not (tmp_path / "x.safetensors").exists()


def test_export_refuses_wrong_model(tmp_path):
    model = _model()
    c = model.compress(_pixels(model.config, 1), prefix_ids=torch.tensor(PREFIX))
    with pytest.raises(ValueError, match="layers"):
        c.export_for_vllm(tmp_path / "x.safetensors", _model(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"\[Hkv, n, D\]"):
        c.export_for_vllm(tmp_path / "x.safetensors", _model(num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"in torch.float32, got .*float64"):
        c.to(dtype=torch.float64).export_for_vllm(tmp_path / "x.safetensors", model)
    other = _model()  # the same shapes, another k_proj: its file would have carried other's hash
    with torch.no_grad():
        other.language_model.model.layers[0].self_attn.k_proj.weight.add_(1e-3)
    for prompt in (
        c.prompt(0),
        model.compress_prompt(torch.tensor([*PREFIX, IMG]), _pixels(model.config, 1)),
    ):
        with pytest.raises(ValueError, match="compressed by another model"):
            prompt.export_for_vllm(tmp_path / "x.safetensors", other)
    assert not (tmp_path / "x.safetensors").exists()


def test_file_missing_a_metadata_field_is_a_value_error(tmp_path):
    """The connector refuses a request on a ValueError; a KeyError would reach vLLM's scheduler."""
    model = _model()
    c = model.compress(_pixels(model.config, 1), prefix_ids=torch.tensor(PREFIX))
    path = tmp_path / "x.safetensors"
    c.export_for_vllm(path, model)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["hf_question_position"]
    save_file(tensors, tmp_path / "y.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"metadata lacks \['hf_question_position'\]"):
        read_info(tmp_path / "y.safetensors")


def test_head_range():
    assert [head_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert [head_range(2, 2, r) for r in range(2)] == [(0, 1), (1, 2)]
    # fewer KV heads than ranks: each head replicated on consecutive ranks (vLLM's QKVParallelLinear)
    assert [head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert head_range(4, 1, 0) == (0, 4)
    for bad in ((6, 4, 0), (4, 3, 0), (4, 2, 2)):
        with pytest.raises(ValueError):
            head_range(*bad)


def test_load_planner(tmp_path):
    """The connector's scheduler side: loads beyond the prefix-cache hit, reloads after a preemption,
    leaves plain requests alone, refuses requests it cannot serve exactly."""
    model = _model()
    c = model.compress(_pixels(model.config, 1), prefix_ids=torch.tensor(PREFIX))
    path = tmp_path / "a.safetensors"
    info = c.export_for_vllm(path, model)
    n = info.num_tokens
    r = request_inputs(path, [9, 10])
    planner = LoadPlanner(
        num_layers=2,
        num_kv_heads=2,
        head_dim=32,
        dtype="float32",
        config_hash=info.config_hash,
        weights_hash=info.weights_hash,
        block_size=4,
    )
    params, ids, salt = r["kv_transfer_params"], r["prompt_token_ids"], r["cache_salt"]

    assert planner.match("plain", None, [3, 4, 5], None, False, 0) == 0
    planner.allocated("plain", [7], 0)
    assert planner.match("a", params, ids, salt, False, 0) == n
    planner.allocated("a", [3, 9], n)
    (load,) = planner.take()
    assert (load.start, load.end, load.slots) == (0, n, [12, 13, 14, 15, 36][:n])
    assert planner.take() == []
    # the worker loads the file the scheduler checked, or nothing
    kv_format.verify_load(read_info(path).to_metadata(), load)
    with pytest.raises(ValueError, match="replaced after the request was placed"):
        kv_format.verify_load({**read_info(path).to_metadata(), "kv_hash": "0" * 64}, load)
    # preempted (blocks freed), placed again with a 4-token prefix-cache hit: the rest is reloaded
    assert planner.match("a", params, ids, salt, False, 4) == n - 4
    planner.allocated("a", [3, 5], n - 4)
    (load,) = planner.take()
    assert (load.start, load.end, load.slots) == (4, n, [20, 21, 22, 23][: n - 4])
    assert planner.loads["a"] == 2
    # a hit covering the file: nothing to load
    assert planner.match("a", params, ids, salt, False, n) == 0
    planner.finished("a")
    assert "a" not in planner.loads

    refusals = {
        "placeholder id": (params, [5] + ids[1:], salt, False),
        "question token": (params, ids[:n], salt, False),
        "cache_salt": (params, ids, None, False),
        "prompt_logprobs": (params, ids, salt, True),
        "does not exist": ({"htc_kv_path": str(tmp_path / "none")}, ids, salt, False),
        # beam search drops kv_transfer_params but keeps the salt: refused, not computed as text
        "carries no kv_transfer_params": (None, ids, salt, False),
        "is not 'htc-kv:'": (params, ids, info.kv_hash, False),
    }
    for match, args in refusals.items():
        with pytest.raises(ValueError, match=match):
            planner.match("b", *args, 0)
    with pytest.raises(ValueError, match="LoRA adapter"):
        planner.match("b", params, ids, salt, False, 0, lora=True)
    other = LoadPlanner(
        num_layers=3,
        num_kv_heads=2,
        head_dim=32,
        dtype="bfloat16",
        config_hash="x",
        weights_hash="y",
        block_size=4,
    )
    with pytest.raises(ValueError, match="num_layers 2.*dtype 'float32'.*config_hash.*weights_hash"):
        other.match("b", params, ids, salt, False, 0)
    unknown = LoadPlanner(
        num_layers=2,
        num_kv_heads=2,
        head_dim=32,
        dtype="float32",
        config_hash=info.config_hash,
        weights_hash=None,
        block_size=4,
    )
    with pytest.raises(ValueError, match="config.json has no 'htc_weights_fingerprint'"):
        unknown.match("b", params, ids, salt, False, 0)
    planner.match("c", params, ids, salt, False, 0)
    with pytest.raises(RuntimeError, match="partial load"):
        planner.allocated("c", [1, 2], n - 1)

    # a refused request: its prompt (but the last token) beyond the prefix-cache hit is claimed, no load
    # is planned, and the workers are told to fail it, once
    assert planner.refuse("d", "why", len(ids), 4) == len(ids) - 5
    assert planner.refuse("d", "why", len(ids), len(ids)) == 1  # a claim is never empty
    assert planner.allocated("d", [3, 9], len(ids) - 1) is False
    assert (planner.take(), planner.take_refused(), planner.take_refused()) == ([], ["d"], [])
    assert "d" not in planner.loads
    # vLLM overriding the claim (a request skipping the prefix cache) would compute the placeholders
    planner.refuse("e", "htc connector: request 'e' refused: x", len(ids), 0)
    with pytest.raises(RuntimeError, match="refused: x; vLLM did not take the connector"):
        planner.allocated("e", [3], 0)
    assert planner.take_refused() == []


def test_connector_import_is_light():
    """In a process that imported vllm, the connector's modules load neither htc_kernels nor
    transformers nor the model side (the real import inside vLLM runs in part b)."""
    code = (
        "import sys, types\n"
        "sys.modules['vllm'] = types.ModuleType('vllm')  # what vLLM's process has\n"
        "import htc_model.serving.kv_format\n"
        "bad = [m for m in ('htc_kernels', 'transformers', 'htc_model.modeling_htc') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


# --------------------------------------------------------------------------------------------------
# (b) served by vLLM (its own venv, a subprocess), against HF with the same weights
# --------------------------------------------------------------------------------------------------

LONG_PREFIX = [1] + [3 + i % 50 for i in range(39)]  # 40 tokens: the kept KV spans a full 32-slot block
BLOCK = 32


def _vllm_or_skip():
    if VLLM_PY.exists():
        return
    reason = f"no vLLM venv at {VLLM_VENV} (bash scripts/setup_vllm.sh makes it; make test runs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _run_child(spec: dict, tmp: Path) -> dict:
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    proc = subprocess.run(
        [
            str(VLLM_PY),
            str(ROOT / "tests" / "vllm_serving_child.py"),
            str(tmp / "spec.json"),
            str(tmp / "out.json"),
        ],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads((tmp / "out.json").read_text())


def _hf_reference(lm, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs for a plain prompt on the plain LLaMA."""
    out = lm.generate(
        torch.tensor([prompt]),
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [float(torch.log_softmax(lg[0].double(), -1)[t]) for lg, t in zip(out.logits, tokens)]
    return tokens, logprobs


def _hf_compressed(model, prompt_ids, px, question, steps) -> tuple[list[int], list[float]]:
    """HF one-shot generate (images in the prompt): the tokens and logprobs vLLM must reproduce."""
    ids = torch.tensor([prompt_ids + question])
    out = model.generate(
        ids,
        pixel_values=px,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    logprobs = [float(torch.log_softmax(lg[0].double(), -1)[t]) for lg, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One child run: engine "main" (prefix caching on: a single request, a batch mixing compressed,
    plain and two-image requests, a repeat of an image; then the two images with one question) and
    engine "small" (8 blocks of 32 slots: six long requests preempt each other)."""
    _vllm_or_skip()
    tmp = tmp_path_factory.mktemp("vllm")
    model = _model()
    save_language_model(model, tmp / "lm")
    lm = LlamaForCausalLM.from_pretrained(tmp / "lm").eval()
    lm.generation_config.eos_token_id = None
    px = _pixels(model.config, 2)
    c = model.compress(px, prefix_ids=torch.tensor(LONG_PREFIX))
    files = {}
    for i in range(2):
        files[f"img{i}"] = tmp / f"img{i}.safetensors"
        c.export_for_vllm(files[f"img{i}"], model, index=i)
    two = LONG_PREFIX[:8] + [IMG, 20, 21, IMG]
    files["two"] = tmp / "two.safetensors"
    model.compress_prompt(torch.tensor(two), px).export_for_vllm(files["two"], model)
    one_shot = {
        "img0": (LONG_PREFIX + [IMG], px[:1]),
        "img1": (LONG_PREFIX + [IMG], px[1:]),
        "two": (two, px),
    }

    cases = {}  # name -> (request, expected tokens, expected logprobs)

    def compressed(name, image, question, steps):
        req = {**request_inputs(files[image], question), "max_tokens": steps}
        cases[name] = (req, *_hf_compressed(model, *one_shot[image], question, steps))
        return req

    def plain(name, prompt, steps):
        cases[name] = ({"prompt_token_ids": prompt, "max_tokens": steps}, *_hf_reference(lm, prompt, steps))
        return cases[name][0]

    # img0's file with a tensor missing: its header passes the scheduler's checks, the worker's load fails
    with safe_open(files["img0"], framework="pt") as f:
        broken = {k: f.get_tensor(k) for k in f.keys() if k != "values.1"}
        save_file(broken, tmp / "broken.safetensors", metadata=f.metadata())
    files["broken"] = tmp / "broken.safetensors"

    def refused(name, change, steps):
        req = {**request_inputs(files["img0"], [9, 10]), "max_tokens": steps}
        cases[name] = (change(req, files), None, None)
        return cases[name][0]

    steps = 8
    main = [
        {"name": "single", "requests": [compressed("single", "img0", [9, 10, 11], steps)]},
        {
            "name": "mixed",
            "requests": [
                compressed("mixed_img0", "img0", [12, 13], steps),
                plain("mixed_plain", [1, 9, 10, 11, 12], steps),
                compressed("mixed_img1", "img1", [14], steps),
                compressed("mixed_two", "two", [9, 10, 11], steps),
                plain("mixed_plain_long", LONG_PREFIX + [9, 10], steps),
            ],
        },
        {"name": "hit", "requests": [compressed("hit", "img0", [9, 10, 11], steps)]},
        {"name": "salt", "requests": [compressed("salt_img1", "img1", [9, 10, 11], steps)]},
        # Requests the connector cannot serve exactly, batched with a good one: refused alone (vLLM
        # finishes them with an error), the good one answered, and the engine serves the next batch.
        {
            "name": "refused",
            "requests": [
                compressed("refused_ok", "img1", [15, 16], steps),
                *(refused(name, change, steps) for name, change in _REFUSALS.items()),
            ],
        },
        {"name": "after_refusal", "requests": [compressed("after_refusal", "img0", [17], steps)]},
    ]
    long = 40
    small = [
        {
            "name": "preempt",
            "requests": [compressed(f"preempt{i}", f"img{i % 2}", [9 + i], long) for i in range(6)],
        }
    ]
    common = {"max_model_len": 128, "block_size": BLOCK, "enable_prefix_caching": True}
    spec = {
        "model": str(tmp / "lm"),
        "engines": [
            {"llm": common, "phases": main},
            {"llm": {**common, "num_gpu_blocks_override": 8, "max_num_seqs": 6}, "phases": small},
        ],
    }
    out = _run_child(spec, tmp)
    got = {}
    for engine, phases in zip(out["engines"], (main, small)):
        for phase, result in zip(phases, engine["phases"]):
            names = [n for n, (req, *_) in cases.items() if any(req is r for r in phase["requests"])]
            got.update(zip(names, result["requests"]))
    return {
        "cases": cases,
        "got": got,
        "out": out,
        "n_kept": read_info(files["img0"]).num_tokens,
        "n_two": read_info(files["two"]).num_tokens,
    }


# Requests about img0 made unservable, each in one way (the connector's scheduler side says why).
_REFUSALS = {
    "refused_salt": lambda r, files: {**r, "cache_salt": "htc-kv:" + read_info(files["img1"]).kv_hash},
    "refused_prompt": lambda r, files: {**r, "prompt_token_ids": [5] + r["prompt_token_ids"][1:]},
    "refused_file": lambda r, files: {**r, "kv_transfer_params": {"htc_kv_path": f"{files['img0']}.gone"}},
    "refused_load": lambda r, files: {**r, "kv_transfer_params": {"htc_kv_path": str(files["broken"])}},
}


def _check(served, name):
    _, tokens, logprobs = served["cases"][name]
    g = served["got"][name]
    assert g["tokens"] == tokens, name
    assert max(abs(a - b) for a, b in zip(g["logprobs"], logprobs)) <= 1e-3, name


def test_vllm_single_request_equals_hf(served):
    _check(served, "single")
    assert served["got"]["single"]["num_cached_tokens"] == served["n_kept"]  # loaded, not computed


def test_vllm_mixed_batch_equals_hf(served):
    """Compressed (one and two images) and plain requests in one batch."""
    for name in ("mixed_img0", "mixed_plain", "mixed_img1", "mixed_two", "mixed_plain_long"):
        _check(served, name)


def test_vllm_prefix_cache_hit_and_salt(served):
    """The same image again hits vLLM's prefix cache for its full block and loads the rest; another
    image with the same question (same placeholder ids) shares nothing with it."""
    n = served["n_kept"]
    log = served["out"]["engines"][0]["connector_log"]
    _check(served, "hit")
    assert served["got"]["hit"]["num_cached_tokens"] >= n
    assert any(f"loads {n - BLOCK} compressed tokens" in line for line in log), log
    _check(served, "salt_img1")
    # the two images' answers differ (HF) and each request got its own image's (checked above) ...
    # (closer to its own image's logprobs than the images are to each other, by a wide margin)
    diff = max(abs(a - b) for a, b in zip(served["cases"]["salt_img1"][2], served["cases"]["hit"][2]))
    err = max(
        abs(a - b) for a, b in zip(served["cases"]["salt_img1"][2], served["got"]["salt_img1"]["logprobs"])
    )
    assert err * 20 < diff, (err, diff)
    # ... and the cache is shared by one image's requests only: in order, single (img0) loads all n,
    # mixed_img0 hits single's block, mixed_img1 loads all n (img0's block has the same placeholder
    # ids, not the same salt), mixed_two all of its own, hit and salt_img1 their image's block's rest
    loads = [int(m.group(1)) for line in log if (m := re.search(r"loads (\d+) compressed", line))]
    assert loads[:6] == [n, n - BLOCK, n, served["n_two"], n - BLOCK, n - BLOCK], log


def test_vllm_refuses_a_request_alone(served):
    """A request the connector cannot serve exactly (another image's cache_salt, a prompt not of the
    file's form, a missing file: refused by the scheduler side; a file whose load fails: by the worker)
    finishes with finish_reason "error" and no tokens, the reason logged; the good request batched with
    them is answered exactly, and the engine serves the next batch."""
    log = served["out"]["engines"][0]["connector_log"]
    for name, why in (
        ("refused_salt", "cache_salt"),
        ("refused_prompt", "placeholder id"),
        ("refused_file", "does not exist"),
        ("refused_load", "values.1"),
    ):
        g = served["got"][name]
        assert (g["finish_reason"], g["tokens"]) == ("error", []), (name, g)
        assert any("refused" in line and why in line for line in log), (name, log)
    for name in ("refused_ok", "after_refusal"):
        _check(served, name)
        assert served["got"][name]["finish_reason"] == "length"
    loads = [int(m.group(1)) for line in log if (m := re.search(r"loads (\d+) compressed", line))]
    # refused_ok, refused_load (planned, then failed in the worker), after_refusal; the others plan none
    assert loads[6:] == [served["n_kept"] - BLOCK] * 3, log


def test_vllm_preemption_reloads(served):
    """With 8 blocks for six 85-token requests vLLM preempts; the connector reloads the KV."""
    log = served["out"]["engines"][1]["connector_log"]
    assert any("after a preemption" in line for line in log), log
    for i in range(6):
        _check(served, f"preempt{i}")


# --------------------------------------------------------------------------------------------------
# (b) the README's OpenAI-server example, run as written
# --------------------------------------------------------------------------------------------------


def _readme_openai_example() -> tuple[list[str], str, dict]:
    """The README's server command (argv after ``PYTHONPATH=$PWD .venv-vllm/bin/python``), the curl
    URL and the curl JSON body: the test runs these, so the README shows what was run."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Serving compressed images with vLLM", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    server, curl = block.replace("\\\n", " ").split("\ncurl ")
    argv, curl_argv = shlex.split(server), shlex.split(curl)
    assert argv[:2] == ["PYTHONPATH=$PWD", ".venv-vllm/bin/python"], argv
    assert curl_argv[1:4] == ["-H", "Content-Type: application/json", "-d"], curl_argv
    return argv[2:], curl_argv[0], json.loads(curl_argv[4])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def test_vllm_openai_server_equals_hf(tmp_path):
    """The README's five lines: the server started with the connector flags as written (on a free
    port, in a directory holding ``lm/``), the README's completion body with this image's
    ``cache_salt`` and path: the answer's token ids are HF ``generate``'s with the image, logprobs
    within 1e-3, and the connector loaded the compressed tokens (not computed them as text). Then a
    request with another salt: HTTP 500, one with ``prompt_logprobs``: HTTP 400 (HTCRequestCheck), and the
    same good request is answered again."""
    _vllm_or_skip()
    server_args, url, body = _readme_openai_example()
    assert url == "localhost:8000/v1/completions", url
    model = _model()
    save_language_model(model, tmp_path / "lm")
    px = _pixels(model.config, 1)
    path = tmp_path / "img.safetensors"
    n = model.compress(px, prefix_ids=torch.tensor(PREFIX)).export_for_vllm(path, model).num_tokens
    question = [9, 10, 11]
    r = request_inputs(path, question)
    assert body["prompt"] == r["prompt_token_ids"], (body["prompt"], r["prompt_token_ids"])
    assert body["cache_salt"] == "htc-kv:<kv_hash>" and set(body["kv_transfer_params"]) == {"htc_kv_path"}, (
        body
    )
    body = {**body, "cache_salt": r["cache_salt"], "kv_transfer_params": r["kv_transfer_params"]}

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    log_path = tmp_path / "server.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(VLLM_PY), *server_args, "--port", str(port)],
            cwd=tmp_path,  # the README's relative "lm/", also the served model's name
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the engine and worker die with it
        )
    try:
        # HF's answer while the server starts
        tokens, logprobs = _hf_compressed(model, PREFIX + [IMG], px, question, body["max_tokens"])
        base = f"http://127.0.0.1:{port}"
        deadline = t0 + 240
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n" + log_path.read_text()[-8000:]
            try:
                _post(f"{base}/health", None, timeout=5)
                break
            except OSError:
                if time.perf_counter() > deadline:
                    pytest.fail("server not up in 240 s:\n" + log_path.read_text()[-8000:])
                time.sleep(0.5)
        startup = time.perf_counter() - t0
        try:
            out = _post(f"{base}/v1/completions", body, timeout=120)
        except urllib.error.HTTPError as e:
            pytest.fail(f"/v1/completions: {e.code} {e.read().decode()}\n" + log_path.read_text()[-8000:])
        # A request the connector refuses (another salt) gets vLLM's HTTP 500 for a failed generation; the
        # server goes on serving.
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"{base}/v1/completions", {**body, "cache_salt": "another"}, timeout=120)
        assert refused.value.code == 500, refused.value
        # prompt_logprobs skips connectors in vLLM: HTCRequestCheck refuses it at admission (HTTP 400)
        with pytest.raises(urllib.error.HTTPError) as skipped:
            _post(f"{base}/v1/completions", {**body, "prompt_logprobs": 0}, timeout=120)
        assert skipped.value.code == 400, skipped.value
        assert "must read the prefix cache" in skipped.value.read().decode()
        again = _post(f"{base}/v1/completions", body, timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    print(f"OpenAI server up in {startup:.1f} s")
    (choice,) = out["choices"]
    assert choice["prompt_token_ids"] == r["prompt_token_ids"]
    assert choice["token_ids"] == tokens, (choice["token_ids"], tokens)
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in tokens], lp["tokens"]
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], logprobs)) <= 1e-3, (lp, logprobs)
    log = log_path.read_text()
    assert f"loads {n} compressed tokens (load 1)" in log, log[-8000:]
    assert "refused: cache_salt 'another'" in log, log[-8000:]
    assert "HTCRequestCheck is not among the logits processors" not in log, log[-8000:]  # it is
    assert again["choices"][0]["token_ids"] == tokens
