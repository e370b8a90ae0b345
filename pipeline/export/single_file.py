"""One .safetensors file with the original LDM / Stable Diffusion key names: what single-file front ends (ComfyUI,
A1111, diffusers' `from_single_file`) load as a VAE. The latent factors and our model section go into the file's
metadata, so firststage reads it back without guessing."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from pipeline.export.diffusers import refuse_cosine_codebook, to_plain_diffusers
from pipeline.export.ldm import diffusers_to_ldm


def save_single_file(model, path: str | Path, model_section: dict, resolution: int, scaling_factor: float,
                     shift_factor: float | None = None, prefix: str = "") -> Path:
    refuse_cosine_codebook(model, "single-file")
    state = {k: v.detach().cpu() for k, v in to_plain_diffusers(model).state_dict().items()}
    section = {**model_section, "scaling_factor": scaling_factor, "shift_factor": shift_factor}
    metadata = {"format": "pt", "scaling_factor": repr(float(scaling_factor)), "resolution": str(resolution),
                "firststage_model": json.dumps(section)}
    if shift_factor is not None:
        metadata["shift_factor"] = repr(float(shift_factor))
    save_file(diffusers_to_ldm(state, prefix), str(path), metadata=metadata)
    return Path(path)
