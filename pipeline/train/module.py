"""The module the trainer optimises: one forward (what DDP needs) around a first-stage autoencoder, with the
parameters that do not train frozen."""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from pipeline.models.autoencoder import AutoencoderOutput, family_of, run_autoencoder


def frozen_parameters(vae: nn.Module, trainable: list[str] = (), freeze_encoder: bool = False) -> set[str]:
    """Names of the parameters that do not train: those the family says images never reach, the encoder side with
    `freeze_encoder`, and, with `trainable` patterns (fnmatch on parameter names, sgm's trainable_ae_params), every
    parameter none of them matches."""
    fam = family_of(vae)
    frozen = set(fam.untrained_parameters(vae))
    if freeze_encoder:
        side = {id(p) for m in fam.encoder_side(vae) for p in m.parameters()}
        frozen |= {n for n, p in vae.named_parameters() if id(p) in side}
    if trainable:
        frozen |= {n for n, _ in vae.named_parameters() if not any(fnmatch(n, pat) for pat in trainable)}
    return frozen


class TrainableAutoencoder(nn.Module):
    """Wraps a model of any family as `.vae`; forward(x) -> AutoencoderOutput. Frozen parameters
    (frozen_parameters) neither train nor, in modules that are wholly frozen, update statistics: such modules stay
    in eval mode (BatchNorm, the VQ codebook), so a frozen part is bit for bit what it was, and a frozen encoder
    side keeps the latent space of an existing diffusion model valid while the decoder is fine-tuned."""

    def __init__(self, vae: nn.Module, trainable: list[str] = (), freeze_encoder: bool = False):
        super().__init__()
        self.vae = vae
        self.frozen = frozen_parameters(vae, trainable, freeze_encoder)
        for n, p in vae.named_parameters():
            if n in self.frozen:
                p.requires_grad_(False)
        self._frozen_modules = []
        for name, m in vae.named_modules():
            names = [f"{name}.{n}" if name else n for n, _ in m.named_parameters()]
            if names and all(n in self.frozen for n in names) \
                    and not any(name.startswith(f + ".") for f, _ in self._frozen_modules):
                self._frozen_modules.append((name, m))

    def train(self, mode: bool = True):
        super().train(mode)
        for _, m in self._frozen_modules:
            m.eval()
        return self

    def forward(self, x: torch.Tensor, plan=None) -> AutoencoderOutput:
        """`plan` (pipeline.losses.equivariance.StepPlan): this step's image and latent transforms, or None."""
        if plan is None:
            return run_autoencoder(self.vae, x)
        out = run_autoencoder(self.vae, plan.input(x), transform=plan.latent)
        if plan.extra_factor:
            out.extra = family_of(self.vae).decode(self.vae, plan.extra_latent(out.latents))
        return out
