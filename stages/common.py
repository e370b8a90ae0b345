"""What every stage shares: config arguments, one-line user errors, exit codes, SIGTERM, the thread policy.

Exit codes: 0 done, 2 a user error (one line on stderr), 3 training diverged, 74 a full disk, 75 preempted (SIGTERM:
what was complete is kept; run the same command again, which SLURM requeue scripts do on 75; also when object
storage kept failing after its retries), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading

import stages
from pipeline.errors import ConfigError, Diverged, TryAgain, UserError
from pipeline.storage import load_storage_options, no_space_message

EXIT_USER = 2
EXIT_DIVERGED = 3
EXIT_IOERR = 74  # EX_IOERR
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", what SLURM requeue scripts look for
EXIT_INTERRUPTED = 130


def pinned_weights(path: str, ema: bool = True, flag: str = "--model"):
    """`--model` pinned once for the whole job (resolve_weights on the main process, handed to every rank): ranks that
    start a moment apart cannot load different weights; a bad path is one line on every rank, naming the flag."""
    from pipeline.distributed import decided_by_main
    from pipeline.weights import resolve_weights
    with flag_named(flag):
        return decided_by_main(lambda: resolve_weights(path, ema))


def ranks_and_weights(path: str, ema: bool = True, **state):
    """accelerate's PartialState (a launched job's ranks: the process group) and `--model` pinned for all of them."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), **state), pinned_weights(path, ema)


def take_output_lock(folder, name: str = ".lock", what: str = "--output", ranks: bool = False):
    """The output's lock (pipeline.jobs.output_lock), after check_paths of the folder for writing, naming `what`."""
    from pipeline.jobs import output_lock

    return output_lock(folder, name, what, ranks, check=lambda: check_paths([(what, folder)], writes=True))


@contextlib.contextmanager
def flag_named(flag: str | None, value=None, only: type = UserError):
    """A library error about the value of a flag (a path, a part) gets the flag's name in front (None: as it is);
    with `value`, only an error that starts with that value (others are about something else); with `only`, only
    errors of that class (a job's EmptyData: the data it was given)."""
    try:
        yield
    except only as e:
        if flag is None or (value is not None and not str(e).startswith(str(value))):
            raise
        raise type(e)(f"{flag} {e}") from None


def check_paths(named, writes: bool = False) -> None:
    """(flag, path) pairs: pipeline.storage.check_access of each path, before any work, its one line naming the flag."""
    from pipeline.storage import check_access

    for flag, path in named:
        with flag_named(flag):
            check_access(path or "", writes)


def add_alias_flags(parser: argparse.ArgumentParser, aliases: dict[str, tuple]) -> None:
    """Flags that are aliases of config keys: {'--flag': ('section.key', type, help)}."""
    for flag, (key, kind, what) in aliases.items():
        parser.add_argument(flag, type=kind, help=f"{what} (alias of {key})")


def alias_overrides(args, aliases: dict[str, tuple]) -> list[str]:
    """key=value overrides for the alias flags that were given (they apply after the other overrides)."""
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in aliases.items()}
    return [f"{key}={value}" for key, value in given.items() if value is not None]


@contextlib.contextmanager
def alias_errors(aliases: dict[str, tuple]):
    """A config error about an aliased key also names its flag."""
    try:
        yield
    except ConfigError as e:
        msg = str(e)
        for flag, (key, _, _) in aliases.items():
            msg = msg.replace(f"{key}:", f"{key} ({flag}):")
        raise ConfigError(msg) from None


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, metavar="PRESET|FILE", help="a preset (configs/) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100 "
                        "loss.kl.weight=1e-6 (see `firststage config --keys`)")


def stage_main(fn):
    """Run a stage's main: a UserError becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(argv=None, *args, **kwargs):
        module = fn.__module__
        if module == "__main__" and getattr(sys.modules["__main__"], "__spec__", None):  # python -m stages.X: the
            module = sys.modules["__main__"].__spec__.name  # real name is on the module's spec
        prog = module.rsplit(".", 1)[-1]
        stages.apply_thread_policy()
        stages.say_threads(prog, argv)
        try:
            load_storage_options(os.environ.get("FIRSTSTAGE_STORAGE_OPTIONS"))  # object storage per URL prefix
            return fn(argv, *args, **kwargs)
        except (TryAgain, UserError) as e:  # one line; the exit code says what to do next
            print(f"firststage {prog}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED if isinstance(e, TryAgain) else
                             EXIT_DIVERGED if isinstance(e, Diverged) else EXIT_USER) from None
        except OSError as e:  # a full disk is one line naming the folder, not a traceback
            msg = no_space_message(e.filename or ".", e)
            if msg is None:
                raise
            print(f"firststage {prog}: error: {msg}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_IOERR) from None
        except KeyboardInterrupt:
            print(f"firststage {prog}: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:  # the checkpoints the stage pinned (pipeline.weights.firststage: private copies) go with it
            getattr(sys.modules.get("pipeline.weights.firststage"), "release_pins", lambda: None)()

    return wrapper


def preempted_now(message: str) -> None:
    print(message, flush=True)
    raise SystemExit(EXIT_PREEMPTED)


class _StopNow(BaseException):
    """start_up's SIGTERM (BaseException: an `except Exception` in a library being imported lets it through)."""


def _stop_now(*_):
    raise _StopNow


@contextlib.contextmanager
def start_up(stop: threading.Event, message: str):
    """Around a stage's heavy imports (torch, diffusers: about 7 s), before it wrote anything: a SIGTERM before or
    during them ends a one-process stage at once, `message` on stdout (outside the handler) and EXIT_PREEMPTED. A rank
    of a launched job (WORLD_SIZE > 1) only sets `stop`, as outside the block: every rank stops at the same point."""
    alone = int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1
    previous = signal.signal(signal.SIGTERM, _stop_now if alone else signal.getsignal(signal.SIGTERM))
    try:
        if alone and stop.is_set():
            raise _StopNow
        yield
    except _StopNow:
        signal.signal(signal.SIGTERM, previous)  # another SIGTERM from here on only sets `stop`
        preempted_now(message)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_sets(stop: threading.Event, grace=None, on_timeout=None):
    """While the block runs, SIGTERM (SLURM preemption) sets `stop` instead of killing the process: the stage
    finishes its unit of work, keeps what is complete and exits EXIT_PREEMPTED. Installed first, so a SIGTERM during
    start-up is not lost. With `grace` (seconds, read when the signal comes), if the stage has not stopped by then
    (a stuck data loader), `on_timeout(seconds)` runs. The previous handler comes back afterwards."""
    watchdog: list[threading.Timer] = []

    def on_sigterm(*_):
        stop.set()
        if grace is not None and not watchdog:
            seconds = grace()
            watchdog.append(threading.Timer(seconds, on_timeout, args=(seconds,)))
            watchdog[0].daemon = True
            watchdog[0].start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for timer in watchdog:
            timer.cancel()
