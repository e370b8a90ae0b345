"""Metrics: PSNR, SSIM (and, with the evaluate stage, LPIPS, FID, ELBO/IWAE, active units, codebook usage)."""

from pipeline.metrics.image import mean_colour, psnr, ssim  # noqa: F401
