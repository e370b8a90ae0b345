"""The Stable Diffusion / LDM encoder-decoder with three kinds of latent:

  kl   diffusers' AutoencoderKL (SD 1/2, SDXL, SD3 and FLUX.1 with 16 channels): a Gaussian posterior
  vq   diffusers' VQModel with our quantizer (pipeline.models.quantizer) in place of diffusers', under the same name
       and parameter key, so `VQModel.from_pretrained` loads what we save
  fsq  the same VQModel shape with finite scalar quantization (pipeline.models.fsq): no codebook to learn
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from pipeline.errors import ConfigError
from pipeline.models.families.base import Family, Latent, plain_config
from pipeline.schema import key

if TYPE_CHECKING:
    import torch
    from torch import nn

_SD_BLOCKS = ("DownEncoderBlock2D", "UpDecoderBlock2D")


@dataclass
class SDKeys:
    """The model.* keys of the SD / LDM encoder-decoder (kl, vq, fsq)."""

    block_out_channels: list[int] = key([128, 256, 512, 512], "channels per resolution level; downsampling factor is "
                                        "2**(levels-1)")
    layers_per_block: int = key(2, "resnet layers per level", min=1)
    mid_block_attention: bool = key(True, "self-attention in the middle block")
    norm_num_groups: int = key(32, "GroupNorm groups; must divide every entry of block_out_channels", min=1)
    init_logvar: Optional[float] = key(
        None, "KL: initial posterior log-variance (bias of quant_conv's logvar half) of a model trained from scratch; "
        "-6 starts at sigma 0.05 so the decoder is not drowned in noise early on; null: diffusers' init",
        init_only=True)
    use_quant_conv: bool = key(True, "the 1x1 convolutions around the latent (SD 1/2, SDXL: true; SD3, FLUX.1: "
                               "false)")


@dataclass
class CodebookConfig:
    size: int = key(16384, "number of codes", min=2)
    dim: int = key(0, "code dimension; 0 means latent_channels", min=0)
    beta: float = key(0.25, "commitment weight (VQ-VAE, van den Oord et al. 2017)", min=0.0)
    update: Literal["loss", "ema"] = key("ema", "codebook learned by the codebook loss or by EMA of assignments")
    ema_decay: float = key(0.99, "EMA decay of code statistics", min=0.0, max=1.0)
    cosine: bool = key(False, "l2-normalise codes and encodings (cosine-similarity lookup)")
    restart_dead: bool = key(True, "restart codes unused for `dead_after` steps from recent encoder outputs")
    dead_after: int = key(100, "steps without an assignment after which a code counts as dead", min=1)
    usage_window: int = key(100, "steps over which codebook usage is measured", min=1)


@dataclass
class VQKeys(SDKeys):
    codebook: CodebookConfig = key(CodebookConfig(), "VQ codebook (kind: vq only)")


@dataclass
class FSQConfig:
    levels: list[int] = key([8, 5, 5, 5], "FSQ levels per latent channel; the implicit codebook has their product "
                            "(Mentzer et al. 2023: [8,5,5,5] = 1000, [8,8,8,5,5,5] = 64000)")


@dataclass
class FSQKeys(SDKeys):
    fsq: FSQConfig = key(FSQConfig(), "FSQ quantizer (kind: fsq only)")


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
    keys = SDKeys

    def validate(self, cfg) -> None:
        m = cfg.model
        if len(m.block_out_channels) < 1:
            raise ConfigError("model.block_out_channels: needs at least one level")
        bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
        if bad and not m.diffusers:
            raise ConfigError(f"model.block_out_channels: {bad} not divisible by model.norm_num_groups="
                              f"{m.norm_num_groups}")

    def factor_of_section(self, m) -> int:
        return super().factor_of_section(m) if m.diffusers else 2 ** (len(m.block_out_channels) - 1)

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
    class_names = ("AutoencoderKL",)

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        import torch
        from diffusers import AutoencoderKL

        model = AutoencoderKL(**_sd_blocks(cfg, sample_size), shift_factor=cfg.shift_factor,
                              use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_quant_conv)
        if cfg.init_logvar is not None:  # the second half of the encoder's outputs is the posterior's log-variance
            last = model.quant_conv if model.quant_conv is not None else model.encoder.conv_out
            with torch.no_grad():
                last.bias[cfg.latent_channels:].fill_(cfg.init_logvar)
        return model


class QuantizedFamily(SDFamily):
    """VQModel's encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder."""

    latent = "codes"

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
    class_names = ("VQModel",)
    keys = VQKeys

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        from diffusers import VQModel

        from pipeline.models.quantizer import VectorQuantizer

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
    class_names = ()  # recognised by its quantizer (family_of), never loaded from a diffusers folder
    exports = ("encoder-only", "firststage")
    keys = FSQKeys

    def validate(self, cfg) -> None:
        super().validate(cfg)
        levels = cfg.model.fsq.levels
        if len(levels) < 1 or min(levels) < 2:
            raise ConfigError(f"model.fsq.levels: expected at least one level, each >= 2, got {levels}")

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        from diffusers import VQModel

        from pipeline.models.fsq import FiniteScalarQuantizer

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
    from pipeline.models.fsq import FiniteScalarQuantizer

    return isinstance(getattr(model, "quantize", None), FiniteScalarQuantizer)


__all__ = ["KLFamily", "VQFamily", "FSQFamily", "is_fsq", "plain_config"]
