"""Objectives: reconstruction, LPIPS, KL (beta, annealing, free bits), adversarial with adaptive weight, VQ terms."""

from pipeline.losses.objective import FirstStageObjective  # noqa: F401
