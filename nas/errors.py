"""User-facing errors: bad input that the CLI reports as one line with exit code 2."""


class ConfigError(ValueError):
    """Raised for invalid user input (unknown op, bad ratio, malformed file, missing data).

    The message is a single line naming what is wrong and how to fix it.
    """


class DivergenceError(RuntimeError):
    """Raised when training produces a non-finite loss; retrying from a checkpoint would not help."""
