"""Latent shards: the encode stage's writer side (pipeline.latents.encoder), the format and manifest
(pipeline.latents.format) and the reader for diffusion trainers (LatentDataset)."""

from pipeline.latents.reader import LatentDataset, collate_latents  # noqa: F401
