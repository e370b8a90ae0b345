"""Loader throughput: images/s per worker process, this loader vs a naive webdataset pipeline, same shards.

  python benchmarks/loader.py [--images 240] [--repeats 3] [--out benchmarks/RESULTS.md]
  python benchmarks/loader.py --s3 [--workers 2] [--images 960] [--out benchmarks/RESULTS.md]

--s3: the same loader (ImageStream in a DataLoader with --workers loader workers, every sample once) reading the same
shards from a local S3 server (SeaweedFS on the loopback interface, as the tests start it) and from disk; if the
loader were network-bound, the S3 figure would fall below the disk one.

Sources: (a) ~1024-pixel JPEGs, (b) ~300-pixel JPEGs; 256x256 training crops from both.
Naive: wds.WebDataset(...).decode("pil") + torchvision Resize/RandomCrop/Flip/ToTensor/Normalize per sample (floats
leave the worker). Ours: ImageStream (draft-mode JPEG decode, crop+resize in one PIL call, uint8 batches).
Both run in one process (num_workers=0), so the figure is per worker process. Each repeat times the naive loader
and ours back to back (so drift in machine load hits both); the ratio is the median of the per-repeat ratios.
Images are scikit-image's photographs resized to the source size with sigma=3 Gaussian noise (sensor-like), JPEG q90.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.data.loader import ImageStream, collate  # noqa: E402

RES = 256
BATCH = 16


@functools.lru_cache(maxsize=None)
def _photograph(i: int) -> Image.Image | None:
    """One of five scikit-image photographs, decoded once per process (it was most of photo_like's time)."""
    try:
        import skimage.data as d
    except ImportError:
        return None
    return Image.fromarray([d.astronaut, d.coffee, d.rocket, d.chelsea, d.hubble_deep_field][i]())


def photo_like(side: int, seed: int) -> Image.Image:
    """A photo-like image: a real scikit-image photograph when available, re-cropped, plus smooth noise."""
    rng = np.random.default_rng(seed)
    img = _photograph(seed % 5)
    if img is None:
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    w, h = side, int(side * rng.uniform(0.7, 1.0))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 3, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def photo_jpeg(side: int, seed: int) -> bytes:
    """photo_like as JPEG bytes (quality 90)."""
    buf = io.BytesIO()
    photo_like(side, seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(folder: Path, side: int, n: int, per_shard: int = 40) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(0, n, per_shard):
        path = folder / f"b-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                data = photo_jpeg(side, i)
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def naive_loader(urls):
    tf = transforms.Compose([
        transforms.Resize(RES), transforms.RandomCrop(RES), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").map(lambda s: tf(s["jpg"]))
    return DataLoader(ds, batch_size=BATCH, num_workers=0)


def our_loader(urls):
    ds = ImageStream(urls, mode="train", resolution=RES, crop="random", flip=True, shuffle_buffer=0)
    return DataLoader(ds, batch_size=BATCH, num_workers=0, collate_fn=collate)


def images_per_second(make, urls, n_images: int) -> float:
    loader = make(urls)
    seen, start = 0, time.perf_counter()
    for batch in loader:
        x = batch["image"] if isinstance(batch, dict) else batch
        seen += x.shape[0]
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - start)


def loader_images_per_second(urls: list[str], workers: int) -> float:
    """Every sample once through ImageStream with `workers` loader workers; timed from the moment every worker has
    delivered a batch (their start, and each one's S3 client, are not counted: a training run starts them once)."""
    ds = ImageStream(urls, mode="eval", resolution=RES, crop="center")
    loader = DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=collate,
                        prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(max(1, workers)):  # batches come from the workers in turn
        next(it)
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - start)


def s3_comparison(args) -> list:
    """Rows: img/s from the local S3 server and from disk, the same shards, interleaved repeats."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from s3server import start_weed

    from pipeline.storage import storage_for

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_weed(Path(tmp) / "weed")
        try:
            os.environ.update(server.env())
            store = storage_for(f"s3://{server.bucket}/bench")
            for label, side in (("~512-px JPEG sources", 512), ("~300-px JPEG sources", 300)):
                disk = make_shards(Path(tmp) / str(side), side, args.images, per_shard=80)
                remote = []
                for path in disk:
                    remote.append(f"s3://{server.bucket}/bench/{side}/{Path(path).name}")
                    store.write_bytes(remote[-1], Path(path).read_bytes())
                mb = sum(os.path.getsize(p) for p in disk) / 2**20
                d, r = [], []
                for _ in range(args.repeats):
                    d.append(loader_images_per_second(disk, args.workers))
                    r.append(loader_images_per_second(remote, args.workers))
                dm, rm = statistics.median(d), statistics.median(r)
                ratio = statistics.median(b / a for a, b in zip(d, r))
                rows.append((label, len(disk), mb, dm, rm, ratio))
                print(f"{label}: disk {dm:7.1f} img/s   S3 {rm:7.1f} img/s   ratio {ratio:.2f}x "
                      f"({len(disk)} shards, {mb:.0f} MiB)", flush=True)
        finally:
            server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="", help="append a results section to this markdown file")
    ap.add_argument("--s3", action="store_true", help="the loader on a local S3 server against the same shards on disk")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="--s3: loader workers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.s3:
        rows = s3_comparison(args)
        if args.out:
            lines = [
                f"\n## Loader from object storage ({date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} cores, "
                f"torch {torch.__version__})\n",
                f"`python benchmarks/loader.py --s3 --workers {args.workers} --images {args.images} --repeats "
                f"{args.repeats}`: ImageStream (256x256 center crops, batches of {BATCH}) with {args.workers} loader "
                f"workers, every sample once, the same shards (80 images each) read from a local SeaweedFS S3 server "
                f"(weed mini on the loopback interface, botocore streaming GETs) and from disk; median of "
                f"{args.repeats} interleaved repeats; the server shares the cores with the workers.\n",
                "| source | shards | MiB | disk (img/s) | S3 (img/s) | S3 / disk |",
                "|---|---:|---:|---:|---:|---:|",
            ] + [f"| {label} | {n} | {mb:.0f} | {d:.1f} | {r:.1f} | {q:.2f}x |" for label, n, mb, d, r, q in rows]
            with open(args.out, "a") as f:
                f.write("\n".join(lines) + "\n")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, side in (("(a) ~1024-px JPEG sources", 1024), ("(b) ~300-px JPEG sources", 300)):
            urls = make_shards(Path(tmp) / str(side), side, args.images)
            naive, ours = [], []
            for _ in range(args.repeats):
                naive.append(images_per_second(naive_loader, urls, args.images))
                ours.append(images_per_second(our_loader, urls, args.images))
            n, o = statistics.median(naive), statistics.median(ours)
            ratio = statistics.median(b / a for a, b in zip(naive, ours))
            rows.append((label, n, o, ratio))
            print(f"{label}: naive {n:7.1f} img/s   firststage {o:7.1f} img/s   ratio {ratio:.2f}x", flush=True)
    if args.out:
        lines = [
            f"\n## Loader throughput ({date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__})\n",
            f"`python benchmarks/loader.py --images {args.images} --repeats {args.repeats}`: 256x256 training crops, "
            f"batches of {BATCH}, one process, median of {args.repeats} interleaved repeats.\n",
            "| source | naive webdataset (img/s) | firststage (img/s) | ratio |",
            "|---|---:|---:|---:|",
        ] + [f"| {label} | {n:.1f} | {o:.1f} | {r:.2f}x |" for label, n, o, r in rows]
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
