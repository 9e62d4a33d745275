"""The one exception type that reaches users as a clear, single-line message."""


class MedxferError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""
