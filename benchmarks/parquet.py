"""prepare from Parquet: peak memory (RSS) against the file's size, a ~100 MB and a ~1 GB file side by side.

  python benchmarks/parquet.py [--mb 100,1000] [--repeats 3] [--out benchmarks/RESULTS.md]

Each file is laid out as Hugging Face `datasets` writes an image dataset: an image struct {bytes, path} and a text
column, 100 rows per row group; each row a ~300 KB JPEG (512x512 noise, quality 95; 16 distinct images, repeated,
written without dictionary encoding, which would otherwise store the 16 once).
Each run is `python -m stages.prepare --input FILE --output DIR --size 64 --shard-size 256` (one process), its peak
RSS read from the kernel (getrusage of a wrapper's children), median of the repeats; the ratio of the largest
file's peak to the smallest's says whether memory follows the file or stays flat (rows are read 16 at a time).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ROWS_PER_GROUP = 100  # datasets' row group size for image datasets


def write_file(path: Path, mb: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        images.append(buf.getvalue())
    rows = max(1, mb * 2**20 * len(images) // sum(len(i) for i in images))
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())])
    with pq.ParquetWriter(path, schema, use_dictionary=False) as w:
        for start in range(0, rows, ROWS_PER_GROUP):
            n = min(ROWS_PER_GROUP, rows - start)
            w.write_table(pa.table({"image": [{"bytes": images[(start + i) % 16], "path": f"img{start + i:06d}.jpg"}
                                              for i in range(n)],
                                    "text": [f"caption {start + i}" for i in range(n)]}, schema=schema))
    return rows


def peak_rss_mb(parquet: Path, out: Path) -> float:
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.exit(r.stderr[-800:]) if r.returncode else print(resource.getrusage(resource.RUSAGE_CHILDREN)"
               ".ru_maxrss)")
    cmd = [sys.executable, "-m", "stages.prepare", "--input", str(parquet), "--output", str(out), "--size", "64",
           "--shard-size", "256"]
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "FIRSTSTAGE_THREADS": "1"})
    if r.returncode:
        sys.exit(f"prepare failed: {r.stderr[-800:]}")
    return int(r.stdout.strip()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="100,1000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    sizes = [int(s) for s in args.mb.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {mb: tmp / f"{mb}mb.parquet" for mb in sizes}
        rows = {mb: write_file(f, mb) for mb, f in files.items()}
        peaks = {mb: [] for mb in sizes}
        for rep in range(args.repeats):
            for mb in sizes:
                peaks[mb].append(peak_rss_mb(files[mb], tmp / f"out-{mb}-{rep}"))
                print(f"{files[mb].stat().st_size / 2**20:.0f} MB file: peak RSS {peaks[mb][-1]:.0f} MB", flush=True)
    lines = ["| Parquet file | rows | peak RSS of prepare (MB) |", "|---|---:|---:|"]
    for mb in sizes:
        lines.append(f"| {mb} MB | {rows[mb]} | {statistics.median(peaks[mb]):.0f} |")
    ratio = statistics.median(peaks[sizes[-1]]) / statistics.median(peaks[sizes[0]])
    text = "\n".join(lines) + f"\n\npeak RSS ratio, {sizes[-1]} MB file / {sizes[0]} MB file: {ratio:.2f}"
    print(text)
    if args.out:
        from benchmarks.loader import cpu_name

        where = f"{date.today().isoformat()}, {cpu_name()}, commit {os.popen('git rev-parse --short HEAD').read().strip()}"
        Path(args.out).open("a").write(
            f"\n## prepare from Parquet: memory against file size ({where})\n\n`python benchmarks/parquet.py --mb "
            f"{args.mb} --repeats {args.repeats}`: median of {args.repeats} runs each, files in the layout of Hugging "
            f"Face datasets (100 rows per row group, ~300 KB JPEGs).\n\n{text}\n")

if __name__ == "__main__":
    main()
