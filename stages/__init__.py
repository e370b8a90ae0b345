"""One module per stage; each is a thin main(): parse args -> load config -> call pipeline -> report.

Thread policy, chosen here because OpenMP reads its wait policy once, when torch is first imported. On a shared
machine torch's default (one spinning intra-op thread per core) is the fastest choice when the cores are idle and the
slowest when other work holds them: 30 tiny training steps on 2 cores took 11.9 s with 2 threads and 17.5 s with 1
when idle, but 27.0 s against 17.8 s beside one CPU-bound process (benchmarks/RESULTS.md). So each stage looks
before it starts: it samples /proc/stat for 0.1 s, counts the cores that other work keeps busy, and uses the free
ones, shared between the processes of this job on the node (LOCAL_WORLD_SIZE). With every core free it keeps torch's
default threads; with fewer it takes that many threads and makes them sleep when idle (OMP_WAIT_POLICY=PASSIVE)
rather than spin. During the run the count follows the machine (pipeline/threads.py: looked at again every 2 s,
applied at the loop's next progress update). FIRSTSTAGE_THREADS=N fixes the count instead (the test suite sets 1),
FIRSTSTAGE_THREADS=torch leaves torch's defaults alone; a wait policy the user set wins. apply_thread_policy() applies the
count to torch at the start of every stage. It is decided here, at import, because whatever imports torch
first (a test, the demo, a stage's heavy imports) fixes it: a later decision could no longer set OpenMP's wait policy.
"""

from __future__ import annotations

import os
import sys

from pipeline.threads import busy_cores, choose_threads, start_following  # no torch: read before torch exists


def _allowed_cores() -> list[int]:
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = list(range(os.cpu_count() or 1))
    return cores


def _quota() -> float | None:
    """Cores granted by a cgroup v2 CPU quota (a container started with --cpus), if any."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _decide() -> tuple[int, str]:
    """(intra-op threads, 0 for torch's default; why, in words)."""
    fixed = os.environ.get("FIRSTSTAGE_THREADS", "").strip()
    if fixed == "torch":  # torch's own default: a thread per core, OpenMP's default waiting
        return 0, "torch's default threads (FIRSTSTAGE_THREADS=torch)"
    if fixed:
        try:
            threads = max(1, int(fixed))
        except ValueError:
            raise SystemExit(f"firststage: error: FIRSTSTAGE_THREADS={fixed!r} is not a whole number") from None
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return threads, f"{threads} thread{'s' * (threads > 1)} (FIRSTSTAGE_THREADS={fixed})"
    cores = _allowed_cores()
    quota = _quota()
    count = min(len(cores), quota) if quota else len(cores)
    busy = busy_cores(cores)
    free = len(cores) - (busy if busy is not None else 0.0)  # no /proc/stat: assume the machine is ours
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads, spin = choose_threads(count, free, local)
    if not spin:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    global _AUTO
    _AUTO = (cores, count, local, threads)
    why = (f"{threads} thread{'s' * (threads > 1)}: {free:.1f} of {count:g} cores free"
           + (f", shared by {local} processes of this job on the node" if local > 1 else "")
           + ("; spinning, as every core is ours" if spin else "; sleeping when idle, as other work holds cores"))
    return threads, why


_AUTO: tuple | None = None  # (cores, granted count, local processes, threads) when the count is chosen, not fixed
THREADS, THREADS_WHY = _decide()
if THREADS:  # torch reads it when it is first imported: the stages can import torch late (checks come first)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


def say_threads(prog: str, argv) -> None:
    """A stage's first line: the threads it took and why (on the main process; not for help or `firststage
    config`, whose output is the config)."""
    args = list(sys.argv[1:] if argv is None else argv)
    main_process = int(os.environ.get("RANK", "0") or 0) == 0  # before any process group: the launcher's rank
    if prog in ("config", "cli") or "-h" in args or "--help" in args or not main_process:
        return
    print(f"firststage {prog}: {THREADS_WHY}", flush=True)


def apply_thread_policy() -> int:
    """Give a torch imported before the stage (a test, the demo calling stages) the intra-op thread count that
    this module chose (a torch imported later reads it from OMP_NUM_THREADS), and, when the count was chosen from
    the free cores, start choosing it again during the run (pipeline/threads.py); returns the count."""
    if _AUTO is not None:
        start_following(*_AUTO)
    torch = sys.modules.get("torch")
    if torch is None:
        return THREADS
    if THREADS and torch.get_num_threads() != THREADS:  # 0: torch's default
        torch.set_num_threads(THREADS)
    return torch.get_num_threads()
