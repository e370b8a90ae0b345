"""PSNR and SSIM on 8-bit images, per image, as tensors.

SSIM is Wang et al. (2004): 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03,
population covariances, averaged over the window positions that lie inside the image and over channels. That is
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255, channel_axis=...)`.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) [B, C, H, W] -> PSNR in dB per image [B]; identical images give +inf."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its mean colour (uint8): the baseline a reconstruction has to beat."""
    return x.double().mean((2, 3), keepdim=True).round().clamp(0, 255).to(torch.uint8).expand_as(x)


def _gaussian_kernel(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) [B, C, H, W] -> mean SSIM per image [B]."""
    x, y = x.double(), y.double()
    b, c, h, w = x.shape
    g = _gaussian_kernel().to(x.device)
    k = g.numel()
    if h < k or w < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k}, got {h}x{w}")

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable 'valid' Gaussian filter per channel
        t = t.reshape(b * c, 1, *t.shape[2:])
        t = F.conv2d(t, g.view(1, 1, 1, k))
        t = F.conv2d(t, g.view(1, 1, k, 1))
        return t.view(b, c, *t.shape[2:])

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
