"""What every stage shares: config arguments, one-line user errors, and the rank logic (print once, all-reduce)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

from pipeline.errors import ConfigError, UserError
from pipeline.io import no_space_message


def is_main_process() -> bool:
    """Global rank 0 (RANK unset or 0), also before any process group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
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
    import torch
    import torch.distributed as dist

    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [t.clone() for t in tensors]
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


def agreed_model_path(path: str) -> str:
    """`--model` pinned once for the whole job (pipeline.checkpoint.pin_model_path): the main process resolves it
    and every rank loads that, so ranks that start a moment apart around a new checkpoint cannot load different
    weights. A bad path is the same one-line error on every rank, never a rank left waiting."""
    import torch.distributed as dist

    from pipeline.checkpoint import pin_model_path

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return pin_model_path(path)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("path", pin_model_path(path))]
        except UserError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)  # a path string or a message, from our own rank 0
    what, value = box[0]
    if what == "error":
        raise UserError(value)
    return value


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> bf16 on a GPU that has it, else 'no'."""
    import torch

    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def add_alias_flags(parser: argparse.ArgumentParser, aliases: dict[str, tuple]) -> None:
    """Flags that are aliases of config keys: {'--flag': ('section.key', type, help)}."""
    for flag, (key, kind, what) in aliases.items():
        parser.add_argument(flag, type=kind, help=f"{what} (alias of {key})")


def alias_overrides(args, aliases: dict[str, tuple]) -> list[str]:
    """key=value overrides for the alias flags that were given (they apply after the other overrides)."""
    out = []
    for flag, (key, _, _) in aliases.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            out.append(f"{key}={value}")
    return out


@contextlib.contextmanager
def flags_named(aliases: dict[str, tuple]):
    """A config error about an aliased key also names its flag."""
    try:
        yield
    except ConfigError as e:
        msg = str(e)
        for flag, (key, _, _) in aliases.items():
            msg = msg.replace(f"{key}:", f"{key} ({flag}):")
        raise ConfigError(msg) from None


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--config", required=required, metavar="PRESET|FILE",
        help="a preset name from configs/ (kl-f8, tiny, ...) or a YAML file",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides, e.g. train.max_steps=100 loss.kl.weight=1e-6 (see `firststage config --keys`)",
    )


def stage_main(fn):
    """Run a stage's main: a UserError becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        module = fn.__module__
        if module == "__main__":  # python -m stages.X: the real name is on the module's spec
            spec = getattr(sys.modules["__main__"], "__spec__", None)
            module = spec.name if spec is not None else module
        prog = module.rsplit(".", 1)[-1]
        apply_thread_policy()
        try:
            return fn(argv)
        except UserError as e:
            print(f"firststage {prog}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except OSError as e:  # a full disk is one line naming the folder, not a traceback
            msg = no_space_message(e.filename or ".", e)
            if msg is None:
                raise
            print(f"firststage {prog}: error: {msg}", file=sys.stderr, flush=True)
            raise SystemExit(74) from None  # EX_IOERR
        except KeyboardInterrupt:
            print(f"firststage {prog}: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper


def apply_thread_policy() -> int:
    """Give torch the intra-op thread count that stages/__init__.py chose for this process; returns the count."""
    import torch

    import stages

    if stages.THREADS and torch.get_num_threads() != stages.THREADS:  # 0: FIRSTSTAGE_THREADS=torch
        torch.set_num_threads(stages.THREADS)
    return torch.get_num_threads()
