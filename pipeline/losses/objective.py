"""The first-stage objective: reconstruction (+ LPIPS, optional learned log-variance), KL or VQ terms, PatchGAN.

Normalisation follows the published code so that published weights carry over unchanged:
  * KL models (LDM `LPIPSWithDiscriminator`): the per-pixel term |x - x_rec| + w_p * LPIPS is summed over pixels and
    averaged over the batch, as is the KL. That is why the SD VAE's KL weight is as small as 1e-6.
  * VQ models (taming `VQLPIPSWithDiscriminator`): the same per-pixel term is averaged over pixels; codebook weight 1.
The adaptive GAN weight compares gradients at the decoder's last layer, so it is the same in either convention.

Every term is returned separately (detached, for logging) with what to backpropagate, as tensors: no host
synchronisation. With the adaptive GAN weight, the perceptual network and the discriminator run backward once per step
(balanced_gan_gradient), not twice as in the published code; the gradient is the same.

Latents that diffuse well (docs/diffusable-latents.md): a step's StepPlan (pipeline.losses.equivariance) says what
the reconstruction is compared with (EQ-VAE: the transformed image; scale equivariance adds a second pair); the
alignment term (VA-VAE) compares the latent with a frozen foundation model's features, with its adaptive weight
||grad L_nll|| / (||grad L_vf|| + 1e-4) at the encoder's last layer: the nll's gradient there is carried from the
decoder's output, where the surrogate already holds it, so LPIPS runs backward once; only the decoder's input
gradient is computed once more.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import LossConfig
from pipeline.losses.adversarial import (
    LeCam,
    adaptive_ratio,
    balanced_gan_gradient,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)
from pipeline.losses.alignment import Alignment
from pipeline.losses.equivariance import StepPlan
from pipeline.losses.kl import kl_loss, kl_per_channel, kl_weight
from pipeline.losses.perceptual import Perceptual
from pipeline.losses.reconstruction import pixel_error
from pipeline.models.autoencoder import AutoencoderOutput
from pipeline.models.discriminator import PatchDiscriminator


class FirstStageObjective(nn.Module):
    def __init__(self, cfg: LossConfig, posterior: bool = True, in_channels: int = 3, latent_channels: int = 0):
        """`posterior`: the model has a Gaussian posterior (LDM's KL normalisation); otherwise taming's (VQ, FSQ,
        deterministic latents). `latent_channels`: the width of the latent the alignment projection takes."""
        super().__init__()
        self.cfg, self.posterior = cfg, posterior
        p = cfg.perceptual
        self.perceptual = Perceptual(p.net, p.backbone) if p.weight > 0 else None
        r = cfg.reconstruction
        self.logvar = nn.Parameter(torch.tensor(float(r.logvar_init))) if r.learned_logvar else None
        a = cfg.adversarial
        self.discriminator = None
        if a.enabled and a.discriminator == "dino":
            from pipeline.models.dino_discriminator import DinoDiscriminator
            from pipeline.models.foundation import dino_backbone

            self.discriminator = DinoDiscriminator(dino_backbone(a.dino_model, a.dino_backbone), a.dino_kernel,
                                                   a.diffaug_p)
        elif a.enabled:
            self.discriminator = PatchDiscriminator(in_channels, a.disc_channels, a.disc_layers)
        self.lecam = LeCam(a.lecam_decay) if a.enabled and a.lecam_weight > 0 else None
        self.alignment = Alignment(cfg.alignment, latent_channels) if cfg.alignment.enabled else None

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters optimised with the autoencoder (the learned log-variance, the alignment projection)."""
        params = [self.logvar] if self.logvar is not None else []
        return params + (list(self.alignment.projection.parameters()) if self.alignment is not None else [])

    def training_state(self) -> dict[str, torch.Tensor]:
        """The state a checkpoint holds: everything but the frozen networks (LPIPS, the foundation model)."""
        frozen = ("perceptual.",) + tuple(f"alignment.{f}" for f in Alignment.frozen)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def gan_active(self, step: int) -> bool:
        """Whether the discriminator trains at this step."""
        return self.discriminator is not None and step >= self.cfg.adversarial.start_step

    def generator_active(self, step: int) -> bool:
        """Whether the generator's adversarial term counts at this step (from generator_start_step, if later)."""
        a = self.cfg.adversarial
        return self.gan_active(step) and step >= (a.generator_start_step or 0)

    def _reduce(self, per_pixel: torch.Tensor) -> torch.Tensor:
        if self.posterior:
            return per_pixel.sum() / per_pixel.shape[0]
        return per_pixel.mean()

    def _nll(self, x: torch.Tensor, x_rec: torch.Tensor, terms: dict, prefix: str = "") -> torch.Tensor:
        """The reconstruction term (pixel + LPIPS, optionally in the learned-variance nll form), its parts in terms."""
        cfg = self.cfg
        err = pixel_error(x, x_rec, cfg.reconstruction.type)
        terms[prefix + "rec"] = err.mean().detach()
        per_pixel = cfg.reconstruction.weight * err
        if self.perceptual is not None:
            p = self.perceptual(x.float(), x_rec.float())
            terms[prefix + "lpips"] = p.mean().detach()
            per_pixel = per_pixel + cfg.perceptual.weight * p.view(-1, 1, 1, 1)
        if self.logvar is not None:
            per_pixel = per_pixel / torch.exp(self.logvar) + self.logvar
        return self._reduce(per_pixel)

    def autoencoder_terms(
        self, x: torch.Tensor, out: AutoencoderOutput, step: int, last_layer: torch.Tensor | None = None,
        plan: StepPlan | None = None, encoder_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(what to backpropagate, detached terms). terms["loss"] is the objective's value. What to backpropagate
        has the objective's gradient; with an adaptive weight (GAN, alignment) it is a surrogate whose value is not
        the loss but whose gradient is. `x`: the batch; `plan`: this step's transforms (the reconstruction is then
        compared with plan.target of the image the encoder saw); `encoder_layer`: where the adaptive alignment
        weight compares gradients."""
        cfg = self.cfg
        x_in = plan.input(x) if plan is not None else x  # the image the encoder saw
        target = plan.target(x_in) if plan is not None else x
        x_rec = out.reconstruction
        terms: dict[str, torch.Tensor] = {}
        nll = self._nll(target, x_rec, terms)
        if self.logvar is not None:
            terms["logvar"] = self.logvar.detach()
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
        if plan is not None and cfg.equivariance.enabled:
            terms["eq_step"] = torch.tensor(float(plan.equivariant or bool(plan.extra_factor)))
        if out.extra is not None:  # scale equivariance: decode(downsample(z)) against downsample(x)
            extra = self._nll(plan.extra_target(x_in), out.extra, terms, "scale_eq_")
            rest = rest + cfg.equivariance.scale_weight * extra
            terms["scale_eq"] = extra.detach()

        total = nll + rest
        vf = None
        if self.alignment is not None:
            vf, vf_terms = self.alignment(out.latents, x_in)
            terms.update(vf_terms)
            terms["vf"] = vf.detach()
        grad = torch.is_grad_enabled()
        al = cfg.alignment
        adaptive_vf = vf is not None and al.adaptive_weight and encoder_layer is not None and grad
        gan = self.generator_active(step)
        a = cfg.adversarial
        adaptive_gan = gan and a.adaptive_weight and last_layer is not None and grad
        g = generator_loss(self.discriminator(x_rec), a.generator_loss or a.loss) if gan else None
        w = torch.ones((), device=nll.device)
        w_vf = torch.tensor(al.weight, device=nll.device)
        if not (adaptive_gan or adaptive_vf):
            to_backward = total + (a.weight * g if g is not None else 0) + (w_vf * vf if vf is not None else 0)
        else:
            if g is not None and not adaptive_gan:
                rest = rest + a.weight * g
            params = [self.logvar] if self.logvar is not None else []
            w, surrogate, at_encoder = balanced_gan_gradient(
                nll, g if adaptive_gan else None, x_rec, last_layer, a.weight, params,
                [encoder_layer] if adaptive_vf else [])
            if adaptive_vf:
                (vf_at_encoder,) = torch.autograd.grad(vf, encoder_layer, retain_graph=True)
                w_vf = al.weight * adaptive_ratio(at_encoder[0], vf_at_encoder, al.max_adaptive_weight)
            to_backward = surrogate + rest + (w_vf * vf if vf is not None else 0)
        if g is not None:  # values only: what to backpropagate carries the gradient
            total = total + a.weight * w * g.detach()
            terms["g"], terms["gan_weight"] = g.detach(), (a.weight * w).detach()
        if vf is not None:
            total = total + w_vf * vf.detach()
            terms["vf_weight"] = w_vf.detach()
        terms["loss"] = total.detach()
        return to_backward, terms

    def discriminator_terms(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
