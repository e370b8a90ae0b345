"""Errors that mean "the user asked for something wrong", reported as one line, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, paths, data). Stages print it as one line and exit 2."""


class ConfigError(UserError):
    """A config key, type or value that the schema rejects."""


class Diverged(UserError):
    """Training diverged: too many non-finite steps in a row (exit code 3, naming the last good checkpoint)."""
