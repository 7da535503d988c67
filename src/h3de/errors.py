"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

__all__ = ["H3deError", "ConfigError", "DataError"]


class H3deError(Exception):
    """Base class of every error caused by user input (files, config values, arguments)."""


class ConfigError(H3deError):
    """An experiment config is invalid: unknown key, wrong type or an impossible value."""


class DataError(H3deError):
    """A dataset file (image, landmark file, manifest) is missing, corrupt or inconsistent."""
