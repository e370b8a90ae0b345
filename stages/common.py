"""What every stage shares: config arguments, one-line user errors, a rank-0 print."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from pipeline.errors import UserError


def print0(*args, **kwargs) -> None:
    """Print on the main process only (RANK/LOCAL_RANK unset or 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


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
        prog = fn.__module__.rsplit(".", 1)[-1]
        try:
            return fn(argv)
        except UserError as e:
            print(f"firststage {prog}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print(f"firststage {prog}: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper
