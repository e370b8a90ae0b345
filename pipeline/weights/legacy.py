"""Format: a legacy .ckpt / .pt / .pth / .bin (an LDM or SD checkpoint, a bare VAE state dict), read with
torch.load(weights_only=True) only: a pickle that needs code to load is refused with one line and never executed.
Names and shape are then handled as for a single file."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.weights import single_file
from pipeline.weights.single_file import describe  # noqa: F401 (this format's describe, as for any single file)

NAME = "legacy"
SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def detect(p: Path) -> Path | None:
    return single_file.detect(p, SUFFIXES)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: refused: it is not plain tensors (loading it would need to run code from the "
                        f"file, which firststage never does; {type(e).__name__}). Convert it to .safetensors "
                        f"where you trust it") from None
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds no state dict (a {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def state_dict(path: Path, ema: bool) -> dict:
    return single_file.to_diffusers_names(read(path)[0])


def load(path: Path, ema: bool, overrides: list[str] | None):
    return single_file.load_from(path, *read(path), overrides)
