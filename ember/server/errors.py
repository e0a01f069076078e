"""OpenAI error objects and the exception handlers that produce them.

Every failure the server reports, whatever raised it, leaves as
`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status, so the `openai` SDK raises its
matching exception class (BadRequestError, NotFoundError, AuthenticationError, ...). Validation failures are
400 as OpenAI and vLLM answer them, never FastAPI's 422.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine.errors import EngineDeadError
from ember.engine.errors import RequestValidationError as EngineValidationError
from ember.sampling_params import SamplingParamsError
from ember.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# OpenAI's error `type` values.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status_code: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody is left to answer."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def to_api_error(exc: BaseException) -> APIError:
    """Map whatever the engine or the parameter checks raised to what the client is told."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineValidationError):
        return APIError(400, str(exc), INVALID_REQUEST, exc.param, exc.code)
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), INVALID_REQUEST, exc.param, None)
    if isinstance(exc, EngineDeadError):
        return APIError(500, "the inference engine has stopped; the server must be restarted", SERVER_ERROR,
                        None, "engine_dead")
    # Anything else is a bug: log the traceback here, tell the client nothing internal.
    logger.error("unhandled error while serving a request", exc_info=exc)
    return APIError(500, "internal server error", SERVER_ERROR, None, "internal_error")


def error_json(err: APIError) -> JSONResponse:
    return JSONResponse(err.to_response().model_dump(), status_code=err.status_code, headers=err.headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages.0.role'; pydantic's union-branch labels are dropped."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Union members show up as 'str', 'list[int]', 'function-after[...]': noise to an API user.
    parts = [p for p in parts if not (p.startswith(("list[", "function-", "union[")) or p in ("str", "int"))]
    return ".".join(parts) or None


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    msgs = []
    for e in errors[:5]:
        where = _loc_to_param(tuple(e.get("loc", ())))
        msgs.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(msgs) + more, param


async def _handle_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_json(exc)


async def _handle_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FastAPIValidationError)
    message, param = _validation_message(list(exc.errors()))
    return error_json(bad_request(message, param))


async def _handle_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    default = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
    kind = {401: AUTHENTICATION, 404: NOT_FOUND}.get(exc.status_code, default)
    headers = dict(exc.headers) if exc.headers else None
    return error_json(APIError(exc.status_code, str(exc.detail), kind, headers=headers))


async def _handle_unexpected(_: Request, exc: Exception) -> JSONResponse:
    return error_json(to_api_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(FastAPIValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    for exc_type in (EngineValidationError, SamplingParamsError, EngineDeadError, Exception):
        app.add_exception_handler(exc_type, _handle_unexpected)
