"""Likelihood bounds for KL autoencoders: ELBO and the importance-weighted bound (IWAE, Burda et al. 2016).

The decoder likelihood must be declared to speak of likelihood at all. Here it is a Gaussian on each pixel value
with mean = the decoder's output and a global scale sigma, discretised to the 256 levels of 8-bit images (bins of
width 2/255 in [-1, 1]; the edge bins take the tails), so the bound is a proper bound on log p(x) of the 8-bit image
and reads in bits per dimension. sigma is fixed or, when declared `learned`, its maximum-likelihood value over the
evaluated data.

  log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x),   z_i ~ q(z | x)
  ELBO    = mean_i log w_i                (Monte-Carlo, k samples)
  IWAE_k  = log mean_i exp(log w_i)       >= ELBO for the same samples (Jensen), tighter as k grows
"""

from __future__ import annotations

import math

import torch

from pipeline.models.autoencoder import reparameterize

HALF_BIN = 1.0 / 255.0  # half of one 8-bit level in [-1, 1]
LOG2 = math.log(2.0)


def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.log_ndtr(x)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log P(x | mean, sigma) per image [B], x on the 8-bit grid in [-1, 1]. Stable in the tails (log_ndtr)."""
    x, mean = x.double(), mean.double()
    upper = (x + HALF_BIN - mean) / sigma
    lower = (x - HALF_BIN - mean) / sigma
    log_cdf_upper = _log_ndtr(upper)  # for the bottom edge bin: P(X < x + half)
    log_sf_lower = _log_ndtr(-lower)  # for the top edge bin: P(X > x - half)
    # interior: log(Phi(u) - Phi(l)), computed as log Phi(u) + log1p(-exp(log Phi(l) - log Phi(u)))
    # on the side of the mean where it is accurate, mirrored otherwise
    left = upper < 0
    a = torch.where(left, _log_ndtr(upper), _log_ndtr(-lower))
    b = torch.where(left, _log_ndtr(lower), _log_ndtr(-upper))
    interior = a + torch.log1p(-torch.exp(b - a).clamp(max=1 - 1e-12))
    logp = torch.where(x < -1 + 1e-6, log_cdf_upper, torch.where(x > 1 - 1e-6, log_sf_lower, interior))
    return logp.flatten(1).sum(1)


def log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) summed per sample [B]."""
    z, mean, logvar = z.double(), mean.double(), logvar.double()
    return (-0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / logvar.exp())).flatten(1).sum(1)


def importance_log_weights(decode, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, k: int, sigma: float,
                           generators: list[torch.Generator], on_draw=None) -> torch.Tensor:
    """log w [B, k] for k posterior samples per image; `generators[b]` draws image b's noise, so the numbers do not
    depend on how images are batched or split across ranks. `on_draw(j)` is told after the j-th of the k draws."""
    weights = []
    for j in range(k):
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
        z = reparameterize(mean, logvar, eps)
        rec = decode(z).float()
        log_px = discretized_gaussian_log_likelihood(x, rec, sigma)
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = log_normal(z, mean, logvar)
        weights.append(log_px + log_pz - log_qz)
        if on_draw is not None:
            on_draw(j + 1)
    return torch.stack(weights, dim=1)


def iwae_from_log_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """IWAE_k per image from the first k log weights [B]."""
    return torch.logsumexp(log_w[:, :k], dim=1) - math.log(k)


def bits_per_dim(log_likelihood_nats: float, dims: int) -> float:
    """Negative log-likelihood in bits per dimension."""
    return -log_likelihood_nats / (dims * LOG2)
