"""User-facing errors.

Every error a user can cause (bad data, bad config, missing weights, stale cache) is raised as a
`RepblendError` subclass whose message is ONE line naming the culprit (file and line, or config key)
and what is wrong. The CLI prints that line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class RepblendError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""

    exit_code = 2


class ConfigError(RepblendError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(RepblendError):
    """Input data is unusable (missing image, corrupt JPEG, malformed caption line, empty split...)."""


class EncoderError(RepblendError):
    """A frozen encoder cannot be built (missing weights file, unknown name, offline hub)."""


class CacheError(RepblendError):
    """A feature cache does not match what the config asks for."""


class DivergenceError(RepblendError):
    """A run's settings are unstable: a non-finite loss or gradient, or a non-positive learned learning rate."""


class BusyError(RepblendError):
    """A run directory is in use by another command (two would interleave checkpoints, metrics and results)."""
