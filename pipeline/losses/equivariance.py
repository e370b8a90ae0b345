"""Latent transforms for latents that diffuse well: what one training step does to the image before encoding, to the
latent before decoding, and what the reconstruction is compared with (docs/diffusable-latents.md).

  EQ-VAE (Kouzelis et al. 2025; zelaki/eqvae, AutoencoderKL.training_step): with probability p the latent is
    rescaled bilinearly by s in {8/32, ..., 31/32} (one s for both axes unless anisotropic) and always also rotated by
    90, 180 or 270 degrees; the decoder's output is compared with the same transform of the image. Otherwise the
    plain reconstruction, a share of it (prior_low_res) on the image rescaled by a random s first.
  Scale equivariance (Skorokhodov et al. 2025): an extra term between decode(downsample(z)) and downsample(x) by a
    factor drawn from {2, 4}.
  Latent noise (l-DeTok, RAE, sigma-VAE): the decoder sees the latent with noise mixed in.

Sizes: a latent side h rescaled by s = n/d becomes floor(h * n / d) (at least 1), as F.interpolate(scale_factor=s)
gives; the image target is that times the downsampling factor, so decode and target always agree (at 256 px and f8
this is exactly EQ-VAE's 256 * s). The resampling is bilinear with align_corners=False, as in EQ-VAE's code, with no
antialiasing there (its torch 1.7 had none) unless asked.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from pipeline.config import LossConfig


def resize(x: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resampling of [B, C, H, W] to `size` (align_corners=False); the tensor itself when it already is."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)


def rotate(x: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    """EQ-VAE's rotation: torch.rot90(x, k, dims=[-1, -2]), the same call for latent and image."""
    return torch.rot90(x, quarter_turns, dims=[-1, -2]) if quarter_turns % 4 else x


def scaled_side(side: int, num: int, den: int) -> int:
    """floor(side * num / den), at least 1: the side F.interpolate(scale_factor=num/den) gives."""
    return max(1, side * num // den)


class StepPlan:
    """The transforms of one training step. `factor`: the model's downsampling factor. `encode_size`: the image is
    resampled to this before encoding (the low-resolution prior); `latent_size` and `rotation`: the latent is
    resampled and rotated before decoding, and the target is the same transform of the image (equivariance);
    `extra_factor`: an extra decode of the latent downsampled by this factor against the image downsampled alike
    (scale equivariance); `noise`: (kind, strength) of the latent noise."""

    def __init__(self, factor: int, encode_size=None, latent_size=None, rotation: int = 0, extra_factor: int = 0,
                 noise: tuple[str, float] | None = None, antialias: bool = False):
        self.factor, self.encode_size, self.latent_size, self.rotation = factor, encode_size, latent_size, rotation
        self.extra_factor, self.noise, self.antialias = extra_factor, noise, antialias
        self._made: dict[str, tuple] = {}  # what input() and target() last made, and of which tensor

    def _once(self, what: str, x: torch.Tensor, make) -> torch.Tensor:
        """make(x), made once per step: the model, the objective and the discriminator all ask for the same images."""
        if what not in self._made or self._made[what][0] is not x:
            self._made[what] = (x, make(x))
        return self._made[what][1]

    @property
    def equivariant(self) -> bool:
        """Whether the decoder sees a transformed latent (the reconstruction is compared with a transformed image)."""
        return self.latent_size is not None or self.rotation % 4 != 0

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The image the encoder sees."""
        if not self.encode_size:
            return x
        return self._once("input", x, lambda x: resize(x, self.encode_size, self.antialias))

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        """The latent the decoder sees: noise mixed in, then rescaled, then rotated."""
        if self.noise is not None:
            z = noisy_latent(z, *self.noise)
        if self.latent_size is not None:
            z = resize(z, self.latent_size, self.antialias)
        return rotate(z, self.rotation)

    def target(self, x_in: torch.Tensor) -> torch.Tensor:
        """What the reconstruction is compared with: the same transform of the encoded image."""
        def make(x_in):
            if self.latent_size is not None:
                x_in = resize(x_in, [self.factor * s for s in self.latent_size], self.antialias)
            return rotate(x_in, self.rotation)

        return self._once("target", x_in, make)

    def _extra_side(self, side: int) -> int:
        return max(1, side // self.factor // self.extra_factor)

    def extra_latent(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        return resize(z, (max(1, h // self.extra_factor), max(1, w // self.extra_factor)), self.antialias)

    def extra_target(self, x_in: torch.Tensor) -> torch.Tensor:
        H, W = x_in.shape[-2:]
        return resize(x_in, (self.factor * self._extra_side(H), self.factor * self._extra_side(W)), self.antialias)


def noisy_latent(z: torch.Tensor, kind: str, strength: float) -> torch.Tensor:
    """l-DeTok's interpolation z' = (1 - t) z + t * strength * eps, or RAE's / sigma-VAE's additive noise
    z' = z + t * strength * eps; t ~ U(0, 1) per sample, eps ~ N(0, I) (torch's RNG on z's device)."""
    t = torch.rand((z.shape[0],) + (1,) * (z.dim() - 1), device=z.device, dtype=z.dtype)
    eps = torch.randn_like(z) * strength
    if kind == "interpolate":
        return (1 - t) * z + t * eps
    return z + t * eps


NOISE_STRENGTH = {"interpolate": 3.0, "additive": 0.8}  # l-DeTok's gamma, RAE's noise_tau


def draw_plan(cfg: LossConfig, image_shape, factor: int) -> StepPlan | None:
    """This step's transforms (python's `random`, saved in checkpoints, so a resumed run draws the same), or None for
    a plain step."""
    eq, ln = cfg.equivariance, cfg.latent_noise
    noise = None
    if ln.kind != "none":
        noise = (ln.kind, NOISE_STRENGTH[ln.kind] if ln.strength is None else ln.strength)
    if not eq.enabled:
        return StepPlan(factor, noise=noise) if noise else None
    p = eq.p if eq.p is not None else (0.5 if eq.mode == "eq-vae" else 1.0)
    antialias = eq.antialias if eq.antialias is not None else eq.mode == "scale"
    h, w = image_shape[-2] // factor, image_shape[-1] // factor
    plan = StepPlan(factor, noise=noise, antialias=antialias)
    if eq.mode == "scale":
        if random.random() < p:
            plan.extra_factor = random.choice(eq.scale_factors)
        return plan
    lo, hi, den = eq.scale_range[0], eq.scale_range[1], eq.scale_denominator
    if random.random() < p:
        sy = random.randint(lo, hi)
        sx = random.randint(lo, hi) if eq.anisotropic else sy
        plan.latent_size = (scaled_side(h, sy, den), scaled_side(w, sx, den))
        plan.rotation = random.choice(eq.rotations) if eq.rotations else 0
    elif random.random() < eq.prior_low_res:
        s = random.randint(lo, hi)
        plan.encode_size = (factor * scaled_side(h, s, den), factor * scaled_side(w, s, den))
    return plan
