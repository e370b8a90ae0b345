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
from datetime import timedelta

# Light imports only: torch and the models come after the SIGTERM handler (a SIGTERM in start-up exits 75, not 143).
from pipeline.errors import EmptyData, UserError
from pipeline.latents import format as lf
from pipeline.distributed import print0
from pipeline.manifest import MANIFEST, parse_part
from pipeline.storage import as_path
from stages.common import (EXIT_PREEMPTED, check_paths, flag_named, preempted_now, ranks_and_weights, sigterm_sets,
                           stage_main, start_up, take_output_lock)

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
    """SIGTERM sets `stop` from the first line on; no stop within encode.sigterm_grace s after it: exit 75 anyway."""
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
        with flag_named("--output"):
            lf.check_settings(out, lf.quick_settings(light), False) if light is not None else None
    run(args, out, part, num_parts, stop, grace, locks)  # complete shards stay, the one in flight is redone


def run(args, out, part: int, num_parts: int, stop: threading.Event, grace: list, locks: list) -> None:
    with start_up(stop, STOPPED_AT_START):  # SIGTERM now: exit 75 at once (one process)
        import accelerate  # noqa: F401 (the launcher's, for ranks_and_weights)
        from pipeline.latents.job import EncodeJob, EncodeOptions, check_output_folder, encode_sources

    start = time.time()
    with flag_named("--data"):  # cheap checks first, before any model is loaded
        urls = encode_sources(args.data, args.overrides)
    with flag_named("--output"):
        check_output_folder(out, urls)
    if stop.is_set():  # a SIGTERM during start-up (launched ranks): nothing was done, nothing collective has begun
        preempted_now(STOPPED_AT_START)
    state, weights = ranks_and_weights(args.model, not args.no_ema, timeout=timedelta(hours=24))  # one checkpoint
    job = EncodeJob(weights, args.data, out, (part, num_parts), EncodeOptions(args.overrides, args.overwrite),
                    state.device, urls)
    grace[0] = job.load().encode.sigterm_grace
    locks.append(lock := take_output_lock(out, job.lock_name, ranks=True))  # every rank's writes prove it
    try:
        with flag_named("--output"):
            job.prepare_folder()
        with flag_named("--data", only=EmptyData):
            r = job.run(stop)
        print0(r.summary(time.time() - start)) if r.stopped or r.manifest is not None else None
        if r.stopped:
            raise SystemExit(EXIT_PREEMPTED)
        r.check()  # every rank: unread input shards (object storage) say "run it again" in the exit code
    finally:
        lock.release()


if __name__ == "__main__":
    main()
