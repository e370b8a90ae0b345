"""Scaling past one machine, on paper, from the model's sizes and stated bandwidths (docs/scaling.md explains).

  python benchmarks/scaling.py [--preset kl-f8] [--step-ms 109] [--images-per-step 12]
  python benchmarks/scaling.py --measure-gloo       # what can be measured on a CPU: a 2-process gloo all-reduce

Encoding on object storage: the requests the encoder sends per shard (counted on a real server by
tests/test_scale.py and benchmarks/scale.py), their rate against the per-prefix limits S3 documents, and the egress
at stated list prices.

Training: DDP all-reduces the autoencoder's fp32 gradients every step, bucketed and overlapped with the backward;
the discriminator's gradients (and the learned log-variance) are averaged in one flat all-reduce after it, not
overlapped; the step's skip/stop decision is one all-reduce of three numbers. A ring all-reduce of S bytes over N
GPUs moves 2 (N - 1) / N x S bytes through each GPU's slowest link; the exposed time is what the backward (taken as
2/3 of the step) does not hide. Weak-scaling efficiency = step / (step + exposed). Every figure printed is computed
from the stated inputs except the parameter counts (counted from the preset) and --measure-gloo's timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Achievable all-reduce bus bandwidth per GPU (GB/s), stated, not measured here: NCCL over NVLink 4 / NVSwitch inside
# an H100 node, and over InfiniBand / RoCE between nodes at 80% of the line rate of the NICs one GPU's ring uses.
LINKS = {
    "NVLink (8 GPUs, one node)": 360.0,
    "8 x 400 Gb/s per node (a NIC per GPU)": 0.8 * 400 / 8,
    "8 x 200 Gb/s per node": 0.8 * 200 / 8,
    "1 x 400 Gb/s per node (shared by 8 GPUs)": 0.8 * 400 / 8 / 8,
}
LATENCY_S = 10e-6  # per hop of a small all-reduce (NCCL's tree for small messages: 2 log2 N hops)


def parameter_counts(preset: str) -> tuple[int, int]:
    import torch

    from pipeline.config import load_config
    from pipeline.models import PatchDiscriminator, build_autoencoder

    cfg = load_config(preset)
    with torch.device("meta"):
        vae = build_autoencoder(cfg.model, cfg.data.resolution)
        a = cfg.loss.adversarial
        disc = PatchDiscriminator(cfg.model.in_channels, a.disc_channels, a.disc_layers)
    return sum(p.numel() for p in vae.parameters()), sum(p.numel() for p in disc.parameters())


def allreduce_seconds(nbytes: float, gpus: int, busbw_gbs: float) -> float:
    if gpus <= 1:
        return 0.0
    return 2 * (gpus - 1) / gpus * nbytes / (busbw_gbs * 1e9)


def training_table(preset: str, step_ms: float, images_per_step: int) -> list[str]:
    import math

    n_vae, n_disc = parameter_counts(preset)
    g_bytes, d_bytes = 4 * n_vae, 4 * n_disc
    step = step_ms / 1e3
    lines = [f"{preset}: {n_vae / 1e6:.1f} M autoencoder parameters ({g_bytes / 1e6:.0f} MB of fp32 gradients per "
             f"step), {n_disc / 1e6:.2f} M discriminator parameters ({d_bytes / 1e6:.1f} MB); step {step_ms:g} ms "
             f"for {images_per_step} images per GPU.", "",
             "| GPUs | slowest link | all-reduce of the gradients (ms) | exposed (ms) | weak-scaling efficiency | "
             "images/s in all |", "|---:|---|---:|---:|---:|---:|"]
    for gpus in (1, 8, 64, 512):
        links = ["none"] if gpus == 1 else [k for k in LINKS if (gpus == 8) == k.startswith("NVLink")]
        for link in links:
            bw = LINKS.get(link, 1.0)
            ar = allreduce_seconds(g_bytes, gpus, bw)
            small = 0.0 if gpus == 1 else 2 * math.log2(gpus) * LATENCY_S
            exposed = max(0.0, ar - 2 / 3 * step) + allreduce_seconds(d_bytes, gpus, bw) + small
            eff = step / (step + exposed)
            lines.append(f"| {gpus} | {link} | {ar * 1e3:.1f} | {exposed * 1e3:.1f} | {eff:.0%} | "
                         f"{gpus * images_per_step / (step + exposed):,.0f} |")
    return lines


def shards_for_stragglers(ranks: int, cv: float, slack: float = 0.05) -> int:
    """Shards per rank so that the slowest of `ranks` ends within `slack` of the mean: one shard more than others
    costs 1/S, and with independent shard times of coefficient of variation `cv`, a rank's total varies by cv/sqrt(S)
    and the largest of R such totals sits about sqrt(2 ln R) of those above the mean."""
    import math

    return max(math.ceil(1 / slack), math.ceil((cv * math.sqrt(2 * math.log(max(ranks, 2))) / slack) ** 2))


def encode_table(images: float, per_gpu: float, jpeg_kb: float, latent_kb: float, shard_images: int,
                 cv: float = 0.3) -> list[str]:
    lines = [f"Encoding {images:.0e} images at {per_gpu:g} images/s per GPU; {jpeg_kb:g} KB per input JPEG, "
             f"{latent_kb:g} KB of latents per image; shards of {shard_images:,} images; shard times varying "
             f"by {cv:.0%} (coefficient of variation, stated).", "",
             "| GPUs | hours | read (GB/s, all) | write (GB/s, all) | shards per rank | shards per rank for "
             "stragglers < 5% |", "|---:|---:|---:|---:|---:|---:|"]
    shards = images / shard_images
    for gpus in (8, 64, 512):
        rate = gpus * per_gpu
        lines.append(f"| {gpus} | {images / rate / 3600:,.1f} | {rate * jpeg_kb / 1e6:.2f} | "
                     f"{rate * latent_kb / 1e6:.2f} | {shards / gpus:,.0f} | {shards_for_stragglers(gpus, cv)} |")
    return lines


# Object storage, stated (list prices of AWS S3 Standard in us-east-1 and of Cloudflare R2; check your provider's):
S3_LIMITS = {"writes": 3500, "reads": 5500}  # requests/s per partitioned prefix that S3 documents (PUT..., GET/HEAD)
PRICE_PER_1000 = {"writes": 0.005, "reads": 0.0004}  # USD; LIST is billed as a write-class request
EGRESS_PER_GB = {"S3 to the internet (tiered $0.09-0.05/GB)": None, "S3 to another AWS region ($0.02/GB)": 0.02,
                 "R2 (no egress fee)": 0.0}


def s3_internet_egress(gb: float) -> float:
    """USD of S3's tiered internet egress for one month's `gb`: 10 TB at $0.09, 40 TB at $0.085, 100 TB at $0.07,
    the rest at $0.05 (stated)."""
    cost, left = 0.0, gb
    for size, price in ((10_000, 0.09), (40_000, 0.085), (100_000, 0.07), (float("inf"), 0.05)):
        cost += min(left, size) * price
        left -= min(left, size)
    return cost


def object_storage_table(images: float, per_gpu: float, jpeg_kb: float, latent_kb: float, shard_images: int,
                         part_mib: float = 16, threshold_mib: float = 64, parts_of_job: int = 64) -> list[str]:
    """Requests and egress of an encode reading its input shards from and writing its latents to object storage, as
    pipeline.latents.encoder does it (counted by tests/test_scale.py): per input shard a HEAD (its identity) and a
    streaming GET; per output shard one GET that finds no record (its state, just before the commit), a multipart
    upload (create, parts, complete) or one PUT, and the create-only PUT of its record. Per run (`parts_of_job`
    `--part` runs): a listing of the folder and of records/ for the plan (a page per 1000 entries each), the last
    part two more for the merged manifest, and a constant (lock, settings, manifests: at most 13 LIST, 4 HEAD,
    4 GET, 3 PUT, tests/test_scale.py)."""
    import math

    shards = images / shard_images
    out_mib = shard_images * latent_kb * 1e3 / 2**20
    parts = math.ceil(out_mib / part_mib) if out_mib >= threshold_mib else 0
    upload = parts + 2 if parts else 1
    per_shard = {"reads": 1 + 1 + 1, "writes": upload + 1}  # HEAD, GET, the record's GET (404) | upload, record
    pages = math.ceil(shards / 1000)
    per_run = {"reads": 8, "writes": 3 + 13 + 2 * pages}
    total = {k: v * shards + per_run[k] * parts_of_job for k, v in per_shard.items()}
    total["writes"] += 2 * pages  # the last part's listings for the merge
    total["reads"] += parts_of_job ** 2  # at most: each part's look at the others' part manifests, the last one's GETs
    read_gb, write_gb = images * jpeg_kb / 1e6, images * latent_kb / 1e6
    lines = [f"Per input shard of {shard_images:,} images: {per_shard['reads']} read-class requests (HEAD and GET of "
             f"the input, the GET that finds no record) and {per_shard['writes']} write-class ones ("
             f"{'a multipart upload of ' + str(parts) + ' parts of ' + str(int(part_mib)) + ' MiB + create + complete' if parts else 'one PUT'} "
             f"for its {out_mib:.0f} MiB of latents, the record's PUT); per `--part` run ({parts_of_job} of them) "
             f"{per_run['reads']} read-class and {per_run['writes']:,} write-class (two listings of {pages:,} pages, "
             f"lock, settings, manifests), at most {parts_of_job}^2 looks at part manifests in all; {shards:,.0f} "
             f"shards: "
             f"{total['reads'] / 1e6:.2f} M + {total['writes'] / 1e6:.2f} M requests, "
             f"${total['reads'] / 1e3 * PRICE_PER_1000['reads'] + total['writes'] / 1e3 * PRICE_PER_1000['writes']:,.0f} "
             f"at S3's request prices. {read_gb / 1e3:,.0f} TB read, {write_gb / 1e3:,.0f} TB written.", "",
             "| GPUs | hours | read-class requests/s | write-class requests/s | share of one S3 prefix's write limit | "
             "read GB/s | write GB/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for gpus in (8, 64, 512):
        seconds = images / (gpus * per_gpu)
        lines.append(f"| {gpus} | {seconds / 3600:,.1f} | {total['reads'] / seconds:,.0f} | "
                     f"{total['writes'] / seconds:,.0f} | {total['writes'] / seconds / S3_LIMITS['writes']:.0%} | "
                     f"{read_gb / seconds:.2f} | {write_gb / seconds:.2f} |")
    lines += ["", f"Egress of reading the {read_gb / 1e3:,.0f} TB of input where the GPUs are not (the {write_gb / 1e3:,.0f} TB "
              f"of latents written back is ingress for the store; the GPU provider may bill it as its egress):", "",
              "| from | USD |", "|---|---:|"]
    for name, price in EGRESS_PER_GB.items():
        cost = s3_internet_egress(read_gb) if price is None else read_gb * price
        lines.append(f"| {name} | {cost:,.0f} |")
    return lines


def _gloo_worker(rank: int, world: int, sizes: list[int], repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29641", rank=rank, world_size=world)
    out = {}
    for n in sizes:
        t = torch.ones(n)
        times = []
        for i in range(repeats + 2):
            dist.barrier()
            s = time.perf_counter()
            dist.all_reduce(t)
            if i >= 2:
                times.append(time.perf_counter() - s)
        out[n] = statistics.median(times)
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def measure_gloo(sizes: list[int], repeats: int = 7) -> dict[int, float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, sizes, repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="kl-f8")
    ap.add_argument("--step-ms", type=float, default=109.0, help="measured or target step time on one GPU")
    ap.add_argument("--images-per-step", type=int, default=12, help="per GPU")
    ap.add_argument("--encode-images", type=float, default=1e9)
    ap.add_argument("--encode-rate", type=float, default=1750.0, help="images/s per GPU")
    ap.add_argument("--jpeg-kb", type=float, default=100.0)
    ap.add_argument("--latent-kb", type=float, default=16.0, help="kl-f8 moments at 256 px in bf16: 2x4x32x32x2 B")
    ap.add_argument("--shard-images", type=int, default=10000)
    ap.add_argument("--measure-gloo", action="store_true")
    args = ap.parse_args()
    if args.measure_gloo:
        n_tiny, _ = parameter_counts("tiny")
        n_big, _ = parameter_counts(args.preset)
        res = measure_gloo([n_tiny, n_big])
        print(f"2-process gloo all-reduce on this CPU ({os.cpu_count()} cores): tiny's gradients "
              f"({4 * n_tiny / 1e6:.1f} MB) {res[n_tiny] * 1e3:.1f} ms, {args.preset}'s ({4 * n_big / 1e6:.0f} MB) "
              f"{res[n_big] * 1e3:.0f} ms (median of 7)")
        return
    print("\n".join(training_table(args.preset, args.step_ms, args.images_per_step)))
    print()
    print("\n".join(encode_table(args.encode_images, args.encode_rate, args.jpeg_kb, args.latent_kb,
                                 args.shard_images)))
    print()
    print("\n".join(object_storage_table(args.encode_images, args.encode_rate, args.jpeg_kb, args.latent_kb,
                                         args.shard_images)))


if __name__ == "__main__":
    main()
