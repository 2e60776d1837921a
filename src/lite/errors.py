"""The one error type users see: a message that names the problem and the fix."""


class LiteError(ValueError):
    """Bad input or a missing prerequisite. The CLI prints the message and exits with status 2."""
