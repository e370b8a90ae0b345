"""Tiny autoencoders (TAESD, TAESDXL, TAESD3, TAEF1; diffusers' AutoencoderTiny): a deterministic latent in the
convention of the VAE they distil (scaling_factor and shift_factor in their config). Trained through encode ->
decode, never forward(), which rounds the latent to 8 bits (no gradient reaches the encoder); its gradient
checkpointing skips the encoder's input rescaling, so it is refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.models.families.base import Family, Latent

if TYPE_CHECKING:
    import torch
    from torch import nn


class TinyFamily(Family):
    name = "tiny"
    class_names = ("AutoencoderTiny",)
    latent = "latent"

    def encode(self, model, x: torch.Tensor) -> Latent:
        return Latent(model.encode(x).latents)

    def last_decoder_layer(self, model) -> nn.Parameter:
        return model.decoder.layers[-1].weight

    def last_encoder_layer(self, model) -> nn.Parameter:
        return model.encoder.layers[-1].weight

    def enable_gradient_checkpointing(self, model) -> None:
        raise UserError("train.gradient_checkpointing: AutoencoderTiny's checkpointed encoder skips its input "
                        "rescaling in diffusers (wrong latents); train it without")
