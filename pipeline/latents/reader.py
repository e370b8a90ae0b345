"""Reading latent shards back: a dataset for the downstream diffusion trainer.

  from pipeline.latents import LatentDataset
  ds = LatentDataset("latents/train", batch_size=64)             # endless, shuffled, a different stream per rank
  ds = LatentDataset("s3://bucket/latents/train", batch_size=64)  # the same from object storage (firststage[s3])
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

A sample that cannot be read (a malformed or missing KEY.latents.safetensors, a missing KEY.json, tensors the manifest
does not name, tensors of different shapes or of another dtype than the manifest's, a NaN/Inf latent, a member over
`max_member_bytes`, which is never read) is skipped and counted, with a warning at 1, 2, 4, ... as the image loader
does;
`max_bad_samples` of them in a row stop the stream (DataError). The manifest is checked against the folder: a shard it
lists that is not there stops the constructor, and a shard holding another number of samples than the manifest says
stops the stream once that shard has been read. `verify=True` checks, before anything is read, that every shard is
the tar its record describes (its SHA-256, or its ETag on object storage): a folder two runs wrote at once stops the
constructor.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from webdataset.utils import make_seed

from pipeline.config import MAX_MEMBER_BYTES
from pipeline.data.loader import MemberTooLarge, ShardStream, collate, read_samples, worker_slot
from pipeline.distributed import rank_and_world
from pipeline.errors import DataError, UserError
from pipeline.latents.format import LATENT_EXT, META_EXT, BadLatent, kind_named, read_latent, shard_intact
from pipeline.manifest import LATENT_FORMAT, MANIFEST, read_manifest
from pipeline.models.normalisation import normalise
from pipeline.models.posterior import key_generator
from pipeline.sources import resolve_sources
from pipeline.storage import as_path
from pipeline.storage.paths import missing_objects


def _convention(manifest: dict) -> tuple:
    """What must agree between the manifests of the folders one LatentDataset reads."""
    return tuple(repr(manifest.get(k)) for k in ("tensors", "dtype", "normalisation"))


class LatentDataset(ShardStream):
    """Samples (or, with batch_size, batches of one bucket) of a latent folder written by `firststage encode`.

    Each sample: `latents` (float32 [C, h, w]; int64 codes for VQ), `__key__`, `meta` (original size, crop box,
    bucket, source shard), `txt` (str or None) and every other carried member as bytes under its extension."""

    def __init__(self, path: str | Path, mode: str = "train", batch_size: int | None = None, *, scale: bool = True,
                 scaling_factor: float | None = None, shift_factor: float | None = None, sample: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, epoch: int = 0,
                 shuffle_buffer: int = 1000, drop_last: bool | None = None, max_bad_samples: int = 1000,
                 verify: bool = False, max_member_bytes: int = MAX_MEMBER_BYTES):
        # a latent folder (local, or on object storage: s3://bucket/prefix), its manifest, or any form of
        # pipeline.sources naming latent shards (a list file, a pattern); each shard's folder has its manifest
        sources = resolve_sources(str(path), empty=True, what="latent shards", format=LATENT_FORMAT)
        manifests = dict(sources.manifests)  # {manifest path: manifest}
        read = {str(as_path(m).parent) for m in manifests}
        for folder in dict.fromkeys(str(as_path(u).parent) for u in sources):
            if folder not in read:
                manifests[str(as_path(folder) / MANIFEST)] = read_manifest(folder, LATENT_FORMAT)
        if not manifests:
            raise DataError(f"{path}: names no latent shards")
        first = next(iter(manifests))
        self.folder, self.manifest = as_path(first).parent, manifests[first]
        try:
            self.kind = kind_named(self.manifest.get("store"))  # what each sample stores
        except UserError as e:
            raise DataError(f"{first}: {e}") from None
        differ = next((m for m, data in manifests.items() if _convention(data) != _convention(self.manifest)), None)
        if differ:
            raise DataError(f"{differ}: its latents are not stored or normalised as those of {first} (the "
                            f"manifests' tensors, dtype or normalisation differ); read them separately")
        # every listed shard, also those the manifest says are empty: what they hold is checked against it
        recorded = {str(as_path(m).parent / s["name"]): int(s["samples"]) for m, data in manifests.items()
                    for s in data["shards"]}
        unknown = [u for u in sources if u not in recorded]
        if unknown:
            raise DataError(f"{unknown[0]}: not a shard that {as_path(unknown[0]).parent / MANIFEST} lists")
        self.expected = {u: recorded[u] for u in sources}
        absent = missing_objects(list(self.expected))
        if absent:
            where = as_path(absent[0]).parent
            raise DataError(f"{where / MANIFEST} lists {len(absent)} shard(s) that are not in the folder (first: "
                            f"{as_path(absent[0]).name}); finish the encode (run its command again) or rebuild the "
                            f"manifest: firststage encode --output {where} --rebuild-manifest")
        if verify:  # each tar against its record (SHA-256: every shard read once more; the ETag on object storage)
            bad = [u for u in self.expected if not shard_intact(as_path(u).parent, as_path(u).name)]
            if bad:
                raise DataError(f"{as_path(bad[0]).parent}: {len(bad)} shard(s) are not the tars their records "
                                f"describe (first: {as_path(bad[0]).name}); run the encode command again, which "
                                f"writes them again")
        r, w = rank_and_world(environment=True)
        super().__init__(list(self.expected), mode, shuffle_buffer, seed, r if rank is None else rank,
                         w if world_size is None else world_size, epoch, max_bad_samples=max_bad_samples,
                         max_member_bytes=max_member_bytes)
        self.shapes = {tuple(v) for v in (self.manifest.get("latent_shapes") or {}).values()}
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
    bad_in_eval_stops = True

    def too_many_bad(self, count: int, sample: dict) -> str:
        return (f"{count} unreadable latent samples in a row (latest {self.skipped.latest}); check the latent folder "
                f"{self.folder}, or raise LatentDataset(max_bad_samples=...)")

    def usable(self, raw: dict) -> bool:
        return LATENT_EXT in raw

    def _samples(self, urls):
        """Raw samples shard by shard; after each shard, its count against the manifest's (unless reading it failed
        on the storage's side after its retries: then it is skipped and counted, as an undecodable sample is)."""
        for url in urls:
            count, failed = 0, []
            handle = self.handler(url, failed)

            def handler(err: Exception) -> bool:
                nonlocal count
                count += isinstance(err, MemberTooLarge)  # a sample of the shard, skipped unread
                return handle(err)

            for sample in read_samples([url], handler=handler, max_member_bytes=self.max_member_bytes):
                count += 1
                yield sample
            if not failed and count != self.expected.get(url, count):
                raise DataError(f"{url}: holds {count} samples, {self.folder / MANIFEST} says "
                                f"{self.expected[url]}; the shard or the manifest changed after encoding: rebuild the "
                                f"manifest (firststage encode --output {self.folder} --rebuild-manifest) or re-encode")

    def decode(self, raw: dict, rng: random.Random | None, train: bool):
        try:
            return self._decode(raw, rng, train)
        except BadLatent as e:
            self.skipped(f"{raw.get('__url__')}:{raw.get('__key__')}", e)
            return None

    def _decode(self, raw: dict, rng: random.Random | None, train: bool):
        for ext in (LATENT_EXT, META_EXT):
            if ext not in raw:
                raise BadLatent(f"no KEY.{ext} member")
        tensors = read_latent(raw[LATENT_EXT])
        absent = [t for t in self.manifest.get("tensors", []) if t not in tensors]
        if absent:
            raise BadLatent(f"no tensor {absent[0]} (the manifest's tensors: {', '.join(self.manifest['tensors'])})")
        odd = [n for n, t in tensors.items() if self.shapes and tuple(t.shape) not in self.shapes]
        if odd:
            raise BadLatent(f"tensor {odd[0]} of shape {list(tensors[odd[0]].shape)}, none of the manifest's "
                            f"latent_shapes")
        self.kind.check(tensors, self.manifest.get("dtype"))
        try:
            meta = json.loads(raw[META_EXT])
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply for the parser
            raise BadLatent(f"KEY.json is not JSON ({str(e)[:160]})") from None
        suffix = "_flip" if train and rng is not None and any(k.endswith("_flip") for k in tensors) \
            and rng.random() < 0.5 else ""
        draw = self.sample and self.kind.draws  # moments: z ~ N(mean, exp(logvar)), else the stored latent
        gen = None if not draw else self._noise if train else key_generator(raw["__key__"])
        z = self.kind.from_stored(tensors, suffix, draw, gen)
        if not self.kind.integer:
            if not torch.isfinite(z).all():
                raise BadLatent("non-finite latent (NaN/Inf)")
            if self.normalisation is not None:
                try:
                    z = normalise(z, self.normalisation)
                except RuntimeError as e:  # a latent whose channels or size the normalisation cannot take
                    raise BadLatent(f"latent of shape {list(z.shape)} cannot be normalised as the manifest says "
                                    f"({str(e)[:120]})") from None
        out = {"latents": z, "__key__": raw["__key__"], "meta": meta,
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
