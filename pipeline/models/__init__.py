"""Networks: the model families (pipeline.models.families), our quantizers (VQ, FSQ), the PatchGAN."""

from pipeline.models.autoencoder import (  # noqa: F401
    FAMILIES,
    AutoencoderOutput,
    Latent,
    build_autoencoder,
    check_input,
    decode_latents,
    downsampling_factor,
    encode_latent,
    family,
    family_of,
    is_vq,
    key_generator,
    key_noise,
    key_seed,
    last_decoder_layer,
    reparameterize,
    run_autoencoder,
)
from pipeline.models.discriminator import PatchDiscriminator  # noqa: F401
from pipeline.models.quantizer import VectorQuantizer  # noqa: F401
