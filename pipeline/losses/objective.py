"""The first-stage objective: reconstruction (+ LPIPS, optional learned log-variance), KL or VQ terms, PatchGAN.

Normalisation follows the published code so that published weights carry over unchanged:
  * KL models (LDM `LPIPSWithDiscriminator`): the per-pixel term |x - x_rec| + w_p * LPIPS is summed over pixels and
    averaged over the batch, as is the KL. That is why the SD VAE's KL weight is as small as 1e-6.
  * VQ models (taming `VQLPIPSWithDiscriminator`): the same per-pixel term is averaged over pixels; codebook weight 1.
The adaptive GAN weight compares gradients at the decoder's last layer, so it is the same in either convention.

Every term is returned separately (detached, for logging) with what to backpropagate, as tensors: no host
synchronisation. With the adaptive GAN weight, the perceptual network and the discriminator run backward once per step
(balanced_gan_gradient), not twice as in the published code; the gradient is the same.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import LossConfig
from pipeline.losses.adversarial import (
    LeCam,
    balanced_gan_gradient,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)
from pipeline.losses.kl import kl_loss, kl_per_channel, kl_weight
from pipeline.losses.perceptual import Perceptual
from pipeline.losses.reconstruction import pixel_error
from pipeline.models.autoencoder import AutoencoderOutput
from pipeline.models.discriminator import PatchDiscriminator


class FirstStageObjective(nn.Module):
    def __init__(self, cfg: LossConfig, posterior: bool = True, in_channels: int = 3):
        """`posterior`: the model has a Gaussian posterior (LDM's KL normalisation); otherwise taming's (VQ, FSQ,
        deterministic latents)."""
        super().__init__()
        self.cfg, self.posterior = cfg, posterior
        p = cfg.perceptual
        self.perceptual = Perceptual(p.net, p.backbone) if p.weight > 0 else None
        r = cfg.reconstruction
        self.logvar = nn.Parameter(torch.tensor(float(r.logvar_init))) if r.learned_logvar else None
        a = cfg.adversarial
        self.discriminator = PatchDiscriminator(in_channels, a.disc_channels, a.disc_layers) if a.enabled else None
        self.lecam = LeCam(a.lecam_decay) if a.enabled and a.lecam_weight > 0 else None

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters optimised with the autoencoder (the learned log-variance)."""
        return [self.logvar] if self.logvar is not None else []

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.adversarial.start_step

    def _reduce(self, per_pixel: torch.Tensor) -> torch.Tensor:
        if self.posterior:
            return per_pixel.sum() / per_pixel.shape[0]
        return per_pixel.mean()

    def autoencoder_terms(
        self, x: torch.Tensor, out: AutoencoderOutput, step: int, last_layer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(what to backpropagate, detached terms). terms["loss"] is the objective's value. What to backpropagate
        has the objective's gradient; once the GAN runs with the adaptive weight it is balanced_gan_gradient's
        surrogate (plus the KL / VQ terms), whose value is not the loss but whose gradient is."""
        cfg = self.cfg
        x_rec = out.reconstruction
        err = pixel_error(x, x_rec, cfg.reconstruction.type)
        terms = {"rec": err.mean().detach()}
        per_pixel = cfg.reconstruction.weight * err
        if self.perceptual is not None:
            p = self.perceptual(x.float(), x_rec.float())
            terms["lpips"] = p.mean().detach()
            per_pixel = per_pixel + cfg.perceptual.weight * p.view(-1, 1, 1, 1)
        if self.logvar is not None:
            per_pixel = per_pixel / torch.exp(self.logvar) + self.logvar
            terms["logvar"] = self.logvar.detach()
        nll = self._reduce(per_pixel)
        terms["nll"] = nll.detach()
        rest = torch.zeros((), device=nll.device)  # the terms that do not go through the decoder's output

        if out.mean is not None:
            beta = kl_weight(step, cfg.kl)
            kl = kl_loss(out.mean, out.logvar, cfg.kl.free_bits)
            rest = rest + beta * kl
            terms["kl"] = kl.detach()
            terms["kl_weight"] = torch.tensor(beta)
            terms["kl_per_channel"] = kl_per_channel(out.mean, out.logvar).detach()
        if out.vq_loss is not None:
            rest = rest + cfg.vq.codebook_weight * out.vq_loss
            terms["vq"] = out.vq_loss.detach()
            terms["perplexity"] = out.perplexity.detach()

        total = nll + rest
        to_backward = None
        if self.gan_active(step):
            a = cfg.adversarial
            g = generator_loss(self.discriminator(x_rec), a.loss)
            if a.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                w, surrogate = balanced_gan_gradient(nll, g, x_rec, last_layer, a.weight,
                                                     self.generator_parameters())
                to_backward = surrogate + rest
                total = total + a.weight * w * g.detach()  # its value only: the surrogate carries the gradient
            else:
                w = torch.ones((), device=g.device)
                total = total + a.weight * w * g
            terms["g"] = g.detach()
            terms["gan_weight"] = (a.weight * w).detach()
        terms["loss"] = total.detach()
        return (total if to_backward is None else to_backward), terms

    def discriminator_terms(
        self, x: torch.Tensor, x_rec: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self.cfg.adversarial
        real = x.detach().requires_grad_(a.r1_weight > 0)
        logits_real = self.discriminator(real)
        logits_fake = self.discriminator(x_rec.detach())
        d = discriminator_loss(logits_real, logits_fake, a.loss)
        terms = {"d": d.detach(), "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
        if a.r1_weight > 0:
            r1 = r1_penalty(logits_real, real)
            d = d + 0.5 * a.r1_weight * r1
            terms["r1"] = r1.detach()
        if self.lecam is not None:
            reg = self.lecam(logits_real, logits_fake)
            d = d + a.lecam_weight * reg
            terms["lecam"] = reg.detach()
        terms["d_loss"] = d.detach()
        return d, terms
