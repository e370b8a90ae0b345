"""What the probe reports: the first stage that decodes its samples, the decoded sample grid, FID against held-out
images (when Inception weights are present, as evaluate computes rFID), probe.json and the probe.md table."""

from __future__ import annotations

import json

import torch

from pipeline.errors import UserError
from pipeline.probe.flow import VAL_GRID, sample

TRANSFORMER = "diffusers DiTTransformer2DModel (adaLN-Zero), FlowMatchEulerDiscreteScheduler (Euler)"


def first_stage(model: str, manifest: dict, latents: str):
    """The pinned weights that decode the samples: `--model`, or the model the latent manifest names; None when
    neither names one. A model whose weights are not those that encoded the latents is refused in one line."""
    from pipeline.weights import resolve_weights

    path = model or (manifest.get("model") or {}).get("path")
    if not path:
        return None
    if not model:
        from pipeline.storage import as_path

        if not as_path(path).exists():
            raise UserError(f"{latents}: its manifest's model {path} is not there (moved?); give --model")
    return resolve_weights(path)


def load_first_stage(weights, manifest: dict, latents: str, flag: str):
    """The model of `weights`, checked against the manifest's model_sha256 (the weights that encoded the latents)."""
    from pipeline.latents.format import model_sha256

    model, _ = weights.load()
    have, want = model_sha256(model), manifest.get("model_sha256")
    if want and have != want:
        raise UserError(f"{flag} {weights.given} is not the model that encoded {latents} (weights sha256 {have[:12]} "
                        f"here, {want[:12]} in its manifest)")
    return model


@torch.no_grad()
def decoded_samples(net, vae, normalisation, n: int, shape, steps: int, shift: float, seed: int, device,
                    num_classes: int = 0, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of the transformer (Euler, seeded), and their decodes by the first stage as uint8 [n, 3, H, W]
    (None without a first stage). Classes, for a class-conditional probe, cycle through 0..num_classes-1."""
    from pipeline.models.autoencoder import decode_latents
    from pipeline.models.normalisation import denormalise
    from pipeline.pixels import to_uint8

    gen = torch.Generator().manual_seed(seed)
    zs, images = [], []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        labels = (torch.arange(i, i + k, device=device) % num_classes) if num_classes else None
        z = sample(net, (k, *shape), steps, shift, gen, device, labels)
        zs.append(z.cpu())
        if vae is not None:
            raw = denormalise(z, normalisation) if normalisation is not None else z
            images.append(to_uint8(decode_latents(vae, raw.to(device))).cpu())
    return torch.cat(zs), torch.cat(images) if images else None


def fid_against(images_spec: str, fake: torch.Tensor, fid, batch: int) -> float:
    """FID of decoded samples (uint8) against the held-out images at the samples' size (torchmetrics)."""
    from pipeline.data.loader import batches, make_loader

    fid.update(fake.to(fid.device), real=False)
    loader = make_loader(images_spec, "eval", batch, 0, resolution=fake.shape[-1])
    with batches(loader) as stream:
        for b in stream:
            fid.update(b["image"].to(fid.device), real=True)
    return float(fid.compute())


def validation_curve(metrics_path) -> list[dict]:
    """The run's validations from metrics.jsonl (all of them, also those before a resume)."""
    rows = [json.loads(ln) for ln in open(metrics_path).read().splitlines() if ln.strip()] \
        if metrics_path.is_file() else []
    return [{"step": r["step"], **{k.split("=", 1)[1]: v for k, v in r.items() if k.startswith("val/loss_t=")}}
            for r in rows if "val/loss_t=mean" in r]


def format_table(res: dict) -> str:
    rows = [("latents", f"{res['latents']} ({res['latent_shape']}, {res['samples_seen']} samples seen)"),
            ("validated on", res["validated_on"]), ("steps", res["step"]),
            ("transformer", f"{res['transformer']}: depth {res['depth']}, hidden {res['hidden']}, patch "
                            f"{res['patch']}, {res['parameters_m']:.2f}M parameters, {res['weights']} weights"),
            ("t sampling", f"{res['t_sampling']}, time shift {res['time_shift']:.3f}")]
    rows += [(f"validation loss at t = {t}", res["val_loss"][t]) for t in map(str, VAL_GRID)]
    rows += [("validation loss, mean over t", res["val_loss"]["mean"]), ("decoded by", res["decoded_by"]),
             ("FID of decoded samples", res["fid"])]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {fmt(v)} |" for k, v in rows)


def write_report(tr, vae, weights, final: dict) -> dict:
    """On the main process, after training: the decoded sample grid (samples.png: two rows), the validation curve
    (curve.png), FID when it can be computed, probe.json and probe.md in the run folder. Returns probe.json."""
    from pipeline.metrics.grid import save_grid
    from pipeline.metrics.plots import training_curves
    from pipeline.metrics.report import load_fid
    from pipeline.storage import atomic_write_json, atomic_write_text

    cfg, p, acc, st, out = tr.cfg, tr.cfg.probe, tr.accelerator, tr.state, tr.logs.local
    if vae is not None:
        vae = vae.to(acc.device).eval()
    fid, why = None, "not computed: no first stage decodes the samples (the manifest names none; give --model)"
    if vae is not None:
        fid, why = load_fid(acc.device) if p.images else (None, "not computed: no held-out images (--images)")
    n = max(p.num_samples, p.fid_samples) if fid is not None else p.num_samples
    norm = tr.loader.dataset.normalisation
    with tr.generator() as net:
        _, images = decoded_samples(net, vae, norm, n, tr.shape, p.sample_steps, tr.shift, cfg.seed, acc.device,
                                    p.num_classes, cfg.evaluate.batch_size)
    if images is not None:
        grid = images[:p.num_samples]
        if len(grid) % 2:  # two rows of equal length
            grid = torch.cat([grid, torch.zeros_like(grid[:1])])
        save_grid(grid[:len(grid) // 2], grid[len(grid) // 2:], out / "samples.png")
    fid_value = fid_against(p.images, images, fid, cfg.evaluate.batch_size) if fid is not None else why
    training_curves(out / "metrics.jsonl", out / "curve.png", f"probe on {p.latents}: training loss and validation",
                    "val/loss_t=mean", "validation loss (mean over t)")
    res = {"latents": str(p.latents), "latent_shape": list(tr.shape), "validated_on": p.val or f"{p.latents} (no "
           f"--val: the first {len(tr.val[1])} training latents)", "val_samples": len(tr.val[1]),
           "step": st.step, "samples_seen": st.samples, "transformer": TRANSFORMER, "depth": p.depth,
           "hidden": p.hidden, "patch": p.patch, "parameters_m": sum(q.numel() for q in net.parameters()) / 1e6,
           "weights": "EMA" if tr.ema is not None else "raw", "t_sampling": p.t_sampling, "time_shift": tr.shift,
           "t_grid": list(VAL_GRID), "val_loss": final, "curve": validation_curve(out / "metrics.jsonl"),
           "decoded_by": weights.describe() if vae is not None else "nothing (no first stage)",
           "samples_png": "samples.png" if images is not None else None, "fid": fid_value,
           "fid_samples": n if isinstance(fid_value, float) else 0, "seed": cfg.seed}
    atomic_write_json(out / "probe.json", res)
    atomic_write_text(out / "probe.md", f"# Generation probe of {p.latents}\n\n{format_table(res)}\n\n"
                      f"![samples](samples.png)\n\n![validation curve](curve.png)\n")
    tr.logs.sync()
    return res
