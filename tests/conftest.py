"""Shared fixtures: small images and shards made on the fly, scikit-image's photos when a real one is wanted."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random colour image (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def image_bytes(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_images(folder: Path, n: int, size=(96, 80), prefix: str = "img", captions: bool = False) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        random_image(*size, seed=i).save(folder / f"{key}.jpg", quality=90)
        if captions:
            (folder / f"{key}.txt").write_text(f"caption {i}")
        keys.append(key)
    return keys


def write_tar(path: Path, samples: list[dict]) -> None:
    """samples: dicts of ext -> bytes plus __key__."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, num_shards: int, per_shard: int, size=(80, 72), prefix="shard") -> list[str]:
    """Image shards with unique keys s{shard}_{i} and a txt caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            img = random_image(*size, seed=s * 1000 + i)
            samples.append({"__key__": f"s{s:03d}_{i:04d}", "jpg": image_bytes(img, quality=90),
                            "txt": f"caption {s} {i}".encode()})
        p = folder / f"{prefix}-{s:06d}.tar"
        write_tar(p, samples)
        paths.append(str(p))
    return paths


@pytest.fixture
def photos(tmp_path) -> Path:
    """A few real colour photographs from scikit-image's package data, as JPEG files."""
    skdata = pytest.importorskip("skimage.data")
    out = tmp_path / "photos"
    out.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skdata, name)()).save(out / f"{name}.jpg", quality=92)
    return out
