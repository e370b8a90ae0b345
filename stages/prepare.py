"""firststage prepare: image folders, path lists or tar shards -> resized webdataset shards + manifest.json.

  firststage prepare --input ~/photos --output data/shards --size 256
  firststage prepare --input 'raw/{00000..00999}.tar' --output data/shards --part 3/16   # one of 16 machines
  firststage prepare --merge-manifests data/shards                                         # after all parts
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict


from pipeline.config import load_config
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.errors import UserError
from pipeline.manifest import merge_manifests, parse_part, part_name, summarize_skips
from pipeline.progress import Progress
from pipeline.storage import as_path
from stages.common import (add_alias_flags, add_config_args, alias_errors, alias_overrides, check_paths, flag_named,
                           stage_main, take_output_lock)


# flags that are aliases of `prepare.*` config keys (the schema checks them); `--config` and key=value work too
ALIASES = {
    "--size": ("prepare.size", int, "target size in pixels (default 256)"),
    "--resize": ("prepare.resize", str, "shorter-side / longer-side: scale down so that side is --size (never up); "
                 "center-crop: squares"),
    "--min-size": ("prepare.min_size", int, "skip images whose shorter side is below this"),
    "--shard-size": ("prepare.shard_size", int, "inputs per shard (default 1000)"),
    "--format": ("prepare.format", str, "jpg, webp, or keep the source format"),
    "--quality": ("prepare.quality", int, "JPEG/WEBP quality (default 95)"),
    "--prefix": ("prepare.prefix", str, "shard name prefix (default shards)"),
    "--workers": ("prepare.workers", int, "processes (decoding is CPU-bound)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="firststage prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", metavar="PATH", help="image folder, text file of paths, or tar shards (brace pattern)")
    p.add_argument("--output", metavar="DIR", help="output folder for shards and manifest.json")
    add_alias_flags(p, ALIASES)
    p.add_argument("--part", default="0/1", metavar="K/N", help="process the K-th of N deterministic partitions")
    p.add_argument("--merge-manifests", metavar="DIR", help="join the part manifests in DIR into manifest.json and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier run with other inputs or options wrote into --output")
    add_config_args(p)
    return p


def options(args) -> PrepareOptions:
    """The prepare section of --config and key=value overrides, with the flags (aliases) applied last."""
    with alias_errors(ALIASES):
        cfg = load_config(args.config, args.overrides + alias_overrides(args, ALIASES)).prepare
        with flag_named("--part"):
            part, num_parts = parse_part(args.part)
        opts = PrepareOptions(**asdict(cfg), part=part, num_parts=num_parts)
        opts.check()
    return opts


def locked_prepare(inputs: list[str], output: str, opts: PrepareOptions, progress=None, overwrite: bool = False) -> dict:
    """pipeline.data.prepare.prepare with the output folder locked (per part): a second run is refused naming the
    first."""
    check_paths(("--input", spec) for spec in inputs)
    with flag_named("--output"):
        out = as_path(output)
        if out.exists() and not out.is_dir():
            raise UserError(f"{output} is a file, not a folder")
    lock = take_output_lock(output, part_name(".lock", opts.part, opts.num_parts))
    try:
        with flag_named("--output", output):
            return prepare(inputs, output, opts, progress=progress, overwrite=overwrite)
    finally:
        lock.release()


@stage_main
def main(argv=None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    if args.merge_manifests:
        m = merge_manifests(args.merge_manifests)
        print(f"prepare: merged {m['parts']} part manifests: {m['total']} samples in {len(m['shards'])} shards, "
              f"{m['skipped_count']} skipped -> {args.merge_manifests}/manifest.json")
        return
    if not args.input or not args.output:
        raise UserError("--input and --output are required (or --merge-manifests DIR)")
    opts = options(args)
    start = time.time()
    with Progress("prepare", None, "shard") as bar:
        manifest = locked_prepare(args.input, args.output, opts, overwrite=args.overwrite,
                                  progress=lambda r: bar.update(1, samples=str(bar.samples(r["samples"]))))
    skipped = manifest["skipped_count"]
    why = f" ({summarize_skips(manifest['skipped'])}; listed in the manifest)" if skipped else ""
    name = "manifest.json" if opts.num_parts == 1 else f"part {opts.part}/{opts.num_parts} manifest"
    print(f"prepare: read {manifest['inputs']} inputs, wrote {manifest['total']} samples in "
          f"{len(manifest['shards'])} shards to {args.output} ({name}) in {time.time() - start:.1f}s; "
          f"skipped {skipped}{why}")


if __name__ == "__main__":
    main()
