"""firststage export: hand the autoencoder to Stable-Diffusion-style models.

  firststage export --model runs/klf8 --output exports/klf8-vae                                # diffusers folder
  firststage export --model runs/klf8 --output exports/klf8.safetensors --format single-file   # LDM / SD key names
  firststage export --model runs/klf8 --output exports/klf8-encoder --format encoder-only      # + torch.export program

The latent factors come from measured statistics: --stats latents/manifest.json (an encode manifest of this model),
--data SHARDS [--num-samples N] (measured now), or the eval.json that evaluate wrote beside the model; without any,
the export refuses unless --keep-scaling-factor. Every export writes a model card, is written under a temporary
name and renamed, and never replaces an existing output without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.checkpoint import (
    CHECKPOINTS,
    describe_weights,
    load_autoencoder,
    pin_model_path,
    read_trainer_state,
    resolve_model_path,
)
from pipeline.config import config_to_dict
from pipeline.errors import UserError
from pipeline.io import atomic_write_text, staged_output
from stages.common import stage_main

FORMATS = ("diffusers", "single-file", "encoder-only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, diffusers folder or a single file")
    p.add_argument("--output", required=True, help="folder (diffusers, encoder-only) or .safetensors file")
    p.add_argument("--format", choices=FORMATS, default="diffusers")
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


def eval_beside(given: str, pinned: str, weights: str) -> tuple[dict | None, str]:
    """The newest eval.json beside the model (where --model pointed, the checkpoint folder, then its run folder)
    that evaluated exactly these weights; (None, why not) otherwise."""
    kind, folder = resolve_model_path(pinned)
    places = [Path(given), folder] + ([folder.parent.parent] if folder.parent.name == CHECKPOINTS else [])
    found = sorted({p / "eval.json" for p in places if (p / "eval.json").is_file()}, key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        res = json.loads(path.read_text())
        if res.get("weights") == weights and "latents" in res:
            return res, str(path)
    if found:
        return None, f"{found[-1]} evaluated other weights ({json.loads(found[-1].read_text()).get('weights')})"
    return None, "no eval.json beside the model"


def latent_factors(args, model_path: str, weights: str, model, cfg) -> dict:
    """{'scaling_factor', 'shift_factor', 'source'} from the measured statistics the user pointed at.
    `weights`: describe_weights of the pinned model path (an eval.json counts only if it evaluated exactly those)."""
    shift = lambda st: st["shift_factor"] if args.shift else None  # noqa: E731
    if args.stats:
        from pipeline.latents import read_manifest
        from pipeline.latents.format import model_sha256

        m = read_manifest(args.stats)
        if m["model_sha256"] != model_sha256(model):
            raise UserError(f"--stats {args.stats}: latents of another model (weights hash differs)")
        st = m["statistics"]
        return {"scaling_factor": st["scaling_factor"], "shift_factor": shift(st), "source": f"encode manifest {args.stats}"}
    if args.data:
        from pipeline.data.loader import plan_subset
        from pipeline.latents.encoder import measure_statistics

        urls, limits, planned = plan_subset(args.data, args.num_samples)
        st = measure_statistics(model, urls, limits, cfg.data.resolution, cfg.encode.batch_size)
        if not st:
            raise UserError(f"--data {args.data}: no decodable image to measure the latent statistics on")
        return {"scaling_factor": st["scaling_factor"], "shift_factor": shift(st),
                "source": f"measured on {planned} samples of {args.data}"}
    res, why = eval_beside(args.model, model_path, weights)
    if res is not None:
        st = res["latents"]
        return {"scaling_factor": st["scaling_factor"], "shift_factor": shift(st), "source": f"{why} ({res['samples']} samples)"}
    if args.keep_scaling_factor:
        return {"scaling_factor": cfg.model.scaling_factor, "shift_factor": cfg.model.shift_factor if args.shift else None,
                "source": "the model's own config (--keep-scaling-factor: not measured)"}
    raise UserError(f"no measured latent statistics for {args.model} ({why}): give --stats latents/manifest.json, or "
                    f"--data SHARDS, or run firststage evaluate first; --keep-scaling-factor keeps the configured "
                    f"{cfg.model.scaling_factor:g}")


def card_inputs(args, model_path: str, cfg) -> tuple[dict | None, str | None, str | None]:
    """(trainer.json, data manifest summary, eval table) for the model card, where they exist."""
    from pipeline.export.card import data_summary

    kind, folder = resolve_model_path(model_path)
    trainer = read_trainer_state(folder) if kind == "checkpoint" else None
    data = Path(cfg.data.train) if cfg.data.train else None
    manifest = data / "manifest.json" if data and data.is_dir() else data
    summary = data_summary(json.loads(manifest.read_text())) if manifest and manifest.suffix == ".json" and manifest.is_file() else None
    evals = [p / "eval.md" for p in (Path(args.model), folder) if (p / "eval.md").is_file()]
    return trainer, summary, evals[0].read_text() if evals else None


@stage_main
def main(argv=None) -> None:
    from pipeline.export.card import model_card
    from pipeline.models.autoencoder import is_vq

    args = build_parser().parse_intermixed_args(argv)
    start = time.time()
    out = Path(args.output)
    if args.format == "single-file" and out.suffix != ".safetensors":
        raise UserError(f"--output {out}: a single-file export is a .safetensors file")
    if out.exists() and not args.overwrite:  # before any model is loaded
        raise UserError(f"--output {out} exists; choose another name or pass --overwrite")
    model_path = pin_model_path(args.model)  # resolved once: a checkpoint written meanwhile changes nothing here
    weights = describe_weights(model_path, not args.no_ema)
    model, cfg = load_autoencoder(model_path, ema=not args.no_ema, overrides=args.overrides)
    model = model.eval().requires_grad_(False)
    factors = latent_factors(args, model_path, weights, model, cfg)
    section = config_to_dict(cfg)["model"]
    cls = "VQModel" if is_vq(model) else "AutoencoderKL"
    card = model_card(args.format, cls, str(out), f"{args.model}: {weights}", cfg, factors,
                      *card_inputs(args, model_path, cfg))
    with staged_output(out, args.overwrite) as tmp, torch.no_grad():
        if args.format == "diffusers":
            from pipeline.export.diffusers import save_diffusers

            save_diffusers(model, tmp, factors["scaling_factor"], factors["shift_factor"])
        elif args.format == "single-file":
            from pipeline.export.single_file import save_single_file

            save_single_file(model, tmp, section, cfg.data.resolution, factors["scaling_factor"],
                             factors["shift_factor"], args.prefix)
        else:
            from pipeline.export.encoder_only import save_encoder_only

            save_encoder_only(model, tmp, section, cfg.data.resolution, factors["scaling_factor"], factors["shift_factor"])
        if tmp.is_dir():
            (tmp / "README.md").write_text(card)
    card_path = out / "README.md" if out.is_dir() else out.with_suffix(".md")
    if not out.is_dir():
        atomic_write_text(card_path, card)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shift = f", shift_factor {factors['shift_factor']:.5g}" if factors["shift_factor"] is not None else ""
    print(f"export: {args.format} {out} ({cls}, {params:.1f}M parameters, {weights}); "
          f"scaling_factor {factors['scaling_factor']:.5g}{shift} from {factors['source']}; model card {card_path}; "
          f"{time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
