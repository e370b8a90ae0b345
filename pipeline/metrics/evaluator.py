"""Accumulate evaluation metrics over batches, on any number of ranks, with results independent of that number.

Every statistic is a float64 sum (or count) that is all-reduced once at the end; the posterior noise of each image
comes from a generator seeded by its sample key; the likelihood subset is chosen by a hash of the key. So 1 and N
processes give the same numbers up to float rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from pipeline.config import EvaluateConfig
from pipeline.losses.kl import kl_elements, kl_per_sample
from pipeline.metrics.diffusability import DiffusabilityProbe
from pipeline.metrics.image import mean_colour, psnr, ssim
from pipeline.metrics.latent import MomentSums, active_units, latent_statistics, normalised_statistics
from pipeline.metrics.likelihood import bits_per_dim, importance_log_weights, iwae_from_log_weights
from pipeline.models.autoencoder import family_of, key_generator, key_noise, key_seed, reparameterize
from pipeline.models.normalisation import patchify
from pipeline.models.quantizer import perplexity
from pipeline.pixels import to_model_input, to_uint8


GRID_SAMPLES = 48  # the evaluation figure shows every sample up to this many


class Evaluator:
    def __init__(self, model, opts: EvaluateConfig, perceptual: dict, resolution: int, device="cpu", fid=None,
                 progress=None):
        """perceptual: name -> LPIPS module, or name -> reason string when it could not be loaded. progress: a
        pipeline.progress.Progress whose line the evaluator keeps naming what it does (its phases: reconstruction,
        with the diffusability probe per batch, then the likelihood bounds draw by draw), or None.
        Every sum exists from the start, so ranks that receive no images still join the same reductions."""
        self.model, self.opts, self.device, self.fid, self.progress = model, opts, device, fid, progress
        self.perceptual = perceptual
        self.family = family_of(model)
        self.normalisation = self.family.normalisation(model)
        self.patch = self.normalisation.get("patch", 1)  # statistics in the normalisation's layout (FLUX.2: 2x2)
        f = self.family.downsampling_factor(model)
        latent_c = self.family.latent_channels(model)
        self.image_dims = self.family.image_channels(model) * resolution * resolution
        names = ["n", "psnr", "psnr_mean_colour", "ssim", "sq_err"] + [f"lpips_{k}" for k, v in perceptual.items() if not isinstance(v, str)]
        self.sums = {k: torch.zeros((), dtype=torch.float64) for k in names}
        self.posterior = self.family.has_posterior  # KL terms, active units and likelihood bounds need one
        if self.posterior:
            self.sums["kl"] = torch.zeros((), dtype=torch.float64)
            self.sums["kl_channel"] = torch.zeros(latent_c, dtype=torch.float64)
        self.au = MomentSums((latent_c, resolution // f, resolution // f)) if self.posterior else None
        self.ch = MomentSums((latent_c * self.patch**2,))
        self.all = MomentSums(())
        self.buffered: list[tuple] = []  # likelihood subset: (x, mean, logvar, keys), bounds computed at the end
        num_codes = self.family.num_codes(model)
        self.code_counts = torch.zeros(num_codes, dtype=torch.float64) if num_codes else None
        self.grid: list[tuple] = []  # (key, image, reconstruction, PSNR) of the first GRID_SAMPLES, for the figure
        self.factor = f
        self.probe = DiffusabilityProbe(latent_c, resolution // f, self.family.any_size) if opts.diffusability else None

    def _add(self, name: str, value: torch.Tensor, per_channel: bool = False) -> None:
        v = value.detach().double().cpu()
        self.sums[name] = self.sums[name] + (v.sum(0) if per_channel else v.sum())

    def _now(self, what: str) -> None:
        if self.progress is not None:
            self.progress.update(0, now=what)

    @torch.no_grad()
    def add(self, images: torch.Tensor, keys: list[str]) -> None:
        images = images.to(self.device)
        x = to_model_input(images)
        n = images.shape[0]
        lat = self.family.encode(self.model, x)
        rec = self.family.decode(self.model, lat.mean)  # KL: from the posterior mean (the mode); VQ: from z_q
        z = lat.mean
        if self.code_counts is not None:
            self.code_counts += torch.bincount(lat.codes.flatten(), minlength=len(self.code_counts)).double().cpu()
        if self.posterior:
            mean, logvar = lat.mean, lat.logvar
            self._add("kl", kl_per_sample(mean, logvar))
            self._add("kl_channel", kl_elements(mean, logvar).sum((2, 3)), per_channel=True)
            self.au.add(mean)
            z = reparameterize(mean, logvar, key_noise(keys, mean.shape[1:]))  # what a diffusion model sees
            rate = self.opts.likelihood_samples / max(1, self.opts.num_samples)
            chosen = [i for i, k in enumerate(keys) if (key_seed(k) % 1_000_003) / 1_000_003 < rate]
            if chosen:
                idx = torch.tensor(chosen)
                self.buffered.append((x[idx].cpu(), mean[idx].cpu(), logvar[idx].cpu(), [keys[i] for i in chosen]))
        rec8 = to_uint8(rec)
        self._add("n", torch.tensor(float(n)))
        tile_psnr = psnr(images, rec8)
        self._add("psnr", tile_psnr.clamp(max=100.0))
        self._add("psnr_mean_colour", psnr(images, mean_colour(images)).clamp(max=100.0))
        self._add("ssim", ssim(images, rec8))
        self._add("sq_err", (x.double() - rec.double().clamp(-1, 1)).pow(2).flatten(1).mean(1))
        for name, lp in self.perceptual.items():
            if not isinstance(lp, str):
                self._add(f"lpips_{name}", lp(x, rec.float()))
        z = patchify(z.detach(), self.patch)
        zc = z.double().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        self.ch.add(zc)
        self.all.add(zc.reshape(-1))
        if self.probe is not None:
            self.probe.add(lambda zt: self.family.decode(self.model, zt), lat.mean, x, self.factor,
                           lambda name, i, k: self._now(f"diffusability probe {name} ({i} of {k})"))
            self._now("reconstruction")
        if self.fid is not None:
            self.fid.update(images, real=True)
            self.fid.update(rec8, real=False)
        if len(self.grid) < GRID_SAMPLES:
            self.grid += [(keys[i], images[i].cpu(), rec8[i].cpu(), tile_psnr[i].item())
                          for i in range(min(n, GRID_SAMPLES - len(self.grid)))]

    @torch.no_grad()
    def _likelihood(self, sigma: float) -> None:
        decode = lambda z: self.family.decode(self.model, z.to(self.device))  # noqa: E731
        k = self.opts.iwae_k
        ks = sorted({1, *[2**i for i in range(1, 20) if 2**i < k], k})
        self.sums = {name: torch.zeros((), dtype=torch.float64) for name in ["lik_n", "elbo"] + [f"iwae_{kk}" for kk in ks]}
        images = sum(x.shape[0] for x, *_ in self.buffered)
        if self.progress is not None and self.buffered:  # one decode per draw and batch: the unit that advances
            self.progress.phase("likelihood bounds", len(self.buffered) * k, "draw")
        done = 0
        for x, mean, logvar, keys in self.buffered:
            gens = [key_generator("iwae/" + key) for key in keys]
            tell = None if self.progress is None else (  # noqa: E731
                lambda j, done=done: self.progress.update(1, k=f"{j} of {k}", images=f"{done}/{images}"))
            log_w = importance_log_weights(decode, x.to(self.device), mean.to(self.device), logvar.to(self.device),
                                           k, sigma, gens, tell).cpu()
            done += x.shape[0]
            if self.progress is not None:
                self.progress.update(0, images=f"{done}/{images}")
            self._add("lik_n", torch.tensor(float(x.shape[0])))
            self._add("elbo", log_w.mean(1))
            for kk in ks:
                self._add(f"iwae_{kk}", iwae_from_log_weights(log_w, kk))

    def finalize(self, reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] = lambda t: t) -> dict:
        """`reduce` sums a list of tensors across ranks (identity in one process). Returns the results dict."""
        names = sorted(self.sums)
        reduced = reduce([self.sums[k] for k in names])
        sums = dict(zip(names, reduced))
        n = float(sums["n"])
        if n == 0:
            return {"samples": 0}
        res = {"samples": int(n), "psnr": float(sums["psnr"]) / n, "ssim": float(sums["ssim"]) / n,
               "psnr_mean_colour": float(sums["psnr_mean_colour"]) / n}
        for name, lp in self.perceptual.items():
            res[f"lpips_{name}"] = float(sums[f"lpips_{name}"]) / n if not isinstance(lp, str) else f"not computed: {lp}"
        # latent statistics
        ch, al = reduce(self.ch.tensors()), reduce(self.all.tensors())
        self.ch.n, self.ch.s, self.ch.ss = ch
        self.all.n, self.all.s, self.all.ss = al
        res["latents"] = latent_statistics(self.ch, self.all)
        res["normalisation"] = {**self.normalisation, **normalised_statistics(self.ch, self.normalisation)}
        if self.probe is not None:
            keys = sorted(self.probe.sums)
            res["diffusability"] = self.probe.results(dict(zip(keys, reduce([self.probe.sums[k] for k in keys]))), n)
        if self.code_counts is not None:
            counts = reduce([self.code_counts])[0]
            res["codebook"] = {
                "size": int(counts.numel()),
                "used": int((counts > 0).sum()),
                "usage": float((counts > 0).double().mean()),
                "dead_codes": int((counts == 0).sum()),
                "perplexity": float(perplexity(counts)),
            }
        if not self.posterior:
            return res
        res["kl_per_sample"] = float(sums["kl"]) / n
        res["kl_per_channel"] = [round(float(v) / n, 6) for v in sums["kl_channel"]]
        self.au.n, self.au.s, self.au.ss = reduce(self.au.tensors())
        res["active_units"] = active_units(self.au.var(), self.opts.active_unit_threshold)
        mse = float(sums["sq_err"]) / n
        sigma = self.opts.decoder_sigma or max(math.sqrt(mse), 1e-3)
        self._likelihood(sigma)
        names = sorted(self.sums)
        lik = dict(zip(names, reduce([self.sums[k] for k in names])))
        m = float(lik["lik_n"])
        if m > 0:
            bounds = {"elbo": float(lik["elbo"]) / m}
            bounds.update({k: float(v) / m for k, v in lik.items() if k.startswith("iwae_")})
            kind = "learned" if not self.opts.decoder_sigma else "fixed"
            res["likelihood"] = {
                "decoder": f"discretised Gaussian, sigma {sigma:.5g} ({kind}) in [-1, 1] units, 8-bit bins",
                "samples": int(m),
                "nats_per_image": bounds,
                "bits_per_dim": {k: bits_per_dim(v, self.image_dims) for k, v in bounds.items()},
            }
        return res
