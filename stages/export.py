"""firststage export: hand the autoencoder to Stable-Diffusion-style models.

  firststage export --model runs/klf8 --output exports/klf8-vae                                # diffusers folder
  firststage export --model runs/klf8 --output exports/klf8.safetensors --format single-file   # LDM / SD key names
  firststage export --model runs/klf8 --output exports/klf8-encoder --format encoder-only      # + torch.export program

The latent factors come from measured statistics: --stats latents/manifest.json (an encode manifest of this model),
--data SHARDS [--num-samples N] (measured now), or the eval.json that evaluate wrote beside the model; without any,
the export refuses unless --keep-scaling-factor. Every export writes a model card and is one unit of the commit
protocol (the files, then the card); an existing output is never replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.config import config_to_dict
from pipeline.errors import UserError
from pipeline.latents.factors import NoStatistics, latent_factors
from pipeline.storage import Unit, respect_umask
from pipeline.weights import EXPORT_FORMATS
from pipeline.weights.card import card_inputs, model_card
from stages.common import flag_named, pinned_weights, stage_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, diffusers folder or a single file")
    p.add_argument("--output", required=True, help="folder (diffusers, encoder-only) or .safetensors file")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="diffusers")
    p.add_argument("--stats", metavar="MANIFEST", help="an encode manifest.json of this model: its latent factors")
    p.add_argument("--data", metavar="SHARDS", help="measure the latent factors now on these image shards")
    p.add_argument("--num-samples", type=int, default=1000, help="samples measured with --data (default 1000)")
    p.add_argument("--keep-scaling-factor", action="store_true",
                   help="no measured statistics: keep the model's configured scaling_factor")
    p.add_argument("--shift", action="store_true", help="also set shift_factor (SD3 / FLUX convention)")
    p.add_argument("--prefix", default="", help="single-file key prefix, e.g. first_stage_model. for full-checkpoint tools")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights of a firststage checkpoint, not EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.resolution=512 (encoder-only example size)")
    return p


def card_path(out: Path) -> Path:
    """The model card: README.md in a folder, NAME.md beside a single file. It is the export's completion record."""
    return out.with_suffix(".md") if out.suffix == ".safetensors" else out / "README.md"


@stage_main
def main(argv=None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    start = time.time()
    out = Path(args.output)
    if args.format == "single-file" and out.suffix != ".safetensors":
        raise UserError(f"--output {out}: a single-file export is a .safetensors file")
    unit = Unit(card_path(out), [out])
    taken = [p for p in (out, card_path(out)) if unit.store.exists(p)]
    if taken and not args.overwrite:  # before any model is loaded
        raise UserError(f"--output {taken[0]} exists; choose another name or pass --overwrite")
    weights = pinned_weights(args.model, ema=not args.no_ema)  # resolved once: a checkpoint written meanwhile changes nothing
    model, cfg = weights.load(args.overrides)
    model = model.eval().requires_grad_(False)
    try:
        with flag_named("--stats" if args.stats else "--data" if args.data else None):
            factors = latent_factors(weights, model, cfg, args.stats, args.data, args.num_samples,
                                     args.keep_scaling_factor, args.shift)
    except NoStatistics as e:
        raise UserError(f"{e}: give --stats latents/manifest.json, or --data SHARDS, or run firststage evaluate "
                        f"first; --keep-scaling-factor keeps the configured {cfg.model.scaling_factor:g}") from None
    section = config_to_dict(cfg)["model"]
    cls = type(model).__name__
    card = model_card(args.format, cls, str(out), f"{args.model}: {weights.describe()}", cfg, factors,
                      *card_inputs(weights, cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = unit.staging(out)
    try:
        with torch.no_grad():
            EXPORT_FORMATS[args.format].save(model, staged, section, cfg.data.resolution, factors["scaling_factor"],
                                             factors["shift_factor"], prefix=args.prefix)
        for f in [staged] if staged.is_file() else [q for q in staged.rglob("*") if q.is_file()]:
            respect_umask(f)
        if args.overwrite:
            Unit(card_path(out), [out]).undo()  # the old export stops counting (card first), then goes
        unit.commit(card.encode())
    finally:
        unit.discard()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shift = f", shift_factor {factors['shift_factor']:.5g}" if factors["shift_factor"] is not None else ""
    print(f"export: {args.format} {out} ({cls}, {params:.1f}M parameters, {weights.describe()}); "
          f"scaling_factor {factors['scaling_factor']:.5g}{shift} from {factors['source']}; model card "
          f"{card_path(out)}; {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
