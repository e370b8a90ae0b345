"""Progress for every stage: a tqdm bar in a terminal; outside one (a SLURM log, nohup, CI), one line every
`interval` seconds (default 30; FIRSTSTAGE_PROGRESS_SECONDS), written by a timer, so a log shows the job is alive
even while one step takes long:

  train: step 120/500 (24%), loss 0.0123, 14.2 img/s, elapsed 0:02:10, ETA 0:05:48

Lines and the bar go to stderr (the stages' summaries go to stdout). Only one process of a job reports (the caller
passes `enabled` for the main process)."""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

from pipeline.threads import follow


def progress_interval() -> float:
    try:
        return max(0.1, float(os.environ.get("FIRSTSTAGE_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0.0, seconds))))


class Progress:
    def __init__(self, desc: str, total: int | None, unit: str = "it", initial: int = 0, enabled: bool = True,
                 interval: float | None = None, file=None):
        self.base = self.desc = desc
        self.total, self.unit, self.done, self.enabled = total, unit, initial, enabled
        self._phased = False
        self.start_done, self.t0 = initial, time.time()
        self.file = file or sys.stderr
        self.postfix: dict[str, str] = {}
        self.bar = None
        self._samples = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if not enabled:
            return
        if getattr(self.file, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file, dynamic_ncols=True,
                            leave=False)
        else:
            self.interval = interval if interval is not None else progress_interval()
            self._timer = threading.Thread(target=self._tick, daemon=True, name=f"{desc}-progress")
            self._timer.start()

    def phase(self, name: str, total: int | None, unit: str) -> None:
        """A new phase of the same job: the line names it (`evaluate: likelihood bounds: draw 37/192 ...`) and counts
        from 0 with its own rate and ETA. Outside a terminal the phase that ends writes its last line, so a log shows
        where each one got to and when the next began."""
        if self._phased and self.bar is None and self.enabled:
            print(self.line(), file=self.file, flush=True)
        with self._lock:
            self.desc, self.total, self.unit = f"{self.base}: {name}", total, unit
            self.done = self.start_done = 0
            self.t0, self.postfix, self._phased = time.time(), {}, True
        if self.bar is not None:
            self.bar.reset(total=total)
            self.bar.set_description(self.desc, refresh=False)
            self.bar.unit = unit
            self.bar.set_postfix({}, refresh=True)

    def samples(self, n: int) -> int:
        """A running count beside the unit (samples written so far, for a bar that counts shards)."""
        self._samples += n
        return self._samples

    def update(self, n: int = 1, **postfix) -> None:
        follow()  # every long loop reports here, on its own thread: where a new thread count can take effect
        with self._lock:
            self.done += n
            self.postfix.update({k: v if isinstance(v, str) else f"{v:.4g}" for k, v in postfix.items()})
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)

    def line(self) -> str:
        with self._lock:
            done, postfix = self.done, dict(self.postfix)
        elapsed = time.time() - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total} ({100 * done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.unit} {done}{of}"] + [f"{k} {v}" for k, v in postfix.items()]
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - done) / rate)}")
        return ", ".join(parts)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=self.file, flush=True)

    def close(self, finished: bool = True) -> None:
        """Outside a terminal, a loop that `finished` (not one ended by an error, whose line comes next) writes its
        last line: a log shows where it got to, also when it took less than one interval."""
        if self._stop.is_set():
            return
        self._stop.set()
        if finished and self.bar is None and self.enabled:
            print(self.line(), file=self.file, flush=True)
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(finished=kind is None)
