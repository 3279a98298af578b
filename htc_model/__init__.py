"""HTC-VLM, thin, on transformers: ``HTCConfig``, ``HTCForConditionalGeneration``, ``HTCProcessor``.

Importing this package registers the ``"htc"`` model type with the Auto classes (``AutoConfig``,
``AutoModelForImageTextToText``, ``AutoProcessor``), so
``AutoModelForImageTextToText.from_pretrained(dir)`` loads a saved HTC model.
``htc_model.mgvq`` is the MGVQ tokenizer encoder; ``htc_model.serving`` serves compressed images
with vLLM.
"""

import sys

if "vllm" in sys.modules:
    # A vLLM process importing htc_model.serving.vllm_connector by module path (which imports this
    # package first): the model side cannot load there (vLLM's torch is not the one htc_kernels'
    # extension was built for), so the package is only a namespace for htc_model.serving.
    __all__ = []

    def __getattr__(name):
        raise ImportError(
            f"htc_model.{name} is not available in a process that imported vllm: vLLM's environment "
            "loads only htc_model.serving.vllm_connector and htc_model.serving.kv_format"
        )

else:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .compression import CompressedImages, CompressedPrompt
    from .configuration_htc import HTCConfig, HTCQuantizerConfig
    from .modeling_htc import HTCCausalLMOutputWithPast, HTCForConditionalGeneration
    from .processing_htc import HTCProcessor

    __all__ = [
        "CompressedImages",
        "CompressedPrompt",
        "HTCCausalLMOutputWithPast",
        "HTCConfig",
        "HTCForConditionalGeneration",
        "HTCProcessor",
        "HTCQuantizerConfig",
    ]

    def _register() -> None:
        AutoConfig.register("htc", HTCConfig, exist_ok=True)
        AutoConfig.register("htc_quantizer", HTCQuantizerConfig, exist_ok=True)
        AutoModelForImageTextToText.register(HTCConfig, HTCForConditionalGeneration, exist_ok=True)
        AutoProcessor.register(HTCConfig, HTCProcessor, exist_ok=True)

    _register()
