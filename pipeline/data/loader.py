"""The streaming image loader, built on webdataset's tar reading.

Two modes:
  * train: an endless stream. Each (rank, worker) draws shards at random with its own seed (seed, rank, worker,
    epoch), so no two ranks read the same order and a resumed run does not replay the start. Samples pass a shuffle
    buffer, then a random (or random-resized) crop and a flip. Training is counted in steps, so ranks with unequal
    shard counts can never hang waiting for each other.
  * eval (evaluation and encoding): every sample exactly once across all ranks and workers, in a deterministic
    order. Shards are dealt to (rank, worker) slots round-robin; with fewer shards than slots, every slot reads
    every shard and keeps samples i with i % slots == slot.

Only image members are decoded (PIL, draft mode), captions are read as text; webdataset's default decoders, which
unpickle `.pyd`/`.pickle` members, are never used. Batches leave the workers as uint8 [B, 3, H, W] tensors in
channels_last memory; `pipeline.pixels.to_model_input` turns them into floats in [-1, 1] on the device.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import re
import tarfile
import warnings

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys
from webdataset.utils import make_seed

from pipeline.config import MAX_MEMBER_BYTES
from pipeline.data.images import CAPTION_EXTS, IMAGE_EXTS, BadImage, to_array
from pipeline.data.shards import split_key
from pipeline.errors import DataError, UserError
from pipeline.sources import resolve_sources
from pipeline.storage import storage_for


def loader_workers(asked: int | None) -> int:
    """data.num_workers as asked, or (null) from the machine: one fewer than the cores each of this job's processes
    on the node may use (LOCAL_WORLD_SIZE; the main process needs one too), at most 8."""
    if asked is not None:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)) - 1))


def _register_gopen(urls: list[str]) -> None:
    """webdataset's gopen opens the object-store URLs too (in this process and the loader workers forked from it),
    for code that reads our shard lists with webdataset's own pipelines."""
    for backend in {type(storage_for(u)) for u in urls if not u.startswith("pipe:")}:
        register = getattr(importlib.import_module(backend.__module__), "register_gopen", None)
        if register is not None:  # a backend that webdataset cannot open by itself
            register()


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _SkipCounter:
    """Counts undecodable samples (or unreadable shard data) in one worker and warns at 1, 2, 4, ... then every
    1000th, so logs stay readable."""

    def __init__(self, what: str = "undecodable sample(s)"):
        self.count = 0
        self.latest = ""
        self.what = what

    def __call__(self, where: str, err: Exception) -> None:
        self.count += 1
        self.latest = f"{where}: {err}"
        if self.count & (self.count - 1) == 0 or self.count % 1000 == 0:  # powers of two, then every 1000
            warnings.warn(f"skipped {self.count} {self.what} in this loader worker; latest: {where}: {err}")


def _warn_and_continue(exn: Exception) -> bool:
    warnings.warn(f"skipping unreadable shard data: {exn!r}")
    return True


def open_shard(url: str):
    """A binary stream of a shard: a file or a storage backend's URL through pipeline.storage; only a `pipe:` source
    (let through by pipeline.sources.resolve_sources with data.allow_pipe) goes to webdataset's gopen, which would also run curl or
    gsutil for a name that merely looks like a URL."""
    return gopen(url) if url.startswith("pipe:") else storage_for(url).open_read(url)


def read_failure(url: str, err: Exception) -> bool:
    """Whether reading an object-store shard failed for the storage's sake (its retries spent: throttling, dropped
    connections, an endpoint away), not for its content (broken tar data, a missing object)."""
    return not url.startswith("pipe:") and storage_for(url).read_failed(err)


class MemberTooLarge(ValueError):
    """A sample with a tar member over data.max_member_bytes, skipped without reading that member's bytes (the size
    comes from its tar header: a sparse member of 2 GiB in a 10 KB shard counts as 2 GiB)."""

    def __init__(self, key: str, member: str, size: int, limit: int):
        self.key, self.member, self.size, self.limit = key, member, size, limit
        super().__init__(f"too large ({size} bytes in member {member}, over data.max_member_bytes={limit}; not read)")


class _Unread:
    """In a sample being grouped: a member that was not read (over the size limit)."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members such as __index__ are not sample data


def tar_members(fileobj, max_bytes: int | None, handler):
    """{fname, data} of each regular member of a tar stream, as webdataset's tar_file_iterator yields them, except
    that a member larger than `max_bytes` (its header's size) is not read: its data is an _Unread. A member that
    fails is passed to `handler`, which says whether to go on."""
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    for info in stream:
        try:
            if not info.isreg() or info.name is None or _META.match(info.name):
                continue
            if max_bytes is not None and info.size > max_bytes:
                data = _Unread(info.name, info.size)  # tarfile skips its stored bytes; nothing is decompressed
            else:
                data = stream.extractfile(info).read()
            yield {"fname": info.name, "data": data}
            stream.members = []  # one member at a time in memory, as webdataset does
        except Exception as exn:
            if exn.args:
                exn.args = (f"{exn.args[0]} @ {fileobj}",) + exn.args[1:]
            if not handler(exn):
                break


def read_samples(urls, limits: dict[str, int] | None = None, handler=None, max_member_bytes: int | None = None):
    """Raw samples (ext -> bytes, `__key__`, `__url__`) of each shard in turn; each shard file is closed as soon as
    it is read. A broken member or tail is passed to `handler` (default: warn) and reading goes on; a shard whose
    reading failed on the storage's side (`read_failure`) is passed to `handler` once and left. A sample with a
    member over `max_member_bytes` is passed to `handler` as MemberTooLarge instead of being yielded (that member
    is never read)."""
    handler = handler or _warn_and_continue
    for url in urls:
        try:
            stream = open_shard(url)
        except Exception as e:
            handler(e)
            continue

        def member_failed(e: Exception, url=url) -> bool:  # go on after a broken member, not a broken connection
            return handler(e) and not read_failure(url, e)

        try:
            files = ({**f, "__url__": url} for f in tar_members(stream, max_member_bytes, member_failed))
            limit = (limits or {}).get(url)
            for i, sample in enumerate(group_by_keys(files, handler=handler)):
                if limit is not None and i >= limit:
                    break
                unread = next((v for v in sample.values() if isinstance(v, _Unread)), None)
                if unread is not None:
                    handler(MemberTooLarge(sample["__key__"], unread.name, unread.size, max_member_bytes))
                    continue
                yield sample
        except Exception as e:  # a tar broken mid-way: keep what was read, go on with the next shard
            handler(e)
        finally:
            stream.close()


class ShardStream(IterableDataset):
    """Raw samples (dicts of extension -> bytes, `__key__`, `__url__`) of tar shards, in one of two modes:
    train (endless, resampled shards, shuffle buffer, seeded per rank / worker / epoch) or eval (every sample exactly
    once across ranks and workers, in shard order). Subclasses turn a raw sample into what they yield (`decode`)."""

    def __init__(self, urls: list[str], mode: str = "train", shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, limits: dict[str, int] | None = None,
                 max_bad_samples: int = 1000, max_member_bytes: int = MAX_MEMBER_BYTES):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be train or eval, got {mode}")
        if not urls:
            raise UserError("no shards to read")
        self.urls, self.mode = list(urls), mode
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.limits = limits or {}  # eval: read at most this many samples of a shard (a fixed subset)
        self.max_bad_samples = max_bad_samples  # train: undecodable samples in a row before DataError
        self.max_member_bytes = max_member_bytes  # a sample with a larger member is skipped and counted, unread
        self.skipped = _SkipCounter()
        # object-store shards (or their tails) that could not be read after the storage's retries
        self.unreadable = _SkipCounter("unreadable shard(s)")
        _register_gopen(self.urls)

    wanted = "sample"  # what a usable sample holds, for messages
    bad_in_eval_stops = False  # whether max_bad_samples in a row also stops an eval stream

    def too_many_bad(self, count: int, sample: dict) -> str:
        """The one line of the DataError after `count` undecodable samples in a row."""
        return (f"{count} undecodable training samples in a row (latest {sample.get('__url__')}:"
                f"{sample.get('__key__')}); check data.train, or raise data.max_bad_samples")

    def usable(self, sample: dict) -> bool:
        """Whether a raw sample holds what decode() needs (checked without decoding)."""
        return True

    def decode(self, sample: dict, rng: random.Random | None, train: bool):
        raise NotImplementedError

    def _samples(self, urls):
        for url in urls:
            yield from read_samples([url], self.limits, handler=self.handler(url),
                                    max_member_bytes=self.max_member_bytes)

    def handler(self, url: str, failed: list | None = None):
        """What a shard's reading errors do: broken tar data is warned about and reading goes on; a sample with a
        member over max_member_bytes is skipped and counted as an undecodable one is (`skipped`); a shard on object
        storage that could not be read after the storage's retries is skipped and counted (`unreadable`, warned at
        1, 2, 4, ...), as an undecodable sample is, and noted in `failed`."""

        def handle(err: Exception) -> bool:
            if isinstance(err, MemberTooLarge):
                self.skipped(f"{url}:{err.key}", err)
                return True
            if not read_failure(url, err):
                return _warn_and_continue(err)
            self.unreadable(url, err)
            if failed is not None:
                failed.append(err)
            return True

        return handle

    def _train_iter(self):
        worker, _ = worker_slot()
        rng = random.Random(make_seed(self.seed, self.rank, worker, self.epoch))
        return self._decoded(self._shuffled(rng), rng, train=True)

    def _shuffled(self, rng: random.Random):
        buffer: list = []
        visited: set[str] = set()
        images = [0]  # samples read that have an image member

        def endless_urls():
            while True:
                if len(visited) == len(self.urls) and not images[0]:  # a whole pass over every shard: no image
                    names = ", ".join(sorted(os.path.basename(u) for u in self.urls)[:5])
                    raise DataError(f"no {self.wanted} in the training data: {len(self.urls)} shard(s) ({names}"
                                    f"{', ...' if len(self.urls) > 5 else ''}) hold none; check data.train")
                url = rng.choice(self.urls)
                visited.add(url)
                yield url

        for sample in self._samples(endless_urls()):
            if self.usable(sample):
                images[0] += 1
            if self.shuffle_buffer > 1:
                buffer.append(sample)
                if len(buffer) < self.shuffle_buffer:
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                sample = buffer.pop()
            yield sample

    def _decoded(self, raw, rng: random.Random | None, train: bool):
        bad_run = 0
        for sample in raw:
            out = self.decode(sample, rng, train)
            if out is not None:
                bad_run = 0
                yield out
                continue
            bad_run += 1
            if (train or self.bad_in_eval_stops) and bad_run >= self.max_bad_samples:
                raise DataError(self.too_many_bad(bad_run, sample))

    def _eval_iter(self):
        worker, num_workers = worker_slot()
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        if len(self.urls) >= slots:
            stream = self._samples(self.urls[slot::slots])
        else:
            stream = (s for i, s in enumerate(self._samples(self.urls)) if i % slots == slot)
        return self._decoded(stream, None, train=False)

    def __iter__(self):
        return self._train_iter() if self.mode == "train" else self._eval_iter()


class ImageStream(ShardStream):
    """Samples as dicts: `image` (uint8 HxWx3 tensor), `__key__`, `__url__`, and `txt` / `json` captions if present.

    In train mode only `image` is kept, to keep inter-process traffic small."""

    wanted = "image (jpg, jpeg, png, webp or bmp member)"

    def __init__(
        self,
        urls: list[str],
        mode: str = "train",
        resolution: int | None = 256,
        crop: str | None = None,
        flip: bool = True,
        scale: tuple[float, float] = (0.5, 1.0),
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        limits: dict[str, int] | None = None,
        max_bad_samples: int = 1000,
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ):
        super().__init__(urls, mode, shuffle_buffer, seed, rank, world_size, epoch, limits, max_bad_samples,
                         max_member_bytes)
        crop = crop or ("random" if mode == "train" else "center")
        if mode == "eval" and crop not in ("center", "none"):
            raise ValueError(f"eval mode crops 'center' or 'none', got {crop!r}")
        self.resolution, self.crop, self.flip = resolution, crop, flip
        self.scale = tuple(scale)

    def usable(self, sample: dict) -> bool:
        return image_member(sample) is not None

    def decode(self, sample: dict, rng: random.Random | None, train: bool):
        ext = image_member(sample)
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        if ext is None:
            self.skipped(where, BadImage("no image member"))
            return None
        try:
            arr = to_array(sample[ext], self.resolution, self.crop, rng, self.flip and train, self.scale)
        except BadImage as e:
            self.skipped(where, e)
            return None
        image = torch.from_numpy(arr)
        if train:
            return {"image": image}
        out = {"image": image, "__key__": sample["__key__"], "__url__": sample["__url__"]}
        for cap in CAPTION_EXTS:
            if cap in sample:
                out[cap] = sample[cap].decode("utf-8", errors="replace")
        return out


def image_member(sample: dict) -> str | None:
    """The extension of a sample's image member (the first of IMAGE_EXTS present), or None."""
    return next((e for e in IMAGE_EXTS if e in sample), None)


def collate(samples: list[dict], key: str = "image") -> dict:
    """Stack `key` of every sample (images: uint8 HxWx3 into [B, 3, H, W], channels_last memory); keep everything
    else as lists."""
    stacked = torch.stack([s[key] for s in samples])
    batch = {key: stacked.permute(0, 3, 1, 2) if key == "image" else stacked}
    for k in samples[0]:
        if k != key:
            batch[k] = [s.get(k) for s in samples]
    return batch


@contextlib.contextmanager
def batches(loader: DataLoader):
    """iter(loader), whose worker processes end with the block, also when it ends in an error. Left to the garbage
    collector (the error's traceback keeps the iterator alive), torch's shutdown no longer reaches the workers through
    its queues and waits 5 s for each (seen after a training run stopped by undecodable data)."""
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's own __del__ calls; none without workers
        if shutdown is not None:
            shutdown()


def make_loader(spec, mode: str, batch_size: int, num_workers: int = 0, *, drop_last: bool | None = None,
                pin_memory: bool = False, limits: dict[str, int] | None = None, allow_pipe: bool = False,
                **stream) -> DataLoader:
    """A DataLoader of ImageStream batches. `stream`: ImageStream's options (resolution, crop, flip, scale,
    shuffle_buffer, seed, rank, world_size, epoch, max_bad_samples, max_member_bytes)."""
    urls = list(spec) if limits is not None else resolve_sources(spec, allow_pipe)  # a planned subset is resolved
    ds = ImageStream(urls, mode, limits=limits, **stream)
    num_workers = loader_workers(num_workers)
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=(mode == "train") if drop_last is None else drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def shard_sample_counts(spec, allow_pipe: bool = False) -> dict[str, int]:
    """Samples per shard: from the manifest for the shards a manifest lists (a prepared folder, a manifest), else by
    reading the tar's member names (a seek from header to header where the storage can seek, else streamed)."""
    sources = resolve_sources(spec, allow_pipe)
    counts = {}
    for url in sources:
        if url in sources.samples:
            counts[url] = sources.samples[url]
            continue
        keys, store = set(), storage_for(url)
        try:
            with store.open_read(url) as stream, \
                    tarfile.open(fileobj=stream, mode="r:" if store.seekable else "r|") as tf:
                for name in tf.getnames():
                    ks = split_key(name)
                    if ks is not None and not ks[0].startswith("__"):
                        keys.add(ks[0])
        except (tarfile.TarError, OSError, UserError):
            pass
        counts[url] = len(keys)
    return counts


def plan_subset(spec, num_samples: int, allow_pipe: bool = False) -> tuple[list[str], dict[str, int], int]:
    """The first `num_samples` samples in shard order: (urls, per-shard limits, samples planned). The same subset
    whatever the number of ranks and workers that read it."""
    counts = shard_sample_counts(spec, allow_pipe)
    urls, limits, total = [], {}, 0
    for url, n in counts.items():
        if total >= num_samples:
            break
        take = min(n, num_samples - total)
        urls.append(url)
        limits[url] = take
        total += take
    return urls, limits, total
