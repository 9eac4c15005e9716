"""Exception types. User errors (SaqError and subclasses) become one line on stderr in the CLI;
anything else is a bug and shows a traceback."""

from __future__ import annotations


class SaqError(Exception):
    """An error the user can fix: bad input, missing file, unavailable backend."""


class ConfigError(SaqError, ValueError):
    """An invalid option, recipe or argument value."""


class BadOptionError(ConfigError):
    """A bad value for a command-line option; the CLI exits 2 for it, like a usage error."""


class ModelLoadError(SaqError):
    """A model or weight file could not be found or read."""


class BackendUnavailableError(SaqError, ImportError):
    """An optional runtime (onnxruntime, tensorrt, ...) is not installed."""
