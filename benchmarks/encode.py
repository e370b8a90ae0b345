"""Encode throughput: the encode stage's loop against a naive loop, same shards, same model, same device.

  python benchmarks/encode.py [--preset tiny] [--resolution 64] [--images 256] [--repeats 5] [--out benchmarks/RESULTS.md]
  python benchmarks/encode.py --preset kl-f8 --resolution 512 --images 2048 --batch 64 --workers 8   # on a GPU

firststage: `pipeline.latents.encoder.encode_shards` (decode and crop in loader workers, whole shards per worker,
pinned memory and bf16 autocast + channels_last on CUDA, inference_mode, tar writing in a background thread).
Naive: PIL decode and crop in the main process, `vae.encode(x).latent_dist.sample()` per batch in fp32, and a
synchronous `np.save` per sample. Both write every latent of every image. "encoder only" times the model alone on
batches decoded beforehand, so the gap between it and end to end shows what else (decode, transfer, writing)
bounds the loop. Repeats alternate the two paths (machine drift hits both); the table gives medians after a warm-up
and the median of the per-repeat ratios. The model is randomly initialised: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stages  # noqa: E402,F401,I001  (the stages' thread policy: chosen before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.loader import make_shards, photo_jpeg  # noqa: E402
from benchmarks.train import peak_flops, sync  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.images import crop_to  # noqa: E402
from pipeline.latents.encoder import EncodeSettings, encode_batch, encode_shards  # noqa: E402
from pipeline.models import build_autoencoder  # noqa: E402
from stages import apply_thread_policy  # noqa: E402


def naive(vae, urls, out: Path, res: int, batch: int, device) -> int:
    """The loop most people write first."""
    n, images, keys = 0, [], []

    def flush():
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample().cpu().numpy()
        for k, zi in zip(keys, z):
            np.save(out / f"{k}.npy", zi)
        images.clear()
        keys.clear()

    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if not m.name.endswith(".jpg"):
                    continue
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                w, h = img.size
                s = min(w, h)
                img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((res, res))
                images.append(np.asarray(img))
                keys.append(f"{Path(url).stem}_{m.name.split('.')[0]}")
                n += 1
                if len(images) == batch:
                    flush()
    if images:
        flush()
    sync(device)
    return n


def ours(vae, urls, out: Path, res: int, batch: int, workers: int, device) -> int:
    cuda = device.type == "cuda"
    s = EncodeSettings(store="moments", dtype="bfloat16" if cuda else "float32", flip=False,
                       autocast=torch.bfloat16 if cuda else None, channels_last=cuda)
    settings = {"model_sha256": "bench", "kind": "kl", "store": "moments", "dtype": s.dtype, "resolution": res,
                "buckets": None, "flip": False}
    r = encode_shards(vae, urls, out, settings, s, device, resolution=res, buckets=None, batch_size=batch,
                      num_workers=workers, pin_memory=cuda)
    sync(device)
    return r.samples


def encoder_only(vae, batches, device, fast: bool) -> float:
    """Images per second of the model alone on pre-decoded uint8 batches."""
    s = EncodeSettings(store="moments", dtype="bfloat16" if fast and device.type == "cuda" else "float32",
                       flip=False, autocast=torch.bfloat16 if fast and device.type == "cuda" else None,
                       channels_last=fast and device.type == "cuda")
    sync(device)
    t = time.perf_counter()
    for b in batches:
        if fast:
            encode_batch(vae, b, [str(i) for i in range(len(b))], s, device)
        else:
            with torch.no_grad():
                vae.encode(b.to(device).float().div(127.5).sub(1)).latent_dist.sample()
    sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--source", type=int, default=300, help="side of the source JPEGs")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None,
                    help="loader workers of the firststage path (default: as the encode stage, 0 on a CPU, else 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="", help="append a results section to this markdown file")
    args = ap.parse_args()
    apply_thread_policy()
    if args.workers is None:
        args.workers = 8 if torch.cuda.is_available() else 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    plain = build_autoencoder(load_config(args.preset).model, args.resolution).to(device).eval()  # the naive loop's
    vae = copy.deepcopy(plain)  # firststage's: channels_last on CUDA, as the encode stage sets it
    if device.type == "cuda":
        vae = vae.to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        urls = make_shards(tmp / "shards", args.source, args.images)
        crops = [torch.from_numpy(crop_to(photo_jpeg(args.source, i), args.resolution, args.resolution)[0]).permute(2, 0, 1)
                 for i in range(args.batch)]
        batches = [torch.stack(crops)] * max(1, args.images // args.batch)
        t_naive, t_ours, e_naive, e_ours = [], [], [], []
        for rep in range(args.repeats + 1):  # the first is a warm-up
            for name, fn, times in (("naive", lambda o: naive(plain, urls, o, args.resolution, args.batch, device),
                                     t_naive),
                                    ("ours", lambda o: ours(vae, urls, o, args.resolution, args.batch, args.workers,
                                                            device), t_ours)):
                out = tmp / f"{name}-{rep}"
                out.mkdir()
                t = time.perf_counter()
                n = fn(out)
                if rep:
                    times.append(n / (time.perf_counter() - t))
            if rep:
                e_naive.append(encoder_only(plain, batches, device, fast=False))
                e_ours.append(encoder_only(vae, batches, device, fast=True))
    flops = encoder_flops(plain, batches[0][:1], device)  # per image
    peak, peak_what = peak_flops(device)
    limit = peak / flops
    n, o = statistics.median(t_naive), statistics.median(t_ours)
    ratio = statistics.median(b / a for a, b in zip(t_naive, t_ours))
    en, eo = statistics.median(e_naive), statistics.median(e_ours)
    where = f"{torch.cuda.get_device_name()} " if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads, "
    print(f"encode {args.preset} {args.resolution}px on {where}: naive {n:.1f} img/s, firststage {o:.1f} img/s, "
          f"ratio {ratio:.2f}x; encoder only: naive {en:.1f}, firststage {eo:.1f} img/s; encoder FLOP limit "
          f"{limit:.0f} img/s ({flops / 1e9:.2f} GFLOP/image at {peak / 1e12:.1f} TFLOP/s): end to end "
          f"{o / limit:.0%} of it, encoder only {eo / limit:.0%}")
    if args.out:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        commit = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or "?"
        lines = [
            f"\n## Encode throughput ({date.today().isoformat()}, {where}{cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, commit {commit})\n",
            f"`python benchmarks/encode.py --preset {args.preset} --resolution {args.resolution} --source {args.source} "
            f"--images {args.images} --batch {args.batch} --workers {args.workers} --repeats {args.repeats}`: every "
            f"image decoded, cropped, encoded and written; median of {args.repeats} interleaved repeats after a warm-up.\n",
            "| path | end to end (img/s) | encoder only (img/s) |",
            "|---|---:|---:|",
            f"| naive (main-process PIL, fp32 sample, np.save per sample) | {n:.1f} | {en:.1f} |",
            f"| firststage encode loop | {o:.1f} | {eo:.1f} |",
            f"| ratio (median of per-repeat ratios) | {ratio:.2f}x | {eo / en:.2f}x |",
            f"| firststage, share of the encoder's FLOP limit ({limit:.0f} img/s: {flops / 1e9:.2f} GFLOP/image at "
            f"{peak / 1e12:.1f} TFLOP/s, {peak_what}) | {o / limit:.0%} | {eo / limit:.0%} |",
        ]
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


def encoder_flops(vae, images: torch.Tensor, device) -> float:
    """Matrix-product and convolution FLOPs of encoding one image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = images.to(device).float().div(127.5).sub(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(x)
    return counter.get_total_flops() / len(images)


if __name__ == "__main__":
    main()
