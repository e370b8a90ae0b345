"""The intra-op thread count, chosen from the cores other work leaves free, at start and again during a long run.

stages/__init__.py chooses the count once, before torch is imported (OpenMP reads its wait policy then), from the
busy time of the granted cores over 0.1 s. A run that lasts minutes sees other work come and go: one that started
on 1.7 free cores of 2 took two spinning threads and ran 2.6x slower when the other work came back. So a `Follower`
looks again every `every` seconds (FIRSTSTAGE_THREADS_EVERY, default 2): over that window it takes the busy time of
the granted cores (/proc/stat) less this job's own CPU time (this process and its descendants, the loader workers;
with LOCAL_WORLD_SIZE > 1 the launcher's other children, the job's other ranks, too), chooses again with the same
rule (`choose_threads`), and the loop's own thread applies the new count at its next progress update (`follow()`):
torch.set_num_threads acts on the OpenMP team of the thread that calls it, so a timer thread cannot.

Read without torch (stages/__init__.py imports it before torch exists).
"""

from __future__ import annotations

import os
import sys
import threading
import time

def choose_threads(cores: float, free: float, local_processes: int) -> tuple[int, bool]:
    """(intra-op threads per process, whether they may spin): of `cores` granted, `free` are idle; they are shared
    among this node's processes. Spinning only when the threads fill the granted cores exactly: none is busy with
    other work and none is oversubscribed."""
    threads = max(1, round(min(cores, free)) // max(1, local_processes))
    return threads, threads * max(1, local_processes) == round(cores)


def core_times(cores: list[int]) -> tuple[int, int]:
    """(total, idle) clock ticks of `cores` since boot, from /proc/stat; OSError or ValueError where there is none."""
    total = idle = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cores:
                values = [int(v) for v in fields[:8]]
                total += sum(values)
                idle += values[3] + values[4]  # idle + iowait
    return total, idle


def busy_cores(cores: list[int], seconds: float = 0.1) -> float | None:
    """How many of `cores` other processes kept busy over `seconds` (this process sleeps meanwhile)."""
    try:
        t0, i0 = core_times(cores)
        time.sleep(seconds)
        t1, i1 = core_times(cores)
    except (OSError, ValueError):
        return None
    if t1 <= t0:
        return None
    return len(cores) * (1 - (i1 - i0) / (t1 - t0))


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        pass
    return kids


def job_ticks(roots: list[int]) -> dict[int, int]:
    """{pid: CPU clock ticks (user + system)} of the live processes `roots` and their descendants."""
    seen, todo, ticks = set(), list(roots), {}
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        except (OSError, ValueError, IndexError):
            continue
        todo += _children(pid)
    return ticks


def follow_rule(threads: int, cores: float, free: float, local_processes: int) -> int:
    """The next count from the current one: down as choose_threads says (other work came: every moment with too
    many threads costs most), up only by whole free cores (a quarter of a core short counts as free), so that the
    count does not swing with every passing process."""
    down, _ = choose_threads(cores, free, local_processes)
    if down <= threads:
        return down
    up, _ = choose_threads(cores, int(free + 0.25), local_processes)
    return max(threads, up)


class Follower:
    """Chooses the thread count again every `every` seconds on a daemon thread; `wanted` is the latest choice."""

    def __init__(self, cores: list[int], count: float, local_processes: int, threads: int, every: float):
        self.cores, self.count, self.local, self.every = cores, count, local_processes, every
        self.wanted = threads
        self.changes: list[tuple[float, int, float]] = []  # (time, threads, free cores) of each change applied
        self._stop = threading.Event()
        me = os.getpid()
        self.roots = _children(os.getppid()) if local_processes > 1 else [me]  # the job's ranks, or this process
        if me not in self.roots:
            self.roots.append(me)
        self._thread = threading.Thread(target=self._run, daemon=True, name="threads-follower")
        self._thread.start()

    def window(self, last: tuple[int, int, dict]) -> tuple[float | None, tuple[int, int, dict]]:
        """(free cores over the window since `last`, the new sample); None when nothing can be told. The job's own
        time is counted per process: one that ended in the window (a loader worker at the end of an epoch) takes
        nothing away, one that started brings all of its time."""
        total, idle = core_times(self.cores)
        mine = job_ticks(self.roots)
        now = (total, idle, mine)
        if total <= last[0]:
            return None, now
        share = (total - last[0]) / len(self.cores)  # ticks per core in the window
        busy = len(self.cores) * (1 - (idle - last[1]) / (total - last[0]))
        ours = sum(max(0, t - last[2].get(pid, 0)) for pid, t in mine.items())
        others = max(0.0, busy - ours / share)
        return len(self.cores) - others, now

    def _run(self) -> None:
        try:
            last = (*core_times(self.cores), job_ticks(self.roots))
        except (OSError, ValueError):
            return  # no /proc/stat: the choice at start stands
        while not self._stop.wait(self.every):
            try:
                free, last = self.window(last)
            except (OSError, ValueError):
                return
            if free is not None:
                self.wanted = follow_rule(self.wanted, self.count, free, self.local)
                self.free = free

    def apply(self) -> None:
        torch = sys.modules.get("torch")
        if torch is None:  # a stage without torch (prepare), or not yet: a later import reads the count from here
            os.environ["OMP_NUM_THREADS"] = str(self.wanted)
            return
        if torch.get_num_threads() != self.wanted:
            torch.set_num_threads(self.wanted)
            free = getattr(self, "free", float("nan"))
            self.changes.append((time.time(), self.wanted, free))
            print(f"firststage: {self.wanted} thread{'s' * (self.wanted > 1)} from now on: {free:.1f} of "
                  f"{self.count:g} cores free", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()


FOLLOWER: Follower | None = None


def start_following(cores: list[int], count: float, local_processes: int, threads: int) -> Follower | None:
    """Start the one Follower of this process (stages/__init__.py, for the automatic policy); FIRSTSTAGE_THREADS_EVERY=0
    keeps the choice made at start."""
    global FOLLOWER
    try:
        every = float(os.environ.get("FIRSTSTAGE_THREADS_EVERY", "2"))
    except ValueError:
        every = 2.0
    if FOLLOWER is None and every > 0:
        FOLLOWER = Follower(cores, count, local_processes, threads, every)
    return FOLLOWER


def follow() -> None:
    """On a long loop's own thread (Progress.update calls it): apply the Follower's latest choice, if it changed."""
    if FOLLOWER is not None and FOLLOWER.wanted != getattr(FOLLOWER, "_applied", None):
        FOLLOWER.apply()
        FOLLOWER._applied = FOLLOWER.wanted
