"""Random star layouts for tests (DESIGN.md §6): prefixes, several images, several <voco> tokens,
left/right padding, odd sizes. Shared by the star_attention and hf tests."""

from __future__ import annotations

import random

import torch

from htc_kernels import TokenKind

T, V, C, P = TokenKind.TEXT, TokenKind.VISUAL, TokenKind.VOCO, TokenKind.PAD


def random_sample(rng: random.Random, max_images: int = 3, max_visual: int = 40) -> list[int]:
    """One unpadded sample: text, then images (VISUAL run, VOCO run, text), then text."""
    seq = [T] * rng.randint(0, 9)
    for _ in range(rng.randint(0, max_images)):
        seq += [V] * rng.randint(1, max_visual)
        seq += [C] * rng.randint(1, 3)
        seq += [T] * rng.randint(0, 5)
    seq += [T] * rng.randint(1, 7)
    return seq


def pad_batch(samples: list[list[int]], side: str, total: int | None = None) -> torch.Tensor:
    """[B, S] kinds, each sample padded with PAD on `side` ("left" or "right") to a common length."""
    total = max(len(s) for s in samples) if total is None else total
    rows = []
    for s in samples:
        pad = [P] * (total - len(s))
        rows.append(pad + s if side == "left" else s + pad)
    return torch.tensor([[int(x) for x in r] for r in rows], dtype=torch.long)


def random_kinds(seed: int, batch: int = 2, **kw) -> torch.Tensor:
    rng = random.Random(seed)
    samples = [random_sample(rng, **kw) for _ in range(batch)]
    return pad_batch(samples, rng.choice(["left", "right"]))


def llava_kinds(prefix: int = 35, visual: int = 580, voco: int = 1, suffix: int = 64) -> torch.Tensor:
    return torch.tensor([T] * prefix + [V] * visual + [C] * voco + [T] * suffix)
