"""RAE's discriminator (bytetriper/RAE, `recipe: S_8`, after StyleGAN-T's and VAR's DINO discriminators): a frozen
DINO ViT-S/8 reads the image, augmented by DiffAug (Zhao et al. 2020: colour, translation, cutout) with probability
`p`, resized to 224 and normalised by ImageNet's statistics; trainable heads on the tokens of four of its blocks
(2, 5, 8, 11) each give one logit per token: a spectrally normalised 1x1 convolution, local BatchNorm and
LeakyReLU(0.2), then a residual block of the same with kernel `ks` (9, circular padding), then a 1x1 convolution to
one channel. The logits of all heads are concatenated.

The backbone is held outside the module's children: neither trained nor saved (the checkpoint, an export's
discriminator.safetensors and train.init_from hold the heads), moved with the module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

HOOKS = (2, 5, 8, 11)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class BatchNormLocal(nn.Module):
    """BatchNorm over groups of `virtual_batch` samples and the token axis, without running statistics."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.virtual_batch, self.eps = virtual_batch, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, N]
        b, c, n = x.shape
        groups = math.ceil(b / self.virtual_batch)
        groups = groups if b % groups == 0 else 1
        g = x.view(groups, -1, c, n)
        mean, var = g.mean((1, 3), keepdim=True), g.var((1, 3), keepdim=True, unbiased=False)
        g = (g - mean) / torch.sqrt(var + self.eps)
        return g.view(b, c, n) * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


def _block(channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), BatchNormLocal(channels), nn.LeakyReLU(0.2))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class Head(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1), Residual(_block(channels, kernel)))
        self.cls = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, N]
        return self.cls(self.main(tokens.transpose(1, 2))).flatten(1)


# --------------------------------------------------------------------------------------------- DiffAug
def _grid(b: int, h: int, w: int, device):
    return torch.meshgrid(torch.arange(b, device=device), torch.arange(h, device=device),
                          torch.arange(w, device=device), indexing="ij")


def diff_augment(x: torch.Tensor) -> torch.Tensor:
    """DiffAug's colour (brightness, saturation, contrast), translation (1/8) and cutout (1/2), per sample."""
    b, _, h, w = x.shape
    r = lambda *s: torch.rand(b, *s, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (r(1, 1, 1) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (r(1, 1, 1) * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (r(1, 1, 1) + 0.5) + mean
    sx, sy = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    tx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    ty = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    gb, gx, gy = _grid(b, h, w, x.device)
    gx, gy = (gx + tx + 1).clamp(0, h + 1), (gy + ty + 1).clamp(0, w + 1)
    x = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    gb, gx, gy = _grid(b, ch, cw, x.device)
    mask = torch.ones(b, h, w, device=x.device, dtype=x.dtype)
    mask[gb, (gx + ox - ch // 2).clamp(0, h - 1), (gy + oy - cw // 2).clamp(0, w - 1)] = 0
    return x * mask.unsqueeze(1)


class DinoDiscriminator(nn.Module):
    def __init__(self, backbone: nn.Module, kernel: int = 9, p: float = 1.0, resolution: int = 224):
        super().__init__()
        self.__dict__["backbone"] = backbone.eval().requires_grad_(False)  # not a child: neither trained nor saved
        depth = backbone.config.num_hidden_layers
        self.hooks = [i for i in HOOKS if i < depth] or [depth - 1]
        self.heads = nn.ModuleList(Head(backbone.config.hidden_size, kernel) for _ in self.hooks)
        self.p, self.resolution = p, resolution
        self.register_buffer("mean", torch.tensor(IMAGENET[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET[1]).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        self.backbone._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> logits [B, tokens x heads]."""
        if self.p > 0 and (self.p >= 1 or torch.rand(()) < self.p):
            x = diff_augment(x)
        x = F.interpolate((x + 1) / 2, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                          align_corners=False)
        hidden = self.backbone((x - self.mean) / self.std, output_hidden_states=True).hidden_states
        return torch.cat([head(hidden[i + 1]) for i, head in zip(self.hooks, self.heads)], dim=1)
