"""htc-kernels: kernels for hybrid token compression in vision-language models (HTC-VLM).

Public API (DESIGN.md §3)::

    hk.TokenKind, hk.StarLayout, hk.star_mask
    hk.star_attention(q, k, v, layout, scale=None, softcap=None, backend="auto")
    hk.star_attention_reference(q, k, v, layout, scale=None, softcap=None)
    hk.mgvq_lookup(z, codebook, normalize=True, backend="auto")
    hk.mgvq_lookup_reference(z, codebook, normalize=True)
    hk.GroupedQuantizer (htc_kernels.mgvq)
    hk.info()
"""

from htc_kernels import _ext  # noqa: F401  (loads the extension, warns once if it cannot)
from htc_kernels._info import info
from htc_kernels.layout import StarLayout, TokenKind, star_mask
from htc_kernels.mgvq import GroupedQuantizer
from htc_kernels.mgvq_lookup import mgvq_lookup, mgvq_lookup_reference
from htc_kernels.reference import star_attention_reference
from htc_kernels.star_attention import star_attention

__version__ = "0.1.0"


def __getattr__(name: str):
    # `hk.hf` (the transformers integration) is imported on first use, so that `import htc_kernels`
    # does not import transformers.
    if name == "hf":
        import importlib

        return importlib.import_module("htc_kernels.hf")
    raise AttributeError(f"module 'htc_kernels' has no attribute {name!r}")


__all__ = [
    "GroupedQuantizer",
    "StarLayout",
    "TokenKind",
    "hf",
    "info",
    "mgvq_lookup",
    "mgvq_lookup_reference",
    "star_attention",
    "star_attention_reference",
    "star_mask",
]
