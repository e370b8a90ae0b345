"""What the tests share: tiny images and shards made on the fly, the tiny-run arguments, loading any weights.

  from helpers import TINY, make_shards, make_train_val, load_model
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# the tiny preset at 32 px, in the test process: no loader workers, a small shuffle buffer
TINY = ["--config", "tiny", "data.resolution=32", "data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=8"]


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


def read_tar_samples(folder) -> dict:
    """Every sample of every shard in `folder` (a folder or an s3:// prefix) with tarfile alone: key -> {extension:
    bytes}; a member twice fails."""
    from pipeline.storage import as_path

    out: dict = {}
    for tar in sorted(as_path(folder).glob("*.tar")):
        with tarfile.open(fileobj=io.BytesIO(tar.read_bytes())) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in out.setdefault(key, {}), f"{m.name} twice"
                out[key][ext] = tf.extractfile(m).read()
    return out


def keys_in_tars(folder: Path) -> list[str]:
    """Every sample key in every complete shard, read with plain tarfile (duplicates kept)."""
    keys = []
    for p in sorted(folder.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.rsplit(".", 1)[-1] in ("jpg", "webp", "png"):
                    keys.append(m.name.rsplit(".", 1)[0])
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


def make_train_val(root: Path) -> None:
    """root/train (4 shards x 16) and root/val (5 shards x 4, other images): a tiny training set and a held-out set."""
    make_shards(root / "train", 4, 16, size=(48, 40))
    make_shards(root / "val", 5, 4, size=(40, 40), prefix="val")


def load_model(path, ema: bool = True, overrides: list[str] | None = None):
    """(model, Config) of any weights format, as evaluate / encode / export load them."""
    from pipeline.weights import resolve_weights

    return resolve_weights(path, ema).load(overrides)


def flat(d: dict, prefix: str = ""):
    """(dotted key, value) of every number in nested dicts and lists: what pytest.approx compares (pytest 9.2 refuses
    nested containers)."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, prefix + k + ".")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                yield f"{prefix}{k}[{i}]", x
        else:
            yield prefix + k, v
