"""Errors that mean "the user asked for something wrong", reported as one line, never a traceback; and the one
failure a unit of work returns as a value."""

from typing import NamedTuple


class Unavailable(NamedTuple):
    """A shard not written because the storage could not read its inputs after every retry (prepare's output shard,
    encode's input shard): returned as a value by the worker that gave up on it; the others go on, the stage exits
    75 and a rerun writes it."""

    shard: str  # the shard's name or URL
    why: str  # the storage's error, as one line


class UserError(Exception):
    """A mistake in the user's input (config, paths, data). Stages print it as one line and exit 2."""


class ConfigError(UserError):
    """A config key, type or value that the schema rejects."""


class DataError(UserError):
    """Training data that cannot feed a run (no image in any shard, a long run of undecodable samples). Raised in a
    loader worker; the DataLoader re-raises it in the main process as `DataError("Caught DataError ... traceback")`,
    from which the worker's own line is kept."""

    def __init__(self, msg: str):
        if msg.startswith("Caught DataError"):
            msg = msg.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(msg)


class EmptyData(UserError):
    """The data a job was given holds nothing it could work on. The message starts with the data as given (a
    stage puts its flag in front: stages.common.flag_named(..., only=EmptyData))."""


class Diverged(UserError):
    """Training diverged: too many non-finite steps in a row (exit code 3, naming the last good checkpoint)."""


class TryAgain(Exception):
    """Nothing is wrong with the user's input, and what was complete is kept: running the same command again finishes
    the job. Stages print the one line and exit 75 (EX_TEMPFAIL: what SLURM requeue scripts look for)."""


class LockLost(TryAgain):
    """This process can no longer prove, on the store, that it holds its output's lock (another run took it over,
    or it was removed): it writes nothing more under a final name, and ends with 75."""


class SaveAbandoned(TryAgain):
    """Another rank could not write its part of a checkpoint: no rank keeps any of it (the previous checkpoint is
    the one to resume from)."""


class StorageUnavailable(TryAgain):
    """Object storage kept failing after every retry (throttling, dropped connections, an endpoint gone for longer
    than the retries last). What was complete is kept; running the same command again finishes the job: stages exit
    75 (try again), as after a preemption."""
