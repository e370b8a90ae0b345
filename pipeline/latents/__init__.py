"""Latent shards: the encode job (pipeline.latents.job: EncodeJob, what the encode stage runs) and its encoder loop and
shard writer (pipeline.latents.encoder), the format and manifest (pipeline.latents.format) and the reader for
diffusion trainers (LatentDataset, imported on first use so that the package's light modules load without torch)."""

from __future__ import annotations

__all__ = ["LatentDataset", "collate_latents"]


def __getattr__(name: str):
    if name in __all__:
        from pipeline.latents import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'pipeline.latents' has no attribute {name!r}")
