"""firststage encode: image shards -> latent shards for a diffusion trainer, exactly once and resumable.

  firststage encode --model runs/klf8 --data 'shards/train-{000000..004095}.tar' --output latents/train
  firststage encode --model path/to/diffusers/vae --data shards/ --output latents/ encode.store=moments encode.flip=true
  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m stages.encode --model ... --data ... --output ...
  firststage encode --output latents/ --rebuild-manifest

Every input shard gives one output shard of the same name (latents, metadata, captions carried byte for byte) and a
record; a rerun of the same command skips the complete ones. Exit codes: 0 done, 2 user error, 75 stopped by
SIGTERM (complete shards stay; rerun the same command).
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.data.loader import resolve_shards, shard_sample_counts
from pipeline.data.prepare import parse_part
from pipeline.data.shards import MANIFEST as IMAGE_MANIFEST
from pipeline.data.shards import part_name
from pipeline.errors import UserError
from pipeline.io import FolderLock
from pipeline.latents import format as lf
from pipeline.latents.buckets import resolve_buckets
from pipeline.latents.encoder import (
    EncodeSettings,
    assign_shards,
    encode_shards,
    non_finite_advice,
    shard_name,
    stored_tensors,
)
from stages.common import agreed_model_path, all_reduce, print0, resolve_mixed_precision, stage_main

EXIT_PREEMPTED = 75


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="run folder, checkpoint folder, or diffusers AutoencoderKL/VQModel folder")
    p.add_argument("--data", help="image shards: brace pattern, folder, list file or manifest.json")
    p.add_argument("--output", required=True, help="folder for latent shards, records and manifest.json")
    p.add_argument("--no-ema", action="store_true", help="encode with the raw weights of a firststage checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace latents of another model or settings in --output")
    p.add_argument("--part", default="0/1", metavar="K/N", help="encode the K-th of N deterministic partitions")
    p.add_argument("--rebuild-manifest", action="store_true", help="rebuild manifest.json from --output alone, exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. encode.store=mean encode.flip=true encode.buckets=auto data.resolution=512")
    return p


def _unique_names(urls: list[str]) -> None:
    seen: dict[str, str] = {}
    for u in urls:
        n = shard_name(u)
        if n in seen:
            raise UserError(f"--data: two input shards share the name {n} ({seen[n]} and {u}); every input shard gives "
                            f"an output shard of the same name, so encode them into separate folders")
        seen[n] = u


def _first_shard_has_images(url: str) -> None:
    """A cheap look at the first shard's member names before any model runs (no decoding)."""
    import tarfile

    from pipeline.data.images import IMAGE_EXTS
    from pipeline.data.shards import split_key

    try:
        with tarfile.open(url) as tf:
            exts = {ks[1] for ks in map(split_key, tf.getnames()) if ks}
    except (tarfile.TarError, OSError):
        return  # a broken shard is reported per sample, not here
    if exts and not exts & set(IMAGE_EXTS):
        raise UserError(f"--data: {url} holds no images (members: {', '.join(sorted(exts))}); "
                        f"encode reads image shards written by firststage prepare or img2dataset")


def settings_for(model, cfg, model_path: str, ema: bool, dtype: str, buckets) -> dict:
    from pipeline.checkpoint import describe_weights
    from pipeline.models.autoencoder import is_vq

    weights = describe_weights(model_path, ema)

    e = cfg.encode
    kind = "vq" if is_vq(model) else "kl"
    return {
        "model_sha256": lf.model_sha256(model),
        "kind": kind,
        "store": "codes" if kind == "vq" else e.store,
        "tensors": stored_tensors(kind, e.store, e.flip),
        "dtype": dtype,
        "resolution": cfg.data.resolution,
        "buckets": [list(b) for b in buckets] if buckets else None,
        "flip": e.flip,
        "statistics_of": ("the latent the reader yields: samples of N(mean, exp(logvar)) (E[z^2] = mean^2 + "
                          "exp(logvar))" if kind == "kl" and e.store == "moments" else
                          "the quantised latent z_q" if kind == "vq" else f"the stored {e.store}"),
        "model": {"class": type(model).__name__, "path": model_path, "weights": weights,
                  "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
                  "scaling_factor": cfg.model.scaling_factor, "shift_factor": cfg.model.shift_factor},
    }


@stage_main
def main(argv=None) -> None:
    args = build_parser().parse_intermixed_args(argv)  # key=value may follow or precede the flags
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    if args.rebuild_manifest:
        return rebuild_manifest(out)
    if not args.model or not args.data:
        raise UserError("--model and --data are required (or --output DIR --rebuild-manifest)")
    part, num_parts = parse_part(args.part)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())  # installed first: a SIGTERM is never lost
    try:
        run(args, out, part, num_parts, stop)
    finally:
        signal.signal(signal.SIGTERM, previous)


def rebuild_manifest(out: Path) -> None:
    m = lf.write_manifest(out)
    print(f"encode: rebuilt {out / lf.MANIFEST} from {len(m['shards'])} shard records: {m['total']} samples, "
          f"{m['skipped_count']} skipped")


def run(args, out: Path, part: int, num_parts: int, stop: threading.Event) -> None:
    from accelerate import PartialState

    from pipeline.checkpoint import load_autoencoder

    start = time.time()
    urls = resolve_shards(args.data)  # cheap checks first, before any model is loaded
    _unique_names(urls)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    model_path = agreed_model_path(args.model)  # a run folder: the same checkpoint on every rank
    model, cfg = load_autoencoder(model_path, ema=not args.no_ema, overrides=args.overrides)
    from pipeline.models.autoencoder import downsampling_factor

    buckets = resolve_buckets(cfg.encode.buckets, cfg.data.resolution, downsampling_factor(model))
    device = state.device
    cuda = device.type == "cuda"
    dtype = cfg.encode.dtype if cfg.encode.dtype != "auto" else ("bfloat16" if resolve_mixed_precision("auto") == "bf16" else "float32")
    mp = resolve_mixed_precision(cfg.encode.mixed_precision) if cuda else "no"
    settings = settings_for(model, cfg, model_path, not args.no_ema, dtype, buckets)
    # one run per folder (per part): a second is refused naming the holder
    lock = FolderLock(out, part_name(".lock", part, num_parts))
    if state.is_main_process:
        lock.acquire()
    try:
        if state.is_main_process:
            lf.check_settings(out, settings, args.overwrite)
            _first_shard_has_images(urls[0])
            lf.write_settings(out, settings)
        state.wait_for_everyone()  # every rank sees the settings; nobody writes before the folder was checked

        image_manifest = Path(args.data) / IMAGE_MANIFEST if Path(args.data).is_dir() else Path(args.data)
        counts = shard_sample_counts(args.data) if image_manifest.suffix == ".json" and image_manifest.is_file() else None
        slots = num_parts * state.num_processes
        mine = assign_shards(urls, counts, slots)[part * state.num_processes + state.process_index]
        todo = [u for u in mine if not lf.is_complete(out, shard_name(u), settings)]
        done_before = len(mine) - len(todo)

        model = model.to(device).eval().requires_grad_(False)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        s = EncodeSettings(kind=settings["kind"], store=cfg.encode.store, dtype=dtype, flip=cfg.encode.flip,
                           autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp), channels_last=cuda)
        bar = tqdm(total=len(todo), desc=f"encode rank {state.process_index}", unit="shard", disable=None,
                   position=state.local_process_index, leave=False)
        # On a CPU the encoder's threads already take the free cores: a loader worker decoding beside them made the
        # loop slower than a plain main-process loop on 2 cores (0.92x against 1.10x, benchmarks/RESULTS.md).
        workers = cfg.data.num_workers if cuda else 0
        res = encode_shards(model, todo, out, settings, s, device, resolution=cfg.data.resolution, buckets=buckets,
                            batch_size=cfg.encode.batch_size, num_workers=workers, pin_memory=cuda,
                            stop=stop, progress=lambda _: bar.update(1))
        bar.close()
        mine_t = torch.tensor([res.shards, res.samples, res.skipped, res.non_finite, done_before, float(res.stopped)],
                              dtype=torch.float64)
        totals = all_reduce([mine_t], device=device)[0].tolist()  # also the barrier: every rank has finished
        shards, samples, skipped, non_finite, done_before, stopped = (int(v) for v in totals)
        if stopped:
            print0(f"encode: stopped by SIGTERM after {shards} shards ({samples} samples); complete shards are kept, "
                   f"rerun the same command to finish")
            raise SystemExit(EXIT_PREEMPTED)
        if state.is_main_process:
            expected = [shard_name(u) for part_urls in assign_shards(urls, counts, num_parts) for u in part_urls] \
                if num_parts > 1 else [shard_name(u) for u in urls]
            m = lf.write_manifest(out, expected=expected, processes=state.num_processes)
            if m["total"] == 0 and not m["missing"]:
                raise UserError(f"--data {args.data}: no sample could be encoded ({_reasons(m['skipped'])})")
            st = m["statistics"]
            factor = f"scaling_factor {st['scaling_factor']:.5g}, shift_factor {st['shift_factor']:.5g}" if st.get("scaling_factor") else "no statistics"
            left = f"; {len(m['missing'])} shards left to other parts or a rerun" if m["missing"] else ""
            why = f" ({_reasons(m['skipped'])}; listed in the manifest)" if m["skipped_count"] else ""
            print0(f"encode: {samples} samples from {shards} shards ({done_before} already complete) -> {out} "
                   f"({settings['store']}, {dtype}, {cfg.data.resolution}px{', buckets' if buckets else ''}"
                   f"{', flip' if cfg.encode.flip else ''}) on {state.num_processes} process(es) in "
                   f"{time.time() - start:.1f}s; folder total {m['total']} samples, skipped {m['skipped_count']}{why}; "
                   f"{factor} (model's {cfg.model.scaling_factor:g}){left}{non_finite_advice(non_finite, samples + non_finite)}")
    finally:
        lock.release()


def _reasons(skipped: list[dict]) -> str:
    counts = Counter(s["reason"].split(" (")[0] for s in skipped)
    return ", ".join(f"{n} {r}" for r, n in counts.most_common(4)) or "nothing decodable"


if __name__ == "__main__":
    main()
