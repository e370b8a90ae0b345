"""firststage export: hand the autoencoder on.

  firststage export --model runs/klf8 --output exports/klf8-vae                                # diffusers folder
  firststage export --model runs/klf8 --output exports/klf8.safetensors --format single-file   # LDM / SD key names
  firststage export --model runs/klf8 --output exports/klf8-encoder --format encoder-only      # + torch.export program
  firststage export --model runs/fsq --output exports/fsq --format firststage                  # any family (FSQ too)

The latent normalisation written into the export comes from measured statistics: --stats latents/manifest.json (an
encode manifest of this model), --data SHARDS [--num-samples N] (measured now), or the eval.json that evaluate wrote
beside the model; without any, the export refuses unless --keep-scaling-factor. It is the convention LatentDataset
applies, (z - shift_factor) * scaling_factor, undone by FLUX / SD3 pipelines (--no-shift: SD 1.x's, no shift). Every
export writes a model card and is one unit of the commit protocol (the files, then the card), taken under a lock
beside --output (.NAME.lock), so two exports to one output cannot interleave. An existing output is never replaced without --overwrite, and
--overwrite replaces only a previous export: never the model's own run, checkpoint or folder, nor anything an export
did not write. Weights or a latent normalisation that are not finite are refused.
"""

from __future__ import annotations

import argparse
import time

from pipeline.errors import UserError
from pipeline.latents.factors import eval_beside
from pipeline.storage import as_path
from pipeline.weights import EXPORT_FORMATS
from pipeline.weights.job import ExportJob, ExportOptions, FormatRefused, NoDiscriminator
from pipeline.weights.output import statistics_from
from stages.common import check_paths, flag_named, pinned_weights, stage_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, diffusers folder or a single file")
    p.add_argument("--output", required=True, help="folder (diffusers, encoder-only, firststage) or .safetensors file")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="diffusers")
    p.add_argument("--stats", metavar="MANIFEST", help="an encode manifest.json of this model: its latent statistics")
    p.add_argument("--data", metavar="SHARDS", help="measure the latent statistics now on these image shards")
    p.add_argument("--num-samples", type=int, default=1000, help="samples measured with --data (default 1000)")
    p.add_argument("--keep-scaling-factor", action="store_true",
                   help="no measured statistics: keep the model's own normalisation")
    p.add_argument("--no-shift", action="store_true", help="no shift_factor, scaling_factor = 1/RMS (SD 1.x pipelines "
                   "add none back); by default the export writes the shift that LatentDataset subtracts")
    p.add_argument("--shift", action="store_true", help=argparse.SUPPRESS)  # the default now; older commands still run
    p.add_argument("--prefix", default="", help="single-file key prefix, e.g. first_stage_model. for full-checkpoint tools")
    p.add_argument("--with-discriminator", action="store_true",
                   help="also write the PatchGAN (discriminator.safetensors), for a fine-tune to continue with it")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights of a firststage checkpoint, not EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (a previous export only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.resolution=512 (encoder-only example size)")
    return p


@stage_main
def main(argv=None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    start = time.time()
    check_paths((flag, getattr(args, flag[2:])) for flag in ("--model", "--output", "--stats", "--data"))
    with flag_named("--output"):
        out = as_path(args.output)  # a local path, or s3://bucket/key: the export is uploaded whole
    if args.format == "single-file" and out.suffix != ".safetensors":
        raise UserError(f"--output {out}: a single-file export is a .safetensors file")
    if args.with_discriminator and args.format not in ("diffusers", "firststage"):
        raise UserError("--with-discriminator: only a folder export (diffusers, firststage) holds one")
    weights = pinned_weights(args.model, ema=not args.no_ema)  # resolved once: a checkpoint written meanwhile changes nothing
    if args.format != "encoder-only":
        with flag_named("--model"):
            weights.require_decoder(f"a {args.format} export would carry a random one: export the full model")
    job = ExportJob(weights, out, args.format, ExportOptions(
        args.overrides, args.stats, args.data, args.num_samples, args.keep_scaling_factor, not args.no_shift,
        args.prefix, args.with_discriminator, args.overwrite))
    with flag_named("--output"):
        job.check_output()  # never over or into the model's own folders, nor the working folder
    if not (args.stats or args.data):  # the eval.json beside the model, looked for once, before any model is loaded
        with statistics_from(lambda: eval_beside(args.model, weights)[1]):
            job.evaluated = eval_beside(args.model, weights)
        if job.evaluated[0] is None and not args.keep_scaling_factor:
            raise UserError(f"no measured latent statistics for {args.model} ({job.evaluated[1]}): give --stats "
                            f"latents/manifest.json, or --data SHARDS, or run firststage evaluate first; "
                            f"--keep-scaling-factor keeps the model's own normalisation")
    with job.lock("--output"):
        with flag_named("--output"):
            job.check_replaceable()  # under the lock: one export of `out` at a time
        job.load()
        with flag_named("--model", args.model), flag_named("--format", only=FormatRefused), \
                flag_named("--with-discriminator:", only=NoDiscriminator):
            job.check_model()
        with flag_named("--stats" if args.stats else "--data" if args.data else None):
            job.normalisation()
        r = job.run()
    print(r.summary(time.time() - start))


if __name__ == "__main__":
    main()
