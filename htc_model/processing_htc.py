"""HTCProcessor: a tokenizer and a CLIP image processor, with the ``<image>`` and ``<voco>`` tokens.

Unlike LLaVA's processor it does not expand ``<image>``: the model replaces each ``<image>`` by its
visual and ``<voco>`` tokens itself (so ``input_ids`` stay short and the kinds are the model's
business). ``<voco>`` is added to the tokenizer so that decoded expanded sequences read well; user text
must not contain it.
"""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin

__all__ = ["HTCProcessor"]


class HTCProcessor(ProcessorMixin):
    """``HTCProcessor(image_processor, tokenizer)``; adds ``image_token`` and ``voco_token`` to the
    tokenizer as special tokens when it lacks them.

    ``processor(text=..., images=...)`` returns ``input_ids`` / ``attention_mask`` ``[B, S]`` (one
    ``<image>`` token per image, padded by the tokenizer's ``padding_side``) and ``pixel_values``
    ``[N, 3, H, W]`` (CLIP-normalised, in the order the ``<image>`` tokens appear, row by row).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        voco_token: str = "<voco>",
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("HTCProcessor: a tokenizer is required")
        missing = [t for t in (image_token, voco_token) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        self.image_token, self.voco_token = image_token, voco_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.voco_token_id = tokenizer.convert_tokens_to_ids(voco_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **text_kwargs) -> BatchFeature:
        """Tokenize ``text`` (a string or a list, one per sample) and preprocess ``images`` (a list of
        images, or a list per sample). ``text_kwargs`` go to the tokenizer (``padding=True`` by
        default). The number of ``<image>`` tokens must equal the number of images."""
        if text is None:
            raise ValueError("HTCProcessor: text is required (put one <image> where each image goes)")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                "HTCProcessor: text must be a string or a non-empty list of strings, one per sample; "
                f"got {type(text).__name__}" + (f" of {[type(t).__name__ for t in texts]}" if texts else "")
            )
        if any(self.voco_token in t for t in texts):
            raise ValueError(
                f"HTCProcessor: the text contains {self.voco_token}; the model inserts the <voco> tokens"
            )
        per_sample = [t.count(self.image_token) for t in texts]
        nested = isinstance(images, (list, tuple)) and any(isinstance(i, (list, tuple)) for i in images)
        if nested:  # a list per sample: each sample's list must match that sample's image tokens
            given = [len(_flatten(i)) for i in images]
            if given != per_sample:
                raise ValueError(
                    f"HTCProcessor: per sample the text has {per_sample} {self.image_token} token(s) but "
                    f"{given} image(s) were given; give each sample the images of its own text"
                )
        flat = _flatten(images)
        n_tokens = sum(per_sample)
        if n_tokens != len(flat):
            raise ValueError(
                f"HTCProcessor: the text has {n_tokens} {self.image_token} token(s) but {len(flat)} image(s) "
                "were given; write one image token per image"
            )
        text_kwargs.setdefault("padding", True)
        data = dict(self.tokenizer(texts, return_tensors=return_tensors, **text_kwargs))
        # Counted again in the ids: truncation (or a tokenizer that splits the token) can lose an
        # <image> whose image would then have no place in the sequence.
        kept = [sum(int(t) == self.image_token_id for t in row) for row in data["input_ids"]]
        if kept != per_sample:
            raise ValueError(
                f"HTCProcessor: the text has {per_sample} {self.image_token} token(s) per sample but the "
                f"tokenized ids keep {kept} (truncation cut them, or the tokenizer split the token); "
                "raise max_length or shorten the text"
            )
        if flat:
            data["pixel_values"] = self.image_processor(flat, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _flatten(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    out = []
    for item in images:
        out.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return out
