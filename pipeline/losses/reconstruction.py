"""Pixel reconstruction terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_error(x: torch.Tensor, x_rec: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element |x - x_rec| (l1) or (x - x_rec)^2 (l2), in float32: same shape as x."""
    x, x_rec = x.float(), x_rec.float()
    if kind == "l1":
        return (x - x_rec).abs()
    if kind == "l2":
        return F.mse_loss(x_rec, x, reduction="none")
    raise ValueError(f"reconstruction type must be l1 or l2, got {kind!r}")
