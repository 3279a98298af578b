"""Training data: LLaVA's JSON conversation format, and a tiny synthetic task for tests and the demo.

A record (LLaVA-1.5's ``llava_v1_5_mix665k.json`` layout)::

    {"id": "0001", "image": "0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nwhat colour is the square ?"},
                       {"from": "gpt", "value": "red"}, ...more turns...]}

``image`` is a path relative to the image folder (or a list of paths, one per ``<image>``; absent for
a text-only record). Turns alternate human / gpt, starting with human. They are written with
LLaVA-1.5's Vicuna-v1 template, ``[BOS] {system} USER: {human} ASSISTANT: {gpt}</s>USER: ...``, and the
loss is on the gpt values and their ``</s>`` only.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# ---- LLaVA's conversation format ----------------------------------------------------------------


def _pieces(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, human: str, system: str = "") -> list[int]:
    """The ids of a one-turn prompt ``[BOS] {system} USER: {human} ASSISTANT:`` (what ``generate``
    continues; training writes the same ids before the answer)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _pieces(tokenizer, f"{system} USER: {human} ASSISTANT:".lstrip())


def _check_turns(conversations, record_id) -> None:
    """ValueError unless ``conversations`` are human/gpt pairs, in that order, each with a string value."""
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        n = len(conversations) if isinstance(conversations, list) else type(conversations).__name__
        raise ValueError(f"record {record_id!r}: conversations must be human/gpt pairs, got {n}")
    for turn, (human, gpt) in enumerate(zip(conversations[::2], conversations[1::2])):
        roles = (human.get("from"), gpt.get("from"))
        if roles != ("human", "gpt"):
            raise ValueError(
                f"record {record_id!r}: turn {turn} has roles {roles}, expected ('human', 'gpt')"
            )
        if not isinstance(human.get("value"), str) or not isinstance(gpt.get("value"), str):
            raise ValueError(f"record {record_id!r}: turn {turn} has a value that is not a string")


def conversation_ids(tokenizer, conversations: list[dict], system: str = "", record_id="?") -> tuple:
    """``(input_ids, labels)``, lists of int: the conversation in the Vicuna-v1 template, labels
    -100 except on the gpt values and their ``</s>``. Raises ValueError on a malformed conversation."""
    _check_turns(conversations, record_id)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token (needed to end each answer)")
    ids: list[int] = []
    labels: list[int] = []
    for turn, (human, gpt) in enumerate(zip(conversations[::2], conversations[1::2])):
        if turn == 0:
            prompt = prompt_ids(tokenizer, human["value"], system)
        else:
            prompt = _pieces(tokenizer, f"USER: {human['value']} ASSISTANT:")
        answer = _pieces(tokenizer, f" {gpt['value']}") + [tokenizer.eos_token_id]
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    return ids, labels


class LLaVADataset(torch.utils.data.Dataset):
    """A LLaVA-format JSON file as ``{"input_ids", "labels": LongTensor [S], "pixel_values":
    FloatTensor [n_images, 3, H, W]}`` items (the processor's image processor; CLIP-normalised).

    Args:
        data_path: the JSON file (a list of records).
        processor: an :class:`~htc_model.HTCProcessor` (its tokenizer holds ``<image>``).
        image_folder: where ``image`` paths are relative to (default: the JSON file's folder).
        system: the system prompt written before the first ``USER:`` ("" for none).
    """

    def __init__(self, data_path: str, processor, image_folder: str | None = None, system: str = ""):
        with open(data_path) as f:
            self.records = json.load(f)
        if not isinstance(self.records, list) or not self.records:
            raise ValueError(f"{data_path}: expected a non-empty JSON list of LLaVA records")
        self.processor = processor
        self.image_folder = image_folder if image_folder is not None else os.path.dirname(data_path)
        self.system = system
        for r in self.records:  # refuse a bad file now, not hours into training
            self._check(r)

    def _images(self, record) -> list[str]:
        image = record.get("image")
        return [] if image is None else [image] if isinstance(image, str) else list(image)

    def _check(self, record) -> None:
        rid = record.get("id", "?")
        conversations = record.get("conversations")
        if not isinstance(conversations, list):
            raise ValueError(f"record {rid!r}: no 'conversations' list")
        token = self.processor.image_token
        n_tokens = sum(turn.get("value", "").count(token) for turn in conversations)
        if n_tokens != len(self._images(record)):
            raise ValueError(
                f"record {rid!r}: {n_tokens} {token} token(s) in the conversation but "
                f"{len(self._images(record))} image(s); write one {token} per image"
            )
        voco = getattr(self.processor, "voco_token", None)
        if voco and any(voco in str(turn.get("value", "")) for turn in conversations):
            raise ValueError(f"record {rid!r}: the conversation contains {voco}; the model inserts them")
        _check_turns(conversations, rid)  # as __getitem__ will read them, without tokenizing
        for path in self._images(record):
            if not os.path.isfile(os.path.join(self.image_folder, path)):
                raise ValueError(f"record {rid!r}: image {path!r} not found under {self.image_folder!r}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        record = self.records[i]
        ids, labels = conversation_ids(
            self.processor.tokenizer, record["conversations"], self.system, record.get("id", i)
        )
        paths = self._images(record)
        images = [Image.open(os.path.join(self.image_folder, p)).convert("RGB") for p in paths]
        if images:
            pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        else:
            size = self.processor.image_processor.crop_size
            pixels = torch.zeros(0, 3, size["height"], size["width"])
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixels,
        }


@dataclass
class DataCollator:
    """Right-pads ``input_ids`` (``pad_token_id``) and ``labels`` (-100), adds ``attention_mask``,
    concatenates the images (row-major, as the model reads them)."""

    pad_token_id: int

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            raise ValueError(
                f"DataCollator: pad_token_id must be an int, got {self.pad_token_id!r} (a tokenizer without "
                "a pad token: set tokenizer.pad_token first)"
            )

    def __call__(self, items: list[dict]) -> dict:
        length = max(item["input_ids"].numel() for item in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = item["input_ids"].numel()
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [item["pixel_values"] for item in items]
        if sum(p.shape[0] for p in pixels):
            batch["pixel_values"] = torch.cat(pixels)
        return batch


# ---- the synthetic task ---------------------------------------------------------------------------

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
BACKGROUNDS = {"black": (20, 20, 20), "white": (235, 235, 235)}
QUESTIONS = {
    "square": "what colour is the square ?",
    "background": "what colour is the background ?",
}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def synthetic_words() -> list[str]:
    """Every word the synthetic records and the template write (whitespace-separated)."""
    words = {"USER:", "ASSISTANT:", *COLOURS, *BACKGROUNDS}
    for q in QUESTIONS.values():
        words.update(q.split())
    return sorted(words)


def make_synthetic_dataset(
    out_dir: str, num_samples: int, seed: int = 0, image_size: int = 32, questions=("square",)
) -> str:
    """Write ``num_samples`` PNG images and a LLaVA-format ``data.json`` into ``out_dir``.

    Each image is a square of one of :data:`COLOURS` (side 40-70% of the image, anywhere) on a
    background of one of :data:`BACKGROUNDS`, with pixel noise. Each record asks one of
    ``questions`` (keys of :data:`QUESTIONS`, chosen at random) and answers with the colour word:
    chance is 1/4 for the square, 1/2 for the background. Records also carry ``"colours"`` (both
    answers; ignored by training).

    Returns:
        the path of ``data.json``.
    """
    import numpy as np
    from PIL import Image

    unknown = [q for q in questions if q not in QUESTIONS]
    if unknown or not questions:
        raise ValueError(
            f"make_synthetic_dataset: questions must be some of {list(QUESTIONS)}, got {questions}"
        )
    if num_samples < 1 or image_size < 8:
        raise ValueError("make_synthetic_dataset: need num_samples >= 1 and image_size >= 8")
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    records = []
    for i in range(num_samples):
        square, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        side = rng.randint(int(0.4 * image_size), int(0.7 * image_size))
        x, y = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
        img = np.empty((image_size, image_size, 3), dtype=np.float32)
        img[:] = BACKGROUNDS[background]
        img[y : y + side, x : x + side] = COLOURS[square]
        img += noise.normal(0, 12, img.shape)
        name = f"{i:06d}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(out_dir, name))
        question = rng.choice(list(questions))
        answer = square if question == "square" else background
        records.append(
            {
                "id": f"{i:06d}",
                "image": name,
                "colours": {"square": square, "background": background},  # both answers (tests, demo)
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTIONS[question]}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    path = os.path.join(out_dir, "data.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def word_processor(words: list[str], image_size: int = 32):
    """A :class:`~htc_model.HTCProcessor` for tiny models: a word-level tokenizer over ``words``
    (ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``words``; ``<image>`` and ``<voco>``
    after them) and a CLIP image processor at ``image_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    from .processing_htc import HTCProcessor

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *(w for w in words if w not in SPECIAL_TOKENS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    size = {"shortest_edge": image_size}
    images = CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size})
    return HTCProcessor(images, tokenizer)
