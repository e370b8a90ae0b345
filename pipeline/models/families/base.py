"""What every model family answers, with the defaults most diffusers autoencoders share.

A family module imports neither torch nor diffusers at module level (they come inside the methods that run a model):
the config reads the family table to check a `model:` section (Family.keys, validate, factor_of_section) before a
stage's heavy imports."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Latent:
    """What an encoder gives for a batch (4-D tensors). `mean`: the posterior mean (KL), the quantised latent z_q
    (VQ, FSQ) or the deterministic latent (DC-AE, Tiny); `logvar`: the posterior's log-variance (KL only); `codes`:
    code indices [B, h, w] (VQ, FSQ); `vq_loss`, `perplexity`: the quantizer's terms."""

    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    vq_loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor
    latents: torch.Tensor  # the latent fed to the decoder: sampled (KL), quantised (VQ, FSQ) or deterministic
    mean: torch.Tensor | None = None  # KL posterior moments
    logvar: torch.Tensor | None = None
    vq_loss: torch.Tensor | None = None  # VQ codebook + commitment terms
    perplexity: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    extra: torch.Tensor | None = None  # training: a second decode (scale equivariance's decode(downsample(z)))


def plain_config(config) -> dict:
    """A diffusers config as plain JSON data (lists, not tuples), without diffusers' private keys."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def diffusers_classes(names: tuple[str, ...]) -> tuple[type, ...]:
    import diffusers

    return tuple(getattr(diffusers, name) for name in names)


class Family:
    """One model family: how its models are built, encode, decode and train. Subclasses override what differs."""

    name = ""  # model.kind
    class_names: tuple[str, ...] = ()  # its diffusers classes: a diffusers folder of one is loaded as this family
    latent = "posterior"  # what its encoder gives: a Gaussian posterior, "codes" (indices), or a deterministic "latent"
    keys: type | None = None  # a dataclass of its own model.* keys (None: it is built from model.diffusers only)

    @functools.cached_property
    def classes(self) -> tuple[type, ...]:
        """Its model classes (diffusers imported here, on first use, never when the family table is read)."""
        return diffusers_classes(self.class_names)

    @property
    def has_posterior(self) -> bool:
        """A Gaussian q(z|x): KL term, active units, likelihood bounds."""
        return self.latent == "posterior"

    # ------------------------------------------------------------------------------------------ its config
    def own_fields(self) -> tuple[dataclasses.Field, ...]:
        """Its own keys of the `model:` section (pipeline.config.model_schema joins them to the shared ones)."""
        return dataclasses.fields(self.keys) if self.keys is not None else ()

    def validate(self, cfg) -> None:
        """One ConfigError line for a `model:` section of this family that cannot work (its own keys, and what they
        require of the rest of the config); without torch. A family without keys of its own needs model.diffusers."""
        if self.keys is None and not cfg.model.diffusers:
            raise ConfigError(f"model.kind {self.name}: built from a diffusers config; give train.init_from (or "
                              f"--model) a diffusers folder of that class")

    def factor_of_section(self, m) -> int:
        """The spatial downsampling of the model a `model:` section builds."""
        return self.factor_of_config(m.diffusers)

    def factor_of_config(self, config) -> int:
        """The spatial downsampling of a model from its diffusers config: one 2x step between consecutive levels
        (AutoencoderKL, VQModel, Flux2, DC-AE, Tiny)."""
        return 2 ** (len(config.get("encoder_block_out_channels") or config["block_out_channels"]) - 1)

    def default_resolution(self, config) -> int:
        """data.resolution for a diffusers model of this family with this config: its sample_size when that fits
        its downsampling factor, else 256 (or the nearest multiple of the factor below it)."""
        f = self.factor_of_config(config)
        size = config.get("sample_size")
        return size if isinstance(size, int) and size > 0 and size % f == 0 else max(f, 256 - 256 % f)

    shift = True  # its pipelines subtract a shift (measured normalisation then removes the mean)
    exports = ("diffusers", "firststage")  # pipeline.weights export formats that can hold this family
    any_size = True  # its decoder decodes a latent of any size (False: a ViT decoder's fixed grid, an RAE's)

    # ------------------------------------------------------------------------------------------ building
    def build(self, cfg, sample_size: int) -> nn.Module:
        """From the `model:` section: its diffusers config when it has one, else the family's own keys."""
        if cfg.diffusers:
            return self.classes[0].from_config(cfg.diffusers)
        return self.build_from_fields(cfg, sample_size)

    def build_from_fields(self, cfg, sample_size: int) -> nn.Module:
        raise UserError(f"model.kind {self.name}: built from a diffusers config only (model.diffusers is empty)")

    def light_section(self, config: dict) -> dict:
        """The `model:` section of a diffusers folder's config.json, read without torch (a light config: what encode
        compares with an output folder's settings before loading anything)."""
        return {"kind": self.name, "diffusers": {k: v for k, v in config.items() if not k.startswith("_")}}

    def model_section(self, model) -> dict:
        """The `model:` config section that rebuilds a loaded model of this family."""
        return {"kind": self.name, "in_channels": self.image_channels(model),
                "latent_channels": self.latent_channels(model), "diffusers": plain_config(model.config)}

    # ------------------------------------------------------------------------------------------ running
    def encode(self, model, x: torch.Tensor) -> Latent:
        """A diffusers KL autoencoder's posterior q(z|x) = N(mean, exp(logvar)), logvar clamped to [-30, 20] as
        diffusers does; families whose encoder gives something else override it."""
        posterior = model.encode(x).latent_dist
        return Latent(posterior.mean, posterior.logvar)

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        return model.decode(z).sample

    def forward(self, model, x: torch.Tensor, sample_posterior: bool = True, transform=None) -> AutoencoderOutput:
        """Encode, decode. `transform` (z -> z', training only: a rescale, a rotation, noise) is applied to the
        latent before decoding; `latents` stays the untransformed one."""
        from pipeline.models.posterior import reparameterize

        lat = self.encode(model, x)
        if lat.logvar is not None:
            z = reparameterize(lat.mean, lat.logvar) if sample_posterior else lat.mean
            return AutoencoderOutput(self.decode(model, transform(z) if transform else z), z, mean=lat.mean,
                                     logvar=lat.logvar)
        z = lat.mean
        return AutoencoderOutput(self.decode(model, transform(z) if transform else z), z, vq_loss=lat.vq_loss,
                                 perplexity=lat.perplexity, codes=lat.codes)

    def decode_codes(self, model, codes: torch.Tensor) -> torch.Tensor:
        raise UserError(f"{self.name} models have no codes")

    # ------------------------------------------------------------------------------------------ training
    def last_decoder_layer(self, model) -> nn.Parameter:
        """The weight at which the adaptive GAN weight compares gradients (LDM / taming: the decoder's conv_out)."""
        weights = [p for n, p in model.decoder.conv_out.named_parameters() if n.endswith("weight")]
        return weights[-1]

    def last_encoder_layer(self, model) -> nn.Parameter:
        """The weight at which the adaptive alignment weight compares gradients (VA-VAE: encoder.conv_out.weight)."""
        weights = [p for n, p in model.encoder.conv_out.named_parameters() if n.endswith("weight")]
        return weights[-1]

    def encoder_side(self, model) -> list[nn.Module]:
        """What a decoder-only fine-tune freezes: the latent space an existing diffusion model was trained on."""
        from torch import nn

        return [m for m in (model.encoder, getattr(model, "quant_conv", None)) if isinstance(m, nn.Module)]

    def initialise(self, model, cfg) -> None:
        """A new run's model after it is built (not a resumed or train.init_from one): pretrained parts it has."""

    def check_initialise(self, cfg) -> None:
        """One line when what initialise reads is missing (the trainer asks before anything is built)."""

    def check_trainable(self, model) -> None:
        """One line when firststage cannot train this model (the trainer asks before building anything else)."""

    def untrained_parameters(self, model) -> list[str]:
        """Parameters that images never reach (they get no gradient): frozen, so DDP does not wait for them."""
        return []

    def enable_gradient_checkpointing(self, model) -> None:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise UserError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        model.enable_gradient_checkpointing()

    def compile(self, model) -> None:
        """torch.compile the encoder in place; the decoder stays eager (the adaptive GAN weight takes gradients at its
        last layer, and inside one compiled region that would rerun the region's whole backward)."""
        model.encoder.compile()

    def train_metrics(self, model) -> dict[str, torch.Tensor]:
        """Scalars worth logging during training besides the loss terms."""
        return {}

    # ------------------------------------------------------------------------------------------ shapes
    def downsampling_factor(self, model) -> int:
        return self.factor_of_config(model.config)

    def image_channels(self, model) -> int:
        return model.config.in_channels

    def latent_channels(self, model) -> int:
        return model.config.latent_channels

    def num_codes(self, model) -> int:
        return 0

    # ------------------------------------------------------------------------------------------ normalisation
    def normalisation(self, model) -> dict:
        """The latent normalisation this model's own config or buffers define (pipeline.models.normalisation). A
        family with codes has one too (of z_q, in its config); the latent reader hands on the codes themselves."""
        c = model.config
        return {"kind": "scale_shift", "scaling_factor": float(c.get("scaling_factor") or 1.0),
                "shift_factor": c.get("shift_factor") if self.shift else None, "source": "the model's config"}

    def set_normalisation(self, model, spec: dict) -> None:
        """Write a normalisation into the model, where its diffusers pipelines read it (an export)."""
        factors = {"scaling_factor": spec["scaling_factor"]}
        if self.shift and spec.get("shift_factor") is not None:
            factors["shift_factor"] = spec["shift_factor"]
        model.register_to_config(**factors)
