"""Latent health: active units (Burda et al. 2016), per-channel statistics, the scaling factor / shift.

Active units: a latent dimension u is active when Cov_x(E_q[z_u | x]) > 0.01, i.e. when its posterior mean moves
with the data. A collapsed dimension (posterior equal to the prior, or constant) has variance ~0. For convolutional
latents every (channel, position) is a dimension; a channel's active fraction says how much of it is used.

Scaling (diffusers convention): the diffusion model sees (z - shift_factor) * scaling_factor, chosen so that the
scaled latents have unit variance: scaling_factor = 1 / std(z), shift_factor = mean(z) over all channels.
"""

from __future__ import annotations

import math

import torch


class MomentSums:
    """Running float64 sums (count, sum, sum of squares) over a leading batch axis; reducible across ranks."""

    def __init__(self, shape: tuple[int, ...]):
        self.n = torch.zeros((), dtype=torch.float64)
        self.s = torch.zeros(shape, dtype=torch.float64)
        self.ss = torch.zeros(shape, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.s, self.ss]

    def mean(self) -> torch.Tensor:
        return self.s / self.n.clamp(min=1)

    def var(self) -> torch.Tensor:
        """Population variance (what 'variance over the data' means for active units)."""
        m = self.mean()
        return (self.ss / self.n.clamp(min=1) - m * m).clamp(min=0)


def active_units(posterior_mean_var: torch.Tensor, threshold: float = 0.01) -> dict:
    """From Var_x of the posterior mean per latent dimension [C, H, W] (or [C])."""
    active = posterior_mean_var > threshold
    per_channel = active.flatten(1).double().mean(1) if active.dim() > 1 else active.double()
    return {
        "active_units": int(active.sum()),
        "latent_dims": int(active.numel()),
        "active_fraction_per_channel": [round(float(v), 4) for v in per_channel],
        "threshold": threshold,
    }


def latent_statistics(channel_sums: MomentSums, all_sums: MomentSums) -> dict:
    """channel_sums over [C] (one entry per latent element, grouped by channel); all_sums over a scalar."""
    std_all = math.sqrt(float(all_sums.var()))
    return {
        "channel_mean": [round(float(v), 6) for v in channel_sums.mean()],
        "channel_std": [round(float(v), 6) for v in channel_sums.var().sqrt()],
        "mean": float(all_sums.mean()),
        "std": std_all,
        "scaling_factor": 1.0 / std_all if std_all > 0 else float("nan"),
        "shift_factor": float(all_sums.mean()),
    }


def normalised_statistics(channel_sums: MomentSums, spec: dict) -> dict:
    """Mean and std of the latent after the normalisation `spec` (pipeline.models.normalisation), from per-channel
    sums in its layout: how close the model's own convention comes to unit variance on these images."""
    n = channel_sums.n.clamp(min=1)
    m, second = channel_sums.s / n, channel_sums.ss / n  # per channel E[z], E[z^2]
    if spec["kind"] == "scale_shift":
        shift = torch.full_like(m, spec.get("shift_factor") or 0.0)
        scale = torch.full_like(m, spec["scaling_factor"])
    else:
        shift = torch.tensor(spec["mean"], dtype=m.dtype)
        scale = 1.0 / torch.tensor(spec["std"], dtype=m.dtype)
    mean_n = ((m - shift) * scale).mean()
    second_n = ((second - 2 * m * shift + shift * shift) * scale * scale).mean()
    return {"normalised_mean": float(mean_n), "normalised_std": math.sqrt(max(float(second_n - mean_n**2), 0.0))}
