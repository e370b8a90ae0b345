"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"), a drop-in
for VQModel's quantizer: no codebook, no codebook loss, no collapse.

Each of the d = len(levels) latent channels is bounded, z -> tanh(z + shift) * half_l - offset with
half_l = (L - 1)(1 - eps) / 2, offset 1/2 for even L and shift = tan(offset / half_l) (the reference notebook,
google-research fsq/fsq.ipynb), then rounded with a straight-through gradient, giving L integer values per channel;
z_q = rounded / (L // 2) lies in [-1, 1]. The implicit codebook is every combination: prod(levels) codes, code index
= sum_i digit_i * basis_i with basis = cumprod([1] + levels[:-1]) and digit_i = rounded_i + L_i // 2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.quantizer import perplexity


class FiniteScalarQuantizer(nn.Module):
    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        self.levels = [int(v) for v in levels]
        self.eps = eps
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], dtype=torch.long), 0)
        half_l = (levels_t - 1) * (1 - eps) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        self.register_buffer("_half_l", half_l.view(1, -1, 1, 1), persistent=False)  # the config holds the levels
        self.register_buffer("_offset", offset.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_shift", torch.tan(offset / half_l).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_half_width", (levels_t // 2).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_basis", basis.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.long).view(1, -1, 1, 1), persistent=False)

    @property
    def n_e(self) -> int:
        """Size of the implicit codebook (diffusers' name)."""
        return math.prod(self.levels)

    @property
    def vq_embed_dim(self) -> int:
        return len(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def forward(self, z: torch.Tensor):
        """z [B, d, h, w] -> (z_q with straight-through gradient, loss 0, (perplexity, None, indices [B, h, w]))."""
        b = self.bound(z.float())
        rounded = b + (torch.round(b) - b).detach()  # straight-through: the gradient of the bounded value
        z_q = (rounded / self._half_width).to(z.dtype)
        with torch.no_grad():
            codes = self._index(b)
            counts = torch.bincount(codes.flatten(), minlength=self.n_e).float()
        return z_q, torch.zeros((), device=z.device), (perplexity(counts), None, codes)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """The code index [B, h, w] of each position (what forward() returns, without the straight-through part)."""
        return self._index(self.bound(z.float()))

    def _index(self, bounded: torch.Tensor) -> torch.Tensor:
        digits = torch.round(bounded).long() + self._half_width.long()
        return (digits * self._basis).sum(1)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] -> z_q [B, d, h, w]: the exact inverse of the indexing in forward()."""
        digits = (codes.long().unsqueeze(1) // self._basis) % self._levels
        return (digits - self._half_width.long()).float() / self._half_width
