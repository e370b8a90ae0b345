"""firststage evaluate: reconstruction quality, likelihood bounds and latent health of a first-stage model.

  firststage evaluate --model runs/klf8 --data 'val-{000000..000009}.tar' --num-samples 5000
  firststage evaluate --model path/to/diffusers_vae_folder --data ...     # any diffusers autoencoder folder
  firststage evaluate --model stabilityai/sd-vae-ft-mse --data ...        # a Hub id: its autoencoder, cached
  accelerate launch -m stages.evaluate --model ... --data ...            # split across processes, same numbers

Prints a table and writes eval.json, eval.md and a reconstruction grid PNG next to the model (or to --output).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from pipeline.data.loader import batches, make_loader, plan_subset
from pipeline.distributed import all_reduce, print0
from pipeline.errors import UserError
from pipeline.metrics.evaluator import Evaluator
from pipeline.metrics.plots import reconstruction_grid
from pipeline.metrics.report import format_table, load_fid, load_perceptual
from pipeline.models.families import family_of
from pipeline.progress import Progress
from pipeline.storage import ObjectPath, as_path, atomic_write_json, atomic_write_text
from stages.common import add_alias_flags, alias_overrides, alias_errors, flag_named, pinned_weights, stage_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, diffusers folder, a single file, or "
                                                  "a Hugging Face Hub id (org/name[@revision])")
    p.add_argument("--data", required=True, help="shards: brace pattern, folder, list file or manifest.json")
    p.add_argument("--output", help="folder for eval.json, eval.md and the grid (default: the model folder, the "
                                    "folder of a single file, or ORG--NAME/ for a Hub id)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights of a firststage checkpoint, not EMA")
    add_alias_flags(p, ALIASES)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. evaluate.iwae_k=64 evaluate.batch_size=32 data.resolution=512")
    return p


# flags that are aliases of config keys (one schema: the config validates them)
ALIASES = {"--num-samples": ("evaluate.num_samples", int, "samples to evaluate"),
           "--lpips-backbone": ("evaluate.lpips_backbone", str, "pretrained, or random (tests only)")}


@stage_main
def main(argv=None) -> None:
    from accelerate import PartialState

    args = build_parser().parse_intermixed_args(argv)
    start = time.time()
    state = PartialState(cpu=not torch.cuda.is_available())
    weights = pinned_weights(args.model, ema=not args.no_ema)  # a run folder: the same checkpoint on every rank
    with flag_named("--model"):
        weights.require_decoder("evaluate reconstructs images: give the full model (its run, a diffusers folder or a "
                                "single file)")
    out = as_path(args.output) if args.output else weights.beside  # beside the model: on object storage too
    there = out if isinstance(out, ObjectPath) else next(p for p in (out, *out.parents) if p.exists())
    if there.is_file():  # checked before evaluating: a result is never computed and then lost
        raise UserError(f"--output {out}: {there} is a file, not a folder")
    with alias_errors(ALIASES):
        model, cfg = weights.load(args.overrides + alias_overrides(args, ALIASES))
    n = cfg.evaluate.num_samples
    urls, limits, planned = plan_subset(args.data, n, cfg.data.allow_pipe)
    if planned == 0:
        raise UserError(f"--data {args.data}: the shards hold no samples")
    asked = args.num_samples is not None or any(o.startswith("evaluate.num_samples=") for o in args.overrides)
    if planned < n and asked:
        print0(f"evaluate: warning: asked for {n} samples, the data holds {planned}; evaluating {planned}",
               file=sys.stderr)
    family_of(model).normalisation(model)  # a class whose latent normalisation cannot be determined: refused now
    device = state.device
    model = model.to(device).eval()
    fid, fid_reason = load_fid(device)
    loader = make_loader(urls, "eval", cfg.evaluate.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
                         rank=state.process_index, world_size=state.num_processes, limits=limits,
                         max_member_bytes=cfg.data.max_member_bytes)
    with Progress("evaluate", planned, "sample", enabled=state.is_main_process) as bar:
        bar.phase("reconstruction", planned, "sample")  # then the likelihood bounds (Evaluator.finalize)
        ev = Evaluator(model, replace(cfg.evaluate, num_samples=planned),
                       load_perceptual(cfg.evaluate.lpips_backbone, device), cfg.data.resolution, device, fid, bar)
        with batches(loader) as stream:
            for batch in stream:
                ev.add(batch["image"], batch["__key__"])
                bar.update(len(batch["__key__"]) * state.num_processes)  # the main process's count, scaled
        res = ev.finalize(lambda tensors: all_reduce(tensors, "sum", device))
    if res["samples"] == 0:
        raise UserError(f"--data {args.data}: no decodable images among the {planned} samples read")
    res["rfid"] = float(fid.compute()) if fid is not None else fid_reason
    res["model"], res["data"] = str(args.model), str(args.data)
    res["weights"] = weights.describe()
    table = format_table(res)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval.json", res)
        atomic_write_text(out / "eval.md", f"# Evaluation of {args.model}\n\nData: {args.data}\n\n{table}\n")
        if ev.grid:
            keys, images, recs, tile_psnr = zip(*ev.grid)
            reconstruction_grid(torch.stack(images).permute(0, 2, 3, 1).numpy(),
                                torch.stack(recs).permute(0, 2, 3, 1).numpy(), list(tile_psnr), list(keys),
                                out / "eval_grid.png", f"{as_path(args.model).name}: inputs and their "
                                f"reconstructions ({len(keys)} of {res['samples']}; mean PSNR {res['psnr']:.2f} dB)")
        print0(table)
        print0(f"evaluate: {res['samples']} samples from {args.data} with {res['weights']} on {state.num_processes} "
               f"process(es) in {time.time() - start:.1f}s; wrote {out / 'eval.json'}, eval.md, eval_grid.png")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
