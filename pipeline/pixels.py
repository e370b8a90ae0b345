"""Pixels between uint8 images and the model's floats, in one place (the loader, the trainer, metrics and latents).

Batches leave the loader as uint8 [B, C, H, W]; the conversion to float in [-1, 1] happens on the device, after the
host-to-device copy (a quarter of the bytes to move)."""

from __future__ import annotations

import torch


def to_model_input(images: torch.Tensor, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float in [-1, 1] on the device (conversion after the host-to-device copy)."""
    x = images.to(device, non_blocking=True) if device is not None else images
    return x.to(dtype).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] -> uint8 (rounded, clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
