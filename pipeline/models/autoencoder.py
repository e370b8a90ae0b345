"""First-stage autoencoders: diffusers' AutoencoderKL and VQModel, built from our config.

Using diffusers' own classes keeps every trained model loadable by Stable-Diffusion-style pipelines without
conversion. The VQ model gets our quantizer (pipeline.models.quantizer) in place of diffusers', under the same name
and parameter key, so `VQModel.from_pretrained` loads what we save.

The forward helpers below return what the losses need (reconstruction, posterior moments or VQ terms) without
touching accelerate, files or command lines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, VQModel

from pipeline.config import ModelConfig
from pipeline.config import downsampling_factor as factor_of
from pipeline.errors import UserError
from pipeline.models.quantizer import VectorQuantizer

Autoencoder = AutoencoderKL | VQModel


def build_autoencoder(cfg: ModelConfig, sample_size: int = 256) -> Autoencoder:
    n = len(cfg.block_out_channels)
    common = dict(
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
    if cfg.kind == "kl":
        model = AutoencoderKL(**common, shift_factor=cfg.shift_factor)
        if cfg.init_logvar is not None:  # the second half of quant_conv's outputs is the posterior's log-variance
            with torch.no_grad():
                model.quant_conv.bias[cfg.latent_channels:].fill_(cfg.init_logvar)
        return model
    cb = cfg.codebook
    dim = cb.dim or cfg.latent_channels
    model = VQModel(**common, num_vq_embeddings=cb.size, vq_embed_dim=dim)
    model.quantize = VectorQuantizer(
        cb.size, dim, beta=cb.beta, update=cb.update, ema_decay=cb.ema_decay, cosine=cb.cosine,
        restart_dead=cb.restart_dead, dead_after=cb.dead_after, usage_window=cb.usage_window,
    )
    return model


def is_vq(model) -> bool:
    return isinstance(model, VQModel)


def downsampling_factor(model) -> int:
    return factor_of(model.config.block_out_channels)


def check_input(model, x: torch.Tensor) -> None:
    """Shapes the model cannot take, as one clear error instead of a deep conv failure."""
    f = downsampling_factor(model)
    c = model.config.in_channels
    if x.dim() != 4:
        raise UserError(f"expected images as [batch, {c}, height, width], got shape {tuple(x.shape)}")
    if x.shape[1] != c:
        raise UserError(f"the model takes {c}-channel images (model.in_channels), got {x.shape[1]} channels")
    if x.shape[2] % f or x.shape[3] % f:
        raise UserError(
            f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the downsampling factor {f}"
        )


def compile_blocks(model) -> None:
    """torch.compile the encoder and the decoder's blocks in place (state-dict names stay as they are). The decoder's
    output layers stay eager: the adaptive GAN weight takes gradients at its last layer, and inside one compiled
    region that would run the whole region's backward for each of them."""
    model.encoder.compile()
    decoder = model.decoder
    decoder.mid_block.compile()
    for block in decoder.up_blocks:
        block.compile()


def last_decoder_layer(model) -> torch.nn.Parameter:
    """The weight at which the adaptive GAN weight compares gradients (LDM / taming: the decoder's conv_out)."""
    return model.decoder.conv_out.weight


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor
    latents: torch.Tensor  # the sampled (KL) or quantised (VQ) latent fed to the decoder
    mean: torch.Tensor | None = None  # KL posterior moments
    logvar: torch.Tensor | None = None
    vq_loss: torch.Tensor | None = None  # VQ codebook + commitment terms
    perplexity: torch.Tensor | None = None
    codes: torch.Tensor | None = None


def encode_moments(model: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior q(z|x) = N(mean, exp(logvar)); logvar clamped to [-30, 20] as diffusers does."""
    posterior = model.encode(x).latent_dist
    return posterior.mean, posterior.logvar


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


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    if is_vq(model):
        return model.decoder(model.post_quant_conv(z))
    return model.decode(z).sample


def run_autoencoder(model, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
    """x in [-1, 1] -> reconstruction plus what the objective needs."""
    check_input(model, x)
    if is_vq(model):
        h = model.quant_conv(model.encoder(x))
        z_q, vq_loss, (perplexity, _, codes) = model.quantize(h)
        rec = model.decoder(model.post_quant_conv(z_q))
        return AutoencoderOutput(rec, z_q, vq_loss=vq_loss, perplexity=perplexity, codes=codes)
    mean, logvar = encode_moments(model, x)
    z = reparameterize(mean, logvar) if sample_posterior else mean
    return AutoencoderOutput(model.decode(z).sample, z, mean=mean, logvar=logvar)
