"""Exponential moving average of the autoencoder's weights (used for evaluation and export by default).

The shadow holds every floating tensor of the state dict (parameters and float buffers); integer buffers (VQ usage
counters) are copied. Its state dict has the model's own keys, so it loads straight into a fresh model.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        floats_s, floats_m = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                floats_s.append(s)
                floats_m.append(v.detach().float())
            else:
                s.copy_(v)
        torch._foreach_lerp_(floats_s, floats_m, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def to(self, device) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self
