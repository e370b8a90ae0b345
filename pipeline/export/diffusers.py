"""Save a trained autoencoder as a plain diffusers folder (config.json + diffusion_pytorch_model.safetensors).

A KL model is diffusers' own AutoencoderKL and saves as it is. A VQ model carries our quantizer's training
statistics (EMA sums, usage counters); they are dropped here so that `VQModel.from_pretrained` loads the folder with
no unexpected keys.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from diffusers import VQModel

from pipeline.models.autoencoder import is_vq


def to_plain_diffusers(model):
    """The model as a class diffusers ships, with identical weights (a copy for VQ, the model itself for KL)."""
    if not is_vq(model):
        return model
    q = model.quantize
    if getattr(q, "cosine", False):
        warnings.warn(
            "cosine (l2-normalised) codebook: diffusers' VQModel looks codes up by Euclidean distance without "
            "normalising encodings, so its outputs differ from firststage's for this model"
        )
    plain = VQModel.from_config(model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("quantize.")}
    state["quantize.embedding.weight"] = q.codebook().detach().clone()
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).dtype)


def save_diffusers(model, folder: str | Path) -> Path:
    folder = Path(folder)
    to_plain_diffusers(model).save_pretrained(folder, safe_serialization=True)
    return folder

