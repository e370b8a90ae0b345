"""The KL term of the ELBO and the standard cures for posterior collapse: beta weighting with annealing
(linear warm-up, Bowman et al. 2016), cyclical schedules (Fu et al. 2019) and free bits (Kingma et al. 2016)."""

from __future__ import annotations


import torch

from pipeline.config import KLConfig


def kl_elements(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per latent element, in nats. Same shape as mean."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Summed over latent dimensions: [B]."""
    return kl_elements(mean, logvar).flatten(1).sum(1)


def kl_per_channel(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions, per channel: [C] nats per latent element (for logging and free bits)."""
    return kl_elements(mean, logvar).mean(dim=(0, 2, 3))


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """KL to N(0, I), summed over latent dimensions, averaged over the batch.

    With free bits lambda > 0, each channel's KL (per latent element, averaged over batch and positions) is replaced by
    max(lambda, KL_c): a channel below the floor costs a constant and gets no gradient, so the encoder is free to
    put information there instead of collapsing it to the prior."""
    if free_bits <= 0:
        return kl_per_sample(mean, logvar).mean()
    per_channel = kl_per_channel(mean, logvar)
    positions = mean.shape[2] * mean.shape[3]
    return torch.clamp(per_channel, min=free_bits).sum() * positions


def kl_weight(step: int, cfg: KLConfig) -> float:
    """beta at a step: constant, linear warm-up from 0, or cyclical (ramp over `cycle_ramp` of each cycle, then hold)."""
    w = cfg.weight
    if cfg.schedule == "linear":
        return w * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps > 0 else w
    if cfg.schedule == "cyclical":
        pos = (step % cfg.cycle_steps) / cfg.cycle_steps
        return w * min(1.0, pos / cfg.cycle_ramp) if cfg.cycle_ramp > 0 else w
    return w
