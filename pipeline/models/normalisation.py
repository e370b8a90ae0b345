"""Latent normalisation: the latent a diffusion model sees, by each family's own convention.

A spec is a JSON object (the encode manifest records one; evaluate reports the model's own):

  {"kind": "scale_shift", "scaling_factor": s, "shift_factor": t}
        (z - t) * s                           AutoencoderKL (SD 1/2, SDXL: t null; SD3, FLUX.1), Tiny, DC-AE (t null)
  {"kind": "per_channel", "mean": [...], "std": [...], "patch": p}
        (patchify_p(z) - mean_c) / std_c      Qwen-Image and Wan (p 1, latents_mean / latents_std), FLUX.2 (p 2, the
                                              VAE's BatchNorm running statistics over the 2x2-patchified channels)
  {"kind": "per_channel", "mean": [...], "std": [...], "patch": g, "per_position": true}
        (z - mean_chw) / std_chw              RAE (AutoencoderRAE's latents_mean / latents_std per [C, H, W], its
                                              calculate_stat): every element of the g x g latent its own statistics,
                                              kept as [C*g*g] in the patchified layout, handed on as [C, g, g]

plus "source" (where the numbers come from: the model's config, or measured statistics). The functions take raw
latents [..., C, h, w] (a batch dimension or not) and give what that family's diffusers pipeline hands on towards its
transformer, cut before any token packing.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch



def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """[..., C, h, w] -> [..., C*p*p, h/p, w/p], channel c*p*p + dy*p + dx (FLUX.2's _patchify_latents for p = 2)."""
    if p == 1:
        return z
    *lead, c, h, w = z.shape
    z = z.reshape(-1, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(-1, c * p * p, h // p, w // p)
    return z.reshape(*lead, c * p * p, h // p, w // p)


def unpatchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of patchify."""
    if p == 1:
        return z
    *lead, c, h, w = z.shape
    z = z.reshape(-1, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(-1, c // (p * p), h * p, w * p)
    return z.reshape(*lead, c // (p * p), h * p, w * p)


def _channels(values, like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def layout(z: torch.Tensor, spec: dict) -> torch.Tensor:
    """The raw latent in the layout the spec normalises (FLUX.2: patchified)."""
    return patchify(z, spec.get("patch", 1))


def normalise(z: torch.Tensor, spec: dict) -> torch.Tensor:
    if spec["kind"] == "scale_shift":
        return (z - (spec.get("shift_factor") or 0.0)) * spec["scaling_factor"]
    z = layout(z, spec)
    zn = (z - _channels(spec["mean"], z)) / _channels(spec["std"], z)
    return unpatchify(zn, spec["patch"]) if spec.get("per_position") else zn


def denormalise(zn: torch.Tensor, spec: dict) -> torch.Tensor:
    """The raw latent back (what the family's decoder takes)."""
    if spec["kind"] == "scale_shift":
        return zn / spec["scaling_factor"] + (spec.get("shift_factor") or 0.0)
    if spec.get("per_position"):
        zn = patchify(zn, spec["patch"])
    z = zn * _channels(spec["std"], zn) + _channels(spec["mean"], zn)
    return unpatchify(z, spec.get("patch", 1))


def measured(template: dict, stats: dict, source: str, shift: bool = True) -> dict:
    """A spec of the template's kind from measured statistics of the latent in its layout (`channel_mean`,
    `channel_std`, `mean`, `std`): unit variance and zero mean. Without `shift` (a family whose pipelines never
    subtract one: DC-AE in SANA) the scale is 1 / RMS and there is no shift."""
    if template["kind"] == "per_channel":
        return {"kind": "per_channel", "mean": stats["channel_mean"], "std": [max(s, 1e-12) for s in stats["channel_std"]],
                "patch": template.get("patch", 1), "source": source,
                **({"per_position": True} if template.get("per_position") else {})}
    if not shift:
        rms = math.sqrt(stats["std"] ** 2 + stats["mean"] ** 2)
        return {"kind": "scale_shift", "scaling_factor": 1.0 / rms if rms else None, "shift_factor": None,
                "source": source}
    return {"kind": "scale_shift", "scaling_factor": 1.0 / stats["std"] if stats["std"] else None,  # NaN stays NaN
            "shift_factor": stats["mean"], "source": source}


def describe(spec: dict) -> str:
    """One line for summaries and tables."""
    if spec["kind"] == "scale_shift":
        shift = spec.get("shift_factor")
        return (f"(z {'+' if shift < 0 else '-'} {abs(shift):.5g}) * {spec['scaling_factor']:.5g}" if shift is not None
                else f"z * {spec['scaling_factor']:.5g}") + f", from {spec.get('source', '?')}"
    if spec.get("per_position"):
        return (f"per element of [C, H, W] ({len(spec['mean'])} values): (z - mean) / std, "
                f"from {spec.get('source', '?')}")
    patch = f"patchified {spec['patch']}x{spec['patch']}, " if spec.get("patch", 1) > 1 else ""
    return f"per channel ({patch}{len(spec['mean'])} channels): (z - mean_c) / std_c, from {spec.get('source', '?')}"
