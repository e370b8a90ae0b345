"""Format: the encoder alone, what a latent service or the encode stage needs, at half the memory of the full model.

  folder/
    encoder_config.json       the model section, resolution(s), latent factors, what the program returns
    encoder.safetensors       encoder.*, quant_conv.* (and quantize.embedding.weight for VQ)
    encoder.pt2               a torch.export program: images [B, 3, H, W] in [-1, 1] -> (mean, logvar), (codes,) or (latent,),
                              B dynamic, H and W any multiple of the downsampling factor up to max_size

firststage loads the folder (`--model folder`) without building a decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.checkpoint import load_tensors
from pipeline.config import config_from_dict, merge_dicts, parse_overrides
from pipeline.errors import UserError
from pipeline.storage import regular_file
from pipeline.weights.loading import build_checked, load_state, named, read_json_config

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

NAME = "encoder-only"
CONFIG = "encoder_config.json"  # the folder's marker
WEIGHTS = "encoder.safetensors"
PROGRAM = "encoder.pt2"
ENCODER_PREFIXES = ("encoder.", "quant_conv.", "quantize.")


def encoder_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def detect(p: Path) -> Path | None:
    return p if p.is_dir() and (p / CONFIG).is_file() else None


def describe(folder: Path, ema: bool) -> str:
    return "encoder-only export"


def state_dict(folder: Path, ema: bool) -> dict:
    raise UserError(f"{folder}: an encoder-only export has no decoder to train; use the full model")


def save(model, folder: Path, section: dict, resolution: int, normalisation: dict, max_size: int = 4096, **_) -> Path:
    import torch
    from safetensors.torch import save_file

    from pipeline.models.autoencoder import downsampling_factor
    from pipeline.models.encoder_program import EncoderProgram

    folder.mkdir(parents=True, exist_ok=True)
    save_file(encoder_state(model), str(folder / WEIGHTS))
    f = downsampling_factor(model)
    program = EncoderProgram(model).eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    h = torch.export.Dim("h", min=1, max=max_size // f)
    w = torch.export.Dim("w", min=1, max=max_size // f)
    example = torch.randn(2, model.config.in_channels, resolution, resolution)
    with torch.no_grad():
        ep = torch.export.export(program, (example,), dynamic_shapes={"x": {0: batch, 2: f * h, 3: f * w}})
    torch.export.save(ep, str(folder / PROGRAM))
    config = {
        "model": {**section, **({"scaling_factor": normalisation["scaling_factor"],
                                 "shift_factor": normalisation.get("shift_factor")}
                                if normalisation["kind"] == "scale_shift" else {})},
        "normalisation": normalisation,
        "resolution": resolution,
        "program": {"file": PROGRAM, "input": "float32 images [B, C, H, W] in [-1, 1]",
                    "batch": "dynamic", "sizes": f"H and W multiples of {f}, up to {max_size}",
                    "outputs": program.outputs},
        "weights": WEIGHTS,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return folder


def read_config(folder: Path) -> tuple[dict, Path]:
    """The folder's encoder_config.json and the weights file it names, which must lie in the folder itself."""
    path = folder / CONFIG
    meta = read_json_config(path, "encoder-only config")
    name = meta.get("weights", WEIGHTS)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise UserError(f"{path}: weights {name!r} is not a file name in {folder} (no folders, no ..)")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("resolution"), int):
        raise UserError(f"{path}: not a firststage encoder-only config (needs a model object and an integer "
                        f"resolution)")
    return meta, regular_file(folder / name, "weights file")


def load(folder: Path, ema: bool, overrides: list[str] | None = None):
    """(model without decoder, Config): built on the meta device and checked against the weights' shapes, so the
    decoder never takes memory and a config that does not fit the weights is refused before any does."""
    meta, weights = read_config(folder)
    with named(folder / CONFIG):
        cfg = config_from_dict(merge_dicts({"model": meta["model"], "data": {"resolution": meta["resolution"]}},
                                           parse_overrides(overrides or [])))
    state = load_tensors(weights)
    model = build_checked(cfg, state, str(folder), encoder_only=True).to_empty(device="cpu")
    load_state(model, state, str(folder), checked=True)
    return model, cfg
