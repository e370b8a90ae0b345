"""Encoding image shards into latent shards: the loader stream, the encoder step and the shard writer.

Exactly once without a coordinator: every input shard gives one output shard with the same base name, a unit of
the commit protocol (pipeline.storage.Unit: the tar, then its record records/NAME.json). A shard counts as done
only when its record exists with the folder's settings and its tar is the one the record describes (the rerun's
check: format.shard_state), so a rerun after a kill at any moment redoes exactly the shards that were not finished. The work inside one shard is deterministic (the same batches, the same noise per
key), so the output does not depend on how many processes or loader workers ran.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.images import IMAGE_EXTS, BadImage, crop_to, displayed_size, read_header
from pipeline.config import MAX_MEMBER_BYTES
from pipeline.data.loader import MemberTooLarge, batches, image_member, read_failure, read_samples, worker_slot
from pipeline.data.shards import ShardWriter, shard_name
from pipeline.errors import Unavailable, UserError
from pipeline.latents.buckets import nearest_bucket, size_name
from pipeline.latents.format import (
    IDENTITY_KEYS,
    LATENT_EXT,
    META_EXT,
    RECORDS,
    ShardRecord,
    StoredKind,
    carried_name,
    input_identity,
    keys_checksum,
    kind_named,
    read_record,
    record_state,
    shard_unit,
    stored_kind,
)
from pipeline.models.autoencoder import family_of
from pipeline.models.normalisation import patchify
from pipeline.pixels import to_model_input
from pipeline.storage import as_path, remove_dead_temporaries, storage_for


def effective_store(model, requested: str) -> str:
    """What is stored for a model (format.stored_kind): codes, the deterministic latent or the posterior as
    encode.store asks."""
    return stored_kind(family_of(model).name, requested).name


def stored_tensors(store: str, flip: bool) -> list[str]:
    """The tensor names of one sample of `store` (StoredKind.names)."""
    return kind_named(store).names(flip)


@dataclass
class ShardEnd:
    """The stream's marker after an input shard's last batch: what the shard's record needs besides its batches."""

    shard: str
    skipped: list  # {shard, key, reason} of each input sample not encoded
    inputs: int  # input samples read
    input: dict | None  # the input shard's identity (format.input_identity), taken before it was read
    renamed: list  # members carried under another name


# ------------------------------------------------------------------------------------------------ the stream
class EncodeStream(IterableDataset):
    """Whole input shards per loader worker. Yields batches of one shard and one bucket (no padding) as dicts, then,
    after a shard's last batch, its ShardEnd, carrying the samples it skipped and why (a sample with a member over
    `max_member_bytes` among them, that member unread); or, for a shard the storage could not read, only its
    Unavailable (after the batches already yielded, which are then dropped)."""

    def __init__(self, urls: list[str], resolution: int, buckets: list[tuple[int, int]] | None, batch_size: int,
                 max_member_bytes: int = MAX_MEMBER_BYTES):
        self.urls, self.resolution, self.buckets, self.batch_size = list(urls), resolution, buckets, batch_size
        self.max_member_bytes = max_member_bytes

    def __iter__(self):
        worker, num_workers = worker_slot()
        for url in self.urls[worker::num_workers]:
            yield from self._shard(url)

    def _shard(self, url: str):
        name = shard_name(url)
        source = input_identity(url)  # taken before reading: a change while it is read shows at the next run
        pending: dict[tuple[int, int], list] = collections.defaultdict(list)
        skipped: list[dict] = []
        renamed: list[dict] = []
        seen: set[str] = set()
        inputs = 0
        unavailable: list[str] = []

        def broken(e: Exception) -> bool:
            nonlocal inputs
            if isinstance(e, MemberTooLarge):  # an input sample, skipped before the member was read
                inputs += 1
                skipped.append({"shard": name, "key": printable(e.key), "reason": str(e)})
                return True
            if read_failure(url, e):  # the storage's retries spent: this shard is not written, a rerun does it
                unavailable.append(f"{type(e).__name__}: {printable(str(e))}")
                return False
            skipped.append({"shard": name, "key": "",
                            "reason": f"broken tar data ({type(e).__name__}: {printable(str(e))})"})
            return True

        for sample in read_samples([url], handler=broken, max_member_bytes=self.max_member_bytes):
            inputs += 1
            key = sample["__key__"]
            problem = unsafe_names(key, [k for k in sample if not k.startswith("__")])
            if problem is None and key in seen:
                problem = "duplicate key (an earlier sample of this shard has it)"
            if problem is not None:  # never copied into a latent tar
                skipped.append({"shard": name, "key": printable(key), "reason": problem})
                continue
            seen.add(key)
            try:
                ext = image_member(sample)
                if ext is None:
                    raise BadImage("no image member")
                header = read_header(sample[ext])  # parsed once for the bucket and the decode
                w, h = displayed_size(header)
                target = nearest_bucket(w, h, self.buckets) if self.buckets else (self.resolution, self.resolution)
                arr, _, box = crop_to(sample[ext], *target, header=header)
            except BadImage as e:
                skipped.append({"shard": name, "key": key, "reason": str(e)})
                continue
            scale = target[0] / (box[2] - box[0])
            meta = {"original_size": [w, h], "crop_box": list(box), "size": list(target),
                    "crop_top_left": [round(box[1] * scale), round(box[0] * scale)],
                    "bucket": size_name(target) if self.buckets else None, "shard": name}
            extras = {}
            for k, v in sample.items():
                if k.startswith("__") or k in IMAGE_EXTS:
                    continue
                carried = carried_name(k)  # our members win: an input's of the same name is renamed
                extras[carried] = v
                if carried != k and k != META_EXT:  # KEY.json -> KEY.source.json is the documented one
                    renamed.append({"shard": name, "key": key, "member": k, "as": carried})
            pending[target].append((key, arr, meta, extras))
            if len(pending[target]) == self.batch_size:
                yield self._batch(url, pending.pop(target))
        if unavailable:
            yield Unavailable(url, unavailable[0])
            return
        for target in sorted(pending):
            yield self._batch(url, pending[target])
        yield ShardEnd(url, skipped, inputs, source, renamed)

    @staticmethod
    def _batch(url: str, items: list) -> dict:
        keys, arrays, metas, extras = zip(*items)
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return {"shard": url, "images": images, "keys": list(keys), "meta": list(metas), "extras": list(extras)}


def unsafe_names(key: str, exts: list[str]) -> str | None:
    """Why the members of a sample must not be copied into a latent tar (None: they may): a name that is not UTF-8
    (the tar writer cannot write it), absolute or with a '..' component (it would land outside the folder of
    whoever extracts the shard)."""
    for name in (key, *exts):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return "member name is not UTF-8"
    if key.startswith("/"):
        return "absolute member name"
    if ".." in key.split("/"):
        return "member name with a '..' component"
    return None


def printable(text: str) -> str:
    """A name read from a tar as text that prints and goes into JSON: bytes that are not UTF-8 as \\xNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class EncodeSettings:
    store: str  # moments | mean | sample | codes | latent (effective_store; format.KINDS)
    dtype: str  # float32 | float16 | bfloat16
    flip: bool
    autocast: torch.dtype | None = None  # bf16 / fp16 autocast on GPU, None for full precision
    channels_last: bool = False
    patch: int = 1  # the statistics are of the latent in the family's normalisation layout (FLUX.2: 2x2 patches)

    @property
    def kind(self) -> StoredKind:
        return kind_named(self.store)


@torch.inference_mode()
def encode_batch(model, images: torch.Tensor, keys: list[str], s: EncodeSettings, device) -> dict:
    """uint8 [B, 3, H, W] -> {name: CPU tensor [B, ...] in its stored dtype}, plus `_finite` [B] (every stored value
    finite, checked after the cast: fp16 overflows there) and `_stats` (count, sum, sumsq per channel, float64) of
    the latent the reader yields before normalisation, in the normalisation's layout, over the finite samples."""
    x = to_model_input(images, device)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if s.flip:  # one forward for the image and its mirror: twice the batch, same numerics per half
        x = torch.cat([x, x.flip(-1)])
    n = images.shape[0]
    fam = family_of(model)
    with torch.autocast(device_type=torch.device(device).type, dtype=s.autocast, enabled=s.autocast is not None):
        lat = fam.encode(model, x)
    kind = s.kind
    out = kind.to_stored(lat, keys + ([f"{k}/flip" for k in keys] if s.flip else []))
    dtype = kind.dtype(s.dtype, fam.num_codes(model))
    stored = {k: v.to(dtype) for k, v in out.items()}
    finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for v in stored.values():
        if v.is_floating_point():
            finite &= torch.isfinite(v).flatten(1).all(1)
    m, second = kind.moments(lat, stored)  # of what the reader yields, from the stored values
    m, second = patchify(m, s.patch), patchify(second, s.patch)
    keep = finite.view(-1, 1, 1, 1).double()
    elems = m.shape[2] * m.shape[3]
    stats = {"count": (finite.double().sum() * elems).expand(m.shape[1]),
             "sum": (m * keep).sum((0, 2, 3)), "sumsq": (second * keep).sum((0, 2, 3))}
    result = {}
    for k, v in stored.items():
        result[k] = v[:n]
        if s.flip:
            result[f"{k}_flip"] = v[n:]
    result = {k: v.cpu() for k, v in result.items()}
    result["_finite"] = (finite[:n] & finite[n:]).cpu() if s.flip else finite.cpu()
    result["_stats"] = {k: v.cpu() for k, v in stats.items()}
    return result


# ------------------------------------------------------------------------------------------------ the writer
@dataclass
class LatentShard:
    """One output shard in the making (a unit of the commit protocol): its tar (opened on the first write), keys,
    statistics sums, skipped list."""

    folder: Path
    url: str
    settings: dict
    writer: ShardWriter | None = None
    unit: object = None
    keys: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    buckets: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    stats: dict | None = None
    non_finite: int = 0
    failed: BaseException | None = None  # a write that failed: this shard is never committed
    kept: bool = False  # another run completed this shard meanwhile: its tar and record stay, nothing is written
    had_record: bool | None = None  # whether the plan saw a record of this shard (None: not known, ask the store)

    @property
    def name(self) -> str:
        return shard_name(self.url)

    @contextlib.contextmanager
    def _writing(self):
        """A failed write marks the shard failed (it is aborted, never committed with what was written before), and
        an OSError without a file name (tarfile's full disk) names the shard, not the working folder."""
        try:
            yield
        except BaseException as e:
            self.failed = self.failed or e
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(self.folder / self.name)
            raise

    def _open(self) -> ShardWriter | None:
        """The shard's tar, opened on the first write; None when another run (a whole-job run beside a `--part`
        run) has completed this shard since it was planned: that run's shard stays, nothing here is written."""
        if self.writer is None and not self.kept:
            self.unit = shard_unit(self.folder, self.name)
            # a tar without a record is not done, and this run's tar replaces it (it may be another run's, whose
            # record is on its way); a record of another model, settings or input is undone: it stops counting.
            # A new shard costs no request here: the plan's listing said it has no record (_finish looks again)
            if self.unit.recorded() if self.had_record is None else self.had_record:
                if self._completed_meanwhile():
                    return None
                self.unit.undo()
            self.writer = ShardWriter(self.unit.staging(self.folder / self.name))
        return self.writer

    def _completed_meanwhile(self) -> bool:
        # one GET (a missing record: its 404), never a HEAD and a listing before it
        self.kept = record_state(read_record(self.unit, listed=True), self.settings, self.url) == "complete"
        return self.kept

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.unit.discard()
            self.writer = None

    def write_batch(self, batch: dict, out: dict) -> None:
        with self._writing():
            self._write_batch(batch, out)

    def _write_batch(self, batch: dict, out: dict) -> None:
        if self.failed is not None:
            return
        w = self._open()
        if w is None:
            return
        names = [k for k in out if not k.startswith("_")]
        stats = out["_stats"]
        self.stats = stats if self.stats is None else {k: self.stats[k] + stats[k] for k in stats}
        for i, key in enumerate(batch["keys"]):
            if not out["_finite"][i]:
                self.non_finite += 1
                self.skipped.append({"shard": self.name, "key": key,
                                     "reason": f"non-finite latent (NaN/Inf in {self.settings['dtype']})"})
                continue
            tensors = {k: out[k][i].contiguous() for k in names}
            sample = {"__key__": key, LATENT_EXT: safetensors_bytes(tensors),
                      META_EXT: _json_bytes(batch["meta"][i]), **batch["extras"][i]}
            w.write(sample)
            self.keys.append(key)
            bucket = batch["meta"][i]["bucket"] or size_name(tuple(batch["meta"][i]["size"]))
            self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
            self.shapes[bucket] = list(tensors[names[0]].shape)

    def finish(self, end: ShardEnd) -> ShardRecord | None:
        """Close the tar, then commit it: the tar under its final name, then the record. Done (None: another run
        completed this shard meanwhile, and its tar stays). A shard whose writing failed is aborted instead (its
        staging file removed) and the failure raised again."""
        try:
            if self.failed is not None:
                raise self.failed
            with self._writing():
                return self._finish(end)
        except BaseException:
            self.abort()
            raise

    def _finish(self, end: ShardEnd) -> ShardRecord | None:
        """The shard's record once committed; None when another run completed it meanwhile (its shard stays)."""
        self.skipped += end.skipped
        w = self._open()
        if w is None:
            return None
        channels = len(self.stats["sum"]) if self.stats else 0
        record = ShardRecord(
            name=self.name, source=self.url, samples=len(self.keys), keys_sha256=keys_checksum(self.keys),
            skipped=self.skipped, renamed=end.renamed, buckets=self.buckets, latent_shapes=self.shapes,
            stats={k: [float(v) for v in self.stats[k]] if self.stats else [0.0] * channels
                   for k in ("count", "sum", "sumsq")},
            input=end.input,  # the input shard's size and mtime: another input of this name is encoded again
            inputs=end.inputs, non_finite=self.non_finite, settings={k: self.settings[k] for k in IDENTITY_KEYS})
        w.close()
        (self.folder / RECORDS).mkdir(parents=True, exist_ok=True)
        if self._completed_meanwhile():  # while this run encoded it: that run's tar is not replaced by this one
            self.unit.discard()
            return None
        self.unit.put_staged()
        record.files = self.unit.files(etag=True)  # the tar's size and SHA-256 (and ETag on object storage)
        return record if self.unit.commit(record.to_json()) else None  # False: the other run's record came first


def _json_bytes(obj) -> bytes:
    import json

    return (json.dumps(obj) + "\n").encode()


class BackgroundWriter:
    """Runs tar writes in one thread, in submission order, so the device never waits on disk; at most `depth` jobs
    in flight (back-pressure), and an error in the thread surfaces at the next submit or at close()."""

    def __init__(self, depth: int = 8):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-writer")
        self.pending: collections.deque[Future] = collections.deque()
        self.depth = depth

    def submit(self, fn, *args) -> Future:
        while len(self.pending) >= self.depth or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()
        fut = self.pool.submit(fn, *args)
        self.pending.append(fut)
        return fut

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class EncodeResult:
    shards: int = 0
    samples: int = 0
    skipped: int = 0
    non_finite: int = 0
    stopped: bool = False
    records: list[ShardRecord] = field(default_factory=list)
    kept: list = field(default_factory=list)  # input shards whose output another run completed after this one
    # planned them: that run's shard stays, nothing was written here
    unavailable: list[Unavailable] = field(default_factory=list)  # not read, not written; a rerun does them


def encode_shards(model, urls: list[str], folder: Path, settings: dict, s: EncodeSettings, device, *,
                  resolution: int, buckets, batch_size: int, num_workers: int, pin_memory: bool = False,
                  stop: threading.Event | None = None, progress=None,
                  max_member_bytes: int = MAX_MEMBER_BYTES, had_record: set[str] | None = None) -> EncodeResult:
    """Encode the given input shards into `folder`. Returns what was written. `had_record`: the output shards that
    had a record when the run planned (format.plan_shards; None: each shard asks the store once). `stop` (set by a
    SIGTERM handler) ends the loop at the next batch: finished shards stay, the shard in flight is redone by the next
    run. An input shard on object storage that cannot be read after the storage's retries is not written
    (`unavailable`). The device (or the CPU allocator) running out of memory ends it the same way, then raises a
    UserError naming encode.batch_size."""
    result = EncodeResult()
    folder = as_path(folder)
    if not urls:
        return result
    names = [shard_name(u) for u in urls]
    remove_dead_temporaries(folder, names)  # what killed runs left of these shards: one listing per run, not per shard
    remove_dead_temporaries(folder / RECORDS, [Path(n).stem + ".json" for n in names])
    workers = min(num_workers, len(urls))
    loader = DataLoader(EncodeStream(urls, resolution, buckets, batch_size, max_member_bytes), batch_size=None,
                        num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers > 0 else None)
    writer = BackgroundWriter()
    shards: dict[str, LatentShard] = {}
    finishing: list[tuple[str, Future]] = []  # (input shard, its finish() in the writer thread)
    oom = None
    try:
        with batches(loader) as items:
            for item in items:
                if stop is not None and stop.is_set():
                    result.stopped = True
                    break
                url = item["shard"] if isinstance(item, dict) else item.shard  # a batch, ShardEnd or Unavailable
                if url not in shards:
                    known = None if had_record is None else shard_name(url) in had_record
                    shards[url] = LatentShard(folder, url, settings, had_record=known)
                shard = shards[url]
                if isinstance(item, Unavailable):
                    writer.submit(shard.abort)  # after the batches of it in flight: the writer thread holds its tar
                    del shards[url]
                    result.unavailable.append(item)
                    continue
                if isinstance(item, ShardEnd):
                    finishing.append((url, writer.submit(shard.finish, item)))
                    del shards[url]
                    if progress is not None:
                        progress(url)
                    continue
                out = encode_batch(model, item["images"], item["keys"], s, device)
                writer.submit(shard.write_batch, item, out)
    except RuntimeError as e:
        # SLURM signals every process of the job: loader workers may die before the loop sees the stop flag
        if stop is not None and stop.is_set():
            result.stopped = True
        elif out_of_memory(e):  # torch.OutOfMemoryError is a RuntimeError: the finished shards are committed first
            oom = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
        else:
            raise
    finally:
        try:
            writer.close()
        finally:
            for shard in shards.values():  # interrupted or failed: drop the unfinished tars' staging files
                shard.abort()
    done = [(url, f.result()) for url, f in finishing]
    if oom is not None:
        fix = (f"lower encode.batch_size (e.g. encode.batch_size={batch_size // 2})" if batch_size > 1 else
               "encode.batch_size=1 does not fit either: lower data.resolution or use a device with more memory")
        raise UserError(f"out of memory on {device} encoding batches of {batch_size} images at {resolution}px "
                        f"({oom}); {fix} and run the same command again: the shards finished are kept "
                        f"({sum(r is not None for _, r in done)} by this run), the others are encoded then")
    result.records, result.kept = [r for _, r in done if r is not None], [u for u, r in done if r is None]
    for r in result.records:
        result.shards += 1
        result.samples += r.samples
        result.skipped += len(r.skipped)
        result.non_finite += r.non_finite
    return result


def out_of_memory(e: BaseException) -> bool:
    """Whether an error is the device (torch.OutOfMemoryError) or the CPU allocator running out of memory."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def check_input_shards(urls: list[str]) -> None:
    """Before any model runs: every input shard gives an output shard of the same name, so names must be unique;
    every shard must be a regular file (a named pipe would block the reader forever, SIGTERM or not; an object
    store's objects always are); and, where a look costs no request (a seekable store: a local shard), a cheap look
    at the first shard's member names (no decoding) catches shards that hold no images."""
    import tarfile

    from pipeline.data.shards import split_key

    seen: dict[str, str] = {}
    for u in urls:
        n = shard_name(u)
        if n in seen:
            raise UserError(f"two input shards share the name {n} ({seen[n]} and {u}); every input shard gives an "
                            f"output shard of the same name, so encode them into separate folders")
        seen[n] = u
        what = None if u.startswith("pipe:") else storage_for(u).not_a_file(u)  # a missing shard is reported later
        if what is not None:
            blocks = " (reading it would block forever)" if "FIFO" in what else ""
            raise UserError(f"{u} is {what}, not a shard file{blocks}; remove it from the data or name the shards "
                            f"explicitly")
    store = None if urls[0].startswith("pipe:") else storage_for(urls[0])
    try:
        if store is not None and store.seekable and store.object_exists(urls[0]):
            with store.open_read(urls[0]) as f, tarfile.open(fileobj=f) as tf:
                exts = {ks[1] for ks in map(split_key, tf.getnames()) if ks}
        else:
            exts = set()
    except (tarfile.TarError, OSError):
        return  # a broken shard is reported per sample, not here
    if exts and not exts & set(IMAGE_EXTS):
        raise UserError(f"{urls[0]} holds no images (members: {', '.join(sorted(exts))}); encode reads image shards "
                        f"written by firststage prepare or img2dataset")


def check_output_folder(folder: Path, urls: list[str]) -> None:
    """Refuse an output folder where encoding would overwrite its inputs: every output shard takes its input's name
    (and the folder gets a manifest.json), so the folder of any input shard, or a folder whose NAME.tar already is
    that input (a link), would have its image shards replaced by latent shards. Compared by where the paths lead
    (Storage.canonical: links resolved locally), without a request."""
    out = storage_for(str(folder))
    target = out.canonical(str(folder))
    for u in urls:
        if u.startswith("pipe:"):
            continue
        store = storage_for(u)
        if store.canonical(str(as_path(u).parent)) == target or \
                store.canonical(u) == out.canonical(out.join(str(folder), shard_name(u))):
            raise UserError(f"{folder} holds the input shard {shard_name(u)}: encoding into it would replace the "
                            f"image shards with latent shards of the same names; choose another output folder")


def non_finite_advice(non_finite: int, total: int) -> str:
    if total and non_finite / total > 0.01:
        return (f"; {non_finite} of {total} latents were NaN/Inf ({non_finite / total:.1%}): encode with "
                f"encode.dtype=bfloat16 or float32 and encode.mixed_precision=bf16 or no")
    return ""


def measure_statistics(model, urls: list[str], limits: dict[str, int], resolution: int, batch_size: int,
                       device="cpu") -> dict:
    """Latent statistics and factors (as in an encode manifest) of the first samples of some shards, measured on
    the spot: the posterior's mean and variance per channel, center crops at `resolution`."""
    from pipeline.data.loader import make_loader
    from pipeline.latents.format import channel_statistics

    own = family_of(model).normalisation(model)
    s = EncodeSettings(store=effective_store(model, "moments"), dtype="float32", flip=False, patch=own.get("patch", 1))
    total = None
    for batch in make_loader(urls, "eval", batch_size, resolution=resolution, limits=limits):
        st = encode_batch(model, batch["image"], batch["__key__"], s, device)["_stats"]
        total = st if total is None else {k: total[k] + st[k] for k in st}
    if total is None:
        return {}
    return channel_statistics(*(total[k].tolist() for k in ("count", "sum", "sumsq")))
