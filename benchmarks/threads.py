"""Thread policy: wall time of a short tiny training run under three policies, on idle and on loaded cores.

  python benchmarks/threads.py [--steps 30] [--repeats 3] [--competitors 0,1,3] [--out benchmarks/RESULTS.md]
  python benchmarks/threads.py --steps 80 --competitors 1@10     # one competitor starting 10 s into each run

Each run is the train stage as a user starts it (`python -m stages.train --config tiny ...`, batch 16, one loader
worker, photo-like 160-px JPEG shards), timed from start to exit (start-up included). Policies: torch's default (a
spinning thread per core: FIRSTSTAGE_THREADS=torch), one thread (FIRSTSTAGE_THREADS=1), and firststage's own choice
(stages/__init__.py: the free cores, spinning only when all are free). "Loaded" runs beside N CPU-bound processes
(`while True: pass`) started a second before; "N@S" starts them S seconds after the run began (the stages choose
at start, then follow the machine: pipeline/threads.py). Repeats interleave the policies; the table gives medians and, per
condition, how far each policy is behind the better of torch's default and one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POLICIES = {"torch default (a spinning thread per core)": "torch", "one thread": "1", "firststage policy": ""}


def hogs(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list) -> None:
    for h in procs:
        h.kill()
        h.wait()


def run_train(shards: Path, out: Path, steps: int, policy: str, late: tuple[int, float] | None = None) -> float:
    """Wall time of one run; `late` = (n, s): n competitors start s seconds after it."""
    env = {k: v for k, v in os.environ.items() if k not in ("FIRSTSTAGE_THREADS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["FIRSTSTAGE_THREADS"] = policy
    cmd = [sys.executable, "-m", "stages.train", "--config", "tiny", f"data.train={shards}", f"output_dir={out}",
           f"train.max_steps={steps}", f"train.log_every={steps}", "train.tracker=none", "data.num_workers=1"]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        competing = []
        try:
            if late is not None:
                try:
                    proc.wait(timeout=late[1])
                except subprocess.TimeoutExpired:
                    competing = hogs(late[0])
            proc.wait()
        finally:
            stop(competing)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"train failed ({proc.returncode}): {err.read()[-800:]}")
    return time.perf_counter() - t


def label(condition: str) -> str:
    n, _, after = condition.partition("@")
    if after:
        return f"{n} competing from {float(after):g} s into the run"
    return "idle" if n == "0" else f"{n} competing"


def main() -> None:
    from benchmarks.loader import make_shards

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--competitors", default="0,1", help="comma-separated numbers of competing CPU-bound processes")
    ap.add_argument("--policies", default="torch,1,auto", help="which of torch (torch's default), 1 (one thread) and "
                                                             "auto (firststage's policy) to run")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    conditions = args.competitors.split(",")
    chosen = {name: policy for name, policy in POLICIES.items() if (policy or "auto") in args.policies.split(",")}
    times = {(c, p): [] for c in conditions for p in POLICIES}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        make_shards(shards, 160, 96, per_shard=24)
        for c in conditions:
            n, _, after = c.partition("@")
            late = (int(n), float(after)) if after else None
            before = hogs(0 if late else int(n))
            try:
                time.sleep(1.0 if before else 0.0)
                for rep in range(args.repeats):
                    for name, policy in chosen.items():
                        t = run_train(shards, tmp / f"run-{c}-{rep}-{policy or 'auto'}", args.steps, policy, late)
                        times[(c, name)].append(t)
                        print(f"{label(c)}, {name}: {t:.1f} s", flush=True)
            finally:
                stop(before)
    header = "| policy | " + " | ".join(f"{label(c)} (s)" for c in conditions) + " |"
    lines = [header, "|---|" + "---:|" * len(conditions)]
    fixed = [n for n in list(POLICIES)[:2] if n in chosen]
    for name in chosen:
        cells = []
        for c in conditions:
            med = statistics.median(times[(c, name)])
            best = min(statistics.median(times[(c, n)]) for n in fixed)
            cells.append(f"{med:.1f} ({med / best - 1:+.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        import torch

        commit = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or "?"
        with open(args.out, "a") as f:
            f.write(f"\n## Thread policy of the stages ({date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, "
                    f"torch {torch.__version__}, commit {commit})\n\n`python benchmarks/threads.py --steps {args.steps} "
                    f"--repeats {args.repeats} --competitors {args.competitors} --policies {args.policies}`: wall time of `python -m stages.train "
                    f"--config tiny` for {args.steps} steps (batch 16, one loader worker, start-up included), median "
                    f"of {args.repeats} interleaved runs; in brackets, the distance to the best fixed choice run (torch's "
                    f"default, one thread) in the same condition.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
