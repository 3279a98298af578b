"""The file that carries one request's compressed KV from htc_model to vLLM, and the logic both sides
share. Pure Python plus ``torch``/``safetensors``: it is imported by the vLLM connector inside vLLM's
environment (vLLM's own torch, no htc_kernels, no transformers needed).

One file per request prompt (written by :func:`htc_model.serving.export.export_for_vllm`):

* tensors ``keys.<layer>`` and ``values.<layer>``: ``[n, Hkv, D]`` in the model's dtype, the KV of the
  ``n`` slots the prompt keeps (text and ``<voco>``; the images' visual tokens are gone), keys
  re-rotated by the dropped positions so that a question at vLLM's position ``n`` sees them at the
  distances it had after the one-shot prompt (:mod:`htc_model.serving.export`);
* string metadata (:class:`KVFileInfo`): ``num_tokens`` (n), the model's shape, a fingerprint of
  its text config and one of its language model's weights (``weights_hash``: the served checkpoint's
  ``config.json`` carries the same, written by :func:`htc_model.serving.export.save_language_model`),
  ``dtype``, ``rope_type``, ``kv_hash`` (a hash of every stored tensor: the cache salt that keeps one
  image's KV from ever being reused for another's prompt), ``placeholder_id``.

The request vLLM serves is ``n`` placeholder ids followed by the question (at least one token), with
``cache_salt = "htc-kv:" + kv_hash`` and ``kv_transfer_params = {"htc_kv_path": path}``
(:func:`request_inputs`). The salt's prefix marks the request as one of ours even where vLLM drops
the ``kv_transfer_params`` (beam search): the connector then refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

__all__ = [
    "FORMAT",
    "KVLoad",
    "LoadPlanner",
    "PARAMS_KEY",
    "KVFileInfo",
    "SALT_PREFIX",
    "WEIGHTS_KEY",
    "config_fingerprint",
    "head_range",
    "read_info",
    "request_inputs",
    "slot_mapping",
    "verify_load",
    "weights_fingerprint",
]

FORMAT = "htc-vllm-kv/2"
PARAMS_KEY = "htc_kv_path"  # the key of kv_transfer_params that names a request's file
SALT_PREFIX = "htc-kv:"  # cache_salt = SALT_PREFIX + kv_hash
# The served checkpoint's config.json key holding its weights' fingerprint (save_language_model).
WEIGHTS_KEY = "htc_weights_fingerprint"

# The text-config fields that decide what a KV slot means; one function on both sides (HF's config
# in our venv, vLLM's hf_config in its own), so a file is only ever loaded into the model it was made for.
_FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_parameters",
)


@dataclass(frozen=True)
class KVFileInfo:
    """The metadata of a KV file (all of it; read without loading any tensor)."""

    num_tokens: int  # kept slots n: the prompt's first n tokens are loaded, not computed
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    rope_type: str
    model: str  # name_or_path of the model that compressed the images (informative)
    config_hash: str  # config_fingerprint() of its text config
    weights_hash: str  # export.weights_fingerprint() of its language model
    kv_hash: str  # sha256 of the tensors: the request's cache_salt (after SALT_PREFIX)
    placeholder_id: int  # the token id of the n placeholder prompt tokens
    hf_question_position: int  # where the question started in the one-shot HF prompt (informative)

    def to_metadata(self) -> dict[str, str]:
        meta = {k: str(v) for k, v in asdict(self).items()}
        meta["format"] = FORMAT
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str = "") -> KVFileInfo:
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"htc vLLM KV file{where}: format {meta.get('format')!r}, expected {FORMAT!r} (files come "
                "from htc_model.serving.export_for_vllm)"
            )
        kinds = cls.__dataclass_fields__
        missing = [k for k in kinds if k not in meta]
        if missing:  # a ValueError refuses the one request (vLLM's scheduler would not survive a KeyError)
            raise ValueError(
                f"htc vLLM KV file{where}: metadata lacks {missing} (a damaged or hand-edited file)"
            )
        try:
            return cls(**{k: (int(meta[k]) if kinds[k].type == "int" else meta[k]) for k in kinds})
        except ValueError as e:
            raise ValueError(f"htc vLLM KV file{where}: bad metadata ({e})") from None


def read_info(path: str | os.PathLike) -> KVFileInfo:
    """The metadata of the file at ``path`` (ValueError if it is not one of ours)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"htc vLLM KV file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"htc vLLM KV file {path!r} cannot be read: {e}") from e
    return KVFileInfo.from_metadata(metadata, f" {path!r}")


def config_fingerprint(config_dict: dict) -> str:
    """sha256 (16 hex digits) of the fields of a text config (``config.to_dict()``) that fix the KV's
    meaning. ``head_dim`` missing means hidden_size / heads, as in LLaMA."""
    d = dict(config_dict)
    if d.get("head_dim") is None:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    if d.get("num_key_value_heads") is None:
        d["num_key_value_heads"] = d["num_attention_heads"]
    fields = {k: d.get(k) for k in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def request_inputs(path: str | os.PathLike, question_ids: list[int]) -> dict:
    """What one vLLM request about the compressed prompt in ``path`` needs.

    Returns ``{"prompt_token_ids": [placeholder] * n + question_ids, "cache_salt": SALT_PREFIX + kv_hash,
    "kv_transfer_params": {"htc_kv_path": abspath}}``: the first two make a ``TokensPrompt`` (or the
    ``prompt`` / ``cache_salt`` fields of a ``/v1/completions`` body), the third goes into
    ``SamplingParams(extra_args={"kv_transfer_params": ...})`` (or the body's ``kv_transfer_params``).
    The path must be readable by the vLLM server (it reads the file itself).
    """
    question_ids = [int(t) for t in question_ids]
    if not question_ids:
        raise ValueError(
            "request_inputs: the question needs at least one token (vLLM computes the prompt's last token)"
        )
    info = read_info(path)
    return {
        "prompt_token_ids": [info.placeholder_id] * info.num_tokens + question_ids,
        "cache_salt": SALT_PREFIX + info.kv_hash,
        "kv_transfer_params": {PARAMS_KEY: os.path.abspath(path)},
    }


def head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The KV heads ``[lo, hi)`` that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds, as vLLM's
    ``QKVParallelLinear`` shards them: ``Hkv / tp`` consecutive heads each, or, when there are fewer KV
    heads than ranks, one head replicated on ``tp / Hkv`` consecutive ranks."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"head_range: rank {tp_rank} outside [0, {tp_size})")
    if tp_size >= num_kv_heads:
        if tp_size % num_kv_heads:
            raise ValueError(f"head_range: {tp_size} ranks do not replicate {num_kv_heads} KV heads evenly")
        head = tp_rank // (tp_size // num_kv_heads)
        return head, head + 1
    if num_kv_heads % tp_size:
        raise ValueError(f"head_range: {num_kv_heads} KV heads do not split over {tp_size} ranks")
    per = num_kv_heads // tp_size
    return tp_rank * per, (tp_rank + 1) * per


def slot_mapping(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Paged-cache slots of a request's tokens ``[start, end)``: token t lives in block
    ``block_ids[t // block_size]`` at offset ``t % block_size`` (slot = block * block_size + offset)."""
    if not 0 <= start <= end <= len(block_ids) * block_size:
        raise ValueError(
            f"slot_mapping: tokens [{start}, {end}) do not fit {len(block_ids)} block(s) of {block_size}"
        )
    return [block_ids[t // block_size] * block_size + t % block_size for t in range(start, end)]


@dataclass(frozen=True)
class KVLoad:
    """One load the worker side performs: tokens ``[start, end)`` of the file at ``path`` into the
    paged-cache ``slots`` (``end - start`` of them). ``kv_hash``: the file the scheduler checked."""

    request_id: str
    path: str
    start: int
    end: int
    slots: list[int]
    kv_hash: str


def verify_load(metadata: dict[str, str], load: KVLoad) -> None:
    """ValueError unless the file the worker opened (its ``metadata``) is the one the scheduler checked:
    a file replaced in between would put another image's KV under this one's cache salt."""
    if metadata.get("kv_hash") != load.kv_hash:
        raise ValueError(
            f"the file's kv_hash is {metadata.get('kv_hash')!r}, the scheduler checked {load.kv_hash!r}: "
            "it was replaced after the request was placed"
        )


class LoadPlanner:
    """The connector's scheduler side, free of vLLM types (unit-tested without vLLM).

    For a request whose ``kv_transfer_params`` name a file, every time the scheduler places it with
    no KV (new, or back from a preemption, which freed its blocks), :meth:`match` reports the file's
    tokens beyond the scheduler's own prefix-cache hit as loadable, :meth:`allocated` turns them into
    a :class:`KVLoad` once blocks exist, and :meth:`take` hands the step's loads to the workers. So a
    preempted request reloads its KV; the placeholder tokens are never computed. Requests without
    the parameter are left alone (plain requests batch with compressed ones).

    A request that cannot be served exactly is refused alone, the engine goes on: :meth:`refuse`
    claims its prompt as an asynchronous load (so vLLM computes none of it), :meth:`allocated` checks
    that vLLM took the claim, and :meth:`take_refused` hands it to the workers, which report its load
    as failed; vLLM (``kv_load_failure_policy="fail"``) then finishes it with an error.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str,
        config_hash: str,
        weights_hash: str | None,
        block_size: int,
    ):
        self._model = {
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "dtype": dtype,
            "config_hash": config_hash,
            "weights_hash": weights_hash,
        }
        self._block_size = block_size
        self._matched: dict[str, tuple[str, int, int, str]] = {}  # request -> (path, start, end, kv_hash)
        self._pending: list[KVLoad] = []
        self._refusing: dict[str, str] = {}  # request -> why, until vLLM allocated its claim
        self._refused: list[str] = []  # claimed, not yet handed to the workers
        self.loads: dict[str, int] = {}  # loads per live request (> 1: reloaded after a preemption)

    @property
    def block_size(self) -> int:
        """Tokens per KV-cache block of the served engine."""
        return self._block_size

    @property
    def head_dim(self) -> int:
        """The served model's head dim (the last dimension of every file tensor)."""
        return self._model["head_dim"]

    @property
    def dtype(self) -> str:
        """The served model's dtype name (e.g. ``"bfloat16"``), as the files' metadata spell it."""
        return self._model["dtype"]

    def match(
        self,
        request_id: str,
        params: dict | None,
        prompt_token_ids: list[int],
        cache_salt: str | None,
        skip_prefix_cache: bool,
        num_computed: int,
        lora: bool = False,
    ) -> int:
        """Tokens of the request to load beyond its ``num_computed`` (the scheduler's block-aligned
        prefix-cache hit); 0 for a plain request. ValueError for a request that cannot be served
        exactly (checked each time it is placed: cheap, the file's header only). ``lora``: the request
        runs a LoRA adapter."""
        if not params or PARAMS_KEY not in params:
            if cache_salt is not None and str(cache_salt).startswith(SALT_PREFIX):
                raise ValueError(
                    f"htc connector: request {request_id!r} refused: its cache_salt names a compressed file "
                    f"but it carries no kv_transfer_params[{PARAMS_KEY!r}] (vLLM drops them in beam search): "
                    "its placeholders would be computed as text"
                )
            return 0
        path = str(params[PARAMS_KEY])
        try:
            info = read_info(path)
        except ValueError as e:
            raise ValueError(f"htc connector: request {request_id!r} refused: {e}") from e
        n = info.num_tokens
        problems = [
            f"{k} {getattr(info, k)!r}, the served model's is {v!r}"
            for k, v in self._model.items()
            if getattr(info, k) != v and v is not None
        ]
        if self._model["weights_hash"] is None:
            problems.append(
                f"the served checkpoint's config.json has no {WEIGHTS_KEY!r}: serve the directory that "
                "htc_model.serving.save_language_model wrote for the model that compressed the images"
            )
        if lora:
            problems.append("the request runs a LoRA adapter: other K/V weights than the file was made with")
        if len(prompt_token_ids) <= n:
            problems.append(
                f"the prompt has {len(prompt_token_ids)} tokens: it must be the file's {n} placeholders "
                "and at least one question token"
            )
        elif any(t != info.placeholder_id for t in prompt_token_ids[:n]):
            problems.append(f"the prompt's first {n} tokens must be the placeholder id {info.placeholder_id}")
        if cache_salt != SALT_PREFIX + info.kv_hash:
            problems.append(
                f"cache_salt {cache_salt!r} is not {SALT_PREFIX!r} + the file's kv_hash {info.kv_hash!r} "
                "(without it vLLM's prefix cache could give this prompt another image's KV)"
            )
        if skip_prefix_cache:
            problems.append(
                "the request skips the prefix cache (prompt_logprobs): vLLM would compute the placeholders"
            )
        if problems:
            raise ValueError(
                f"htc connector: request {request_id!r} ({path}) refused: " + "; ".join(problems)
            )
        if num_computed >= n:
            self._matched.pop(request_id, None)
            return 0
        self._matched[request_id] = (path, num_computed, n, info.kv_hash)
        return n - num_computed

    def allocated(self, request_id: str, block_ids: list[int], num_external: int) -> bool:
        """The scheduler gave the request blocks ``block_ids`` (all of them, in order) and accepted
        ``num_external`` tokens to load. True when that planned a load of the file."""
        why = self._refusing.pop(request_id, None)
        if why is not None:
            if num_external == 0:
                # vLLM overrode the claim (e.g. a request that skips the prefix cache): it would compute
                # the placeholders as text. Nothing per-request is left; stop rather than answer wrongly.
                raise RuntimeError(f"{why}; vLLM did not take the connector's claim: no refusing it alone")
            self._refused.append(request_id)
            return False
        matched = self._matched.pop(request_id, None)
        if matched is None or num_external == 0:
            # num_external == 0 after a match: the scheduler's own prefix cache holds those tokens
            # (a hit ending inside a block that covers the file); nothing to load.
            return False
        path, start, end, kv_hash = matched
        if start + num_external != end:
            raise RuntimeError(
                f"htc connector: request {request_id!r}: the scheduler accepted {num_external} tokens "
                f"to load, the file has [{start}, {end}) left; a partial load would leave placeholders"
            )
        slots = slot_mapping(block_ids, self._block_size, start, end)
        self._pending.append(KVLoad(request_id, path, start, end, slots, kv_hash))
        self.loads[request_id] = self.loads.get(request_id, 0) + 1
        return True

    def refuse(self, request_id: str, why: str, num_prompt_tokens: int, num_computed: int) -> int:
        """Record a request :meth:`match` refused (``why``: its message); returns the tokens to claim as
        an asynchronous load: the prompt but its last token beyond ``num_computed``, at least one."""
        self._matched.pop(request_id, None)
        self._refusing[request_id] = why
        return max(1, num_prompt_tokens - 1 - num_computed)

    def take(self) -> list[KVLoad]:
        """The loads planned since the last call (for this step's workers)."""
        loads, self._pending = self._pending, []
        return loads

    def take_refused(self) -> list[str]:
        """The requests refused since the last call, whose loads this step's workers report failed."""
        refused, self._refused = self._refused, []
        return refused

    def finished(self, request_id: str) -> None:
        self._refusing.pop(request_id, None)
        self._matched.pop(request_id, None)
        self.loads.pop(request_id, None)


_SAMPLE = 1 << 16  # elements hashed per tensor


def weights_fingerprint(lm) -> str:
    """sha256 (16 hex digits) of a module's parameters and buffers (a language model's, or a whole
    HTC model's): every name, shape and dtype, and an evenly strided sample of up to 65,536 elements
    of each tensor (a checkpoint read once, not 14 GB hashed per export). Tells a file's model from
    another with the same config (a fine-tune, another seed); cached on ``lm`` until a tensor changes:
    its storage, its version counter, or one of 16 sampled elements (fused optimizers and ``.data``
    writes change values without bumping the version; a write missing both the counter and the
    samples stays unseen, as it would by the sampled hash itself)."""
    import torch

    tensors = sorted(lm.state_dict(keep_vars=True).items())
    with torch.no_grad():
        probes = _sample_bytes([t for _, t in tensors], 16)
    key = tuple((name, t.data_ptr(), t._version, pr) for (name, t), pr in zip(tensors, probes))
    cached = getattr(lm, "_htc_weights_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    with torch.no_grad():
        samples = _sample_bytes([t for _, t in tensors], _SAMPLE)
    for (name, t), sample in zip(tensors, samples):
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(sample)
    value = digest.hexdigest()[:16]
    lm._htc_weights_fingerprint = (key, value)
    return value


def _sample_bytes(tensors, count: int) -> list[bytes]:
    """Per tensor, the bytes of an evenly strided sample of at most ``count`` of its elements, copied
    to the host in one transfer per device (not one per tensor: a decoder has hundreds, and the probe
    runs on every generate(compressed=...))."""
    import torch

    samples = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // count)].contiguous().view(torch.uint8))
    out: list[bytes] = [b""] * len(samples)
    for device in {s.device for s in samples}:
        index = [i for i, s in enumerate(samples) if s.device == device]
        host = torch.cat([samples[i] for i in index]).cpu().numpy().tobytes()
        start = 0
        for i in index:
            out[i] = host[start : start + samples[i].numel()]
            start += samples[i].numel()
    return out
