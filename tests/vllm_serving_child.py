"""Runs in the vLLM venv (``.venv-vllm``), started by tests/test_serving.py and
benchmarks/test_bench_vllm.py: serve the requests of a spec with vLLM's offline ``LLM`` and write
what came back as JSON.

``python tests/vllm_serving_child.py SPEC.json OUT.json``. SPEC: ``{"model": dir, "engines": [{"llm":
{LLM kwargs}, "phases": [{"name", "requests": [{"prompt_token_ids", "cache_salt", "kv_transfer_params",
"max_tokens"}]}]}]}``; each phase is one ``generate`` call (one batch). OUT: per phase, per request
``{"tokens", "logprobs", "num_cached_tokens", "finish_reason"}``, the phase's wall time, and the
connector's log lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

CONNECTOR = {
    "kv_connector": "HTCKVConnector",
    "kv_connector_module_path": "htc_model.serving.vllm_connector",
    "kv_role": "kv_both",
}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(spec_path: str, out_path: str) -> None:
    # The engine in this process: the connector's log records reach the handler below.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path))
    out = {"engines": []}
    for engine in spec["engines"]:
        kwargs = {
            "model": spec["model"],
            "dtype": "float32",
            "seed": 0,
            "skip_tokenizer_init": True,
            "enforce_eager": True,  # no compilation: start-up in seconds, the same numerics
            # A small KV cache, reserved up front (the CPU default reserves most of the machine's memory).
            "kv_cache_memory_bytes": 64 << 20,
            "gpu_memory_utilization": 0.2,
            **engine["llm"],
        }
        if engine.get("connector", True):
            kwargs["kv_transfer_config"] = CONNECTOR
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        # After LLM(): vLLM configures its loggers while it starts.
        lines = _Lines()
        logging.getLogger("vllm.htc_connector").addHandler(lines)
        result = {"startup_s": time.perf_counter() - t0, "phases": []}
        for phase in engine["phases"]:
            prompts, params = [], []
            for r in phase["requests"]:
                prompt = {"prompt_token_ids": r["prompt_token_ids"]}
                if r.get("cache_salt"):
                    prompt["cache_salt"] = r["cache_salt"]
                extra = (
                    {"kv_transfer_params": r["kv_transfer_params"]} if r.get("kv_transfer_params") else None
                )
                prompts.append(prompt)
                params.append(
                    SamplingParams(
                        max_tokens=r["max_tokens"],
                        min_tokens=r["max_tokens"],  # a fixed length: ignore EOS
                        temperature=0.0,
                        logprobs=0,
                        detokenize=False,
                        extra_args=extra,
                    )
                )
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            reqs = []
            for o in outputs:
                c = o.outputs[0]
                reqs.append(
                    {
                        "tokens": list(c.token_ids),
                        "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)],
                        "num_cached_tokens": o.num_cached_tokens,
                        "finish_reason": c.finish_reason,
                    }
                )
            result["phases"].append({"name": phase["name"], "wall_s": wall, "requests": reqs})
        result["connector_log"] = lines.lines
        logging.getLogger("vllm.htc_connector").removeHandler(lines)
        out["engines"].append(result)
        del llm
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
