"""The module the trainer optimises: one forward (what DDP needs) around a diffusers autoencoder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.io import atomic_write_bytes
from pipeline.models.autoencoder import AutoencoderOutput, is_vq, run_autoencoder


class TrainableAutoencoder(nn.Module):
    """Wraps AutoencoderKL / VQModel as `.vae`; forward(x) -> AutoencoderOutput. With `freeze_encoder`, the
    encoder side (encoder, quant_conv, and for VQ the codebook) neither trains nor updates its statistics, so the
    latent space of an existing diffusion model stays valid while the decoder is fine-tuned."""

    def __init__(self, vae: nn.Module, freeze_encoder: bool = False):
        super().__init__()
        self.vae = vae
        self.frozen_encoder = freeze_encoder
        if freeze_encoder:
            for m in self._encoder_side():
                m.requires_grad_(False)

    def _encoder_side(self) -> list[nn.Module]:
        parts = [self.vae.encoder, self.vae.quant_conv]
        if is_vq(self.vae):
            parts.append(self.vae.quantize)
        return [p for p in parts if p is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_encoder:
            for m in self._encoder_side():
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        return run_autoencoder(self.vae, x)


def save_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> np.ndarray:
    """uint8 [B, 3, H, W] inputs above their reconstructions, as one PNG (written atomically); returns the HxWx3
    grid so callers can log it without reading the file back."""
    top = torch.cat(list(inputs.cpu()), dim=2)
    bottom = torch.cat(list(reconstructions.cpu()), dim=2)
    grid = torch.cat([top, bottom], dim=1).permute(1, 2, 0).contiguous().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return grid
