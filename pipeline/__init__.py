"""firststage library: data, models, losses, metrics, latents, checkpoints, export.

Knows nothing of command lines; `stages/` calls into it.
"""
