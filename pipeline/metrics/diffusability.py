"""The diffusability probe: how easy a latent space is for a diffusion model, beside how well it reconstructs
(docs/diffusable-latents.md).

  equivariance error   PSNR of decode(T(z)) against T(x), 8-bit, for T a 2x downscale (bilinear, align_corners=False:
                       on both sides exactly the mean of each 2x2 block) and each rotation by 90, 180, 270 degrees.
                       An autoencoder whose decoder commutes with these transforms (EQ-VAE) scores close to its plain
                       PSNR; a plain VAE's latents decode to noise-like textures when rescaled.
  spectrum             the share of the latent's 2D DCT-II energy (orthonormal, per channel, per image) at spatial
                       frequencies above half the Nyquist frequency (radially: sqrt((u/h)^2 + (v/w)^2) > 1/2 with
                       u, v the DCT indices), per channel and over all channels; the DC coefficient (each channel's
                       mean over the image) is left out of both sums. High-frequency latents are what Skorokhodov et
                       al. (2025) show diffusion models struggle with.

z is the posterior mean for KL models (what the reconstruction is decoded from), the quantised latent for VQ / FSQ,
the latent itself otherwise. Every statistic is a float64 sum, reduced across ranks with the evaluator's.
"""

from __future__ import annotations

import math

import torch

from pipeline.losses.equivariance import resize, rotate
from pipeline.metrics.image import psnr
from pipeline.pixels import to_uint8

ROTATIONS = {"rot90": 1, "rot180": 2, "rot270": 3}


def dct_matrix(n: int, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (n x n, float64): C @ v is the DCT of v; C is orthogonal."""
    k = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(n, dtype=torch.float64, device=device)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def dct2(z: torch.Tensor) -> torch.Tensor:
    """2D DCT-II (orthonormal) over the last two dimensions, in float64."""
    h, w = z.shape[-2:]
    return dct_matrix(h, z.device) @ z.double() @ dct_matrix(w, z.device).T


def high_frequency_mask(h: int, w: int, device=None) -> torch.Tensor:
    """True where a DCT coefficient's frequency is above half the Nyquist frequency (radially)."""
    u = torch.arange(h, dtype=torch.float64, device=device)[:, None] / h
    v = torch.arange(w, dtype=torch.float64, device=device)[None, :] / w
    return (u**2 + v**2).sqrt() > 0.5


def spectrum_energy(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, summed over the batch: (energy above half Nyquist, energy without the DC coefficient)."""
    e = dct2(z).pow(2)
    e[..., 0, 0] = 0.0
    high = e * high_frequency_mask(*z.shape[-2:], device=z.device)
    return high.sum((0, 2, 3)), e.sum((0, 2, 3))


def equivariance_pairs(z: torch.Tensor, x: torch.Tensor, factor: int, scale: bool = True):
    """(name, transformed latent, transformed image) for the probe's transforms; the 2x downscale only when the
    latent has at least 2 positions per side and the decoder decodes a latent of any size (`scale`)."""
    h, w = z.shape[-2:]
    if scale and h >= 2 and w >= 2:
        yield "scale_1/2", resize(z, (h // 2, w // 2)), resize(x, (factor * (h // 2), factor * (w // 2)))
    for name, k in ROTATIONS.items():
        yield name, rotate(z, k), rotate(x, k)


class DiffusabilityProbe:
    """Float64 sums of the probe over batches (`sums`, keyed for the evaluator's reduction), and their results."""

    def __init__(self, latent_channels: int, latent_side: int, any_size: bool = True):
        names = (["scale_1/2"] if latent_side >= 2 and any_size else []) + list(ROTATIONS)
        self.names, self.any_size = names, any_size
        self.sums = {f"eq_psnr_{n}": torch.zeros((), dtype=torch.float64) for n in names}
        self.sums["hf_energy"] = torch.zeros(latent_channels, dtype=torch.float64)
        self.sums["dct_energy"] = torch.zeros(latent_channels, dtype=torch.float64)

    @torch.no_grad()
    def add(self, decode, z: torch.Tensor, x: torch.Tensor, factor: int, on_transform=None) -> None:
        """`decode`: latent -> image in [-1, 1]; z the latent of the images x (in [-1, 1]); `on_transform(name, i,
        n)` is told before each of the n decodes."""
        for i, (name, tz, tx) in enumerate(equivariance_pairs(z, x, factor, self.any_size)):
            if on_transform is not None:
                on_transform(name, i + 1, len(self.names))
            value = psnr(to_uint8(tx), to_uint8(decode(tz))).clamp(max=100.0)
            self.sums[f"eq_psnr_{name}"] += value.double().sum().cpu()
        high, total = spectrum_energy(z.float())
        self.sums["hf_energy"] += high.cpu()
        self.sums["dct_energy"] += total.cpu()

    def results(self, sums: dict, n: float) -> dict:
        """The probe's numbers from the reduced sums and the number of images."""
        eq = {name: float(sums[f"eq_psnr_{name}"]) / n for name in self.names}
        high, total = sums["hf_energy"], sums["dct_energy"]
        share = lambda a, b: float(a) / float(b) if float(b) > 0 else 0.0  # noqa: E731
        return {
            "equivariance_psnr": eq,
            "equivariance_psnr_rotations": sum(eq[k] for k in ROTATIONS) / len(ROTATIONS),
            "high_frequency_share": share(high.sum(), total.sum()),
            "high_frequency_share_per_channel": [round(share(a, b), 6) for a, b in zip(high, total)],
        }
