"""Serving compressed images with vLLM (README, "Serving compressed images with vLLM").

* :mod:`htc_model.serving.export` (our environment): ``export_for_vllm`` writes a compressed prompt's
  KV, re-rotated for vLLM's positions, to a safetensors file; ``save_language_model`` writes the
  checkpoint vLLM serves.
* :mod:`htc_model.serving.kv_format` (both environments): the file's metadata, ``request_inputs``
  (prompt, cache salt and ``kv_transfer_params`` of a request).
* :mod:`htc_model.serving.vllm_connector` (vLLM's environment): ``HTCKVConnector``, the KV connector
  that loads the file into vLLM's paged cache.

Nothing is imported here: vLLM imports the connector by module path, in an environment where the
export side (htc_kernels' compiled extension, our transformers) cannot load.
"""
