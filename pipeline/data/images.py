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
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "json")
RESAMPLE = Image.Resampling.BICUBIC  # prepare: what is stored is resized once, so take the sharper filter
CROP_RESAMPLE = Image.Resampling.BILINEAR  # loader: per sample, every epoch; antialiased like torchvision's Resize

# Decompression bombs and huge scans are bad input, not a reason to stop or to take gigabytes: every decode checks
# the header's pixel count against a limit (prepare.max_pixels) and refuses with its own reason; JPEGs over the
# limit are decoded at reduced scale instead when that brings them under it. PIL's own bomb check is replaced by it.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
_ORIENTATION = 0x0112  # EXIF tag; 5-8 are the orientations that swap width and height


class BadImage(ValueError):
    """An input that cannot be used as an image; the message is the reason recorded in the manifest."""


def read_header(data: bytes) -> Image.Image:
    """The image opened from its header only (nothing decoded yet). Raises BadImage."""
    if not data:
        raise BadImage("empty file")
    try:
        return Image.open(io.BytesIO(data))
    except Exception:
        raise BadImage("not an image (unrecognised format)") from None


def orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is no reason to drop the image
        return 1


def is_plain_rgb(img: Image.Image) -> bool:
    """8-bit RGB without transparency or EXIF rotation: its bytes can be stored as they are."""
    return img.mode == "RGB" and "transparency" not in img.info and orientation(img) in (0, 1)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and 32-bit grey scaled (not clipped) to 0..255, transparency composited on
    BACKGROUND, CMYK / palette / grey converted."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def displayed_size(header: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied) of an image opened by read_header."""
    w, h = header.size
    return (h, w) if orientation(header) in (5, 6, 7, 8) else (w, h)


def open_image(data: bytes, min_shorter_side: int | None = None, max_pixels: int = MAX_PIXELS,
               header: Image.Image | None = None) -> Image.Image:
    """Decode bytes to an upright 8-bit RGB image, at reduced JPEG scale when the shorter side can stay >=
    min_shorter_side (or must shrink to fit max_pixels). `header`: the same bytes already opened by read_header and
    not yet decoded (saves parsing the header again)."""
    img = header if header is not None else read_header(data)
    try:
        w, h = img.size
        if w * h > max_pixels and img.format == "JPEG":
            # draft keeps both sides >= the request and reduces by 2, 4 or 8: asking for half the scale that just
            # fits guarantees a reduction that fits (when 8x is enough)
            f = math.sqrt(max_pixels / (w * h)) / 2
            img.draft("RGB", (max(1, math.floor(w * f)), max(1, math.floor(h * f))))
        elif min_shorter_side and img.format == "JPEG" and min(w, h) > min_shorter_side:
            s = min(w, h)  # draft picks the largest reduction keeping both sides >= the requested size
            img.draft("RGB", (math.ceil(w * min_shorter_side / s), math.ceil(h * min_shorter_side / s)))
        if img.size[0] * img.size[1] > max_pixels:
            raise BadImage(f"too many pixels: {w} x {h} > {max_pixels} (prepare.max_pixels)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and EXIF warnings are noise here
            img.load()  # the full decode: truncated files fail here
            img = ImageOps.exif_transpose(img) if orientation(img) not in (0, 1) else img
            img = to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, MemoryError) as e:
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


def crop_to(data: bytes, width: int, height: int, header: Image.Image | None = None,
            ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]]:
    """Resize to cover width x height and center-crop (the encode stage's fixed-square and bucket policy).
    Returns (uint8 HxWx3 array, the image's own (width, height), crop box (l, t, r, b) in its pixels).
    `header`: as for open_image (the encode stream reads the size first to choose a bucket)."""
    header = header if header is not None else read_header(data)
    w, h = displayed_size(header)
    box = crop_box_center(w, h, width / height)
    need = math.ceil(min(w, h) * width / (box[2] - box[0]))  # shorter side the (draft) decode must keep
    img = open_image(data, min_shorter_side=need, header=header)
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
