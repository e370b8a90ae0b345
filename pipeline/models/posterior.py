"""Sampling the Gaussian posterior of a KL autoencoder, with per-sample randomness seeded by the sample's key (so
results do not depend on batching or ranks)."""

from __future__ import annotations

import hashlib

import torch


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) drawn outside the graph (or given): gradients flow through mu and
    sigma."""
    if eps is None:  # drawn on the device itself unless a (CPU) generator fixes it
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                          device=mean.device if generator is None else generator.device)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean)


def key_seed(key: str) -> int:
    """A 60-bit seed from a sample key: per-sample randomness that does not depend on batching or ranks."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def key_generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(key))


def key_noise(keys: list[str], shape) -> torch.Tensor:
    """eps ~ N(0, I) of `shape` per sample, seeded by its key (CPU): [len(keys), *shape]."""
    return torch.stack([torch.randn(tuple(shape), generator=key_generator(k)) for k in keys])
