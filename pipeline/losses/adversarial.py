"""Adversarial terms for the PatchGAN: discriminator and generator losses, the adaptive weight of
taming-transformers / LDM, and the optional R1 (Mescheder et al. 2018) and LeCam (Tseng et al. 2021) regularisers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non-saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"adversarial loss must be hinge or non-saturating, got {kind!r}")


def generator_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_ratio(grad_a: torch.Tensor, grad_b: torch.Tensor, clamp: float) -> torch.Tensor:
    """||grad_a|| / (||grad_b|| + 1e-4), clamped to [0, clamp] and detached: taming's / LDM's adaptive weight."""
    return (grad_a.norm() / (grad_b.norm() + 1e-4)).clamp(0.0, clamp).detach()


def balanced_gan_gradient(rec_loss: torch.Tensor, gan_loss: torch.Tensor | None, output: torch.Tensor,
                          last_layer: torch.Tensor | None, gan_scale: float, params: list[torch.Tensor] = (),
                          rec_at: list[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The adaptive GAN weight w = ||grad L_rec|| / (||grad L_gan|| + 1e-4) at the decoder's last layer, clamped to
    [0, 1e4] and detached (Esser et al. 2021, eq. 7), and a surrogate loss whose gradient is that of
    L_rec + gan_scale * w * L_gan, from one backward pass through the loss networks (LPIPS, discriminator).

    Both losses see the autoencoder only through `output` (and L_rec through `params`, a learned log-variance), so
    their gradients are taken at `output`, where they stop, and carried to `last_layer` through that one layer.
    The surrogate <output, g_rec + gan_scale * w * g_gan> + <params, dL_rec/dparams> then backpropagates through
    the autoencoder once. The textbook form (two autograd.grad calls to the last layer, then a backward of the full
    loss) runs the perceptual network's and the discriminator's backward twice; this one once.

    `rec_at`: further weights at which L_rec's gradient is wanted (the adaptive alignment weight at the encoder's
    last layer), carried from `output` in the same call. `gan_loss` None: no GAN term (w = 1, the surrogate is
    L_rec's). Returns (w, surrogate, L_rec's gradients at rec_at).
    """
    g_rec, *g_params = torch.autograd.grad(rec_loss, [output, *params])  # frees the LPIPS graph
    gan = gan_loss is not None
    layers = ([last_layer] if gan else []) + list(rec_at)
    at = list(torch.autograd.grad(output, layers, g_rec, retain_graph=True)) if layers else []
    w, g_out = torch.ones((), device=output.device), g_rec
    if gan:
        (g_gan,) = torch.autograd.grad(gan_loss, output)  # frees the discriminator's graph
        (w_gan,) = torch.autograd.grad(output, last_layer, g_gan, retain_graph=True)
        w = adaptive_ratio(at.pop(0), w_gan, 1e4)
        g_out = g_rec + gan_scale * w * g_gan
    surrogate = (output * g_out.detach()).sum()
    for p, g in zip(params, g_params):
        surrogate = surrogate + (p * g.detach()).sum()
    return w, surrogate, at


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 on real images; `real` must require grad when D is run."""
    (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


class LeCam(nn.Module):
    """LeCam regulariser: keeps D's outputs near EMA anchors of the other class's outputs."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema_real.mul_(self.decay).add_(logits_real.float().mean(), alpha=1 - self.decay)
            self.ema_fake.mul_(self.decay).add_(logits_fake.float().mean(), alpha=1 - self.decay)
        return (F.relu(logits_real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - logits_fake).pow(2).mean())
