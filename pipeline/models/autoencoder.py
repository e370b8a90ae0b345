"""First-stage autoencoders, one entry per model family: the only place that knows how each kind of model is built,
encodes, decodes and trains.

  kl   diffusers' AutoencoderKL (SD / LDM KL-f8 and its kin): a Gaussian posterior q(z|x) = N(mean, exp(logvar))
  vq   diffusers' VQModel with our quantizer (pipeline.models.quantizer) in place of diffusers', under the same name
       and parameter key, so `VQModel.from_pretrained` loads what we save

Using diffusers' own classes keeps every trained model loadable by diffusers pipelines without conversion. A family
answers: build from the `model:` config section, encode to a `Latent` (posterior moments, or the quantised latent
and its codes), decode, the whole forward the objective needs, the decoder's last layer (for the adaptive GAN
weight), the encoder side (frozen by a decoder-only fine-tune), the downsampling factor, and the `model:` section of
a loaded model. Adding a family is one new class and one entry in FAMILIES. Nothing here touches accelerate, files
or command lines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.quantizer import VectorQuantizer


@dataclass
class Latent:
    """What an encoder gives for a batch. `mean`: the posterior mean (KL) or the quantised latent z_q (VQ), the
    deterministic latent otherwise; `logvar`: the posterior's log-variance (KL only); `codes`: code indices [B, h, w]
    (VQ only); `vq_loss`, `perplexity`: the quantizer's terms (VQ, training)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    vq_loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor
    latents: torch.Tensor  # the sampled (KL) or quantised (VQ) latent fed to the decoder
    mean: torch.Tensor | None = None  # KL posterior moments
    logvar: torch.Tensor | None = None
    vq_loss: torch.Tensor | None = None  # VQ codebook + commitment terms
    perplexity: torch.Tensor | None = None
    codes: torch.Tensor | None = None


def _diffusers_blocks(cfg: ModelConfig, sample_size: int) -> dict:
    n = len(cfg.block_out_channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=cfg.scaling_factor,
        mid_block_add_attention=cfg.mid_block_attention,
    )


class Family:
    """The SD / LDM encoder-decoder shape shared by AutoencoderKL and VQModel; subclasses add the latent."""

    name = ""
    classes: tuple[type, ...] = ()
    has_posterior = False

    def build(self, cfg: ModelConfig, sample_size: int) -> nn.Module:
        raise NotImplementedError

    def encode(self, model, x: torch.Tensor) -> Latent:
        raise NotImplementedError

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
        raise NotImplementedError

    def last_decoder_layer(self, model) -> nn.Parameter:
        """The weight at which the adaptive GAN weight compares gradients (LDM / taming: the decoder's conv_out)."""
        return model.decoder.conv_out.weight

    def encoder_side(self, model) -> list[nn.Module]:
        """What a decoder-only fine-tune freezes: the latent space an existing diffusion model was trained on."""
        return [m for m in (model.encoder, model.quant_conv) if m is not None]

    def downsampling_factor(self, model) -> int:
        return 2 ** (len(model.config.block_out_channels) - 1)

    def latent_channels(self, model) -> int:
        return model.config.latent_channels

    def num_codes(self, model) -> int:
        return 0

    def model_section(self, model) -> dict:
        """The `model:` config section that describes a loaded model of this family."""
        c = model.config
        section = {"kind": self.name, "in_channels": c["in_channels"],
                   "block_out_channels": list(c["block_out_channels"]), "layers_per_block": c["layers_per_block"],
                   "latent_channels": c["latent_channels"], "norm_num_groups": c["norm_num_groups"],
                   "scaling_factor": float(c.get("scaling_factor") or 1.0),
                   "mid_block_attention": bool(c.get("mid_block_add_attention", True))}
        if c.get("shift_factor") is not None:
            section["shift_factor"] = float(c["shift_factor"])
        return section

    def compile(self, model) -> None:
        """torch.compile the encoder and the decoder's blocks in place (state-dict names stay as they are). The
        decoder's output layers stay eager: the adaptive GAN weight takes gradients at its last layer, and inside one
        compiled region that would run the whole region's backward for each of them."""
        model.encoder.compile()
        model.decoder.mid_block.compile()
        for block in model.decoder.up_blocks:
            block.compile()

    def train_metrics(self, model) -> dict[str, torch.Tensor]:
        """Scalars worth logging during training besides the loss terms."""
        return {}


class KLFamily(Family):
    name = "kl"
    classes = (AutoencoderKL,)
    has_posterior = True

    def build(self, cfg: ModelConfig, sample_size: int) -> nn.Module:
        model = AutoencoderKL(**_diffusers_blocks(cfg, sample_size), shift_factor=cfg.shift_factor)
        if cfg.init_logvar is not None:  # the second half of quant_conv's outputs is the posterior's log-variance
            with torch.no_grad():
                model.quant_conv.bias[cfg.latent_channels:].fill_(cfg.init_logvar)
        return model

    def encode(self, model, x: torch.Tensor) -> Latent:
        """Posterior q(z|x) = N(mean, exp(logvar)); logvar clamped to [-30, 20] as diffusers does."""
        posterior = model.encode(x).latent_dist
        return Latent(posterior.mean, posterior.logvar)

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        return model.decode(z).sample

    def forward(self, model, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
        lat = self.encode(model, x)
        z = reparameterize(lat.mean, lat.logvar) if sample_posterior else lat.mean
        return AutoencoderOutput(self.decode(model, z), z, mean=lat.mean, logvar=lat.logvar)


class VQFamily(Family):
    name = "vq"
    classes = (VQModel,)

    def build(self, cfg: ModelConfig, sample_size: int) -> nn.Module:
        cb = cfg.codebook
        dim = cb.dim or cfg.latent_channels
        model = VQModel(**_diffusers_blocks(cfg, sample_size), num_vq_embeddings=cb.size, vq_embed_dim=dim)
        model.quantize = VectorQuantizer(
            cb.size, dim, beta=cb.beta, update=cb.update, ema_decay=cb.ema_decay, cosine=cb.cosine,
            restart_dead=cb.restart_dead, dead_after=cb.dead_after, usage_window=cb.usage_window,
        )
        return model

    def encode(self, model, x: torch.Tensor) -> Latent:
        h = model.quant_conv(model.encoder(x))
        z_q, vq_loss, (perplexity, _, codes) = model.quantize(h)
        codes = codes.reshape(h.shape[0], h.shape[2], h.shape[3])  # diffusers' own quantizer gives them flat
        return Latent(z_q, codes=codes, vq_loss=vq_loss, perplexity=perplexity)

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        return model.decoder(model.post_quant_conv(z))

    def forward(self, model, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
        lat = self.encode(model, x)
        rec = self.decode(model, lat.mean)
        return AutoencoderOutput(rec, lat.mean, vq_loss=lat.vq_loss, perplexity=lat.perplexity, codes=lat.codes)

    def encoder_side(self, model) -> list[nn.Module]:
        return super().encoder_side(model) + [model.quantize]

    def latent_channels(self, model) -> int:
        return model.quantize.vq_embed_dim

    def num_codes(self, model) -> int:
        return model.quantize.n_e  # ours and diffusers' quantizer

    def model_section(self, model) -> dict:
        c = model.config
        return {**super().model_section(model), "codebook": {
            "size": int(c["num_vq_embeddings"]), "dim": int(c["vq_embed_dim"] or c["latent_channels"])}}

    def train_metrics(self, model) -> dict[str, torch.Tensor]:
        return {"codebook_usage": model.quantize.usage()} if hasattr(model.quantize, "usage") else {}


FAMILIES: dict[str, Family] = {f.name: f for f in (KLFamily(), VQFamily())}


def family(kind: str) -> Family:
    if kind not in FAMILIES:
        raise UserError(f"model.kind {kind!r}: not a model family (families: {', '.join(FAMILIES)})")
    return FAMILIES[kind]


def family_of(model) -> Family:
    """The family of a model instance."""
    for f in FAMILIES.values():
        if isinstance(model, f.classes):
            return f
    raise UserError(f"{type(model).__name__}: not a model family firststage knows ({', '.join(FAMILIES)})")


# ------------------------------------------------------------------------------ the family-independent helpers
def build_autoencoder(cfg: ModelConfig, sample_size: int = 256) -> nn.Module:
    return family(cfg.kind).build(cfg, sample_size)


def is_vq(model) -> bool:
    return family_of(model).name == "vq"


def downsampling_factor(model) -> int:
    return family_of(model).downsampling_factor(model)


def last_decoder_layer(model) -> nn.Parameter:
    return family_of(model).last_decoder_layer(model)


def encode_latent(model, x: torch.Tensor) -> Latent:
    return family_of(model).encode(model, x)


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    return family_of(model).decode(model, z)


def check_input(model, x: torch.Tensor) -> None:
    """Shapes the model cannot take, as one clear error instead of a deep conv failure."""
    f = downsampling_factor(model)
    c = model.config.in_channels
    if x.dim() != 4:
        raise UserError(f"expected images as [batch, {c}, height, width], got shape {tuple(x.shape)}")
    if x.shape[1] != c:
        raise UserError(f"the model takes {c}-channel images (model.in_channels), got {x.shape[1]} channels")
    if x.shape[2] % f or x.shape[3] % f:
        raise UserError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the downsampling factor {f}")


def run_autoencoder(model, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
    """x in [-1, 1] -> reconstruction plus what the objective needs."""
    check_input(model, x)
    return family_of(model).forward(model, x, sample_posterior)


# ------------------------------------------------------------------------------------------ posterior sampling
def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) drawn outside the graph (or given): gradients flow through mu and
    sigma."""
    if eps is None:  # drawn on the device itself unless a (CPU) generator fixes it
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                          device=mean.device if generator is None else generator.device)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean)


def key_seed(key: str) -> int:
    """A 60-bit seed from a sample key: per-sample randomness that does not depend on batching or ranks."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def key_generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(key))


def key_noise(keys: list[str], shape) -> torch.Tensor:
    """eps ~ N(0, I) of `shape` per sample, seeded by its key (CPU): [len(keys), *shape]."""
    return torch.stack([torch.randn(tuple(shape), generator=key_generator(k)) for k in keys])
