"""Representation autoencoders (RAE: Zheng et al. 2025, bytetriper/RAE; diffusers' AutoencoderRAE): a frozen vision
foundation encoder (DINOv2 with registers, SigLIP-2, MAE) whose patch features are the latent [C, g, g], and a ViT
decoder, the only part that trains. The encoder reads the image in [0, 1] resized bicubically to its input size and
normalised by its own mean and std (AutoencoderRAE's _resize_and_normalize); the decoder's patches give the image
back in that normalisation. The latent here is the raw features: AutoencoderRAE's own normalisation (latents_mean /
latents_std per [C, H, W], the RAE's calculate_stat, std + 1e-5, then scaling_factor) is the family's normalisation,
applied by the latent reader; training's noise augmentation is loss.latent_noise (RAE: additive, noise_tau 0.8),
drawn by the trainer only, so evaluate and encode never see it (AutoencoderRAE's own noise_tau is left at 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from pipeline.errors import ConfigError, UserError
from pipeline.models.families.base import Family, Latent, plain_config
from pipeline.schema import key

if TYPE_CHECKING:
    import torch
    from torch import nn

EPS = 1e-5  # AutoencoderRAE divides by latents_std + 1e-5
NORM = {"siglip2": ([0.5] * 3, [0.5] * 3)}  # the encoder's input normalisation by type; else ImageNet's
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@dataclass
class FoundationEncoderConfig:
    """The frozen vision foundation model an RAE encodes with (transformers' Dinov2WithRegisters, Siglip2 or ViTMAE):
    the width, patch and depth of the weights at `weights`, which must fit them."""

    type: Literal["dinov2", "siglip2", "mae"] = key("dinov2", "dinov2 (with registers), siglip2 or mae")
    weights: str = key("", "a transformers folder of the encoder (facebook/dinov2-with-registers-base)")
    backbone: Literal["pretrained", "random"] = key(
        "pretrained", "pretrained: the weights at model.rae.encoder.weights; random: seeded random weights (tests "
        "only)")
    hidden_size: int = key(768, "the encoder's width: the latent's channels", min=1)
    patch_size: int = key(14, "the encoder's patch size", min=1)
    num_layers: int = key(12, "the encoder's depth", min=1)
    input_size: int = key(224, "the image is resized bicubically to this square before the encoder", min=1)
    norm_mean: Optional[list[float]] = key(None, "the encoder's input mean; null: its type's (ImageNet; SigLIP 0.5)")
    norm_std: Optional[list[float]] = key(None, "the encoder's input std; null: its type's (ImageNet; SigLIP 0.5)")


@dataclass
class RAEConfig:
    """A representation autoencoder (Zheng et al. 2025, bytetriper/RAE): a frozen foundation encoder and the ViT
    decoder of diffusers' AutoencoderRAE; the defaults are DINOv2-B with the paper's ViT-XL decoder."""

    encoder: FoundationEncoderConfig = key(FoundationEncoderConfig(), "the frozen encoder")
    decoder_hidden_size: int = key(1152, "ViT decoder width (ViT-XL: 1152)", min=1)
    decoder_layers: int = key(28, "ViT decoder depth (ViT-XL: 28)", min=1)
    decoder_heads: int = key(16, "ViT decoder attention heads", min=1)
    decoder_intermediate_size: int = key(4096, "ViT decoder MLP width", min=1)
    patch_size: int = key(16, "decoder patch: the image is patch_size x the encoder's grid", min=1)


@dataclass
class RAEKeys:
    rae: RAEConfig = key(RAEConfig(), "representation autoencoder (kind: rae only)")


def rae_section(c: dict) -> dict:
    """The model.rae keys of an AutoencoderRAE config (config.json or a model's), without torch: what a light config
    needs to check data.resolution against the image size it decodes."""
    get = c.get  # AutoencoderRAE's defaults where a key is absent
    return {"encoder": {"type": get("encoder_type", "dinov2"), "hidden_size": get("encoder_hidden_size", 768),
                        "patch_size": get("encoder_patch_size", 14), "num_layers": get("encoder_num_hidden_layers", 12),
                        "input_size": get("encoder_input_size", 224), "backbone": "random",
                        "norm_mean": get("encoder_norm_mean"), "norm_std": get("encoder_norm_std")},
            "decoder_hidden_size": get("decoder_hidden_size", 512),
            "decoder_layers": get("decoder_num_hidden_layers", 8),
            "decoder_heads": get("decoder_num_attention_heads", 16),
            "decoder_intermediate_size": get("decoder_intermediate_size", 2048), "patch_size": get("patch_size", 16)}


class RAEFamily(Family):
    name = "rae"
    class_names = ("AutoencoderRAE",)
    latent = "latent"
    keys = RAEKeys
    any_size = False  # the ViT decoder's position embeddings fix its grid: the probe's 2x downscale is left out

    def validate(self, cfg) -> None:
        e = cfg.model.rae.encoder
        if e.input_size % e.patch_size:
            raise ConfigError(f"model.rae.encoder.input_size {e.input_size}: not a multiple of its patch_size "
                              f"{e.patch_size}")
        size = cfg.model.rae.patch_size * (e.input_size // e.patch_size)
        if cfg.data.resolution != size:
            raise ConfigError(f"data.resolution {cfg.data.resolution}: this RAE decodes {size}px images (model.rae."
                              f"patch_size x model.rae.encoder.input_size / patch_size); set data.resolution={size}")
        if cfg.loss.equivariance.enabled or cfg.loss.alignment.enabled:
            raise ConfigError("loss.equivariance / loss.alignment: an RAE's latent is a frozen encoder's fixed grid "
                              "of features; turn them off (loss.latent_noise is its augmentation)")

    def factor_of_section(self, m) -> int:
        return m.rae.patch_size

    def factor_of_config(self, config) -> int:
        return int(config.get("patch_size") or 16)  # the decoder's patch per latent position

    def default_resolution(self, config) -> int:
        """The one size it decodes: its patch times the encoder's grid."""
        return self.factor_of_config(config) * (config.get("encoder_input_size", 224) //
                                                config.get("encoder_patch_size", 14))

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        r, e = cfg.rae, cfg.rae.encoder
        mean, std = NORM.get(e.type, IMAGENET)
        return self.classes[0](
            encoder_type=e.type, encoder_hidden_size=e.hidden_size, encoder_patch_size=e.patch_size,
            encoder_num_hidden_layers=e.num_layers, decoder_hidden_size=r.decoder_hidden_size,
            decoder_num_hidden_layers=r.decoder_layers, decoder_num_attention_heads=r.decoder_heads,
            decoder_intermediate_size=r.decoder_intermediate_size, patch_size=r.patch_size,
            encoder_input_size=e.input_size, num_channels=cfg.in_channels,
            encoder_norm_mean=e.norm_mean or mean, encoder_norm_std=e.norm_std or std)

    def initialise(self, model, cfg) -> None:
        """A new run: the frozen encoder's pretrained weights (model.rae.encoder.weights), unless it is random."""
        from pipeline.models.foundation import load_rae_encoder

        e = cfg.model.rae.encoder
        if e.backbone == "random":
            return
        state = load_rae_encoder(e).state_dict()
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.endswith(("layernorm.weight", "layernorm.bias"))]  # RAE: identity
        if missing or unexpected:  # final LayerNorm (AutoencoderRAE drops its affine parameters)
            raise UserError(f"model.rae.encoder.weights {e.weights}: does not fit model.rae.encoder (hidden_size "
                            f"{e.hidden_size}, patch_size {e.patch_size}, num_layers {e.num_layers}): missing "
                            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")

    def light_section(self, config: dict) -> dict:
        return {**super().light_section(config), "rae": rae_section(config)}

    def check_initialise(self, cfg) -> None:
        from pipeline.models.foundation import rae_encoder_source

        if cfg.model.rae.encoder.backbone == "pretrained":
            rae_encoder_source(cfg.model.rae.encoder)

    def model_section(self, model) -> dict:
        """model.rae from its config (the encoder's weights are the model's own: backbone random means "not read from
        model.rae.encoder.weights"), and its whole config in model.diffusers (latents_mean / latents_std shapes)."""
        c = plain_config(model.config)
        section = rae_section(c)
        section["encoder"].update(norm_mean=model.encoder_mean.flatten().tolist(),
                                  norm_std=model.encoder_std.flatten().tolist())
        return {"kind": self.name, "in_channels": c["num_channels"], "latent_channels": c["encoder_hidden_size"],
                "rae": section, "diffusers": c}

    # ------------------------------------------------------------------------------------------ running
    def encode(self, model, x: torch.Tensor) -> Latent:
        """The frozen encoder's patch features of images in [-1, 1]: [B, C, g, g] (no gradient: it never trains)."""
        import torch

        size = model.decoder_image_size
        if x.shape[-2:] != (size, size):
            raise UserError(f"this RAE decodes {size}x{size} images; got {x.shape[-2]}x{x.shape[-1]} "
                            f"(data.resolution={size})")
        with torch.no_grad():
            h = model._resize_and_normalize((x + 1) / 2)
            if model.config.encoder_type == "mae":
                tokens = model._encoder_forward_fn(model.encoder, h, model.config.encoder_patch_size)
            else:
                tokens = model._encoder_forward_fn(model.encoder, h)
        b, n, c = tokens.shape
        g = math.isqrt(n)
        return Latent(tokens.transpose(1, 2).reshape(b, c, g, g).detach())

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        """The ViT decoder on raw features -> images in [-1, 1] (AutoencoderRAE._decode without its latent
        de-normalisation)."""
        logits = model.decoder(z.flatten(2).transpose(1, 2), return_dict=True).logits
        return model._denormalize_image(model.decoder.unpatchify(logits)) * 2 - 1

    # ------------------------------------------------------------------------------------------ training
    def last_decoder_layer(self, model) -> nn.Parameter:
        return model.decoder.decoder_pred.weight

    def last_encoder_layer(self, model) -> nn.Parameter:
        raise UserError("loss.alignment: an RAE's encoder is a frozen foundation model already; turn alignment off")

    def encoder_side(self, model) -> list[nn.Module]:
        return [model.encoder]

    def untrained_parameters(self, model) -> list[str]:
        return [n for n, _ in model.named_parameters() if n.startswith("encoder.")]

    def compile(self, model) -> None:
        model.encoder.compile()

    # ------------------------------------------------------------------------------------------ shapes
    def image_channels(self, model) -> int:
        return model.config.num_channels

    def latent_channels(self, model) -> int:
        return model.config.encoder_hidden_size

    def grid(self, model) -> int:
        return model.config.encoder_input_size // model.config.encoder_patch_size

    # ------------------------------------------------------------------------------------------ normalisation
    def normalisation(self, model) -> dict:
        """AutoencoderRAE's (z - latents_mean) / (latents_std + 1e-5) * scaling_factor, per element of [C, g, g],
        from its buffers (what its encode uses; a new model's are 0 and 1)."""
        import torch

        c, g = self.latent_channels(model), self.grid(model)
        shape = (c, g, g)

        def full(t):  # [1], [C, 1, 1], [C, g, g] or [1, C, g, g] -> [C, g, g]
            t = t.detach().double().cpu()
            return torch.broadcast_to(t.reshape(t.shape[-3:]) if t.dim() > 3 else t, shape)

        mean = full(model._latents_mean)
        std = (full(model._latents_std) + EPS) / float(model.config.scaling_factor)
        return {"kind": "per_channel", "mean": mean.flatten().tolist(), "std": std.flatten().tolist(), "patch": g,
                "per_position": True, "source": "the model's latents_mean / latents_std"}

    def set_normalisation(self, model, spec: dict) -> None:
        import torch

        c, g = self.latent_channels(model), self.grid(model)
        mean = torch.tensor(spec["mean"], dtype=torch.float64).view(c, g, g)
        std = torch.tensor(spec["std"], dtype=torch.float64).view(c, g, g) - EPS
        model.register_buffer("_latents_mean", mean.float(), persistent=True)
        model.register_buffer("_latents_std", std.float(), persistent=True)
        model.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist(), scaling_factor=1.0)
