"""The encoder of any family as one module with plain tensor outputs: what torch.export turns into a program that
needs no Python model code (the encoder-only export, pipeline.weights.encoder_only)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.autoencoder import family_of


class EncoderProgram(nn.Module):
    """x in [-1, 1] -> (posterior mean, logvar clamped as diffusers does) for a KL model, (codes [B, h, w],) for VQ
    and FSQ, (latent,) for a deterministic encoder (DC-AE)."""

    def __init__(self, vae):
        super().__init__()
        fam = family_of(vae)
        self.encoder, self.quant_conv = vae.encoder, getattr(vae, "quant_conv", None)
        self.outputs = ["mean", "logvar"] if fam.has_posterior else ["codes"] if fam.num_codes(vae) else ["latent"]
        self.quantize = vae.quantize if self.outputs == ["codes"] else None

    def forward(self, x: torch.Tensor):
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        if self.outputs == ["mean", "logvar"]:
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar.clamp(-30.0, 20.0)
        return (h,) if self.quantize is None else (self.quantize.codes(h),)  # VQ and FSQ alike
