"""The one error type of checkpoint reading, writing and conversion."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or converted; the message says what to fix."""
