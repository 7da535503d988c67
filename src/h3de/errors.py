"""User-facing errors (the CLI prints their message and exits non-zero, without a traceback) and warnings."""

__all__ = ["H3deError", "ConfigError", "DataError", "DataWarning", "root_cause"]


class H3deError(Exception):
    """Base class of every error caused by user input (files, config values, arguments)."""


class ConfigError(H3deError):
    """An experiment config is invalid: unknown key, wrong type or an impossible value."""


class DataError(H3deError):
    """A dataset file (image, landmark file, manifest) is missing, corrupt or inconsistent."""


class DataWarning(UserWarning):
    """A dataset problem that h3de works around (and names), such as a landmark far outside its image."""


def root_cause(error: BaseException) -> BaseException:
    """The H3deError behind wrappings of ``error`` (MONAI wraps transform errors), else ``error`` itself."""
    seen = error
    while seen is not None:
        if isinstance(seen, H3deError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error
