"""Export a compressed prompt for vLLM: the kept KV with keys re-rotated for vLLM's positions.

vLLM gives prompt token i RoPE position i, so the question after ``n`` kept slots sits at ``n``,
where the one-shot prompt had it at ``L`` (its full length: the images' visual tokens are gone). A
query at ``n + j`` must see each kept key at the same distance as in the one-shot prompt, ``L + j -
p``: so every kept key is rotated by the same ``-(L - n)`` (the dropped positions), i.e. re-encoded at
``p - (L - n)`` (negative for the prefix: RoPE is a rotation, any angle is fine). The kept slots are
never recomputed (their KV comes from the file), so the distances among them do not matter; values
carry no position. This is exact whenever the rotation frequencies do not depend on the sequence:
default, linear, llama3 and yarn RoPE (llama3's and yarn's scaling fixes the frequencies once; an
attention factor scales cos and sin alike and commutes with a pure rotation). Dynamic NTK and longrope
pick their frequencies from the current length, multimodal RoPE (mrope) has 3-D positions: refused.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..compression import CompressedPrompt, model_fingerprint
from .kv_format import WEIGHTS_KEY, KVFileInfo, config_fingerprint, weights_fingerprint

__all__ = ["EXACT_ROPE_TYPES", "export_for_vllm", "rotate_keys", "save_language_model", "weights_fingerprint"]

EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Text models whose attention applies RoPE as transformers' LLaMA does (rotate_half over the whole head)
# and that vLLM serves with the same convention; others are refused rather than guessed.
_MODEL_TYPES = ("llama",)


def _rope(text_config, lm) -> tuple[str, torch.Tensor]:
    """``(rope_type, inv_freq [D/2] float64)`` of the language model, or a ValueError naming why a
    re-rotation would not be exact for it."""
    params = getattr(text_config, "rope_parameters", None) or {}
    rope_type = str(params.get("rope_type", "default"))
    problems = []
    if text_config.model_type not in _MODEL_TYPES:
        problems.append(
            f"model type {text_config.model_type!r} (supported: {list(_MODEL_TYPES)}, whose RoPE is "
            "transformers' LLaMA rotate_half convention)"
        )
    if any(isinstance(v, dict) for v in params.values()):
        problems.append(f"per-layer-type RoPE parameters {params}")
    elif "mrope_section" in params or "mrope" in rope_type:
        problems.append("multimodal RoPE (mrope: 3-D positions; vLLM positions prompt tokens 0..n-1)")
    elif rope_type not in EXACT_ROPE_TYPES:
        problems.append(
            f"RoPE type {rope_type!r}: its frequencies depend on the sequence length, so a key rotated "
            f"to another position would not be the key vLLM computes there (exact: {list(EXACT_ROPE_TYPES)})"
        )
    if problems:
        raise ValueError("export_for_vllm: cannot re-rotate this model's KV exactly: " + "; ".join(problems))
    rotary = lm.get_submodule("model.rotary_emb")
    inv_freq = rotary.original_inv_freq.detach().to("cpu", torch.float64)
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    if 2 * inv_freq.numel() != head_dim:
        raise ValueError(
            f"export_for_vllm: partial rotary embedding ({2 * inv_freq.numel()} of {head_dim} dims) is "
            "not supported"
        )
    return rope_type, inv_freq


def rotate_keys(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[..., D]`` with RoPE at positions p -> the same keys at ``p + shift``.

    Applies ``k cos(shift w) + rotate_half(k) sin(shift w)`` with ``w = cat(inv_freq, inv_freq)``
    ``[D]`` (``inv_freq`` ``[D/2]``), transformers' LLaMA convention, in float64; returns ``keys``'
    dtype. Rotations compose (R(a) R(b) = R(a + b)), so this is the key computed at ``p + shift``.
    """
    angle = float(shift) * torch.cat([inv_freq, inv_freq]).to(torch.float64)
    k = keys.to("cpu", torch.float64)
    half = k.shape[-1] // 2
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * angle.cos() + rotated_half * angle.sin()).to(keys.dtype)


def export_for_vllm(prompt: CompressedPrompt, path: str | os.PathLike, model) -> KVFileInfo:
    """Write ``prompt``'s kept KV for the vLLM connector (:mod:`htc_model.serving.vllm_connector`).

    Args:
        prompt: :class:`~htc_model.compression.CompressedPrompt` (from ``model.compress_prompt`` or
            ``CompressedImages.prompt(i)``).
        path: the safetensors file to write (format: :mod:`htc_model.serving.kv_format`).
        model: the :class:`HTCForConditionalGeneration` that compressed it (its language model is what
            vLLM serves: :func:`save_language_model`).

    Returns:
        The file's :class:`KVFileInfo` (``num_tokens`` placeholder tokens start the vLLM prompt,
        ``kv_hash`` is its cache salt: :func:`~htc_model.serving.kv_format.request_inputs`).
    """
    text = model.config.text_config
    lm = model.language_model
    rope_type, inv_freq = _rope(text, lm)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    n = prompt.num_tokens
    problems = []
    if len(prompt.keys) != text.num_hidden_layers or len(prompt.values) != len(prompt.keys):
        problems.append(f"{len(prompt.keys)} layers of keys, the model has {text.num_hidden_layers}")
    for name, ts in (("keys", prompt.keys), ("values", prompt.values)):
        if any(tuple(t.shape) != (heads, n, head_dim) or t.dtype != lm.dtype for t in ts):
            problems.append(
                f"{name} must be [Hkv, n, D] = {[heads, n, head_dim]} in {lm.dtype}, got "
                f"{sorted({(tuple(t.shape), t.dtype) for t in ts}, key=str)}"
            )
    pos = prompt.positions
    if pos.dim() != 1 or n == 0 or bool((pos[1:] <= pos[:-1]).any()) or int(pos[0]) < 0:
        problems.append("positions must be [n], n >= 1, non-negative and strictly increasing")
    elif int(pos[-1]) >= prompt.seq_length:
        problems.append(f"positions reach {int(pos[-1])}, beyond seq_length {prompt.seq_length}")
    mine = model_fingerprint(model)
    if prompt.model and prompt.model != mine:
        problems.append(
            f"compressed by another model (fingerprint {prompt.model!r}, this model's {mine!r}: other "
            "weights, settings or dtype); export with the model that compressed it"
        )
    if problems:
        raise ValueError("export_for_vllm: this prompt does not fit the model: " + "; ".join(problems))

    tensors = {}
    for i, (k, v) in enumerate(zip(prompt.keys, prompt.values)):
        # [Hkv, n, D] -> [n, Hkv, D]: vLLM's per-token layout (what do_kv_cache_update takes).
        tensors[f"keys.{i}"] = rotate_keys(k, n - prompt.seq_length, inv_freq).transpose(0, 1).contiguous()
        tensors[f"values.{i}"] = v.detach().to("cpu").transpose(0, 1).contiguous()
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].view(torch.uint8).numpy().tobytes())
    info = KVFileInfo(
        num_tokens=n,
        num_layers=text.num_hidden_layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        dtype=str(lm.dtype).removeprefix("torch."),
        rope_type=rope_type,
        model=str(getattr(model.config, "name_or_path", "") or ""),
        config_hash=config_fingerprint(text.to_dict()),
        weights_hash=weights_fingerprint(lm),
        kv_hash=digest.hexdigest(),
        placeholder_id=getattr(text, "pad_token_id", None) or 0,
        hf_question_position=prompt.seq_length,
    )
    from safetensors.torch import save_file

    # Written beside, then moved into place: a reader sees the old file or the new one, never a mix.
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=info.to_metadata())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info


def save_language_model(model, directory: str | os.PathLike) -> None:
    """Save ``model``'s language model as a plain transformers checkpoint that vLLM loads (its own
    architecture, e.g. ``LlamaForCausalLM``; the star attention is not needed there: once images are
    compressed every query attends causally). Its ``config.json`` carries the weights' fingerprint
    (``htc_weights_fingerprint``), which the connector compares with each file's."""
    lm = model.language_model
    impl = lm.config._attn_implementation
    lm.config._attn_implementation = "sdpa"  # not "htc_star": vLLM's transformers does not know it
    setattr(lm.config, WEIGHTS_KEY, weights_fingerprint(lm))
    try:
        lm.save_pretrained(os.fspath(directory))
    finally:
        lm.config._attn_implementation = impl
        delattr(lm.config, WEIGHTS_KEY)
