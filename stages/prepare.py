"""firststage prepare: image folders, path lists or tar shards -> resized webdataset shards + manifest.json.

  firststage prepare --input ~/photos --output data/shards --size 256
  firststage prepare --input 'raw/{00000..00999}.tar' --output data/shards --part 3/16   # one of 16 machines
  firststage prepare --merge-manifests data/shards                                         # after all parts
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from pipeline.data.prepare import FORMATS, PrepareOptions, parse_part, prepare, summarize_skips
from pipeline.data.images import RESIZE_MODES
from pipeline.data.shards import merge_manifests
from pipeline.errors import UserError
from stages.common import stage_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="firststage prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", metavar="PATH", help="image folder, text file of paths, or tar shards (brace pattern)")
    p.add_argument("--output", metavar="DIR", help="output folder for shards and manifest.json")
    p.add_argument("--size", type=int, default=256, help="target size in pixels (default 256)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="shorter-side",
                   help="shorter-side / longer-side: scale down so that side is --size (never up); center-crop: square --size")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is below this")
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per shard (default 1000)")
    p.add_argument("--format", choices=FORMATS, default="jpg", help="jpg, webp, or keep the source format")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WEBP quality (default 95)")
    p.add_argument("--prefix", default="shards", help="shard name prefix (default shards)")
    p.add_argument("--workers", type=int, default=1, help="processes (decoding is CPU-bound)")
    p.add_argument("--part", default="0/1", metavar="K/N", help="process the K-th of N deterministic partitions")
    p.add_argument("--merge-manifests", metavar="DIR", help="join the part manifests in DIR into manifest.json and exit")
    return p


@stage_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.merge_manifests:
        m = merge_manifests(args.merge_manifests)
        print(f"prepare: merged {m['parts']} part manifests: {m['total']} samples in {len(m['shards'])} shards, "
              f"{m['skipped_count']} skipped -> {args.merge_manifests}/manifest.json")
        return
    if not args.input or not args.output:
        raise UserError("--input and --output are required (or --merge-manifests DIR)")
    part, num_parts = parse_part(args.part)
    opts = PrepareOptions(
        size=args.size, resize=args.resize, min_size=args.min_size, shard_size=args.shard_size, format=args.format,
        quality=args.quality, prefix=args.prefix, workers=max(1, args.workers), part=part, num_parts=num_parts,
    )
    start = time.time()
    bar = tqdm(desc="prepare", unit="shard", leave=False, disable=None)
    manifest = prepare(args.input, args.output, opts, progress=lambda r: bar.update(1))
    bar.close()
    skipped = manifest["skipped_count"]
    why = f" ({summarize_skips(manifest['skipped'])}; listed in the manifest)" if skipped else ""
    name = "manifest.json" if num_parts == 1 else f"part {part}/{num_parts} manifest"
    print(f"prepare: read {manifest['inputs']} inputs, wrote {manifest['total']} samples in "
          f"{len(manifest['shards'])} shards to {args.output} ({name}) in {time.time() - start:.1f}s; "
          f"skipped {skipped}{why}")


if __name__ == "__main__":
    main()
