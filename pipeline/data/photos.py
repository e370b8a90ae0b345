"""Photographs for the demo: scikit-image's (shipped in its package, no download) or a folder of the user's, split by
photo into training photos and held-out photos. Held-out photos (and, to measure the generalisation gap, the
training photos too) are scaled to a shorter side of 2 x TILE and cut into TILE x TILE tiles: what the evaluation
scores, against the PSNR of predicting each tile's mean colour."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import UserError
from pipeline.storage import atomic_write_bytes, atomic_write_text

# real photographs in scikit-image's package data (grey ones as RGB): 14 to train on, 2 held out whole
SKIMAGE_TRAIN = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
                 "camera", "coins", "moon", "grass", "gravel", "brick", "clock", "cell")
SKIMAGE_HELD_OUT = ("rocket", "coffee")
TILE = 64  # the held-out tiles, and the resolution the demo evaluates and encodes at
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
HELD_OUT_EVERY = 5  # a folder of the user's: every 5th photo (in name order) is held out, at least one


def skimage_photo(name: str) -> Image.Image:
    try:
        import skimage.data as skdata
    except ImportError:
        raise UserError("the demo needs scikit-image for its photos: pip install scikit-image") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = getattr(skdata, name)()
    a = np.asarray(a[0] if isinstance(a, tuple) else a)
    return Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3].astype(np.uint8))


def folder_photos(folder: Path) -> list[Path]:
    """The photos in a folder (not below it), in name order; one line when there are too few to hold any out."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTS)
    if len(found) < 2:
        raise UserError(f"{folder}: {len(found)} photo(s) ({', '.join(PHOTO_EXTS)}); the demo needs at least 2, to "
                        f"train on some and hold others out")
    return found


def split_by_photo(names: list, every: int = HELD_OUT_EVERY) -> tuple[list, list]:
    """(training photos, held-out photos): every `every`-th photo held out, starting with the second, at least one."""
    held = set(range(1, len(names), every)) or {len(names) - 1}
    return [n for i, n in enumerate(names) if i not in held], [n for i, n in enumerate(names) if i in held]


def _write_png(path: Path, img: Image.Image) -> None:
    if path.is_file():  # written by an earlier run: unchanged inputs let prepare resume
        return
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_tiles(folder: Path, name: str, img: Image.Image, tile: int = TILE) -> int:
    """The photo at a shorter side of 2 x tile, cut into tile x tile PNGs NAME_ROW_COL.png; returns how many."""
    s = 2 * tile / min(img.size)
    img = img.convert("RGB").resize((max(tile, round(img.width * s)), max(tile, round(img.height * s))),
                                    Image.Resampling.BICUBIC)
    n = 0
    for top in range(0, img.height - tile + 1, tile):
        for left in range(0, img.width - tile + 1, tile):
            _write_png(folder / f"{name}_{top // tile}_{left // tile}.png", img.crop((left, top, left + tile, top + tile)))
            n += 1
    return n


def _tiles_of(folder: Path, key: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(key + "_") and p.suffix == ".png"]


def check_photo_set(folder: Path, source: dict, train_keys: list[str]) -> None:
    """Before anything is copied: `folder` holds no other photo set (its record, folder/source.json, or, for a folder
    written before the record existed, its training photos' names), so the shards made from it still match it."""
    record = folder / "source.json"
    if record.is_file():
        held = json.loads(record.read_text())
    elif (folder / "train").is_dir():
        strays = sorted(p.stem for p in (folder / "train").glob("*.png") if p.stem not in train_keys)
        held = {"photos": f"other photos ({', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''})"} if strays else source
    else:
        held = source
    if held != source:
        def said(s: dict) -> str:
            return s["photos"] + (f" (--subset {s['subset']})" if s.get("subset") else "")
        raise UserError(f"{folder.parent} holds the demo of {said(held)}, not of {said(source)}: give --output another "
                        f"folder, or delete {folder.parent}")


def write_demo_photos(folder: Path, photos: Path | None = None, subset: int | None = None) -> dict:
    """folder/train (whole training photos with a caption), folder/heldout (the held-out photos' tiles) and
    folder/traintiles (the training photos' tiles, for the generalisation gap). From scikit-image's photos, or from
    the folder `photos` split by photo. `subset`: the first N of each (tests). A folder that holds another photo set
    is refused before anything is copied (check_photo_set). Returns what went where."""
    if photos is None:
        train = [(n, lambda n=n: skimage_photo(n)) for n in SKIMAGE_TRAIN[:subset]]
        held = [(n, lambda n=n: skimage_photo(n)) for n in SKIMAGE_HELD_OUT[:subset]]
    else:
        train_paths, held_paths = split_by_photo(folder_photos(photos))
        train = [(p.stem, lambda p=p: Image.open(p)) for p in train_paths[:subset]]
        held = [(p.stem, lambda p=p: Image.open(p)) for p in held_paths[:subset]]
    source = {"photos": str(photos.resolve()) if photos else "scikit-image's photos", "subset": subset}
    check_photo_set(folder, source, [name.replace(".", "_") for name, _ in train])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "source.json", json.dumps(source))
    for part in ("train", "heldout", "traintiles"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    counts = {"train": len(train), "held_out": len(held), "held_out_tiles": 0, "train_tiles": 0}
    for name, load in train:
        key = name.replace(".", "_")
        if not (folder / "train" / f"{key}.png").is_file() or not _tiles_of(folder / "traintiles", key):
            img = load()
            _write_png(folder / "train" / f"{key}.png", img)
            write_tiles(folder / "traintiles", key, img)
        caption = folder / "train" / f"{key}.txt"
        if not caption.is_file():
            atomic_write_text(caption, f"a photograph: {name.replace('_', ' ')}")
        counts["train_tiles"] += len(_tiles_of(folder / "traintiles", key))
    for name, load in held:
        key = name.replace(".", "_")
        if not _tiles_of(folder / "heldout", key):
            write_tiles(folder / "heldout", key, load())
        counts["held_out_tiles"] += len(_tiles_of(folder / "heldout", key))
    counts["held_out_names"] = [n for n, _ in held]
    return counts
