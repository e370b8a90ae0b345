"""White latents: a latent folder in the encode stage's format whose floor under the probe is known in closed form
(flow.gaussian_minimum), to check the probe itself (tests/test_probe.py) and to time it (benchmarks/probe.py)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.shards import ShardWriter
from pipeline.manifest import LATENT_FORMAT, MANIFEST
from pipeline.storage import atomic_write_json


def write_gaussian_latents(folder: str | Path, n: int, shape=(4, 4, 4), per_shard: int = 64,
                           store: str = "moments") -> None:
    """n samples whose latents are exactly N(0, I): each stores the posterior moments mean 0, logvar 0, so
    LatentDataset draws z = eps, fresh in training and seeded by key in eval. The manifest names no first stage
    (nothing decodes these). store="codes": zero integer codes instead (what the probe refuses)."""
    import torch
    from safetensors.torch import save as save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from pipeline.latents.format import kind_named

    kind = kind_named(store)
    tensors = kind.names(flip=False)
    dtype = torch.int64 if kind.integer else torch.float32
    member = save_safetensors({t: torch.zeros(shape, dtype=dtype) for t in tensors})
    shards = []
    for s in range(0, n, per_shard):
        name = f"shards-{s // per_shard:06d}.tar"
        writer = ShardWriter(folder / name)
        for i in range(s, min(n, s + per_shard)):
            writer.write({"__key__": f"g{i:05d}", "latents.safetensors": member, "json": b'{"source": "gaussian"}'})
        writer.close()
        shards.append({"name": name, "samples": writer.count})
    atomic_write_json(folder / MANIFEST, {
        "format": LATENT_FORMAT, "model": None, "model_sha256": None, "kind": "kl", "store": store,
        "tensors": tensors, "dtype": "float32", "latent_shapes": {"none": list(shape)}, "shards": shards, "total": n,
        "statistics": {"mean": 0.0, "std": 1.0, "scaling_factor": 1.0, "shift_factor": 0.0},
        "normalisation": {"kind": "scale_shift", "scaling_factor": 1.0, "shift_factor": 0.0}})
