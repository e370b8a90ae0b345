"""Networks: the model families (pipeline.models.families), our quantizers (VQ, FSQ), the PatchGAN.

The names below are imported on first use (PEP 562), so `pipeline.models.registry` stays importable without torch:
a stage's checks that need no model run before torch and diffusers are imported."""

from __future__ import annotations

import importlib

_WHERE = {
    "FAMILIES": "pipeline.models.families",
    **dict.fromkeys(["AutoencoderOutput", "Latent", "build_autoencoder", "check_input", "decode_latents",
                     "downsampling_factor", "encode_latent", "family", "family_of", "key_generator",
                     "key_noise", "key_seed", "last_decoder_layer", "reparameterize", "run_autoencoder"],
                    "pipeline.models.autoencoder"),
    "PatchDiscriminator": "pipeline.models.discriminator",
    "VectorQuantizer": "pipeline.models.quantizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
