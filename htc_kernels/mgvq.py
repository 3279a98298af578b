"""MGVQ's grouped quantizer as an ``nn.Module``, on top of :func:`htc_kernels.mgvq_lookup`.

Parameter layout (MGVQ's ``quantize`` submodule; loads the official ``mgvq-f16c32-g8`` weights by
name with ``strict=True``, prefix ``quantize.`` stripped):

==========================  =====================================  ==============================
key                         shape (f16c32-g8)                      meaning
==========================  =====================================  ==============================
``embedding.weight``        ``[groups * codes_per_group, dim]``    all codes; group g uses rows
                            = ``[16384, 4]``                       ``[g*K, (g+1)*K)``
``codebook_used``           ``[groups, usage_history]``            training statistic (buffer;
                            = ``[8, 65536]``                       loaded, never read or updated)
``embed_prob``              ``[groups, codes_per_group]``          training statistic (buffer;
                            = ``[8, 2048]``                        loaded, never read or updated)
==========================  =====================================  ==============================

Channel ``c`` of a latent belongs to group ``c // dim`` (channel order: MGVQ splits the 32 channels
into 8 consecutive groups of 4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from htc_kernels.mgvq_lookup import _unit, mgvq_lookup


class QuantizerOutput(NamedTuple):
    quant: torch.Tensor  # same layout as the input latent; straight-through gradient to it
    indices: torch.Tensor  # [B, N, G] int64, index into each group's slice of codes
    codebook_loss: torch.Tensor  # mean((zq - sg(z))^2): trains the codebook only
    commitment_loss: torch.Tensor  # beta * mean((sg(zq) - z)^2): trains the encoder only


class GroupedQuantizer(nn.Module):
    """MGVQ's multi-group vector quantizer (``l2_norm`` mode by default: cosine nearest code).

    Args:
        groups: G (8 for MGVQ-f16c32-g8).
        codes_per_group: K (2048).
        dim: channels per group, d (4); the latent has ``groups * dim`` channels.
        l2_norm: unit-normalise latents and codes (nearest = largest dot product); else squared L2.
        beta: commitment-loss weight (0.25).
        usage_history: second dim of the ``codebook_used`` buffer (65536 in the official weights).
        backend: passed to :func:`mgvq_lookup` (``"auto"`` picks the CPU/CUDA/Triton kernel).
    """

    def __init__(
        self,
        groups: int = 8,
        codes_per_group: int = 2048,
        dim: int = 4,
        l2_norm: bool = True,
        beta: float = 0.25,
        usage_history: int = 65536,
        backend: str = "auto",
    ):
        super().__init__()
        if groups < 1 or codes_per_group < 1 or dim < 1:
            raise ValueError(
                f"GroupedQuantizer: groups ({groups}), codes_per_group ({codes_per_group}) and dim "
                f"({dim}) must be >= 1"
            )
        self.groups, self.codes_per_group, self.dim = groups, codes_per_group, dim
        self.l2_norm, self.beta, self.backend = l2_norm, beta, backend
        self.embedding = nn.Embedding(groups * codes_per_group, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codes_per_group, 1.0 / codes_per_group)
        self.register_buffer("codebook_used", torch.zeros(groups, usage_history))
        self.register_buffer("embed_prob", torch.zeros(groups, codes_per_group))

    @property
    def channels(self) -> int:
        return self.groups * self.dim

    def codebook(self) -> torch.Tensor:
        """The ``[G, K, d]`` view of ``embedding.weight`` (no copy)."""
        return self.embedding.weight.view(self.groups, self.codes_per_group, self.dim)

    def _tokens(self, z: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if not isinstance(z, torch.Tensor) or z.dim() not in (3, 4):
            raise ValueError(
                "GroupedQuantizer: z must be [B, C, H, W] or [B, N, C], got "
                f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}"
            )
        spatial = z.dim() == 4
        c = z.shape[1] if spatial else z.shape[2]
        if c != self.channels:
            raise ValueError(
                f"GroupedQuantizer: z has {c} channels, expected groups*dim = {self.channels} "
                f"({'[B, C, H, W]' if spatial else '[B, N, C]'} input of shape {tuple(z.shape)})"
            )
        tokens = z.flatten(2).transpose(1, 2) if spatial else z  # [B, N, C]
        return tokens, spatial

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` (``[B, C, H, W]`` or ``[B, N, C]``, C = groups * dim).

        ``quant`` has z's layout and equals the selected (unit-normalised when ``l2_norm``) codes;
        its gradient reaches z straight-through (through the normalisation), not the codebook. The
        codebook is trained by ``codebook_loss``, the encoder by ``commitment_loss`` (as in MGVQ).
        """
        tokens, spatial = self._tokens(z)
        b, n, _ = tokens.shape
        zg = tokens.reshape(b, n, self.groups, self.dim)
        cb = self.codebook()
        codes, indices = mgvq_lookup(zg, cb.detach(), normalize=self.l2_norm, backend=self.backend)
        # _unit, not F.normalize: the same values, but |z| is formed without overflow (F.normalize
        # gives zero vectors past |z| ~ 1e19 in float32, and the losses would measure those).
        zn = _unit(zg) if self.l2_norm else zg
        sel = cb[torch.arange(self.groups, device=cb.device), indices]  # [B, N, G, d], grad -> cb
        if self.l2_norm:
            sel = _unit(sel)
        codebook_loss = F.mse_loss(sel, zn.detach())
        commitment_loss = self.beta * F.mse_loss(codes.detach(), zn)
        quant = codes.reshape(b, n, self.channels)
        if spatial:
            quant = quant.transpose(1, 2).reshape(z.shape)
        return QuantizerOutput(quant, indices, codebook_loss, commitment_loss)

    @staticmethod
    def flatten_for_projector(quant: torch.Tensor) -> torch.Tensor:
        """The vector HTC's discrete projector consumes: ``[B, C*H*W]`` in the ``[C, H, W]`` order
        of the quantized latent (``[B, 32, 21, 21]`` -> ``[B, 14112]``). A ``[B, N, C]`` input is
        taken as tokens in row-major (h, w) order and gives the same vector."""
        if quant.dim() == 4:
            return quant.flatten(1)
        if quant.dim() == 3:
            return quant.transpose(1, 2).flatten(1)
        raise ValueError(
            f"flatten_for_projector: expected [B, C, H, W] or [B, N, C], got {tuple(quant.shape)}"
        )
