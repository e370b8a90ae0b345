"""Exponential moving average of the autoencoder's weights (used for evaluation and export by default).

The shadow holds every floating tensor of the state dict (parameters and float buffers); integer buffers (VQ usage
counters) are copied. Its state dict has the model's own keys, so it loads straight into a fresh model.

Warm-up (as diffusers' EMAModel and timm): update t uses decay_t = min(decay, (1 + t) / (10 + t)), so a young run's
EMA follows the weights closely instead of being mostly its random initialisation (with a fixed 0.999, after 1,000
steps 37% of it still is). `step` counts the updates; the trainer saves it in trainer.json.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.step = 0
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.step += 1
        floats_s, floats_m = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                floats_s.append(s)
                floats_m.append(v.detach().float())
            else:
                s.copy_(v)
        torch._foreach_lerp_(floats_s, floats_m, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def to(self, device) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """`model` with the EMA weights in it for the block, then its own again, bit for bit (validation and sampling
        mid-run, without a second model in memory)."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(raw)
