"""Save a trained autoencoder as a plain diffusers folder (config.json + diffusion_pytorch_model.safetensors).

A KL model is diffusers' own AutoencoderKL and saves as it is. A VQ model carries our quantizer's training
statistics (EMA sums, usage counters); they are dropped here so that `VQModel.from_pretrained` loads the folder with
no unexpected keys. A cosine (l2-normalised) codebook is refused: diffusers' VQModel looks codes up by Euclidean
distance without normalising the encodings, so it would be a different model.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import VQModel

from pipeline.errors import UserError
from pipeline.models.autoencoder import is_vq
from pipeline.models.quantizer import VectorQuantizer


def refuse_cosine_codebook(model, fmt: str) -> None:
    if is_vq(model) and getattr(model.quantize, "cosine", False):
        raise UserError(f"--format {fmt}: this VQ model has a cosine (l2-normalised) codebook, which diffusers' "
                        f"VQModel and LDM's quantizer cannot reproduce (they look codes up by Euclidean distance); "
                        f"export it with --format encoder-only, or train with model.codebook.cosine=false")


def to_plain_diffusers(model):
    """The model as a class diffusers ships, with identical weights (a copy for VQ, the model itself for KL)."""
    if not is_vq(model) or not isinstance(model.quantize, VectorQuantizer):
        return model  # diffusers' own class already (a KL model, or a VQ model loaded from a diffusers folder)
    refuse_cosine_codebook(model, "diffusers")
    q = model.quantize
    plain = VQModel.from_config(model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("quantize.")}
    state["quantize.embedding.weight"] = q.codebook().detach().clone()
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).dtype)


def save_diffusers(model, folder: str | Path, scaling_factor: float | None = None,
                   shift_factor: float | None = None) -> Path:
    """diffusers' own save_pretrained (safetensors), with the latent factors set in config.json when given."""
    folder = Path(folder)
    plain = to_plain_diffusers(model)
    factors = {k: v for k, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)) if v is not None}
    if factors:
        plain.register_to_config(**factors)
    plain.save_pretrained(folder, safe_serialization=True)
    return folder
