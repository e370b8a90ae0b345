"""What the library's jobs share: the output's lock (EncodeJob, ExportJob), and the process group of a job launched
as several processes (EncodeJob, EvaluateJob).

A job writes under its output's lock. A stage takes it first (stages.common.take_output_lock, naming its flag) and
the job finds it held; a Python user who calls a job without one gets it taken by the job for the run and released
after, so two runs into one folder are refused the same way. While it is held, every write under a final name in
the folder proves it (pipeline.storage.base.check_writable).
"""

from __future__ import annotations

import contextlib
import os

from pipeline.errors import UserError
from pipeline.storage.base import held_token


def check_process_group() -> None:
    """A job launched as several processes (WORLD_SIZE, as accelerate launch and torchrun set it) deals its work
    among them through their process group: without one, each process would take itself for the whole job (every
    shard done by each, the main process's checks and writes missing on the others). One line, before any work."""
    from pipeline.distributed import rank_and_world

    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and rank_and_world()[1] != int(world):
        raise UserError(f"launched as {world} processes (WORLD_SIZE) but no process group of {world} joins them: "
                        f"create it before running the job (accelerate.PartialState(), as the stages do, or "
                        f"torch.distributed.init_process_group())")


def output_lock(folder, name: str = ".lock", what: str = "output folder", ranks: bool = False, check=None):
    """`folder`'s lock `name` (leased on object storage), after `check()` (credentials, bucket and conditional
    writes); a second run, or one of another split of the job, is refused naming the holder, who aborts the uploads
    no live run owns. `ranks`: the main process's, followed by every other rank (pipeline.distributed.held_by_main)."""
    from pipeline.distributed import held_by_main
    from pipeline.manifest import abort_orphan_uploads, exclude_other_splits
    from pipeline.storage import folder_lock

    def take():
        if check is not None:
            check()
        lock = folder_lock(folder, name, what=what).acquire()
        abort_orphan_uploads(folder, exclude_other_splits(lock))
        return lock

    if not ranks:
        return take()
    return held_by_main(take, lambda token: folder_lock(folder, name, what=what).follow(token))


@contextlib.contextmanager
def under_lock(path, take):
    """The block runs under a lock that covers writes to `path`: the caller's when this process holds (or follows)
    one, else `take()`'s (an acquired lock), released after."""
    if held_token(str(path)) is not None:
        yield None
        return
    lock = take()
    try:
        yield lock
    finally:
        lock.release()
