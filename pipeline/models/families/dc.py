"""Deep-compression autoencoders (DC-AE, Chen et al. 2025; diffusers' AutoencoderDC, SANA's VAE): f32 to f64 with a
deterministic latent, residual and EfficientViT (linear attention) stages, no posterior, no shift (SANA scales by
scaling_factor only). The DC-AE 1.5 structured latent (model.dc.channel_mask_step) trains the decoder to
reconstruct from the first c' channels: in each training step the channels from a random c' on are zeroed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.errors import ConfigError
from pipeline.models.families.base import AutoencoderOutput, Family, Latent
from pipeline.schema import key

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class DCConfig:
    """AutoencoderDC (DC-AE, Chen et al. 2025): the defaults are SANA's dc-ae-f32c32 (with model.latent_channels 32)."""

    block_types: list[str] = key(["ResBlock"] * 3 + ["EfficientViTBlock"] * 3, "per stage: ResBlock or "
                                 "EfficientViTBlock")
    block_out_channels: list[int] = key([128, 256, 512, 512, 1024, 1024], "channels per stage (encoder and decoder); "
                                        "downsampling factor 2**(stages-1)")
    encoder_layers_per_block: list[int] = key([2, 2, 2, 3, 3, 3], "encoder blocks per stage (0: a strided "
                                              "projection)")
    decoder_layers_per_block: list[int] = key([3, 3, 3, 3, 3, 3], "decoder blocks per stage")
    qkv_multiscales: list[list[int]] = key([[], [], [], [5], [5], [5]], "multi-scale linear attention kernel sizes")
    attention_head_dim: int = key(32, "linear attention head width", min=1)
    downsample_block_type: Literal["conv", "pixel_unshuffle"] = key("conv", "encoder downsampling")
    upsample_block_type: Literal["interpolate", "pixel_shuffle"] = key("interpolate", "decoder upsampling")
    decoder_norm_types: list[str] = key(["rms_norm"] * 6, "per stage: rms_norm or batch_norm")
    decoder_act_fns: list[str] = key(["silu"] * 6, "per stage: silu, relu, ...")
    shortcuts: bool = key(True, "the encoder's channel-averaging and the decoder's channel-duplicating shortcuts "
                          "(DC-AE 1.5 turns them off)")
    channel_mask_step: int = key(0, "DC-AE 1.5 structured latent: in training the decoder sees only the first c' "
                                 "channels, c' a random multiple of this per step; 0: off", min=0)


@dataclass
class DCKeys:
    dc: DCConfig = key(DCConfig(), "AutoencoderDC shape (kind: dc only)")


class DCFamily(Family):
    name = "dc"
    class_names = ("AutoencoderDC",)
    latent = "latent"
    keys = DCKeys
    shift = False
    exports = ("diffusers", "encoder-only", "firststage")

    def validate(self, cfg) -> None:
        m, d = cfg.model, cfg.model.dc
        lengths = {len(v) for v in (d.block_types, d.block_out_channels, d.encoder_layers_per_block,
                                    d.decoder_layers_per_block, d.qkv_multiscales, d.decoder_norm_types,
                                    d.decoder_act_fns)}
        if len(lengths) != 1 or 0 in lengths:
            raise ConfigError("model.dc: block_types, block_out_channels, *_layers_per_block, qkv_multiscales, "
                              "decoder_norm_types and decoder_act_fns need one entry per stage")
        if d.block_out_channels[-1] % m.latent_channels:
            raise ConfigError(f"model.dc.block_out_channels: the last stage ({d.block_out_channels[-1]}) must be a "
                              f"multiple of model.latent_channels ({m.latent_channels})")
        if d.channel_mask_step and m.latent_channels % d.channel_mask_step:
            raise ConfigError(f"model.dc.channel_mask_step: {d.channel_mask_step} does not divide "
                              f"model.latent_channels ({m.latent_channels})")

    def factor_of_section(self, m) -> int:
        return super().factor_of_section(m) if m.diffusers else 2 ** (len(m.dc.block_out_channels) - 1)

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
        import torch

        z = self.encode(model, x).mean
        step = getattr(model, "channel_mask_step", 0)
        if model.training and step:  # DC-AE 1.5: reconstruct from the first c' channels, c' in {step, 2 step, ...}
            keep = step * random.randint(1, z.shape[1] // step)
            z = torch.cat([z[:, :keep], torch.zeros_like(z[:, keep:])], 1)
        return AutoencoderOutput(self.decode(model, transform(z) if transform else z), z)
