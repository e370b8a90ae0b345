"""What an evaluation reports: the metric networks that could be loaded (and why not, for those that could not),
and the table of results that evaluate prints, writes to eval.md and the model card repeats."""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.models.normalisation import describe

LPIPS_NETS = ("vgg", "alex")  # the two the published tables use


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
    probe = res.get("diffusability")
    if probe:
        eq = probe["equivariance_psnr"]
        rows += [(f"equivariance PSNR, {name.replace('_', ' ').replace('rot', 'rotation ')} (dB)", v)
                 for name, v in eq.items()]
        rows += [("latent high-frequency share (DCT energy above Nyquist/2)", probe["high_frequency_share"]),
                 ("high-frequency share per channel", ", ".join(f"{v:.3g}" for v in
                                                                probe["high_frequency_share_per_channel"][:16])
                  + (", ..." if len(probe["high_frequency_share_per_channel"]) > 16 else ""))]
    lat, norm = res["latents"], res["normalisation"]
    rows += [("latent mean / std", f"{lat['mean']:.4g} / {lat['std']:.4g}"),
             ("scaling_factor (1/std)", lat["scaling_factor"]), ("shift_factor (mean)", lat["shift_factor"]),
             ("latent channel std", ", ".join(f"{v:.3g}" for v in lat["channel_std"][:16])
              + (", ..." if len(lat["channel_std"]) > 16 else "")),
             ("the model's latent normalisation", describe(norm)),
             ("normalised latent mean / std", f"{norm['normalised_mean']:.4g} / {norm['normalised_std']:.4g}")]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    cell = lambda v: fmt(v).replace("|", "\\|")  # noqa: E731 (a | inside a value would split the markdown cell)
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {cell(v)} |" for k, v in rows)
