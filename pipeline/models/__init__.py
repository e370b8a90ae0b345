"""Networks: diffusers' AutoencoderKL / VQModel built from config, our quantizer, the PatchGAN discriminator."""

from pipeline.models.autoencoder import (  # noqa: F401
    AutoencoderOutput,
    build_autoencoder,
    compile_blocks,
    decode_latents,
    encode_moments,
    is_vq,
    last_decoder_layer,
    reparameterize,
    run_autoencoder,
)
from pipeline.models.discriminator import PatchDiscriminator  # noqa: F401
from pipeline.models.quantizer import VectorQuantizer  # noqa: F401
