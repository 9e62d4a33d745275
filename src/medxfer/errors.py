"""The exception and the warning that reach users as one clear line each."""


class MedxferError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""


class MedxferWarning(UserWarning):
    """Something went wrong that medxfer recovered from (a damaged cache entry or checkpoint)."""


def warn(message: str) -> None:
    """Warn once per message; the CLI prints it as one line ``medxfer: warning: MESSAGE``."""
    import warnings

    warnings.warn(message, MedxferWarning, stacklevel=3)
