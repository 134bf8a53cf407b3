"""User-facing errors: `run.py` prints their message alone, without a stack trace."""


class DographError(Exception):
    """Base class of the errors a user can fix (bad config, missing data, no network)."""


class ConfigError(DographError, ValueError):
    """A configuration value is invalid; the message names the key."""


class DataError(DographError):
    """A data file or source is missing, corrupt or unreachable; the message names it."""
