"""User-facing errors: each carries a one-line message the CLI prints before exiting non-zero."""


class CortexError(Exception):
    """A problem with the user's input, files or environment (not a bug): printed as one line."""


class BundleError(CortexError):
    pass


class SessionError(CortexError):
    pass
