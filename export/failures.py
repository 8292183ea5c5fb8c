"""The export's own failure: a message naming the cause and the fix, printed by the CLI."""


class ExportError(RuntimeError):
    """Raised for a user-fixable export problem; the CLI prints it and exits with status 2."""
