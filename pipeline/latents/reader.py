"""Reading latent shards back: a dataset for the downstream diffusion trainer.

  from pipeline.latents import LatentDataset
  ds = LatentDataset("latents/train", batch_size=64)             # endless, shuffled, a different stream per rank
  loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4)
  for batch in loader:
      z = batch["latents"]            # [64, C, h, w], normalised as the manifest says (the family's own convention)
      captions = batch["txt"]         # list of str (None where a sample has no caption)

Moments are sampled with fresh noise every time (z = mean + exp(logvar / 2) * eps); a stored flip is chosen at random
in train mode; batches hold one bucket each (never padded). `mode="eval"` reads every sample exactly once across
ranks and loader workers, the unflipped latent, with noise seeded by the sample key. The latent is then normalised
by the manifest's `normalisation` (pipeline.models.normalisation): for a published autoencoder its own convention,
so the latents equal what its diffusers pipeline feeds its transformer (FLUX.2: 2x2-patchified, 128 channels); for
a firststage run the factors measured on these latents. VQ and FSQ latents are integer codes.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from webdataset.utils import make_seed

from pipeline.data.loader import ShardStream, collate, worker_slot
from pipeline.latents.format import LATENT_EXT, META_EXT
from pipeline.manifest import LATENT_FORMAT, read_manifest
from pipeline.models.normalisation import normalise
from pipeline.models.posterior import key_generator, reparameterize


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class LatentDataset(ShardStream):
    """Samples (or, with batch_size, batches of one bucket) of a latent folder written by `firststage encode`.

    Each sample: `latents` (float32 [C, h, w]; int64 codes for VQ), `__key__`, `meta` (original size, crop box,
    bucket, source shard), `txt` (str or None) and every other carried member as bytes under its extension."""

    def __init__(self, path: str | Path, mode: str = "train", batch_size: int | None = None, *, scale: bool = True,
                 scaling_factor: float | None = None, shift_factor: float | None = None, sample: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, epoch: int = 0,
                 shuffle_buffer: int = 1000, drop_last: bool | None = None):
        folder = Path(path)
        folder = folder.parent if folder.is_file() else folder
        self.manifest = read_manifest(folder, LATENT_FORMAT)
        urls = [str(folder / s["name"]) for s in self.manifest["shards"] if s["samples"] > 0]
        r, w = _default_rank_world()
        super().__init__(urls, mode, shuffle_buffer, seed, r if rank is None else rank,
                         w if world_size is None else world_size, epoch)
        stats = self.manifest["statistics"]
        # the manifest's normalisation; a manifest from before it existed: the measured factors
        self.normalisation = self.manifest.get("normalisation", {
            "kind": "scale_shift", "scaling_factor": stats.get("scaling_factor") or 1.0,
            "shift_factor": stats.get("shift_factor") or 0.0, "source": "measured"})
        if scaling_factor is not None or shift_factor is not None:
            self.normalisation = {"kind": "scale_shift", "scaling_factor": scaling_factor or 1.0,
                                  "shift_factor": shift_factor or 0.0, "source": "given"}
        if not scale:
            self.normalisation = None
        self.sample, self.batch_size = sample, batch_size
        self.drop_last = (mode == "train") if drop_last is None else drop_last
        self._noise: torch.Generator | None = None

    wanted = "latent (KEY.latents.safetensors member)"

    def usable(self, raw: dict) -> bool:
        return LATENT_EXT in raw

    def decode(self, raw: dict, rng: random.Random | None, train: bool):
        tensors = load_safetensors(raw[LATENT_EXT])
        suffix = "_flip" if train and rng is not None and any(k.endswith("_flip") for k in tensors) \
            and rng.random() < 0.5 else ""
        if "codes" in tensors:
            z = tensors["codes" + suffix].long()
        else:
            if "logvar" in tensors and self.sample:
                mean, logvar = tensors["mean" + suffix].float(), tensors["logvar" + suffix].float()
                gen = self._noise if train else key_generator(raw["__key__"])
                z = reparameterize(mean, logvar, generator=gen)
            else:
                z = tensors[next(n for n in ("mean", "sample", "latent") if n in tensors) + suffix].float()
            if self.normalisation is not None:
                z = normalise(z, self.normalisation)
        out = {"latents": z, "__key__": raw["__key__"], "meta": json.loads(raw[META_EXT]),
               "txt": raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None}
        for k, v in raw.items():
            if not k.startswith("__") and k not in (LATENT_EXT, META_EXT, "txt"):
                out[k] = v
        return out

    def __iter__(self):
        worker, _ = worker_slot()
        self._noise = torch.Generator().manual_seed(make_seed(self.seed, self.rank, worker, self.epoch, 1))
        samples = super().__iter__()
        if self.batch_size is None:
            yield from samples
            return
        buffers: dict[tuple, list] = {}
        for s in samples:
            buf = buffers.setdefault(tuple(s["latents"].shape), [])
            buf.append(s)
            if len(buf) == self.batch_size:
                yield collate_latents(buf)
                buf.clear()
        if not self.drop_last:
            for buf in buffers.values():
                if buf:
                    yield collate_latents(buf)


def collate_latents(samples: list[dict]) -> dict:
    """Stack the latents of samples of one shape; everything else becomes a list."""
    return collate(samples, "latents")
