"""The rectified-flow objective of SiT / LightningDiT, and the transformer and sampler the probe uses (diffusers').

Path and target: x_t = (1 - t) x0 + t eps (t = 1 is pure noise), the model predicts the velocity v = eps - x0, the
loss is the mean squared error per latent dimension. Training draws t logit-normal (SiT / LightningDiT) or uniform,
then shifts it by t -> a t / (1 + (a - 1) t); a = sqrt(latent dimension / 4096) by default (RAE, Zheng et al. 2025:
a high-dimensional latent keeps more of its signal at a given t, so it needs noisier t), the same shift as
diffusers' FlowMatchEulerDiscreteScheduler(shift=a), which samples.

The validation loss is measured at the fixed grid VAL_GRID of unshifted t, with noise seeded by each latent's key and
t: the same grid and noise for every probe, so two first stages compare on numbers. For x0 ~ N(0, I) the best
predictor leaves 1 / ((1 - t)^2 + t^2) per dimension (gaussian_minimum): the loss's floor on white latents.
"""

from __future__ import annotations

import math

import torch

VAL_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TIME_SCALE = 1000.0  # the transformer's timestep is t x 1000, as the scheduler's timesteps are


def gaussian_minimum(t: float) -> float:
    """The rectified-flow loss of the best velocity predictor when x0 ~ N(0, 1) per dimension: Var(v) - Cov(v,
    x_t)^2 / Var(x_t) = 2 - (2t - 1)^2 / ((1 - t)^2 + t^2) = 1 / ((1 - t)^2 + t^2)."""
    return 1.0 / ((1 - t) ** 2 + t ** 2)


def default_shift(latent_shape) -> float:
    """RAE's dimension-dependent shift: sqrt(C * H * W / 4096)."""
    return math.sqrt(math.prod(latent_shape) / 4096)


def shift_t(t: torch.Tensor, a: float) -> torch.Tensor:
    return a * t / (1 + (a - 1) * t)


def sample_t(n: int, kind: str, mean: float, std: float, shift: float, device=None) -> torch.Tensor:
    """Training times from the global RNG (saved in checkpoints, so a resumed run draws what it would have)."""
    if kind == "uniform":
        t = torch.rand(n)
    else:
        t = torch.sigmoid(torch.randn(n) * std + mean)
    return shift_t(t, shift).to(device)


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the velocity target eps - x0)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * eps, eps - x0


def velocity(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The transformer's velocity at x_t (t in [0, 1]); unconditional models see class 0."""
    if labels is None:
        labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    return model(x, timestep=t.to(x.device) * TIME_SCALE, class_labels=labels).sample


def build_transformer(p, channels: int, side: int):
    """diffusers' DiTTransformer2DModel (adaLN-Zero blocks, fixed sin-cos positions) of the probe.* shape on
    [channels, side, side] latents, predicting as many channels (no learned sigma)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=p.heads, attention_head_dim=p.hidden // p.heads,
                                 in_channels=channels, out_channels=channels, num_layers=p.depth, sample_size=side,
                                 patch_size=p.patch, num_embeds_ada_norm=max(1, p.num_classes),
                                 norm_type="ada_norm_zero")


@torch.no_grad()
def sample(model, shape, steps: int, shift: float, generator: torch.Generator, device,
           labels: torch.Tensor | None = None) -> torch.Tensor:
    """Euler integration of the velocity from t = 1 (noise, from `generator`) to t = 0 with diffusers'
    FlowMatchEulerDiscreteScheduler (its shift is the training shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(TIME_SCALE), shift=shift)
    sched.set_timesteps(steps, device=device)
    x = torch.randn(tuple(shape), generator=generator).to(device)
    for ts in sched.timesteps:
        t = (ts / TIME_SCALE).expand(len(x)).float()
        x = sched.step(velocity(model, x, t, labels).float(), ts, x).prev_sample
    return x
