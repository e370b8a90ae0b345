"""Family-independent helpers: build a model from config, run it, encode, decode, ask its family. Everything that
differs between kinds of autoencoder is in pipeline.models.families."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.families import (  # noqa: F401 (re-exported: the names callers use)
    AutoencoderOutput,
    Latent,
    family,
    family_of,
)
from pipeline.models.posterior import key_generator, key_noise, key_seed, reparameterize  # noqa: F401


def build_autoencoder(cfg: ModelConfig, sample_size: int = 256) -> nn.Module:
    return family(cfg.kind).build(cfg, sample_size)


def downsampling_factor(model) -> int:
    return family_of(model).downsampling_factor(model)


def last_decoder_layer(model) -> nn.Parameter:
    return family_of(model).last_decoder_layer(model)


def encode_latent(model, x: torch.Tensor) -> Latent:
    return family_of(model).encode(model, x)


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    return family_of(model).decode(model, z)


def check_input(model, x: torch.Tensor) -> None:
    """Shapes the model cannot take, as one clear error instead of a deep conv failure."""
    fam = family_of(model)
    f = fam.downsampling_factor(model)
    c = fam.image_channels(model)
    if x.dim() != 4:
        raise UserError(f"expected images as [batch, {c}, height, width], got shape {tuple(x.shape)}")
    if x.shape[1] != c:
        raise UserError(f"the model takes {c}-channel images (model.in_channels), got {x.shape[1]} channels")
    if x.shape[2] % f or x.shape[3] % f:
        raise UserError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the downsampling factor {f}")


def run_autoencoder(model, x: torch.Tensor, sample_posterior: bool = True, transform=None) -> AutoencoderOutput:
    """x in [-1, 1] -> reconstruction plus what the objective needs; `transform` (training) changes the latent the
    decoder sees (Family.forward)."""
    check_input(model, x)
    return family_of(model).forward(model, x, sample_posterior, transform)
