"""Aspect-ratio buckets (SDXL / kohya convention) and the crop that puts an image into one.

A bucket is a (width, height) of about resolution^2 pixels whose sides are multiples of the model's downsampling
factor x 8, so the latent's sides are multiples of 8 (what diffusion U-Nets and DiT patchifiers expect). Each image
goes to the bucket whose aspect ratio is nearest (in log space), is resized to cover it and center-cropped: no
padding, no distortion.
"""

from __future__ import annotations

import math

from pipeline.errors import UserError


def parse_size(text: str) -> tuple[int, int]:
    """'320x192' -> (320, 192)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"encode.buckets: {text!r} is not WIDTHxHEIGHT (e.g. 320x192)") from None
    if w < 1 or h < 1:
        raise UserError(f"encode.buckets: {text!r} has a side below 1")
    return w, h


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def auto_buckets(resolution: int, factor: int) -> list[tuple[int, int]]:
    """Buckets of at most resolution^2 pixels, sides multiples of factor*8 between resolution/2 and 2*resolution,
    in both orientations (kohya's make_bucket_resolutions, with the square always present)."""
    step = factor * 8
    area = resolution * resolution
    out = {(resolution, resolution)} if resolution % step == 0 else set()
    w = step
    while w <= 2 * resolution:
        h = (area // w) // step * step
        if w >= resolution // 2 and resolution // 2 <= h <= 2 * resolution and h > 0:
            out.update({(w, h), (h, w)})
        w += step
    if not out:
        raise UserError(f"encode.buckets=auto: no bucket of about {resolution}x{resolution} has sides that are "
                        f"multiples of {step} (downsampling factor {factor} x 8); raise data.resolution")
    return sorted(out, key=lambda s: (s[0] / s[1], s))


def resolve_buckets(spec: str, resolution: int, factor: int) -> list[tuple[int, int]] | None:
    """encode.buckets: 'none' -> None (fixed square), 'auto', or 'WxH,WxH,...' (each side a multiple of `factor`)."""
    spec = spec.strip()
    if spec in ("", "none"):
        return None
    buckets = auto_buckets(resolution, factor) if spec == "auto" else [parse_size(s) for s in spec.split(",") if s]
    bad = [b for b in buckets if b[0] % factor or b[1] % factor]
    if bad:
        raise UserError(f"encode.buckets: {size_name(bad[0])} is not a multiple of the downsampling factor {factor}")
    return sorted(set(buckets), key=lambda s: (s[0] / s[1], s))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to the image's (log ratio; ties: the first in order)."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))
