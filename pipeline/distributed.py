"""Rank helpers: plain torch.distributed, no launcher (the stages build the Accelerator or PartialState).

  is_main_process()            global rank 0, also before a process group exists
  print0(...)                  print once per job, above a tqdm bar when one is running
  all_reduce(tensors, op)      one flat all-reduce for a list of tensors (identity in one process)
  decided_by_main(fn)          fn() run on the main process only, its result (or its one-line error) on every rank
  on_every_rank(fn, what)      fn() run on every rank; it returns on every rank or fails on every rank
  held_by_main(take, follow)   a lock taken by the main process and followed by every other rank
  gather_objects(obj)          [obj of every rank] on every rank
  rank_and_world()             (this process's global rank, the number of processes): (0, 1) without a group, or
                               with `environment` the RANK / WORLD_SIZE variables
  wait_for_everyone()          a barrier (nothing in one process)
"""

from __future__ import annotations

import os
import sys

from pipeline.errors import SaveAbandoned, UserError


def _group():
    """torch.distributed when a process group exists, else None (torch is not imported for that: a group needs it)."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _world() -> bool:
    dist = _group()
    return dist is not None and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Global rank 0 (RANK unset or 0), also before any process group exists."""
    dist = _group()
    if dist is not None:
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """Print once per job (global rank 0), not once per process; above a tqdm bar when one is running."""
    if is_main_process():
        from tqdm import tqdm

        file = kwargs.pop("file", sys.stdout)
        tqdm.write(" ".join(str(a) for a in args), file=file, **kwargs)
        file.flush()


def all_reduce(tensors: list, op: str = "sum", device=None) -> list:
    """Reduce a list of tensors across all processes in one flat all-reduce (sum, mean or max); returns new
    tensors on their original devices. Identity in a single process."""
    if not tensors or not _world():
        return [t.clone() for t in tensors]
    import torch
    import torch.distributed as dist

    device = device or tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64 if t.dtype == torch.float64 else torch.float32)
                      for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        flat /= dist.get_world_size()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.device, t.dtype))
        offset += t.numel()
    return out


def decided_by_main(fn):
    """`fn()` evaluated once, on the main process, and its (picklable) result handed to every rank: ranks that start
    a moment apart cannot decide differently (which checkpoint a run folder means, say). A UserError on the main
    process is the same one-line error on every rank, never a rank left waiting."""
    if not _world():
        return fn()
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("value", fn())]
        except UserError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)  # from our own rank 0
    what, value = box[0]
    if what == "error":
        raise UserError(value)
    return value


def on_every_rank(fn, what: str, undo=None, device=None,
                  elsewhere: str = "another process of the job could not write its part, so no process keeps any of "
                                   "it; rerun with --resume auto (the previous checkpoint is complete)"):
    """`fn()` on every rank, then one all-reduce in which every rank learns whether it succeeded everywhere (the
    parts of one checkpoint: each rank writes its own). If it failed anywhere, every rank calls `undo()` and raises:
    a rank whose fn raised raises its own error (a full disk: exit 74), the others SaveAbandoned naming `what`, and
    `elsewhere` (exit 75), so no rank goes on alone and none is left waiting in the next collective."""
    import torch

    error = None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 (raised again below, after the other ranks have heard of it)
        error = e
    failed = all_reduce([torch.tensor(float(error is not None), device=device)], "max")[0].item() > 0
    if not failed:
        return value
    if undo is not None:
        try:
            undo()
        except Exception:  # noqa: BLE001 (what failed first is the error to report; a later save starts afresh)
            pass
    if error is not None:
        raise error
    raise SaveAbandoned(f"{what}: {elsewhere}")


def held_by_main(take, follow):
    """`take()` (a lock) on the main process, its token handed to every other rank, which returns `follow(token)`:
    the writes of every rank then prove the main process's lock (pipeline.storage.lock). A UserError taking it is
    the same one line on every rank."""
    held: list = []
    token = decided_by_main(lambda: held.append(take()) or held[0].me["token"])
    return held[0] if held else follow(token)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: the records a rank wrote); [obj] in one
    process."""
    if not _world():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_and_world(environment: bool = False) -> tuple[int, int]:
    """(global rank, world size) of the process group the stage started (accelerate); without one (0, 1), or with
    `environment` the RANK / WORLD_SIZE variables (LatentDataset's default in a trainer that has no group yet)."""
    dist = _group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))) if environment else (0, 1)


def wait_for_everyone() -> None:
    """Every rank waits here until all have arrived (nothing in one process)."""
    if _world():
        import torch.distributed as dist

        dist.barrier()
