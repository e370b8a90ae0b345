"""Every other image autoencoder of diffusers.models.autoencoders (GENERIC below): a class whose
encode gives a Gaussian posterior and whose decode gives an image, [B, C, H, W], or one frame of a video VAE,
[B, C, 1, H, W] (Cosmos, Qwen-Image 2.1, HunyuanImage's refiner, MiniMax H3: their causal first frame is encoded
alone, as Wan's). Its latent normalisation is what its config gives, the way its pipelines read it:

  latents_mean / latents_std   per channel, (z - mean_c) / std_c (Qwen-Image 2.1, MiniMax H3; Cosmos keeps one
                               value per channel and latent frame: frame 0's, as its pipelines' [:, :, :1])
  scaling_factor (+ shift)     (z - shift_factor) * scaling_factor (HunyuanImage 2.1, SVD, SD's asymmetric VAE,
                               the consistency decoder)

A config with neither (AutoencoderKLKVAE has no constants and no pipeline; HunyuanImage's scaling_factor may be
null) is refused in one line when its normalisation is needed, never guessed. The consistency decoder is sampled
(a UNet in steps), so it is evaluated and encoded, not trained."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.models.families.base import Family, Latent, plain_config
from pipeline.models.families.video import frames_factor

if TYPE_CHECKING:
    import torch
    from torch import nn

# every image autoencoder in diffusers.models.autoencoders (0.42) that no family of its own holds: the generic
# families take it, an image [B, C, H, W] ("image") or one frame of a video VAE [B, C, 1, H, W] ("frame"); its
# encoder gives a Gaussian posterior (family generic) or a deterministic latent (generic-latent: Cosmos)
GENERIC = {"AsymmetricAutoencoderKL": "image", "AutoencoderKLHunyuanImage": "image", "AutoencoderKLKVAE": "image",
           "AutoencoderKLTemporalDecoder": "image", "ConsistencyDecoderVAE": "image",
           "AutoencoderKLCosmos": "frame", "AutoencoderKLHunyuanImageRefiner": "frame",
           "AutoencoderKLMiniMaxH3": "frame", "AutoencoderKLQwenImage21": "frame"}
DETERMINISTIC = ("AutoencoderKLCosmos",)

UNTRAINABLE = {"ConsistencyDecoderVAE": "its decoder is a consistency model sampled in steps, not a decoder "
                                        "firststage's objective trains"}


def _config_value(c, *names):
    return next((c[n] for n in names if c.get(n) is not None), None)


class GenericFamily(Family):
    name = "generic"
    class_names = tuple(n for n in GENERIC if n not in DETERMINISTIC)
    shift = False  # none of these classes' pipelines subtract a shift unless the config has one (own normalisation)

    @staticmethod
    def frame(model) -> bool:
        return GENERIC[type(model).__name__] == "frame"

    def build(self, cfg, sample_size: int) -> nn.Module:
        d = dict(cfg.diffusers)
        name = d.get("_class_name")
        if name not in (c.__name__ for c in self.classes):
            raise UserError(f"model.kind {self.name}: model.diffusers._class_name {name!r} is not one of its classes "
                            f"({', '.join(c.__name__ for c in self.classes)})")
        return next(c for c in self.classes if c.__name__ == name).from_config(d)

    def light_section(self, config: dict) -> dict:
        """With the config's _class_name: the family holds several classes."""
        return {"kind": self.name, "diffusers": {k: v for k, v in config.items()
                                                 if not k.startswith("_") or k == "_class_name"}}

    def model_section(self, model) -> dict:
        return {"kind": self.name, "in_channels": self.image_channels(model),
                "latent_channels": self.latent_channels(model),
                "diffusers": {**plain_config(model.config), "_class_name": type(model).__name__}}

    # ------------------------------------------------------------------------------------------ running
    def encode(self, model, x: torch.Tensor) -> Latent:
        posterior = model.encode(x.unsqueeze(2) if self.frame(model) else x).latent_dist
        first = (lambda t: t[:, :, 0]) if self.frame(model) else (lambda t: t)  # noqa: E731
        if not self.has_posterior:
            return Latent(first(posterior.mode()))
        return Latent(first(posterior.mean), first(posterior.logvar))

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        if self.frame(model):
            return model.decode(z.unsqueeze(2)).sample[:, :, 0]
        if type(model).__name__ == "AutoencoderKLTemporalDecoder":
            return model.decode(z, num_frames=1).sample
        return model.decode(z).sample

    # ------------------------------------------------------------------------------------------ training
    def check_trainable(self, model) -> None:
        why = UNTRAINABLE.get(type(model).__name__)
        if why:
            raise UserError(f"train.init_from: {type(model).__name__} cannot be trained by firststage: {why}; "
                            f"evaluate and encode take it")

    def _last_weight(self, module: nn.Module) -> nn.Parameter:
        from torch import nn

        conv_out = getattr(module, "conv_out", None)
        if isinstance(conv_out, nn.Module) and any(True for _ in conv_out.parameters()):
            module = conv_out
        return [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() > 1][-1]

    def last_decoder_layer(self, model) -> nn.Parameter:
        return self._last_weight(model.decoder)

    def last_encoder_layer(self, model) -> nn.Parameter:
        return self._last_weight(model.encoder)

    def untrained_parameters(self, model) -> list[str]:
        """A single frame never reaches the temporal convolutions of Qwen-Image 2.1's Wan-style network."""
        return [n for n, _ in model.named_parameters() if ".time_conv." in n] if self.frame(model) else []

    def compile(self, model) -> None:
        model.encoder.compile()

    # ------------------------------------------------------------------------------------------ shapes
    def factor_of_config(self, config) -> int:
        """Wan's temperal_downsample (Qwen-Image 2.1), the config's own ratio (HunyuanImage, Cosmos:
        spatial_compression_ratio; MiniMax H3: its factors), KVAE's ch_mult or the asymmetric VAE's down blocks."""
        if "temperal_downsample" in config:
            return frames_factor(config)
        if config.get("spatial_compression_ratio"):
            return int(config["spatial_compression_ratio"])
        if config.get("spatial_downsample_factors"):
            return int(math.prod(config["spatial_downsample_factors"]))
        for key in ("ch_mult", "down_block_out_channels"):
            if config.get(key):
                return 2 ** (len(config[key]) - 1)
        return super().factor_of_config(config)

    def image_channels(self, model) -> int:
        return _config_value(model.config, "in_channels", "encoder_in_channels") or 3

    def latent_channels(self, model) -> int:
        return _config_value(model.config, "latent_channels", "z_dim", "z_channels")

    # ------------------------------------------------------------------------------------------ normalisation
    def normalisation(self, model) -> dict:
        c, name, ch = model.config, type(model).__name__, self.latent_channels(model)
        if c.get("latents_mean") is not None and c.get("latents_std") is not None:
            mean, std = list(c["latents_mean"]), list(c["latents_std"])
            if len(mean) != len(std) or not mean or len(mean) % ch:
                raise UserError(f"{name}: latents_mean / latents_std ({len(mean)} / {len(std)} values) are not per "
                                f"channel of its {ch} latent channels: its latent normalisation cannot be determined")
            per = len(mean) // ch  # Cosmos: one value per channel and latent frame, channel-major
            return {"kind": "per_channel", "mean": [float(v) for v in mean[::per]],
                    "std": [float(v) for v in std[::per]], "patch": 1,
                    "source": f"the model's latents_mean / latents_std ({name})"}
        if c.get("scaling_factor") is not None:
            return {"kind": "scale_shift", "scaling_factor": float(c["scaling_factor"]),
                    "shift_factor": c.get("shift_factor"), "source": f"the model's config ({name})"}
        raise UserError(f"{name}: its config has neither latents_mean / latents_std nor scaling_factor: its latent "
                        f"normalisation cannot be determined (firststage does not guess it)")

    def set_normalisation(self, model, spec: dict) -> None:  # noqa: D102 (see Family)
        c = model.config
        if spec["kind"] == "per_channel":
            per = len(c["latents_mean"]) // len(spec["mean"]) if c.get("latents_mean") else 1
            model.register_to_config(latents_mean=[float(v) for v in spec["mean"] for _ in range(per)],
                                     latents_std=[float(v) for v in spec["std"] for _ in range(per)])
            return
        if "scaling_factor" not in c:
            raise UserError(f"{type(model).__name__}: its config has no scaling_factor to hold a normalisation")
        factors = {"scaling_factor": spec["scaling_factor"]}
        if "shift_factor" in c and spec.get("shift_factor") is not None:
            factors["shift_factor"] = spec["shift_factor"]
        model.register_to_config(**factors)


class GenericLatentFamily(GenericFamily):
    """The generic family's classes whose encoder gives a deterministic latent (DETERMINISTIC)."""

    name = "generic-latent"
    class_names = DETERMINISTIC
    latent = "latent"
