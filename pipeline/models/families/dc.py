"""Deep-compression autoencoders (DC-AE, Chen et al. 2025; diffusers' AutoencoderDC, SANA's VAE): f32 to f64 with a
deterministic latent, residual and EfficientViT (linear attention) stages, no posterior, no shift (SANA scales by
scaling_factor only). The DC-AE 1.5 structured latent (model.dc.channel_mask_step) trains the decoder to
reconstruct from the first c' channels: in each training step the channels from a random c' on are zeroed."""

from __future__ import annotations

import random

import torch
from torch import nn

from pipeline.models.registry import diffusers_classes
from pipeline.models.families.base import AutoencoderOutput, Family, Latent


class DCFamily(Family):
    name = "dc"
    classes = diffusers_classes("dc")
    shift = False
    exports = ("diffusers", "encoder-only", "firststage")

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        d = cfg.dc
        model = self.classes[0](
            in_channels=cfg.in_channels, latent_channels=cfg.latent_channels, attention_head_dim=d.attention_head_dim,
            encoder_block_types=tuple(d.block_types), decoder_block_types=tuple(d.block_types),
            encoder_block_out_channels=tuple(d.block_out_channels), decoder_block_out_channels=tuple(d.block_out_channels),
            encoder_layers_per_block=tuple(d.encoder_layers_per_block),
            decoder_layers_per_block=tuple(d.decoder_layers_per_block),
            encoder_qkv_multiscales=tuple(tuple(m) for m in d.qkv_multiscales),
            decoder_qkv_multiscales=tuple(tuple(m) for m in d.qkv_multiscales),
            downsample_block_type=d.downsample_block_type, upsample_block_type=d.upsample_block_type,
            decoder_norm_types=tuple(d.decoder_norm_types), decoder_act_fns=tuple(d.decoder_act_fns),
            encoder_out_shortcut=d.shortcuts, decoder_in_shortcut=d.shortcuts, scaling_factor=cfg.scaling_factor,
        )
        model.channel_mask_step = d.channel_mask_step
        return model

    def model_section(self, model) -> dict:
        c = model.config
        same = (c.encoder_block_types == c.decoder_block_types
                and c.encoder_block_out_channels == c.decoder_block_out_channels
                and c.encoder_qkv_multiscales == c.decoder_qkv_multiscales
                and c.encoder_out_shortcut == c.decoder_in_shortcut and c.decoder_conv_act_fn == "relu")
        if not same:
            return super().model_section(model)
        n = len(c.encoder_block_out_channels)
        per_stage = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
        return {"kind": "dc", "in_channels": c.in_channels, "latent_channels": c.latent_channels,
                "scaling_factor": float(c.scaling_factor),
                "dc": {"block_types": per_stage(c.encoder_block_types),
                       "block_out_channels": list(c.encoder_block_out_channels),
                       "encoder_layers_per_block": list(c.encoder_layers_per_block),
                       "decoder_layers_per_block": list(c.decoder_layers_per_block),
                       "qkv_multiscales": [list(m) for m in c.encoder_qkv_multiscales],
                       "attention_head_dim": c.attention_head_dim,
                       "downsample_block_type": c.downsample_block_type.lower(),
                       "upsample_block_type": c.upsample_block_type.lower(),
                       "decoder_norm_types": per_stage(c.decoder_norm_types),
                       "decoder_act_fns": per_stage(c.decoder_act_fns), "shortcuts": bool(c.encoder_out_shortcut),
                       "channel_mask_step": getattr(model, "channel_mask_step", 0)}}

    def encode(self, model, x: torch.Tensor) -> Latent:
        return Latent(model.encode(x).latent)

    def forward(self, model, x: torch.Tensor, sample_posterior: bool = True, transform=None) -> AutoencoderOutput:
        z = self.encode(model, x).mean
        step = getattr(model, "channel_mask_step", 0)
        if model.training and step:  # DC-AE 1.5: reconstruct from the first c' channels, c' in {step, 2 step, ...}
            keep = step * random.randint(1, z.shape[1] // step)
            z = torch.cat([z[:, :keep], torch.zeros_like(z[:, keep:])], 1)
        return AutoencoderOutput(self.decode(model, transform(z) if transform else z), z)
