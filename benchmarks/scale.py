"""What bookkeeping costs as a job grows (issue 31), measured: prepare, encode (into a local folder and onto a real S3
server) and LatentDataset at several numbers of shards, with tiny shards (one 32-px image each, the tiny model), so
that the time is the cost per shard of names, records, listings and manifests rather than of encoding.

  python benchmarks/scale.py --sizes 1000,4000,16000 --out benchmarks/RESULTS.md

For each size N: prepare N images into N shards (--shard-size 1), encode them into a local folder and into one on
SeaweedFS (tests/s3server.py starts it; requests counted by operation with a botocore hook), then read every latent
with LatentDataset (eval mode). Each stage runs in its own process (`--stage`, torch and the stages imported before
the clock starts, one torch thread): seconds of the stage's main(), its peak RSS, its manifest's size. The growth
exponent is the slope of log(seconds) over log(N), least squares. Then `--beside`: encoding 40 shards into an empty
folder and into one beside 30,000 unrelated files, interleaved, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FIRSTSTAGE_THREADS": "1", "PYTHONPATH": str(ROOT),
       "HF_HUB_OFFLINE": "1"}
KINDS = {"HEAD": ("HeadObject",), "GET": ("GetObject",),
         "PUT": ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"),
         "LIST": ("ListObjectsV2", "ListMultipartUploads"), "DELETE": ("DeleteObject",)}


# ------------------------------------------------------------------------------------------------ one stage
def stage(kind: str, args: list[str], count: str | None) -> None:
    """In this process: one stage's main() (or LatentDataset over a folder), timed after the imports; prints one
    JSON line: seconds, and with `count` (an s3:// URL) the requests sent to its backend by operation."""
    import contextlib

    import torch  # noqa: F401 (imported before the clock starts, as every heavy module below)

    import pipeline.latents.encoder  # noqa: F401
    import pipeline.data.prepare  # noqa: F401
    from pipeline.latents import LatentDataset
    from stages.encode import main as encode
    from stages.prepare import main as prepare

    counter = contextlib.nullcontext({})
    if count:
        sys.path.insert(0, str(ROOT / "tests"))
        from s3server import count_requests

        from pipeline.storage import storage_for

        storage_for(count).check_conditional_writes(count)  # once per process: not the run's
        counter = count_requests(storage_for(count))
    start = time.perf_counter()
    with counter as counts:
        if kind == "read":
            n = sum(1 for _ in LatentDataset(args[0], mode="eval", batch_size=None))
        else:
            {"encode": encode, "prepare": prepare}[kind](args)
            n = None
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "requests": dict(counts), "samples": n,
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_stage(kind: str, args: list[str], env: dict, count: str | None = None) -> dict:
    """`stage` in a child process: its JSON line (seconds, requests, samples, peak RSS in MiB)."""
    cmd = [sys.executable, __file__, "--stage", kind, *(["--count", count] if count else []), "--", *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed ({r.returncode}): {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ inputs
def make_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"img-{i:06d}.jpg")


def make_vae(path: Path) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_autoencoder
    from pipeline.weights.diffusers import save as save_diffusers

    torch.manual_seed(0)
    save_diffusers(build_autoencoder(load_config("tiny", ["data.resolution=32"]).model, 32), path)


def exponent(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) over log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-9)) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def size_of(path) -> int:
    from pipeline.storage import storage_for

    return storage_for(str(path)).info(str(path))["size"]


# ------------------------------------------------------------------------------------------------ the runs
def measure(sizes: list[int], work: Path, env: dict, s3: str | None) -> dict:
    vae = work / "vae"
    encode_args = ["--model", vae, "data.resolution=32", "data.num_workers=0", "encode.batch_size=1"]
    rows: dict[str, dict[int, dict]] = {}
    for n in sizes:
        make_images(work / f"images-{n}", n)
        data = work / f"data-{n}"
        r = run_stage("prepare", ["--input", work / f"images-{n}", "--output", data, "--size", "32",
                                  "--shard-size", "1"], env)
        rows.setdefault("prepare", {})[n] = {**r, "manifest": size_of(data / "manifest.json")}
        print(f"prepare {n}: {r['seconds']:.1f}s", flush=True)
        remote = f"{s3}/latents-{n}" if s3 else None  # its requests are counted
        for name, out, count in (("encode (local)", work / f"latents-{n}", None), ("encode (S3)", remote, remote)):
            if out is None:
                continue
            r = run_stage("encode", ["--data", data, "--output", out, *encode_args], env, count=count)
            rows.setdefault(name, {})[n] = {**r, "manifest": size_of(f"{out}/manifest.json")}
            print(f"{name} {n}: {r['seconds']:.1f}s", flush=True)
            r = run_stage("encode", ["--data", data, "--output", out, *encode_args], env, count=count)
            rows.setdefault(name.replace("encode", "no-op rerun"), {})[n] = {**r, "manifest": None}
        r = run_stage("read", [work / f"latents-{n}"], env)
        assert r["samples"] == n, r
        rows.setdefault("LatentDataset (eval, every sample)", {})[n] = {**r, "manifest": None}
        shutil.rmtree(work / f"images-{n}")
    return rows


def beside(work: Path, env: dict, files: int, repeats: int) -> tuple[list[float], list[float]]:
    """Encode 40 shards into an empty folder and into one beside `files` unrelated files, interleaved."""
    make_images(work / "images-beside", 40)
    run_stage("prepare", ["--input", work / "images-beside", "--output", work / "data-beside", "--size", "32",
                          "--shard-size", "1"], env)
    crowd = work / "crowd"
    crowd.mkdir()
    for i in range(files):
        (crowd / f"unrelated-{i:06d}.bin").write_bytes(b"x")
    empty, full = [], []
    args = ["--model", work / "vae", "--data", work / "data-beside", "data.resolution=32", "data.num_workers=0",
            "encode.batch_size=1"]
    for i in range(repeats):
        for times, folder in ((empty, work / f"empty-{i}"), (full, crowd)):
            if folder == crowd:
                for p in [*crowd.glob("*.tar"), *crowd.glob("records/*"), crowd / "manifest.json"]:
                    p.unlink(missing_ok=True)
            times.append(run_stage("encode", ["--output", folder, *args], env)["seconds"])
    return empty, full


def table(rows: dict, sizes: list[int]) -> list[str]:
    head = " | ".join(f"{n:,}: s/shard (ms), peak MiB, manifest KB" for n in sizes)
    lines = [f"| stage | {head} | exponent (seconds) |", "|---|" + "---:|" * (len(sizes) + 1)]
    for name, by_size in rows.items():
        cells = []
        for n in sizes:
            r = by_size[n]
            kb = "-" if r["manifest"] is None else f"{r['manifest'] / 1024:,.0f}"
            cells.append(f"{r['seconds'] / n * 1e3:.2f}, {r['rss_mib']:.0f}, {kb}")
        lines.append(f"| {name} | {' | '.join(cells)} | {exponent(sizes, [by_size[n]['seconds'] for n in sizes]):.2f} |")
    return lines


def requests_table(rows: dict, sizes: list[int]) -> list[str]:
    lines = ["| S3 run | " + " | ".join(f"{n:,}: requests per shard" for n in sizes) + " | exponent (requests) |",
             "|---|" + "---:|" * (len(sizes) + 1)]
    for name in ("encode (S3)", "no-op rerun (S3)"):
        if name not in rows:
            continue
        cells, totals = [], []
        for n in sizes:
            req = rows[name][n]["requests"]
            kinds = {k: sum(req.get(op, 0) for op in ops) for k, ops in KINDS.items()}
            totals.append(sum(kinds.values()))
            cells.append(", ".join(f"{kinds[k] / n:.3f} {k}" for k in KINDS if kinds[k]))
        lines.append(f"| {name} | {' | '.join(cells)} | {exponent(sizes, totals):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,4000,16000")
    ap.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS runs")
    ap.add_argument("--beside", type=int, default=30000, help="unrelated files beside the 40 shards (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", help="default: a temporary folder, removed after")
    ap.add_argument("--out", help="append the tables to this markdown file")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--count", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return stage(args.stage, args.rest, args.count)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env, server = dict(ENV), None
    try:
        make_vae(work / "vae")
        s3 = None
        if not args.no_s3:
            sys.path.insert(0, str(ROOT / "tests"))
            from s3server import start_weed

            server = start_weed(work / "weed")
            env.update(server.env())
            os.environ.update(server.env())  # this process reads the manifests' sizes
            env["FIRSTSTAGE_CACHE"] = str(work / "cache")
            s3 = f"s3://{server.bucket}/scale"
        load = os.getloadavg()
        rows = measure(sizes, work, env, s3)
        empty, full = beside(work, env, args.beside, args.repeats) if args.beside else ([], [])
        load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    finally:
        if server is not None:
            server.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    lines = [f"## Bookkeeping per shard as a job grows ({time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} "
             f"cores, torch {torch.__version__}, commit {commit})", "",
             f"`python benchmarks/scale.py --sizes {args.sizes} --beside {args.beside} --repeats {args.repeats}`: "
             f"tiny shards (one 32-px image each, the tiny model, one torch thread), each stage in its own process, "
             f"one run per size. The machine was shared with other work: load average up to {load[0]:.1f} (1 min) / "
             f"{load[1]:.1f} (5 min) on {os.cpu_count()} cores while it ran, so single timings carry noise.", "",
             *table(rows, sizes), ""]
    if "encode (S3)" in rows:
        lines += [*requests_table(rows, sizes), ""]
    if empty:
        ratio = statistics.median(f / e for e, f in zip(empty, full))
        lines += [f"Encoding 40 shards into an empty folder: {statistics.median(empty):.2f} s; into a folder beside "
                  f"{args.beside:,} unrelated files: {statistics.median(full):.2f} s (median of {args.repeats}, "
                  f"interleaved); ratio {ratio:.2f}x (median of the per-repeat ratios).", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
