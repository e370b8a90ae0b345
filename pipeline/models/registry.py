"""The model families by name, without importing torch or diffusers: what a weights folder's config names, and what
a family stores, known before any model is loaded (a stage's checks come before its heavy imports).
pipeline.models.families holds the families themselves and takes their classes from here."""

from __future__ import annotations

# family (model.kind) -> the diffusers classes it holds (FSQ has none: no diffusers model has its quantizer)
FAMILY_CLASSES = {"kl": ("AutoencoderKL",), "vq": ("VQModel",), "fsq": (), "dc": ("AutoencoderDC",),
                  "flux2": ("AutoencoderKLFlux2",), "qwenimage": ("AutoencoderKLQwenImage",),
                  "wan": ("AutoencoderKLWan",), "tiny": ("AutoencoderTiny",)}
# what its encoder gives: a Gaussian posterior, code indices, or a deterministic latent
LATENT = {"kl": "posterior", "flux2": "posterior", "qwenimage": "posterior", "wan": "posterior", "vq": "codes",
          "fsq": "codes", "dc": "latent", "tiny": "latent"}


def family_of_class_name(class_name: str | None) -> str | None:
    """The family whose diffusers class has this name (a diffusers folder's config.json `_class_name`), or None."""
    return next((kind for kind, names in FAMILY_CLASSES.items() if class_name in names), None)


def diffusers_classes(kind: str) -> tuple[type, ...]:
    import diffusers

    return tuple(getattr(diffusers, name) for name in FAMILY_CLASSES[kind])


def stored(kind: str, requested: str) -> str:
    """What encode stores for a family: codes (VQ, FSQ), the deterministic latent (DC-AE, Tiny), else the posterior
    as encode.store asks (moments, mean or one sample)."""
    return {"codes": "codes", "latent": "latent"}.get(LATENT[kind], requested)
