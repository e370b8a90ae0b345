"""One real process for the race tests (tests/test_races.py): it takes folder locks and writes or reads a JSON file
on command, so several of them can race on one name. Commands on stdin, one line each, one line answered each:

  lock FOLDER T0        at time T0 (a start shared by every worker), FolderLock(FOLDER): 'held' or 'refused MESSAGE'
  release               release the lock taken: 'released'
  write PATH ID N T0    from T0, N atomic_write_json(PATH, ...) as writer ID: 'wrote N' or 'error EXCEPTION'
  read PATH STOP T0     from T0, read PATH until the file STOP exists: 'read N' (valid reads) or 'invalid TEXT'
"""

import json
import signal
import sys
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage import FolderLock, atomic_write_json


def wait_for(t0: float) -> None:
    """Until the shared instant T0: asleep until 20 ms before it (six workers spinning on two cores would starve
    each other and every other test), then spinning, so that every worker leaves within a scheduler tick of the
    others."""
    time.sleep(max(0.0, t0 - time.time() - 0.02))
    while time.time() < t0:
        pass


def main() -> None:
    held = None
    for line in sys.stdin:
        signal.alarm(60)  # a worker that hangs dies, and the test sees an empty answer instead of waiting forever
        cmd, *args = line.split()
        if cmd == "lock":
            wait_for(float(args[1]))
            try:
                held = FolderLock(args[0]).acquire()
                answer = "held"
            except UserError as e:
                answer = f"refused {e}"
        elif cmd == "release":
            held.release() if held is not None else None
            held, answer = None, "released"
        elif cmd == "write":
            path, writer, n = args[0], args[1], int(args[2])
            wait_for(float(args[3]))
            try:
                for i in range(n):
                    atomic_write_json(path, {"writer": writer, "i": i, "padding": "x" * 20000})
                answer = f"wrote {n}"
            except Exception as e:
                answer = f"error {type(e).__name__}: {e}"
        elif cmd == "read":
            path, stop = Path(args[0]), Path(args[1])
            wait_for(float(args[2]))
            answer, n = None, 0
            while answer is None and not stop.exists():
                text = path.read_text()
                try:
                    json.loads(text)
                    n += 1
                except ValueError:
                    answer = f"invalid {text[:80]!r} ({len(text)} characters)"
            answer = answer or f"read {n}"
        else:
            answer = f"unknown command {cmd}"
        print(answer, flush=True)
        signal.alarm(0)


if __name__ == "__main__":
    main()
