"""The project's one error type."""


class DiffsrError(Exception):
    """A failure the user can act on. The message is one line: what failed, the value, what to do."""
