"""Errors the engine raises to its callers."""

from __future__ import annotations


class RequestValidationError(ValueError):
    """The request cannot be served as asked (bad parameter, prompt too long, ...). Maps to HTTP 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class EngineDeadError(RuntimeError):
    """The engine's step loop has died; no request can be served any more. Maps to HTTP 500."""
