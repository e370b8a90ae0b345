"""The Stable Diffusion / LDM encoder-decoder with three kinds of latent:

  kl   diffusers' AutoencoderKL (SD 1/2, SDXL, SD3 and FLUX.1 with 16 channels): a Gaussian posterior
  vq   diffusers' VQModel with our quantizer (pipeline.models.quantizer) in place of diffusers', under the same name
       and parameter key, so `VQModel.from_pretrained` loads what we save
  fsq  the same VQModel shape with finite scalar quantization (pipeline.models.fsq): no codebook to learn
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

from pipeline.models.registry import diffusers_classes
from pipeline.models.families.base import Family, Latent, plain_config
from pipeline.models.fsq import FiniteScalarQuantizer
from pipeline.models.quantizer import VectorQuantizer

_SD_BLOCKS = ("DownEncoderBlock2D", "UpDecoderBlock2D")


def _sd_blocks(cfg, sample_size: int) -> dict:
    n = len(cfg.block_out_channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=(_SD_BLOCKS[0],) * n,
        up_block_types=(_SD_BLOCKS[1],) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=cfg.scaling_factor,
        mid_block_add_attention=cfg.mid_block_attention,
    )


def _describable(c) -> bool:
    """Whether the model.* keys describe this AutoencoderKL / VQModel config exactly."""
    return (set(c["down_block_types"]) == {_SD_BLOCKS[0]} and set(c["up_block_types"]) == {_SD_BLOCKS[1]}
            and c["in_channels"] == c["out_channels"] and c.get("act_fn", "silu") == "silu"
            and c.get("use_quant_conv", True) == c.get("use_post_quant_conv", True))


class SDFamily(Family):
    """What KL, VQ and FSQ share: the encoder / decoder and their blocks."""

    exports = ("diffusers", "single-file", "encoder-only", "firststage")

    def model_section(self, model) -> dict:
        c = model.config
        if not _describable(c):
            return super().model_section(model)
        section = {"kind": self.name, "in_channels": c["in_channels"],
                   "block_out_channels": list(c["block_out_channels"]), "layers_per_block": c["layers_per_block"],
                   "latent_channels": c["latent_channels"], "norm_num_groups": c["norm_num_groups"],
                   "scaling_factor": float(c.get("scaling_factor") or 1.0),
                   "mid_block_attention": bool(c.get("mid_block_add_attention", True))}
        if c.get("shift_factor") is not None:
            section["shift_factor"] = float(c["shift_factor"])
        if not c.get("use_quant_conv", True):
            section["use_quant_conv"] = False
        return section

    def compile(self, model) -> None:
        """The encoder and the decoder's blocks; the decoder's output layers stay eager (see Family.compile)."""
        model.encoder.compile()
        model.decoder.mid_block.compile()
        for block in model.decoder.up_blocks:
            block.compile()


class KLFamily(SDFamily):
    name = "kl"
    classes = diffusers_classes("kl")

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        model = AutoencoderKL(**_sd_blocks(cfg, sample_size), shift_factor=cfg.shift_factor,
                              use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_quant_conv)
        if cfg.init_logvar is not None:  # the second half of the encoder's outputs is the posterior's log-variance
            last = model.quant_conv if model.quant_conv is not None else model.encoder.conv_out
            with torch.no_grad():
                last.bias[cfg.latent_channels:].fill_(cfg.init_logvar)
        return model


class QuantizedFamily(SDFamily):
    """VQModel's encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder."""

    def encode(self, model, x: torch.Tensor) -> Latent:
        h = model.quant_conv(model.encoder(x))
        z_q, vq_loss, (perplexity, _, codes) = model.quantize(h)
        codes = codes.reshape(h.shape[0], h.shape[2], h.shape[3])  # diffusers' own quantizer gives them flat
        return Latent(z_q, codes=codes, vq_loss=vq_loss, perplexity=perplexity)

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        return model.decoder(model.post_quant_conv(z))

    def encoder_side(self, model) -> list[nn.Module]:
        return super().encoder_side(model) + [model.quantize]

    def latent_channels(self, model) -> int:
        return model.quantize.vq_embed_dim

    def num_codes(self, model) -> int:
        return model.quantize.n_e  # ours and diffusers' quantizer


class VQFamily(QuantizedFamily):
    name = "vq"
    classes = diffusers_classes("vq")

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        cb = cfg.codebook
        dim = cb.dim or cfg.latent_channels
        model = VQModel(**_sd_blocks(cfg, sample_size), num_vq_embeddings=cb.size, vq_embed_dim=dim)
        model.quantize = VectorQuantizer(
            cb.size, dim, beta=cb.beta, update=cb.update, ema_decay=cb.ema_decay, cosine=cb.cosine,
            restart_dead=cb.restart_dead, dead_after=cb.dead_after, usage_window=cb.usage_window,
        )
        return model

    def decode_codes(self, model, codes: torch.Tensor) -> torch.Tensor:
        z_q = model.quantize.get_codebook_entry(codes.reshape(-1), (*codes.shape, self.latent_channels(model)))
        return self.decode(model, z_q)

    def model_section(self, model) -> dict:
        section = super().model_section(model)
        if "diffusers" not in section:
            c = model.config
            section["codebook"] = {"size": int(c["num_vq_embeddings"]), "dim": int(c["vq_embed_dim"] or c["latent_channels"])}
        return section

    def train_metrics(self, model) -> dict[str, torch.Tensor]:
        return {"codebook_usage": model.quantize.usage()} if hasattr(model.quantize, "usage") else {}


class FSQFamily(QuantizedFamily):
    """VQModel's encoder and decoder around a finite scalar quantizer. diffusers has no FSQ model: a firststage
    folder is its export format."""

    name = "fsq"
    classes = ()  # recognised by its quantizer (family_of), never loaded from a diffusers folder
    exports = ("encoder-only", "firststage")

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        levels = cfg.fsq.levels
        model = VQModel(**_sd_blocks(cfg, sample_size), num_vq_embeddings=2, vq_embed_dim=len(levels))
        model.quantize = FiniteScalarQuantizer(levels)  # replaces diffusers' (unused) 2-entry codebook
        return model

    def build(self, cfg, sample_size: int) -> nn.Module:
        return self.build_from_fields(cfg, sample_size)

    def decode_codes(self, model, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(model, model.quantize.codes_to_latent(codes))

    def model_section(self, model) -> dict:
        return {**super().model_section(model), "fsq": {"levels": list(model.quantize.levels)}}


def is_fsq(model) -> bool:
    return isinstance(getattr(model, "quantize", None), FiniteScalarQuantizer)


__all__ = ["KLFamily", "VQFamily", "FSQFamily", "is_fsq", "plain_config"]
