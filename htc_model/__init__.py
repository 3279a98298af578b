"""HTC-VLM, thin, on transformers: ``HTCConfig``, ``HTCForConditionalGeneration``, ``HTCProcessor``.

Importing this package registers the ``"htc"`` model type with the Auto classes (``AutoConfig``,
``AutoModelForImageTextToText``, ``AutoProcessor``), so
``AutoModelForImageTextToText.from_pretrained(dir)`` loads a saved HTC model.
``htc_model.mgvq`` is the MGVQ tokenizer encoder.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .compression import CompressedImages
from .configuration_htc import HTCConfig, HTCQuantizerConfig
from .modeling_htc import HTCCausalLMOutputWithPast, HTCForConditionalGeneration
from .processing_htc import HTCProcessor

__all__ = [
    "CompressedImages",
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
