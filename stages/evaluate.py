"""firststage evaluate: reconstruction quality, likelihood bounds and latent health of a first-stage model.

  firststage evaluate --model runs/klf8 --data 'val-{000000..000009}.tar' --num-samples 5000
  firststage evaluate --model path/to/diffusers_vae_folder --data ...     # any AutoencoderKL / VQModel folder
  accelerate launch -m stages.evaluate --model ... --data ...            # split across processes, same numbers

Prints a table and writes eval.json, eval.md and a reconstruction grid PNG next to the model (or to --output).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.checkpoint import describe_weights, load_autoencoder
from pipeline.data.loader import make_loader, plan_subset
from pipeline.errors import UserError
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.metrics.evaluator import Evaluator
from pipeline.train.module import save_grid
from stages.common import add_alias_flags, agreed_model_path, alias_overrides, all_reduce, flags_named, print0, stage_main

LPIPS_NETS = ("vgg", "alex")  # the two the published tables use


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firststage evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, or diffusers AutoencoderKL/VQModel folder")
    p.add_argument("--data", required=True, help="shards: brace pattern, folder, list file or manifest.json")
    p.add_argument("--output", help="folder for eval.json, eval.md and the grid (default: the model folder)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights of a firststage checkpoint, not EMA")
    add_alias_flags(p, ALIASES)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. evaluate.iwae_k=64 evaluate.batch_size=32 data.resolution=512")
    return p


# flags that are aliases of config keys (one schema: the config validates them)
ALIASES = {"--num-samples": ("evaluate.num_samples", int, "samples to evaluate"),
           "--lpips-backbone": ("evaluate.lpips_backbone", str, "pretrained, or random (tests only)")}


def load_perceptual(backbone: str, device) -> dict:
    from pipeline.losses.perceptual import Perceptual

    out = {}
    for net in LPIPS_NETS:
        try:
            out[net] = Perceptual(net, backbone).to(device)
        except UserError as e:
            out[net] = f"no {net} backbone weights ({str(e).split(', which')[0].split('weights ')[-1]} missing)"
    return out


def load_fid(device):
    """torchmetrics' FID when it and its Inception weights are available; else (None, why not)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except Exception:
        return None, "not computed: no Inception weights (pip install torchmetrics torch-fidelity, run once online)"
    try:
        return FrechetInceptionDistance(feature=2048).to(device), None
    except Exception as e:
        return None, f"not computed: no Inception weights ({type(e).__name__}; run once online to cache them)"


def format_table(res: dict) -> str:
    rows = [("samples", res["samples"]), ("weights", res.get("weights", "")), ("PSNR (dB)", res["psnr"]),
            ("PSNR of the mean-colour baseline (dB)", res["psnr_mean_colour"]), ("SSIM", res["ssim"])]
    rows += [(f"LPIPS ({n})", res[f"lpips_{n}"]) for n in LPIPS_NETS if f"lpips_{n}" in res]
    rows.append(("rFID", res.get("rfid")))
    if "kl_per_sample" in res:
        au = res["active_units"]
        rows += [("KL per sample (nats)", res["kl_per_sample"]),
                 ("KL per channel (nats)", ", ".join(f"{v:.4g}" for v in res["kl_per_channel"])),
                 ("active units", f"{au['active_units']} / {au['latent_dims']} (Var_x E[z|x] > {au['threshold']})")]
        lik = res.get("likelihood")
        if lik:
            bpd = lik["bits_per_dim"]
            rows.append((f"ELBO (bits/dim, {lik['samples']} images)", bpd["elbo"]))
            rows += [(f"IWAE k={k.split('_')[1]} (bits/dim)", v) for k, v in bpd.items() if k.startswith("iwae_")]
            rows.append(("decoder likelihood", lik["decoder"]))
    if "codebook" in res:
        cb = res["codebook"]
        rows += [("codebook usage", f"{cb['used']} / {cb['size']} ({cb['usage']:.1%})"),
                 ("codebook perplexity", cb["perplexity"]), ("dead codes", cb["dead_codes"])]
    lat = res["latents"]
    rows += [("latent mean / std", f"{lat['mean']:.4g} / {lat['std']:.4g}"),
             ("scaling_factor (1/std)", lat["scaling_factor"]), ("shift_factor (mean)", lat["shift_factor"]),
             ("latent channel std", ", ".join(f"{v:.3g}" for v in lat["channel_std"]))]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    cell = lambda v: fmt(v).replace("|", "\\|")  # noqa: E731 (a | inside a value would split the markdown cell)
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {cell(v)} |" for k, v in rows)


@stage_main
def main(argv=None) -> None:
    from accelerate import PartialState

    args = build_parser().parse_intermixed_args(argv)
    start = time.time()
    state = PartialState(cpu=not torch.cuda.is_available())
    model_path = agreed_model_path(args.model)  # a run folder: the same checkpoint on every rank, and in eval.json
    with flags_named(ALIASES):
        model, cfg = load_autoencoder(model_path, ema=not args.no_ema, overrides=args.overrides + alias_overrides(args, ALIASES))
    n = cfg.evaluate.num_samples
    urls, limits, planned = plan_subset(args.data, n)
    if planned == 0:
        raise UserError(f"--data {args.data}: the shards hold no samples")
    asked = args.num_samples is not None or any(o.startswith("evaluate.num_samples=") for o in args.overrides)
    if planned < n and asked:
        print0(f"evaluate: warning: asked for {n} samples, the data holds {planned}; evaluating {planned}",
               file=sys.stderr)
    device = state.device
    model = model.to(device).eval()
    fid, fid_reason = load_fid(device)
    ev = Evaluator(model, replace(cfg.evaluate, num_samples=planned), load_perceptual(cfg.evaluate.lpips_backbone, device),
                   cfg.data.resolution, device, fid)
    loader = make_loader(urls, "eval", cfg.evaluate.batch_size, cfg.data.num_workers, resolution=cfg.data.resolution,
                         rank=state.process_index, world_size=state.num_processes, limits=limits)
    for batch in loader:
        ev.add(batch["image"], batch["__key__"])
    res = ev.finalize(lambda tensors: all_reduce(tensors, "sum", device))
    if res["samples"] == 0:
        raise UserError(f"--data {args.data}: no decodable images among the {planned} samples read")
    res["rfid"] = float(fid.compute()) if fid is not None else fid_reason
    res["model"], res["data"] = str(args.model), str(args.data)
    res["weights"] = describe_weights(model_path, not args.no_ema)
    table = format_table(res)
    if state.is_main_process:
        out = Path(args.output or args.model)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval.json", res)
        atomic_write_text(out / "eval.md", f"# Evaluation of {args.model}\n\nData: {args.data}\n\n{table}\n")
        if ev.grid is not None:
            save_grid(*ev.grid, out / "eval_grid.png")
        print0(table)
        print0(f"evaluate: {res['samples']} samples from {args.data} with {res['weights']} on {state.num_processes} "
               f"process(es) in {time.time() - start:.1f}s; wrote {out / 'eval.json'}, eval.md, eval_grid.png")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
