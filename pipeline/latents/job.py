"""EncodeJob: image shards -> a latent folder, exactly once and resumable; what `firststage encode` runs.

  from pipeline.latents.job import EncodeJob, EncodeOptions
  from pipeline.weights import resolve_weights

  job = EncodeJob(resolve_weights("runs/klf8"), "shards/", "latents/train", options=EncodeOptions(["encode.flip=true"]))
  report = job.run()          # an EncodeReport: counts, the manifest (on the main process), what was not read

The job writes under the output's lock (`.lock`, or `.lock.part-K-of-N` for a part): the caller's when it holds one
(the stage takes it first), else taken by the job for the run (pipeline.jobs.under_lock). Run by several processes
(accelerate launch: a process group exists), the job deals the shards of its part among them, sums their counts and
the main process writes the manifest once. `run(stop)` ends at the next batch once `stop` is set (a SIGTERM): the
complete shards stay, `report.stopped` says so and the same job run again finishes the rest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pipeline.errors import EmptyData, StorageUnavailable
from pipeline.jobs import check_process_group, output_lock, under_lock
from pipeline.latents import format as lf
from pipeline.latents.encoder import check_output_folder
from pipeline.manifest import MANIFEST, part_name, share, summarize_skips
from pipeline.sources import Sources
from pipeline.storage import as_path


@dataclass
class EncodeOptions:
    overrides: list[str] = field(default_factory=list)  # key=value on the model's config: data.resolution=512, ...
    overwrite: bool = False  # replace latents of another model or settings in the output folder


@dataclass
class EncodeReport:
    """What an encode did, summed over every process of the job."""
    shards: int  # encoded by this run
    samples: int
    skipped: int
    non_finite: int
    done_before: int  # complete before this run (or by another run meanwhile)
    changed: int  # encoded again: their input changed
    processes: int
    seconds: float
    stopped: bool  # `stop` was set: complete shards stay, run the job again
    unread: int = 0  # input shards object storage could not give after every retry (see check())
    first_unread: tuple | None = None  # (shard, why), on the process that met it
    manifest: dict | None = None  # the main process's: the part manifest, or the folder's when `whole`
    whole: bool = False  # manifest.json now covers the folder (every part is done)
    output: object = None  # the latent folder
    what: dict = field(default_factory=dict)  # store, dtype, resolution, buckets, flip: how the latents were made

    def summary(self, seconds: float | None = None) -> str:
        """The one line that says what the job did (of a job that stopped, or of the main process's report, which
        has the manifest); `seconds`: the time to state (default: the job's own)."""
        from pipeline.latents.encoder import non_finite_advice
        from pipeline.models.normalisation import describe

        if self.stopped:
            return (f"encode: stopped by SIGTERM after {self.shards} shards ({self.samples} samples); complete shards "
                    f"are kept, rerun the same command to finish")
        m, w = self.manifest, self.what
        reasons = summarize_skips(m["skipped"], 4) or "nothing decodable"
        norm = m["normalisation"]
        factor = ("codes, not normalised" if lf.kind_named(w["store"]).integer else "no statistics" if norm is None
                  else f"normalisation {describe(norm)}")
        left = f"; {len(m['missing'])} shards left to other parts or a rerun" if m["missing"] else ""
        why = f" ({reasons}; listed in the manifest)" if m["skipped_count"] else ""
        why += f"; {len(m['renamed'])} input members renamed (ours have their names)" if m["renamed"] else ""
        return (f"encode: {self.samples} samples from {self.shards} shards ({self.done_before} already complete"
                f"{f', {self.changed} encoded again: their input changed' if self.changed else ''}) -> {self.output} "
                f"({w['store']}, {w['dtype']}, {w['resolution']}px{', buckets' if w['buckets'] else ''}"
                f"{', flip' if w['flip'] else ''}) on {self.processes} process(es) in "
                f"{self.seconds if seconds is None else seconds:.1f}s; {'folder' if self.whole else 'this part'} total "
                f"{m['total']} samples, skipped {m['skipped_count']}{why}; {factor}{left}"
                f"{non_finite_advice(self.non_finite, self.samples + self.non_finite)}")

    def check(self) -> None:
        """StorageUnavailable (try again) when some input shards could not be read."""
        if self.unread:
            first = f" (first: {self.first_unread[0]}: {self.first_unread[1]})" if self.first_unread else ""
            raise StorageUnavailable(f"{self.unread} input shards could not be read from object storage after every "
                                     f"retry{first}; the others are complete, run the same command again")


def encode_sources(data: str, overrides: list[str]) -> list[str]:
    """The input shards `data` names (data.allow_pipe from `overrides`), checked before any model is loaded."""
    from pipeline.config import parse_overrides
    from pipeline.latents.encoder import check_input_shards
    from pipeline.sources import resolve_sources

    data_keys = parse_overrides(overrides).get("data")  # the config comes with the model; this key is needed now
    allow_pipe = isinstance(data_keys, dict) and data_keys.get("allow_pipe") is True
    urls = resolve_sources(data, allow_pipe)
    check_input_shards(urls)
    return urls


class EncodeJob:
    """Encode the image shards `data` with `weights` (pipeline.weights.resolve_weights) into the folder `output`;
    `part` (K, N): the K-th of N deterministic partitions. `device`: the process's (default: its GPU, else the
    CPU); `sources`: the shards of `data`, when the caller resolved and checked them already (encode_sources)."""

    def __init__(self, weights, data: str, output, part: tuple[int, int] = (0, 1), options: EncodeOptions | None = None,
                 device=None, sources: list[str] | None = None):
        self.weights, self.data, self.output, (self.part, self.num_parts) = weights, str(data), as_path(output), part
        self.options, self.device, self.sources = options or EncodeOptions(), device, sources
        self.model = self.cfg = self.settings = None
        self.prepared = False

    def load(self):
        """The model and its Config (the options' overrides applied) and the folder's settings; returns the Config."""
        if self.cfg is None:
            import torch

            from pipeline.latents.buckets import resolve_buckets
            from pipeline.latents.encoder import effective_store, stored_tensors
            from pipeline.machine import resolve_mixed_precision
            from pipeline.models.autoencoder import downsampling_factor

            if self.sources is None:
                self.sources = encode_sources(self.data, self.options.overrides)
                check_output_folder(self.output, self.sources)
            self.device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.model, cfg = self.weights.load(self.options.overrides)
            e = cfg.encode
            self.buckets = resolve_buckets(e.buckets, cfg.data.resolution, downsampling_factor(self.model))
            auto = "bfloat16" if resolve_mixed_precision("auto") == "bf16" else "float32"
            self.dtype, self.store = e.dtype if e.dtype != "auto" else auto, effective_store(self.model, e.store)
            self.settings = lf.folder_settings(self.model, cfg, self.weights, self.dtype, self.buckets, self.store,
                                               stored_tensors(self.store, e.flip))
            self.cfg = cfg
        return self.cfg

    @property
    def lock_name(self) -> str:
        return part_name(".lock", self.part, self.num_parts)

    def prepare_folder(self) -> None:
        """Under the output's lock: the main process refuses a folder of other latents (or clears it with
        `overwrite`) and writes settings.json; every process waits for it."""
        from pipeline.distributed import is_main_process, wait_for_everyone

        self.load()
        if is_main_process():
            lf.check_settings(self.output, self.settings, self.options.overwrite)
            lf.write_settings(self.output, self.settings, self.part, self.num_parts)
        wait_for_everyone()  # every rank sees the settings; nobody writes before the folder was checked
        self.prepared = True

    def run(self, stop: threading.Event | None = None, progress: bool = True) -> EncodeReport:
        start = time.time()
        check_process_group()
        take = lambda: output_lock(self.output, self.lock_name, ranks=True)  # noqa: E731 (every rank's writes prove it)
        with under_lock(self.output / lf.SETTINGS, take):
            if not self.prepared:
                self.prepare_folder()
            return self._encode(stop or threading.Event(), start, progress)

    def _encode(self, stop: threading.Event, start: float, progress: bool) -> EncodeReport:
        import torch

        from pipeline.data.loader import loader_workers, shard_sample_counts
        from pipeline.data.shards import shard_name
        from pipeline.distributed import all_reduce, gather_objects, on_every_rank, rank_and_world
        from pipeline.latents.encoder import EncodeSettings, encode_shards
        from pipeline.machine import resolve_mixed_precision
        from pipeline.progress import Progress

        cfg, urls, device, settings = self.cfg, self.sources, self.device, self.settings
        rank, world = rank_and_world()
        cuda = device.type == "cuda"
        manifest = as_path(self.data) / MANIFEST if as_path(self.data).is_dir() else as_path(self.data)
        counts = shard_sample_counts(urls if isinstance(urls, Sources) else self.data) \
            if manifest.suffix == ".json" and manifest.is_file() else None  # the manifest's, as resolved
        _, mine = share(urls, counts, self.part, self.num_parts, rank, world)
        states = (plan := lf.plan_shards(self.output, mine, settings)).states  # "changed": done from another input
        todo = [u for u in mine if states[u] != "complete"]
        done_before, changed = len(mine) - len(todo), sum(v == "changed" for v in states.values())

        model = self.model.to(device).eval().requires_grad_(False)
        model = model.to(memory_format=torch.channels_last) if cuda else model
        mp = resolve_mixed_precision(cfg.encode.mixed_precision) if cuda else "no"
        s = EncodeSettings(store=self.store, dtype=self.dtype, flip=cfg.encode.flip, channels_last=cuda,
                           autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp),
                           patch=settings["normalisation"]["model"].get("patch", 1))
        bar = Progress("encode", len(todo), "shard", enabled=progress and rank == 0)  # the main process's shards
        # On a CPU the encoder's threads already take the free cores: a loader worker decoding beside them made the
        # loop slower than a plain main-process loop on 2 cores (0.92x against 1.10x, benchmarks/RESULTS.md).
        workers = loader_workers(cfg.data.num_workers) if cuda else 0
        res = on_every_rank(lambda: encode_shards(  # one rank's error (out of memory, a lost lock) ends every rank
            model, todo, self.output, settings, s, device, resolution=cfg.data.resolution, buckets=self.buckets,
            batch_size=cfg.encode.batch_size, num_workers=workers, pin_memory=cuda, stop=stop,
            progress=lambda _: bar.update(1), max_member_bytes=cfg.data.max_member_bytes,
            had_record=plan.had_record), "encode", device=device,
            elsewhere="another process of the job failed; complete shards are kept, run the same command again")
        bar.close()
        done_before, changed = done_before + len(res.kept), changed - sum(states.get(u) == "changed" for u in res.kept)
        mine_t = torch.tensor([res.shards, res.samples, res.skipped, res.non_finite, done_before, changed,
                               float(res.stopped), len(res.unavailable)], dtype=torch.float64)
        totals = all_reduce([mine_t], device=device)[0].tolist()  # also the barrier: every rank has finished
        shards, samples, skipped, non_finite, done_before, changed, stopped, unread = (int(v) for v in totals)
        what = {"store": self.store, "dtype": self.dtype, "resolution": cfg.data.resolution,
                "buckets": bool(self.buckets), "flip": cfg.encode.flip}
        report = EncodeReport(shards, samples, skipped, non_finite, done_before, changed, world, 0.0, bool(stopped),
                              unread, res.unavailable[0] if res.unavailable else None, output=self.output, what=what)
        known = gather_objects([] if stopped else [*plan.records.values(), *res.records])  # what the manifest needs
        if not stopped and rank == 0:
            report.manifest, report.whole = lf.finish_manifest(
                self.output, [r for rank in known for r in rank], [shard_name(u) for u in urls], self.part,
                self.num_parts, world)
            m = report.manifest
            if m["total"] == 0 and not m["missing"]:
                raise EmptyData(f"{self.data}: no sample could be encoded "
                                f"({summarize_skips(m['skipped'], 4) or 'nothing decodable'})")
        report.seconds = time.time() - start
        return report
