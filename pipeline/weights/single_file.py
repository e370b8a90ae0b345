"""Format: one .safetensors file with the original LDM / Stable Diffusion key names (or diffusers names), what
single-file front ends (ComfyUI, A1111, diffusers' `from_single_file`) load as a VAE; of a full SD checkpoint only
the autoencoder is read. A firststage export stores the latent factors and its model section in the metadata; any
other file's model shape is read from its tensors (pipeline.weights.ldm.infer_model_section)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.config import config_from_dict, merge_dicts, parse_overrides
from pipeline.errors import UserError
from pipeline.storage import regular_file
from pipeline.weights.diffusers import refuse_cosine_codebook, to_plain_diffusers
from pipeline.weights.ldm import PREFIXES, diffusers_to_ldm, infer_model_section, is_ldm_named, ldm_to_diffusers, strip_prefix
from pipeline.weights.loading import build_and_load, named

NAME = "single-file"
SUFFIXES = (".safetensors",)
MAX_RESOLUTION = 16384  # what a file's metadata may claim (data.resolution=N overrides it)


def detect(p: Path, suffixes: tuple[str, ...] = SUFFIXES) -> Path | None:
    return p if p.is_file() and p.suffix.lower() in suffixes else None


def describe(path: Path, ema: bool) -> str:
    """Every single file (safetensors or legacy) is described by its name."""
    return f"single file {path.name}"


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the autoencoder's tensors as stored, the file's metadata). safetensors checks that the header's offsets lie
    in the file, so what is read is never more than the file holds."""
    from safetensors import safe_open

    regular_file(path, "weights file")
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


_KINDS = {dict: "a JSON object", int: f"an integer from 8 to {MAX_RESOLUTION}", float: "a finite number"}


def _metadata(meta: dict, key: str, kind, path: Path):
    """A metadata value (metadata are strings) as `kind`, or one line naming the file, the key and the value."""
    try:
        value = json.loads(meta[key]) if kind is dict else kind(meta[key])
    except (ValueError, TypeError):
        value = None
    if (not isinstance(value, kind) or (kind is float and not math.isfinite(value))
            or (kind is int and not 8 <= value <= MAX_RESOLUTION)):
        raise UserError(f"{path}: metadata {key} is {meta[key][:80]!r}, not {_KINDS[kind]}")
    return value


def file_config(path: Path, state: dict, meta: dict, overrides: list[str] | None = None):
    """The Config of a single file: the model section a firststage export stores in its metadata, else the one
    inferred from the shapes; then the user's overrides."""
    if "firststage_model" in meta:
        section = _metadata(meta, "firststage_model", dict, path)
    else:
        with named(path):
            section = infer_model_section(state)
        if "scaling_factor" in meta:
            section["scaling_factor"] = _metadata(meta, "scaling_factor", float, path)
    resolution = _metadata(meta, "resolution", int, path) if "resolution" in meta else 256
    levels = section.get("block_out_channels")
    f = 2 ** (len(levels) - 1) if isinstance(levels, list) and levels else 1
    data = {"resolution": max(f, resolution - resolution % f)}
    with named(path):
        return config_from_dict(merge_dicts({"model": section, "data": data}, parse_overrides(overrides or [])))


def load_from(path: Path, state: dict, meta: dict, overrides: list[str] | None):
    """(model, Config) of a file's tensors (any names) and metadata: the shared half of single-file and legacy."""
    state = to_diffusers_names(state)
    cfg = file_config(path, state, meta, overrides)
    return build_and_load(cfg, state, str(path)), cfg


def load(path: Path, ema: bool, overrides: list[str] | None):
    return load_from(path, *read(path), overrides)


def save(model, path: Path, section: dict, resolution: int, scaling_factor: float, shift_factor: float | None = None,
         prefix: str = "", **_) -> Path:
    """LDM names (attention matrices as 1x1 convs), the latent factors and our model section in the metadata."""
    refuse_cosine_codebook(model, "single-file")
    state = {k: v.detach().cpu() for k, v in to_plain_diffusers(model).state_dict().items()}
    section = {**section, "scaling_factor": scaling_factor, "shift_factor": shift_factor}
    metadata = {"format": "pt", "scaling_factor": repr(float(scaling_factor)), "resolution": str(resolution),
                "firststage_model": json.dumps(section)}
    if shift_factor is not None:
        metadata["shift_factor"] = repr(float(shift_factor))
    save_file(diffusers_to_ldm(state, prefix), str(path), metadata=metadata)
    return Path(path)
