"""firststage encode: image shards -> latent shards for a diffusion trainer, exactly once and resumable.

  firststage encode --model runs/klf8 --data 'shards/train-{000000..004095}.tar' --output latents/train
  firststage encode --model path/to/diffusers/vae --data shards/ --output latents/ encode.store=moments encode.flip=true
  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m stages.encode --model ... --data ... --output ...
  firststage encode --output latents/ --rebuild-manifest

Every input shard gives one output shard of the same name (latents, metadata, captions carried byte for byte) and a
record; a rerun of the same command skips the complete ones. Exit codes: 0 done, 2 user error, 75 stopped by
SIGTERM, also during start-up (complete shards stay; rerun the same command).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

# Light imports only: torch, the models and the loader take seconds to import and come inside the functions, after
# the SIGTERM handler is in place (a SIGTERM during start-up exits 75, which the sbatch script requeues, not 143).
from pipeline.errors import StorageUnavailable, UserError
from pipeline.latents import format as lf
from pipeline.manifest import MANIFEST, parse_part, part_name, share, summarize_skips
from pipeline.storage import as_path
from stages.common import (EXIT_PREEMPTED, check_paths, flag_named, preempted_now, sigterm_sets, stage_main, start_up,
                           take_output_lock)

STOPPED_AT_START = "encode: stopped by SIGTERM during start-up, before any shard; rerun the same command"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="run, checkpoint or diffusers folder, single file, encoder-only export, Hub id")
    p.add_argument("--data", help="image shards: brace pattern, folder, list file or manifest.json")
    p.add_argument("--output", required=True, help="folder for latent shards, records and manifest.json")
    p.add_argument("--no-ema", action="store_true", help="encode with the raw weights of a firststage checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace latents of another model or settings in --output")
    p.add_argument("--part", default="0/1", metavar="K/N", help="encode the K-th of N deterministic partitions")
    p.add_argument("--rebuild-manifest", action="store_true", help="rebuild manifest.json from --output alone, exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. encode.store=mean encode.flip=true encode.buckets=auto data.resolution=512")
    return p


def main(argv=None) -> None:
    """SIGTERM sets `stop` from the first line on, before the heavy imports; if the encoder has not stopped within
    encode.sigterm_grace seconds after it (a read that never returns), the process exits 75 anyway."""
    stop, grace, locks = threading.Event(), [100.0], []
    with sigterm_sets(stop, lambda: grace[0], lambda seconds: _exit_preempted(seconds, locks)):
        _main(argv, stop, grace, locks)


def _exit_preempted(seconds: float, locks: list) -> None:
    print(f"encode: SIGTERM, and the encoder did not stop within {seconds:g}s (encode.sigterm_grace): exiting "
          f"{EXIT_PREEMPTED}; complete shards are kept, rerun the same command", file=sys.stderr, flush=True)
    for lock in locks:
        lock.release()
    os._exit(EXIT_PREEMPTED)


@stage_main
def _main(argv, stop: threading.Event, grace: list, locks: list) -> None:
    args = build_parser().parse_intermixed_args(argv)  # key=value may follow or precede the flags
    check_paths((flag, getattr(args, flag[2:])) for flag in ("--model", "--data", "--output"))
    out = as_path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    if args.rebuild_manifest:
        m = lf.write_manifest(out)
        print(f"encode: rebuilt {out / MANIFEST} from {len(m['shards'])} shard records: {m['total']} samples, "
              f"{m['skipped_count']} skipped")
        return
    if not args.model or not args.data:
        raise UserError("--model and --data are required (or --output DIR --rebuild-manifest)")
    with flag_named("--part"):
        part, num_parts = parse_part(args.part)
    if not args.overwrite:  # before torch is imported: another store, resolution, ... refuses in a moment
        from pipeline.weights import resolve_weights

        with flag_named("--model"):
            light = resolve_weights(args.model, not args.no_ema).light_config(args.overrides)
        if light is not None:
            with flag_named("--output"):
                lf.check_settings(out, lf.quick_settings(light), False)
    run(args, out, part, num_parts, stop, grace, locks)  # complete shards stay, the one in flight is redone


def run(args, out, part: int, num_parts: int, stop: threading.Event, grace: list, locks: list) -> None:
    with start_up(stop, STOPPED_AT_START):  # SIGTERM now: exit 75 at once (one process)
        from datetime import timedelta

        import torch
        from accelerate import PartialState

        from pipeline.config import parse_overrides
        from pipeline.data.loader import loader_workers, shard_sample_counts
        from pipeline.data.shards import shard_name
        from pipeline.distributed import all_reduce, gather_objects, on_every_rank, print0
        from pipeline.latents.buckets import resolve_buckets
        from pipeline.latents.encoder import (EncodeSettings, check_input_shards, check_output_folder, effective_store,
                                              encode_shards, non_finite_advice, stored_tensors)
        from pipeline.models.autoencoder import downsampling_factor
        from pipeline.models.normalisation import describe
        from pipeline.progress import Progress
        from pipeline.sources import resolve_sources
        from stages.common import pinned_weights, resolve_mixed_precision
    start = time.time()
    data_keys = parse_overrides(args.overrides).get("data")  # the config comes with the model; this key is needed now
    allow_pipe = isinstance(data_keys, dict) and data_keys.get("allow_pipe") is True
    with flag_named("--data"):  # cheap checks first, before any model is loaded
        urls = resolve_sources(args.data, allow_pipe)
        check_input_shards(urls)
    with flag_named("--output"):
        check_output_folder(out, urls)
    if stop.is_set():  # a SIGTERM during start-up (launched ranks): nothing was done, nothing collective has begun
        preempted_now(STOPPED_AT_START)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    weights = pinned_weights(args.model, ema=not args.no_ema)  # a run folder: the same checkpoint on every rank
    model, cfg = weights.load(args.overrides)
    grace[0] = cfg.encode.sigterm_grace
    buckets = resolve_buckets(cfg.encode.buckets, cfg.data.resolution, downsampling_factor(model))
    device, cuda = state.device, state.device.type == "cuda"
    dtype = cfg.encode.dtype if cfg.encode.dtype != "auto" else ("bfloat16" if resolve_mixed_precision("auto") == "bf16" else "float32")
    mp = resolve_mixed_precision(cfg.encode.mixed_precision) if cuda else "no"
    store = effective_store(model, cfg.encode.store)
    settings = lf.folder_settings(model, cfg, weights, dtype, buckets, store, stored_tensors(store, cfg.encode.flip))
    lock = take_output_lock(out, part_name(".lock", part, num_parts), ranks=True)  # every rank's writes prove it
    locks.append(lock)
    try:
        if state.is_main_process:
            with flag_named("--output"):
                lf.check_settings(out, settings, args.overwrite)
            lf.write_settings(out, settings, part, num_parts)
        state.wait_for_everyone()  # every rank sees the settings; nobody writes before the folder was checked
        manifest = as_path(args.data) / MANIFEST if as_path(args.data).is_dir() else as_path(args.data)
        counts = shard_sample_counts(args.data) if manifest.suffix == ".json" and manifest.is_file() else None
        _, mine = share(urls, counts, part, num_parts, state.process_index, state.num_processes)
        states = (plan := lf.plan_shards(out, mine, settings)).states  # "changed": done from another input: redone
        todo = [u for u in mine if states[u] != "complete"]
        done_before, changed = len(mine) - len(todo), sum(v == "changed" for v in states.values())

        model = model.to(device).eval().requires_grad_(False)
        model = model.to(memory_format=torch.channels_last) if cuda else model
        s = EncodeSettings(store=store, dtype=dtype, flip=cfg.encode.flip, channels_last=cuda,
                           autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp),
                           patch=settings["normalisation"]["model"].get("patch", 1))
        bar = Progress("encode", len(todo), "shard", enabled=state.is_main_process)  # the main process's shards
        # On a CPU the encoder's threads already take the free cores: a loader worker decoding beside them made the
        # loop slower than a plain main-process loop on 2 cores (0.92x against 1.10x, benchmarks/RESULTS.md).
        workers = loader_workers(cfg.data.num_workers) if cuda else 0
        res = on_every_rank(lambda: encode_shards(  # one rank's error (out of memory, a lost lock) ends every rank
            model, todo, out, settings, s, device, resolution=cfg.data.resolution, buckets=buckets,
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
        known = gather_objects([] if stopped else [*plan.records.values(), *res.records])  # what the manifest needs
        if stopped:
            print0(f"encode: stopped by SIGTERM after {shards} shards ({samples} samples); complete shards are kept, "
                   f"rerun the same command to finish")
            raise SystemExit(EXIT_PREEMPTED)
        if state.is_main_process:
            m, whole = lf.finish_manifest(out, [r for rank in known for r in rank], [shard_name(u) for u in urls],
                                          part, num_parts, state.num_processes)
            reasons = summarize_skips(m["skipped"], 4) or "nothing decodable"
            if m["total"] == 0 and not m["missing"]:
                raise UserError(f"--data {args.data}: no sample could be encoded ({reasons})")
            norm = m["normalisation"]
            factor = ("codes, not normalised" if settings["store"] == "codes" else "no statistics" if norm is None
                      else f"normalisation {describe(norm)}")
            left = f"; {len(m['missing'])} shards left to other parts or a rerun" if m["missing"] else ""
            why = f" ({reasons}; listed in the manifest)" if m["skipped_count"] else ""
            why += f"; {len(m['renamed'])} input members renamed (ours have their names)" if m["renamed"] else ""
            print0(f"encode: {samples} samples from {shards} shards ({done_before} already complete"
                   f"{f', {changed} encoded again: their input changed' if changed else ''}) -> {out} "
                   f"({settings['store']}, {dtype}, {cfg.data.resolution}px{', buckets' if buckets else ''}"
                   f"{', flip' if cfg.encode.flip else ''}) on {state.num_processes} process(es) in "
                   f"{time.time() - start:.1f}s; {'folder' if whole else 'this part'} total {m['total']} samples, "
                   f"skipped {m['skipped_count']}{why}; "
                   f"{factor}{left}{non_finite_advice(non_finite, samples + non_finite)}")
        if unread:  # every rank: the exit code says "run it again"
            first = f" (first: {res.unavailable[0][0]}: {res.unavailable[0][1]})" if res.unavailable else ""
            raise StorageUnavailable(f"{unread} input shards could not be read from object storage after every "
                                     f"retry{first}; the others are complete, run the same command again")
    finally:
        if lock:
            lock.release()


if __name__ == "__main__":
    main()
