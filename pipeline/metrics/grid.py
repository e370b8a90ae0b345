"""Image grids: inputs above their reconstructions, as one PNG (the trainer's samples/ and evaluate's grid)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.storage import as_path, atomic_write_bytes


def save_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> np.ndarray:
    """uint8 [B, 3, H, W] inputs above their reconstructions, as one PNG (written whole); returns the HxWx3 grid so
    callers can log it without reading the file back."""
    top = torch.cat(list(inputs.cpu()), dim=2)
    bottom = torch.cat(list(reconstructions.cpu()), dim=2)
    grid = torch.cat([top, bottom], dim=1).permute(1, 2, 0).contiguous().numpy()
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return grid
