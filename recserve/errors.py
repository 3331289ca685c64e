"""The one error root of recserve.

Every error a user can cause derives from :class:`RecserveError`. Its message says what was
wrong and what to do; the CLI prints it as one line and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class RecserveError(Exception):
    """Root of every error recserve raises on purpose."""

    exit_code: int = 2


class ConfigError(RecserveError):
    """A recipe, profile or command-line option is invalid."""


class DataError(RecserveError):
    """A dataset spec, file or row cannot be used."""


class ModelError(RecserveError):
    """A model file is missing, corrupt, or does not fit the operation asked for."""


class StageError(RecserveError):
    """A compression stage cannot run on the model it was given."""


class GateFailed(RecserveError):
    """The compressed model lost more quality (or saved less size) than the recipe's gate allows."""

    exit_code = 3

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("quality gate failed: " + "; ".join(self.reasons))


class LoadTestFailed(RecserveError):
    """A load test ran, but did not load the target as asked or got too many errors."""

    exit_code = 3


class ServerError(RecserveError):
    """A server (Triton, the router) could not start, or stopped answering."""


class InferenceError(RecserveError):
    """A request was refused or failed on the server."""
