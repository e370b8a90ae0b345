"""The module the trainer optimises: one forward (what DDP needs) around a first-stage autoencoder."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.autoencoder import AutoencoderOutput, family_of, run_autoencoder


class TrainableAutoencoder(nn.Module):
    """Wraps a model of any family as `.vae`; forward(x) -> AutoencoderOutput. With `freeze_encoder`, the encoder
    side (the family's: encoder, quant_conv, and for VQ the codebook) neither trains nor updates its statistics, so
    the latent space of an existing diffusion model stays valid while the decoder is fine-tuned."""

    def __init__(self, vae: nn.Module, freeze_encoder: bool = False):
        super().__init__()
        self.vae = vae
        self.frozen_encoder = freeze_encoder
        if freeze_encoder:
            for m in family_of(vae).encoder_side(vae):
                m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_encoder:
            for m in family_of(self.vae).encoder_side(self.vae):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        return run_autoencoder(self.vae, x)
