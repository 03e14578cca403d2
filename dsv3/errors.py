"""User-facing errors: a bad config, data path, corpus or checkpoint. Entry points catch UserError,
print its one-line message (no traceback) and exit with code 2."""


class UserError(Exception):
    """A mistake the user can fix; the message says what to change."""


class DataError(UserError):
    """Missing data path, empty corpus, corpus too small for the sequence length."""


class CheckpointError(UserError):
    """A truncated, corrupted or incompatible checkpoint."""
