"""Learning-rate schedules: linear warm-up, then constant or cosine to zero at max_steps."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, max_steps: int, kind: str, final: float = 0.0) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def base_learning_rate(lr: float, scale: str, global_batch: int) -> float:
    """`per_sample`: lr x global batch (LDM's scale_lr convention); `absolute`: as given."""
    return lr * global_batch if scale == "per_sample" else lr
