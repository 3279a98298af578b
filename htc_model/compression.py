"""``CompressedImages``: what is left of images once their ``<voco>`` tokens have read them.

Under the star mask no token after an image's ``<voco>`` tokens can attend the image's visual tokens
(DESIGN.md §2, "Compaction"), so the language model's KV cache of ``[prefix; visual; <voco>]``
without the visual part is all any later question needs. Positions stay absolute: a question
continues at ``prefix + visual + voco``, exactly where it would in the one-shot prompt.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

import htc_kernels.hf as hkhf

__all__ = ["CompressedImages", "CompressedPrompt"]

_FORMAT = "htc-compressed-images/2"


def model_fingerprint(model) -> str:
    """What decides the compressed KV besides the shapes: the HTC model's weights (a sampled hash,
    cached), the settings that change the computation without changing a shape, and the text
    config's fields that fix the KV's meaning (RoPE, norm epsilon: the vLLM file's config hash)."""
    from .serving.kv_format import config_fingerprint, weights_fingerprint

    cfg = model.config
    settings = (
        cfg.topology,
        cfg.fusion,
        cfg.num_discrete_tokens,
        cfg.vision_feature_layer,
        cfg.vision_feature_select_strategy,
        cfg.continuous_projector,
        config_fingerprint(cfg.text_config.to_dict()),
    )
    text = f"{settings}|{weights_fingerprint(model)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class CompressedImages:
    """The per-layer KV of a shared text prefix and of each image's ``<voco>`` tokens.

    Made by :meth:`HTCForConditionalGeneration.compress`; consumed by
    ``generate(compressed=..., input_ids=questions)`` any number of times (it is never modified).

    Attributes:
        prefix_keys, prefix_values: per layer ``[1, Hkv, P, D]`` (the prefix is the same for every
            image: stored once).
        voco_keys, voco_values: per layer ``[N, Hkv, n_voco, D]``.
        prefix_ids: ``[P]`` int64, the prefix tokens (kept for ``generate``'s bookkeeping).
        num_visual_tokens: visual positions each image occupied (580): the question's positions
            start at ``P + num_visual_tokens + n_voco``.
        model: :func:`model_fingerprint` of the model that compressed them (``generate`` refuses
            them on another model: the same shapes with other weights or settings).
    """

    prefix_keys: list[torch.Tensor]
    prefix_values: list[torch.Tensor]
    voco_keys: list[torch.Tensor]
    voco_values: list[torch.Tensor]
    prefix_ids: torch.Tensor
    num_visual_tokens: int
    model: str = ""

    def __len__(self) -> int:
        return self.voco_keys[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.voco_keys)

    @property
    def num_voco_tokens(self) -> int:
        return self.voco_keys[0].shape[2]

    @property
    def seq_length(self) -> int:
        """Positions the prompt had up to the last ``<voco>``: ``P + num_visual_tokens + n_voco``."""
        return self.prefix_ids.numel() + self.num_visual_tokens + self.num_voco_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of all stored keys and values (the prefix once, the ``<voco>`` KV per image)."""
        tensors = self.prefix_keys + self.prefix_values + self.voco_keys + self.voco_values
        return sum(t.numel() * t.element_size() for t in tensors)

    def select(self, indices) -> CompressedImages:
        """The images at ``indices`` (a list or 1-D tensor; repeats allowed: two questions about one
        image in one batch)."""
        idx = torch.as_tensor(indices, device=self.voco_keys[0].device).flatten()
        if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise ValueError(
                f"CompressedImages.select: indices must be integers, got {idx.dtype} (a boolean mask: "
                "pass mask.nonzero().flatten())"
            )
        idx = idx.long()
        if idx.numel() == 0 or int(idx.min()) < -len(self) or int(idx.max()) >= len(self):
            raise ValueError(
                f"CompressedImages.select: indices must lie in [-{len(self)}, {len(self)}), "
                f"got {idx.tolist()}"
            )
        idx = idx % len(self)  # negative indices count from the end, as in prompt()
        return CompressedImages(
            self.prefix_keys,
            self.prefix_values,
            [k.index_select(0, idx) for k in self.voco_keys],
            [v.index_select(0, idx) for v in self.voco_values],
            self.prefix_ids,
            self.num_visual_tokens,
            self.model,
        )

    def to(self, device=None, dtype=None) -> CompressedImages:
        def move(ts):
            return [t.to(device=device, dtype=dtype) for t in ts]

        return CompressedImages(
            move(self.prefix_keys),
            move(self.prefix_values),
            move(self.voco_keys),
            move(self.voco_values),
            self.prefix_ids.to(device=device),
            self.num_visual_tokens,
            self.model,
        )

    # ---- files ----
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (tensors ``{prefix,voco}_{keys,values}.<layer>``, ``prefix_ids``)."""
        from safetensors.torch import save_file

        tensors = {"prefix_ids": self.prefix_ids.contiguous()}
        for name in ("prefix_keys", "prefix_values", "voco_keys", "voco_values"):
            for i, t in enumerate(getattr(self, name)):
                tensors[f"{name}.{i}"] = t.contiguous()
        meta = {
            "format": _FORMAT,
            "num_layers": str(self.num_layers),
            "num_visual_tokens": str(self.num_visual_tokens),
            "model": self.model,
        }
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CompressedImages:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(
                    f"CompressedImages.load: {path!r} is not a CompressedImages file (format "
                    f"{meta.get('format')!r}, expected {_FORMAT!r})"
                )
            n = int(meta["num_layers"])
            lists = {
                name: [f.get_tensor(f"{name}.{i}") for i in range(n)]
                for name in ("prefix_keys", "prefix_values", "voco_keys", "voco_values")
            }
            return cls(
                **lists,
                prefix_ids=f.get_tensor("prefix_ids"),
                num_visual_tokens=int(meta["num_visual_tokens"]),
                model=meta.get("model", ""),
            )

    def prompt(self, index: int = 0) -> CompressedPrompt:
        """The kept KV of the prompt ``[prefix; <image index>]`` as a :class:`CompressedPrompt`."""
        if not -len(self) <= index < len(self):
            raise ValueError(f"CompressedImages.prompt: index must lie in [0, {len(self)}), got {index}")
        p = self.prefix_ids.numel()
        device = self.voco_keys[0].device
        positions = torch.cat(
            [
                torch.arange(p, device=device),
                torch.arange(self.seq_length - self.num_voco_tokens, self.seq_length, device=device),
            ]
        )
        return CompressedPrompt(
            keys=[torch.cat([pk[0], vk[index]], dim=1) for pk, vk in zip(self.prefix_keys, self.voco_keys)],
            values=[
                torch.cat([pv[0], vv[index]], dim=1) for pv, vv in zip(self.prefix_values, self.voco_values)
            ],
            positions=positions,
            seq_length=self.seq_length,
            model=self.model,
        )

    def export_for_vllm(self, path: str | os.PathLike, model, index: int = 0):
        """Write image ``index``'s prompt ``[prefix; <image>]`` for vLLM: see
        :func:`htc_model.serving.export.export_for_vllm` (``model``: the HTC model that compressed it).
        Returns the file's :class:`~htc_model.serving.kv_format.KVFileInfo`."""
        from .serving.export import export_for_vllm

        return export_for_vllm(self.prompt(index), path, model)

    # ---- what generate() needs ----
    def _check(self, config, lm_dtype, batch: int, model: str | None = None) -> None:
        """ValueError unless these images fit a model of ``config`` (``model``: its
        :func:`model_fingerprint`) and a batch of ``batch`` questions."""
        text = config.text_config
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        k = self.voco_keys[0]
        problems = []
        if self.num_layers != text.num_hidden_layers:
            problems.append(f"{self.num_layers} layers, the model has {text.num_hidden_layers}")
        if tuple(k.shape[1::2]) != (heads, head_dim):
            problems.append(
                f"KV heads x head dim {tuple(k.shape[1::2])}, the model's are {(heads, head_dim)}"
            )
        if self.num_voco_tokens != config.num_voco_tokens:
            problems.append(
                f"{self.num_voco_tokens} <voco> tokens per image, the model writes {config.num_voco_tokens}"
            )
        if self.num_visual_tokens != config.num_visual_tokens:
            problems.append(
                f"{self.num_visual_tokens} visual tokens per image, the model's {config.num_visual_tokens}"
            )
        if model is not None and self.model != model:
            problems.append(
                f"compressed by another model (fingerprint {self.model!r}, this model's {model!r}: other "
                "weights, topology, fusion or vision features); compress them with this model"
            )
        if k.dtype != lm_dtype:
            problems.append(
                f"dtype {k.dtype}, the model runs in {lm_dtype} (compress with the model in its dtype)"
            )
        if len(self) != batch:
            problems.append(
                f"{len(self)} image(s) for {batch} question(s) (one image per question; .select([...]) "
                "picks or repeats images)"
            )
        if problems:
            raise ValueError(
                "generate(compressed=...): these compressed images do not fit: " + "; ".join(problems)
            )

    def _cache(self) -> hkhf.StarCache:
        """A :class:`htc_kernels.hf.StarCache` holding the kept slots at their absolute positions."""
        n = len(self)
        p = self.prefix_ids.numel()
        device = self.voco_keys[0].device
        positions = torch.cat(
            [
                torch.arange(p, device=device),
                torch.arange(self.seq_length - self.num_voco_tokens, self.seq_length, device=device),
            ]
        )
        keys = [
            torch.cat([pk.expand(n, -1, -1, -1), vk], dim=2)
            for pk, vk in zip(self.prefix_keys, self.voco_keys)
        ]
        values = [
            torch.cat([pv.expand(n, -1, -1, -1), vv], dim=2)
            for pv, vv in zip(self.prefix_values, self.voco_values)
        ]
        cache = hkhf.StarCache.from_slots(keys, values, positions, self.seq_length)
        return cache


@dataclass
class CompressedPrompt:
    """The KV one prompt keeps once its images are compressed: its text tokens and ``<voco>`` tokens,
    any number of images (made by :meth:`HTCForConditionalGeneration.compress_prompt`, or
    :meth:`CompressedImages.prompt` for ``[prefix; <image>]``).

    Attributes:
        keys, values: per layer ``[Hkv, n, D]`` in the language model's dtype, RoPE at the absolute
            positions below.
        positions: ``[n]`` int64, strictly increasing: each kept slot's position in the one-shot
            prompt (the dropped visual tokens leave gaps).
        seq_length: the one-shot prompt's length: the position of the first token after it.
        model: :func:`model_fingerprint` of the model that compressed it (``export_for_vllm`` refuses
            another model); empty for a prompt built by hand (then unchecked).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    seq_length: int
    model: str = ""

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    def export_for_vllm(self, path: str | os.PathLike, model):
        """See :func:`htc_model.serving.export.export_for_vllm`."""
        from .serving.export import export_for_vllm

        return export_for_vllm(self, path, model)
