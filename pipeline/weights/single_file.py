"""Format: one .safetensors file with the original LDM / Stable Diffusion key names (or diffusers names), what
single-file front ends (ComfyUI, A1111, diffusers' `from_single_file`) load as a VAE; of a full SD checkpoint only
the autoencoder is read. A firststage export stores the latent factors and its model section in the metadata; any
other file's model shape is read from its tensors (pipeline.weights.ldm.infer_model_section)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.config import config_from_dict, merge_dicts, parse_overrides
from pipeline.errors import UserError
from pipeline.weights.diffusers import refuse_cosine_codebook, to_plain_diffusers
from pipeline.weights.ldm import PREFIXES, diffusers_to_ldm, infer_model_section, is_ldm_named, ldm_to_diffusers, strip_prefix
from pipeline.weights.loading import build_and_load

NAME = "single-file"
SUFFIXES = (".safetensors",)


def detect(p: Path, suffixes: tuple[str, ...] = SUFFIXES) -> Path | None:
    return p if p.is_file() and p.suffix.lower() in suffixes else None


def describe(path: Path, ema: bool) -> str:
    """Every single file (safetensors or legacy) is described by its name."""
    return f"single file {path.name}"


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the autoencoder's tensors as stored, the file's metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
            state = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    return state, meta


def to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = strip_prefix(state)
    return ldm_to_diffusers(state) if is_ldm_named(state) else state


def state_dict(path: Path, ema: bool) -> dict:
    return to_diffusers_names(read(path)[0])


def file_config(state: dict, meta: dict, overrides: list[str] | None = None):
    """The Config of a single file: the model section a firststage export stores in its metadata, else the one
    inferred from the shapes; then the user's overrides."""
    if "firststage_model" in meta:
        section = json.loads(meta["firststage_model"])
    else:
        section = infer_model_section(state)
        if "scaling_factor" in meta:
            section["scaling_factor"] = float(meta["scaling_factor"])
    resolution = int(meta.get("resolution", 256))
    f = 2 ** (len(section["block_out_channels"]) - 1)
    data = {"resolution": resolution - resolution % f}
    return config_from_dict(merge_dicts({"model": section, "data": data}, parse_overrides(overrides or [])))


def load_from(path: Path, state: dict, meta: dict, overrides: list[str] | None):
    """(model, Config) of a file's tensors (any names) and metadata: the shared half of single-file and legacy."""
    state = to_diffusers_names(state)
    cfg = file_config(state, meta, overrides)
    return build_and_load(cfg, state, str(path)), cfg


def load(path: Path, ema: bool, overrides: list[str] | None):
    return load_from(path, *read(path), overrides)


def save(model, path: Path, section: dict, resolution: int, normalisation: dict, prefix: str = "", **_) -> Path:
    """LDM names (attention matrices as 1x1 convs), the latent factors and our model section in the metadata."""
    refuse_cosine_codebook(model, "single-file")
    state = {k: v.detach().cpu() for k, v in to_plain_diffusers(model).state_dict().items()}
    scale, shift = normalisation["scaling_factor"], normalisation.get("shift_factor")
    section = {**section, "scaling_factor": scale, "shift_factor": shift}
    metadata = {"format": "pt", "scaling_factor": repr(float(scale)), "resolution": str(resolution),
                "firststage_model": json.dumps(section)}
    if shift is not None:
        metadata["shift_factor"] = repr(float(shift))
    save_file(diffusers_to_ldm(state, prefix), str(path), metadata=metadata)
    return Path(path)
