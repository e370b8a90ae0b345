"""VA-VAE's vision-foundation alignment (Yao et al. 2025; hustvl/LightningDiT, vavae/ldm/modules/losses/
contperceptual.py): the latent z, projected by a learned 1x1 convolution to the foundation model's width, is pulled
towards the frozen model's patch features f of the same image by two margin terms:

  distance matrix  ReLU(|cos-sim(z_i, z_j) - cos-sim(f_i, f_j)| - m_d), averaged over all token pairs (i, j)
  cosine           ReLU(1 - m_c - cos(z_i, f_i)), averaged over tokens

The features come on the foundation model's grid (16x16 for DINOv2/14 at 224 px, which is the f16 latent of a
256 px image, as in VA-VAE); on another latent grid they are resampled to it (bilinear, antialiased).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AlignmentConfig


def vf_loss(z: torch.Tensor, f: torch.Tensor, cos_margin: float, distmat_margin: float, cos_weight: float = 1.0,
            distmat_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VF loss between the projected latent z and the features f, both [B, C, h, w]; returns (loss, parts):
    `vf_cos` is the mean cosine similarity of z and f per token (what alignment raises)."""
    z, f = z.float(), f.float()
    zn = F.normalize(z.flatten(2), dim=1)
    fn = F.normalize(f.flatten(2), dim=1)
    sim_z = torch.einsum("bci,bcj->bij", zn, zn)
    sim_f = torch.einsum("bci,bcj->bij", fn, fn)
    distmat = F.relu((sim_z - sim_f).abs() - distmat_margin).mean()
    cos = F.cosine_similarity(f, z, dim=1, eps=1e-8)
    cos_term = F.relu(1 - cos_margin - cos).mean()
    loss = distmat_weight * distmat + cos_weight * cos_term
    return loss, {"vf_distmat": distmat.detach(), "vf_cos_term": cos_term.detach(), "vf_cos": cos.mean().detach()}


class Alignment(nn.Module):
    """The projection (learned, saved in the checkpoint) and the frozen foundation model (not saved: `frozen`)."""

    frozen = ("foundation.",)  # state_dict prefixes that are not training state

    def __init__(self, cfg: AlignmentConfig, latent_channels: int):
        super().__init__()
        from pipeline.models.foundation import foundation_model

        self.cfg = cfg
        self.foundation = foundation_model(cfg.model, cfg.backbone, cfg.resolution)
        self.projection = nn.Conv2d(latent_channels, self.foundation.width, kernel_size=1, bias=False)

    def features(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The foundation model's features of images x in [-1, 1], on the latent's grid."""
        f = self.foundation(x)
        if tuple(f.shape[-2:]) != tuple(grid):
            f = F.interpolate(f, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
        return f

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The VF loss of latent z (the one decoded: sampled for KL models) for the images x it was encoded from."""
        c = self.cfg
        f = self.features(x, z.shape[-2:])
        return vf_loss(self.projection(z), f, c.cos_margin, c.distmat_margin, c.cos_weight, c.distmat_weight)
