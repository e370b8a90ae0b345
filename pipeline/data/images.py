"""Decoding, resizing and encoding of single images, shared by the prepare stage and the streaming loader.

Only PIL touches image bytes; nothing is ever unpickled. JPEGs are decoded with `Image.draft`, which lets libjpeg
decode at 1/2, 1/4 or 1/8 scale when the target is smaller: a 1024-pixel JPEG feeding a 256 crop decodes ~4-10x
faster this way.
"""

from __future__ import annotations

import io
import math
import random
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "json")
RESAMPLE = Image.Resampling.BICUBIC  # prepare: what is stored is resized once, so take the sharper filter
CROP_RESAMPLE = Image.Resampling.BILINEAR  # loader: per sample, every epoch; antialiased like torchvision's Resize

# Decompression bombs are bad input, not a reason to stop: PIL raises DecompressionBombError past 2x this limit.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class BadImage(ValueError):
    """An input that cannot be used as an image; the message is the reason recorded in the manifest."""


def open_image(data: bytes, min_shorter_side: int | None = None) -> Image.Image:
    """Decode bytes to an RGB image, at reduced JPEG scale when the shorter side can stay >= min_shorter_side."""
    if not data:
        raise BadImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        if min_shorter_side and img.format == "JPEG":
            w, h = img.size
            s = min(w, h)
            if s > min_shorter_side:
                # draft picks the largest reduction keeping both sides >= the requested size
                img.draft("RGB", (math.ceil(w * min_shorter_side / s), math.ceil(h * min_shorter_side / s)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and EXIF warnings are noise here
            img.load()  # the full decode: truncated files fail here
            if img.mode != "RGB":  # convert() copies even when the mode already matches
                img = img.convert("RGB")
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"unreadable image ({e})") from None
    return img


def target_size(w: int, h: int, size: int, mode: str) -> tuple[int, int]:
    """Output size for the prepare stage's resize modes; never upscales except to fill a center crop."""
    if mode == "center-crop":
        return size, size
    ref = min(w, h) if mode == "shorter-side" else max(w, h)
    if ref <= size:
        return w, h
    scale = size / ref
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_for_storage(img: Image.Image, size: int, mode: str) -> Image.Image:
    w, h = img.size
    if mode == "center-crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.resize((size, size), RESAMPLE, box=(left, top, left + s, top + s), reducing_gap=3.0)
    tw, th = target_size(w, h, size, mode)
    if (tw, th) == (w, h):
        return img
    return img.resize((tw, th), RESAMPLE, reducing_gap=3.0)


def encode_image(img: Image.Image, fmt: str, quality: int) -> tuple[bytes, str]:
    """Encode to (bytes, extension). fmt: jpg | webp | png."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=False)
        return buf.getvalue(), "jpg"
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
        return buf.getvalue(), "webp"
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue(), "png"


# ------------------------------------------------------------------------------------------- loader transforms
def crop_box_train(w: int, h: int, crop: str, scale: tuple[float, float], rng: random.Random):
    """Box (l, t, r, b) in source pixels of a random square crop (random) or a random-resized crop."""
    s = min(w, h)
    if crop == "random-resized":
        area = rng.uniform(scale[0], scale[1]) * s * s
        side = max(1, min(s, int(round(math.sqrt(area)))))
    else:
        side = s
    left = rng.randint(0, w - side)
    top = rng.randint(0, h - side)
    return left, top, left + side, top + side


def crop_box_center(w: int, h: int, aspect: float = 1.0):
    """The largest centered box of aspect ratio `aspect` (width / height) inside a w x h image, in its pixels."""
    bw, bh = (w, max(1, round(w / aspect))) if w / h <= aspect else (max(1, round(h * aspect)), h)
    bw, bh = min(bw, w), min(bh, h)
    left, top = (w - bw) // 2, (h - bh) // 2
    return left, top, left + bw, top + bh


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone. Raises BadImage."""
    if not data:
        raise BadImage("empty file")
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:
        raise BadImage("not an image (unrecognised format)") from None


def crop_to(data: bytes, width: int, height: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]]:
    """Resize to cover width x height and center-crop (the encode stage's fixed-square and bucket policy).
    Returns (uint8 HxWx3 array, the image's own (width, height), crop box (l, t, r, b) in its pixels)."""
    w, h = image_size(data)
    box = crop_box_center(w, h, width / height)
    need = math.ceil(min(w, h) * width / (box[2] - box[0]))  # shorter side the (draft) decode must keep
    img = open_image(data, min_shorter_side=need)
    if img.size == (w, h) and (box[2] - box[0], box[3] - box[1]) == (width, height):
        return np.array(img.crop(box)), (w, h), box
    sx, sy = img.width / w, img.height / h  # a JPEG draft decode is smaller than the header says
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return np.array(img.resize((width, height), CROP_RESAMPLE, box=scaled, reducing_gap=3.0)), (w, h), box


def to_array(
    data: bytes,
    resolution: int | None,
    crop: str,
    rng: random.Random | None = None,
    flip: bool = False,
    scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Bytes -> uint8 HxWx3 array: a square `resolution` crop (random, random-resized or center) or, with
    crop='none', the full image. Crop and resize happen in one PIL call on the (draft-decoded) image."""
    if crop == "none" or resolution is None:
        return np.array(open_image(data))
    if crop == "center":  # the same pixels the encode stage feeds the model
        arr = crop_to(data, resolution, resolution)[0]
        return np.ascontiguousarray(arr[:, ::-1]) if flip and rng is not None and rng.random() < 0.5 else arr
    # random-resized crops cover as little as scale[0] of the area: decode large enough that they stay sharp
    need = resolution if crop != "random-resized" else math.ceil(resolution / math.sqrt(scale[0]))
    img = open_image(data, min_shorter_side=need)
    w, h = img.size
    box = crop_box_train(w, h, crop, scale, rng)
    if box[2] - box[0] == resolution and box[3] - box[1] == resolution:
        img = img.crop(box)
    else:
        img = img.resize((resolution, resolution), CROP_RESAMPLE, box=box, reducing_gap=3.0)
    if flip and rng is not None and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(img)  # a writable copy: torch.from_numpy rejects read-only buffers
