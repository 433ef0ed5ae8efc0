"""Errors the CLI maps to exit codes. Library code raises these; it never calls sys.exit."""


class VlmError(Exception):
    """Base class: a problem the user can fix. The CLI prints the message (no traceback)."""

    exit_code = 1


class BadInput(VlmError):
    """Malformed or inconsistent input (files, arguments, stores). Exit code 2."""

    exit_code = 2


class ModelUnavailable(VlmError):
    """A model or its weights cannot be loaded (offline, not cached). Exit code 2."""

    exit_code = 2


class StoreMismatch(BadInput):
    """A store was opened with a different model than the one that wrote it."""
