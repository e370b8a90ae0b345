"""The model families: the only place that knows how each kind of autoencoder is built, encodes, decodes and trains.

  kl         AutoencoderKL: SD 1/2, SDXL, SD3 and FLUX.1 (16 channels, shift_factor)  pipeline.models.families.sd
  vq         VQModel with our quantizer (EMA codebook, restarts)                         pipeline.models.families.sd
  fsq        VQModel's encoder / decoder with finite scalar quantization                 pipeline.models.families.sd
  dc         AutoencoderDC (DC-AE, SANA)                                                 pipeline.models.families.dc
  flux2      AutoencoderKLFlux2 (FLUX.2)                                                 pipeline.models.families.flux2
  qwenimage  AutoencoderKLQwenImage                                                      pipeline.models.families.video
  wan        AutoencoderKLWan                                                            pipeline.models.families.video
  tiny       AutoencoderTiny (TAESD and kin)                                             pipeline.models.families.tiny
  rae        AutoencoderRAE: a frozen foundation encoder, a ViT decoder                 pipeline.models.families.rae
  generic    every other diffusers image autoencoder (generic.GENERIC), a posterior     pipeline.models.families.generic
  generic-latent  the same with a deterministic latent (Cosmos)                         pipeline.models.families.generic

A family declares its name (model.kind), its diffusers classes by name, what its encoder gives (a posterior, codes or
a deterministic latent) and its own model.* keys (a dataclass that pipeline.config joins to the shared keys), and
answers: validate its `model:` section and give its downsampling factor (without torch: the config asks this table
before a stage's heavy imports), build from the section, encode to a `Latent` (posterior moments, a deterministic
latent, or codes), decode, the forward the objective needs, the decoder's last layer (adaptive GAN weight), the
encoder side (frozen by a decoder-only fine-tune), the `model:` section of a loaded model, and the latent
normalisation its diffusers pipelines apply. The family modules import torch and diffusers only inside the methods
that run a model. Adding a family is one module and one row in FAMILIES; docs/model-families.md is the table users
read.
"""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.models.families.base import AutoencoderOutput, Family, Latent, plain_config  # noqa: F401
from pipeline.models.families.dc import DCFamily
from pipeline.models.families.flux2 import Flux2Family
from pipeline.models.families.generic import GenericFamily, GenericLatentFamily
from pipeline.models.families.rae import RAEFamily
from pipeline.models.families.sd import FSQFamily, KLFamily, VQFamily, is_fsq  # noqa: F401
from pipeline.models.families.tiny import TinyFamily
from pipeline.models.families.video import QwenImageFamily, WanFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (KLFamily(), VQFamily(), FSQFamily(), DCFamily(), Flux2Family(),
                                                     QwenImageFamily(), WanFamily(), TinyFamily(),
                                                     RAEFamily(), GenericFamily(), GenericLatentFamily())}
DEFAULT = "kl"  # the family of a config that names none


def family(kind: str) -> Family:
    if kind not in FAMILIES:
        raise UserError(f"model.kind {kind!r}: not a model family (families: {', '.join(FAMILIES)})")
    return FAMILIES[kind]


def family_of(model) -> Family:
    """The family of a model instance: by its diffusers class (exactly, so a subclass is not taken for its base),
    FSQ by its quantizer."""
    if is_fsq(model):
        return FAMILIES["fsq"]
    for f in FAMILIES.values():
        if type(model) in f.classes:
            return f
    raise UserError(f"{type(model).__name__}: not a model family firststage knows ({', '.join(FAMILIES)})")
