"""User-facing errors.

Anything a user can cause (a bad config, a missing file, a checkpoint of another
shape, token ids out of range) raises a subclass of `UserError`. The CLI turns it
into one line on stderr and exit status 2, so a mistake never looks like a crash.
"""


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


class ConfigError(UserError):
    """An impossible or unknown model / training configuration."""


class DataError(UserError):
    """Missing, empty, corrupt or mismatched data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not match the model."""


class TokenRangeError(UserError):
    """Token ids outside the model's vocabulary."""


class DirectoryBusy(UserError):
    """Another live process is writing the directory (its lock is held)."""
