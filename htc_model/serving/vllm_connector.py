"""``HTCKVConnector``: a vLLM (v1) KV connector that serves compressed images.

It loads a request's compressed KV (a file from :func:`htc_model.serving.export.export_for_vllm`)
into vLLM's paged cache instead of computing the prompt's placeholder tokens; vLLM then computes the
question and decodes as usual, batched with any other request. Pure Python on vLLM's own torch: it
imports nothing from htc_kernels and nothing heavy from htc_model.

Offline::

    from vllm import LLM, SamplingParams
    from htc_model.serving.kv_format import request_inputs

    llm = LLM(model=lm_dir, kv_transfer_config={
        "kv_connector": "HTCKVConnector",
        "kv_connector_module_path": "htc_model.serving.vllm_connector",
        "kv_role": "kv_both"},
        logits_processors=["htc_model.serving.vllm_connector:HTCRequestCheck"])
    r = request_inputs("image.safetensors", question_ids)
    llm.generate({"prompt_token_ids": r["prompt_token_ids"], "cache_salt": r["cache_salt"]},
                 SamplingParams(max_tokens=32, extra_args={"kv_transfer_params": r["kv_transfer_params"]}))

Server: ``python -m vllm.entrypoints.openai.api_server --model LM_DIR --logits-processors
htc_model.serving.vllm_connector:HTCRequestCheck --kv-transfer-config
'{"kv_connector":"HTCKVConnector","kv_connector_module_path":"htc_model.serving.vllm_connector",
"kv_role":"kv_both"}'``, then POST ``/v1/completions`` with ``prompt`` (the token ids),
``cache_salt`` and ``kv_transfer_params`` from :func:`~htc_model.serving.kv_format.request_inputs`.
The repository root must be importable (``PYTHONPATH``) and the files readable by the server.

Policies: a preempted request reloads its file when it is placed again (never recomputes
placeholders). A request that cannot be served exactly (a missing or unreadable file, model or dtype
mismatch, weights other than the file's (``save_language_model`` writes their fingerprint into the
served ``config.json``), a LoRA adapter, prompt not of the file's form, wrong cache_salt, or an
``htc-kv:`` cache_salt without ``kv_transfer_params``, as beam search sends) is refused alone: the
connector claims its prompt as an asynchronous load that its workers report failed, so vLLM
computes none of it and finishes it with ``finish_reason="error"`` (the reason is logged, ERROR,
under ``vllm.htc_connector``); the engine and the other requests go on. A file that fails when the
worker loads it (removed or replaced since the scheduler read its header: another kv_hash, a tensor
missing, of another shape or dtype) fails its request the same way: the worker writes nothing of it
and reports its blocks invalid. A request with ``prompt_logprobs`` skips connectors altogether in
vLLM, so there is no claim to fail: start vLLM with ``--logits-processors
htc_model.serving.vllm_connector:HTCRequestCheck`` to refuse it at admission
(:class:`HTCRequestCheck`); without it such a request raises in the engine, which stops (rather than
compute its placeholders as text).
``kv_load_failure_policy`` must stay ``"fail"`` (the default; ``"recompute"`` is refused at start-up:
it would retry a refused request forever). Pipeline parallelism and decode context parallelism are
refused at start-up; tensor parallelism loads each rank's KV heads
(:func:`~htc_model.serving.kv_format.head_range`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as _LogitsProcessorV1
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _LogitsProcessorV2

from .kv_format import (
    PARAMS_KEY,
    WEIGHTS_KEY,
    KVLoad,
    LoadPlanner,
    config_fingerprint,
    head_range,
    verify_load,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["HTCKVConnector", "HTCRequestCheck"]

# Under vLLM's "vllm" logger, so its handler prints it (INFO) with the engine's other messages.
logger = logging.getLogger("vllm.htc_connector")

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class _Metadata(KVConnectorMetadata):
    loads: list[KVLoad] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # requests whose (claimed) load the workers fail


def _torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class HTCRequestCheck(_LogitsProcessorV1, _LogitsProcessorV2):
    """Request admission for the connector: vLLM's ``logits_processors`` (``--logits-processors
    htc_model.serving.vllm_connector:HTCRequestCheck``) runs ``validate_params`` on every request
    before the engine sees it. A request naming a compressed file that would skip the prefix cache
    (``prompt_logprobs``, or ``skip_reading_prefix_cache=True``) is refused there: vLLM ignores a
    connector's claim for such a request, so past admission nothing could refuse it alone. Offline
    it raises in ``generate``; the OpenAI server answers HTTP 400; the engine goes on either way.

    Changes no logits (both of vLLM's model-runner interfaces: V1 and V2). vLLM refuses custom logits
    processors with speculative decoding; without this check such a request stops the engine.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        params = (sampling_params.extra_args or {}).get("kv_transfer_params") or {}
        if PARAMS_KEY in params and sampling_params.skip_reading_prefix_cache:
            raise ValueError(
                f"htc connector: a request with kv_transfer_params[{PARAMS_KEY!r}] must read the prefix "
                "cache (no prompt_logprobs, skip_reading_prefix_cache not True): vLLM would compute its "
                "placeholders as text"
            )

    def __init__(self, vllm_config, *args) -> None:  # V1: (config, device, pin); V2: (config, states)
        pass

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        return

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False  # V2: modifies no request's logits


class HTCKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        par = vllm_config.parallel_config
        if par.pipeline_parallel_size > 1 or getattr(par, "decode_context_parallel_size", 1) > 1:
            raise ValueError(
                "HTCKVConnector: pipeline parallelism and decode context parallelism are not supported "
                f"(pipeline_parallel_size={par.pipeline_parallel_size}, decode_context_parallel_size="
                f"{getattr(par, 'decode_context_parallel_size', 1)}); tensor parallelism is"
            )
        # Read, not guessed: a vLLM without this field may not report failed receives either, and a
        # refused request would then wait forever (AttributeError: an unsupported vLLM).
        policy = vllm_config.kv_transfer_config.kv_load_failure_policy
        if policy != "fail":
            raise ValueError(
                f"HTCKVConnector: kv_load_failure_policy={policy!r}; it must be 'fail' (the default): the "
                "connector refuses a request it cannot serve exactly by failing its load, which 'recompute' "
                "would retry forever"
            )
        model = vllm_config.model_config
        check = f"{HTCRequestCheck.__module__}:{HTCRequestCheck.__qualname__}"  # vLLM's FQCN syntax
        if role == KVConnectorRole.SCHEDULER and not any(
            lp is HTCRequestCheck or lp == check for lp in model.logits_processors or ()
        ):
            logger.warning(
                "htc connector: HTCRequestCheck is not among the logits processors; a request for a "
                "compressed file with prompt_logprobs will stop the engine instead of being refused "
                "alone (add --logits-processors %s)",
                check,
            )
        cache_dtype = vllm_config.cache_config.cache_dtype
        if cache_dtype != "auto":
            raise ValueError(
                f"HTCKVConnector: kv_cache_dtype {cache_dtype!r};"
                " the files hold the model's dtype: use 'auto'"
            )
        self._num_kv_heads = model.get_total_num_kv_heads()
        self._planner = LoadPlanner(
            num_layers=model.get_total_num_hidden_layers(),
            num_kv_heads=self._num_kv_heads,
            head_dim=model.get_head_size(),
            dtype=_torch_dtype_name(model.dtype),
            config_hash=config_fingerprint(model.hf_text_config.to_dict()),
            weights_hash=model.hf_text_config.to_dict().get(WEIGHTS_KEY),
            block_size=vllm_config.cache_config.block_size,
        )
        self._kv_caches: dict[str, torch.Tensor] = {}
        # Worker side: refused requests and blocks of failed loads, reported with this step's results.
        self._failed: set[str] = set()
        self._invalid_blocks: set[int] = set()

    # ---- scheduler side ----
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        prompt = list(request.prompt_token_ids or [])
        try:
            n = self._planner.match(
                request.request_id,
                request.kv_transfer_params,
                prompt,
                request.cache_salt,
                bool(request.skip_reading_prefix_cache),
                num_computed_tokens,
                lora=getattr(request, "lora_request", None) is not None,
            )
        except ValueError as e:
            if request.skip_reading_prefix_cache:
                raise  # vLLM ignores a connector's claim for this request: nothing can refuse it alone
            logger.error("%s", e)
            # Claimed as an asynchronous load, failed by the workers: vLLM computes none of the prompt
            # and finishes the request with an error (kv_load_failure_policy="fail").
            return self._planner.refuse(request.request_id, str(e), len(prompt), num_computed_tokens), True
        return n, False  # loaded synchronously, in the step that first computes the request

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        if self._planner.allocated(request.request_id, blocks.get_block_ids()[0], num_external_tokens):
            count = self._planner.loads[request.request_id]
            logger.info(
                "htc: request %s loads %d compressed tokens (load %d%s)",
                request.request_id,
                num_external_tokens,
                count,
                ", after a preemption" if count > 1 else "",
            )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return _Metadata(self._planner.take(), self._planner.take_refused())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._planner.finished(request.request_id)
        return False, None

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = kv_caches

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, _Metadata):
            return
        self._failed.update(meta.refused)
        if not meta.loads:
            return
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        lo, hi = head_range(
            self._num_kv_heads, get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        )
        for load in meta.loads:
            try:
                layers = self._read(load, lo, hi)
            except (OSError, ValueError, SafetensorError) as e:
                # The file changed after the scheduler checked it (removed, truncated, a tensor missing or
                # of another shape): this request fails alone. Its blocks are reported invalid; vLLM
                # evicts them and finishes the request with an error (kv_load_failure_policy="fail").
                logger.error(
                    "htc connector: request %r refused: loading %s failed: %s", load.request_id, load.path, e
                )
                self._invalid_blocks.update(slot // self._planner.block_size for slot in load.slots)
                continue
            for name, (keys, values) in layers.items():
                kv_cache = self._kv_caches[name]
                layer = forward_context.no_compile_layers[name]
                slots = torch.tensor(load.slots, dtype=torch.int64, device=kv_cache.device)
                # The backend's own cache write: the layout (and any packing) stays its business.
                layer.impl.do_kv_cache_update(
                    layer,
                    keys.to(kv_cache.device).contiguous(),
                    values.to(kv_cache.device).contiguous(),
                    kv_cache,
                    slots,
                )

    def _read(self, load: KVLoad, lo: int, hi: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's keys and values of ``load`` (this rank's heads ``[lo, hi)``), checked against the
        served model before anything is written."""
        want = (load.end - load.start, hi - lo, self._planner.head_dim)
        layers = {}
        with safe_open(load.path, framework="pt") as f:
            verify_load(f.metadata() or {}, load)  # the file the scheduler checked, in this same open
            for name in self._kv_caches:
                found = _LAYER_INDEX.search(f".{name}")
                if found is None:
                    raise RuntimeError(f"HTCKVConnector: no layer index in the layer name {name!r}")
                i = int(found.group(1))
                kv = tuple(
                    f.get_slice(f"{part}.{i}")[load.start : load.end, lo:hi] for part in ("keys", "values")
                )
                for t in kv:
                    if tuple(t.shape) != want or _torch_dtype_name(t.dtype) != self._planner.dtype:
                        raise ValueError(
                            f"layer {i}: a tensor of shape {tuple(t.shape)} in {t.dtype}, the load needs "
                            f"{want} in {self._planner.dtype}"
                        )
                layers[name] = kv
        return layers

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid_blocks = self._invalid_blocks, set()
        return invalid

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        # A failed receive is also a finished one (vLLM's contract): the scheduler then frees its blocks.
        failed, self._failed = self._failed, set()
        return KVConnectorTransferResults(finished_recving=set(failed), failed_recving=failed)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv wrote every layer already

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # load-only connector

    def wait_for_save(self):
        return
