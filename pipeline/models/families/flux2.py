"""FLUX.2's autoencoder (diffusers' AutoencoderKLFlux2): an SD-style KL autoencoder with 32 latent channels whose
pipeline patchifies the latent 2x2 (128 channels) and normalises it with the VAE's BatchNorm running statistics,
std = sqrt(running_var + batch_norm_eps) (pipelines/flux2/pipeline_flux2.py `_encode_vae_image`). The model never
runs that BatchNorm itself: it only holds the statistics, which an export rewrites when they were measured anew."""

from __future__ import annotations

from pipeline.models.families.base import Family

PATCH = 2


class Flux2Family(Family):
    name = "flux2"
    class_names = ("AutoencoderKLFlux2",)

    def normalisation(self, model) -> dict:
        import torch

        bn = model.bn
        std = torch.sqrt(bn.running_var.double() + model.config.batch_norm_eps)
        return {"kind": "per_channel", "mean": bn.running_mean.double().tolist(), "std": std.tolist(), "patch": PATCH,
                "source": "the model's BatchNorm running statistics"}

    def set_normalisation(self, model, spec: dict) -> None:
        import torch

        with torch.no_grad():
            model.bn.running_mean.copy_(torch.tensor(spec["mean"]))
            model.bn.running_var.copy_(torch.tensor(spec["std"], dtype=torch.float64).pow(2) - model.config.batch_norm_eps)
