"""One JSON error shape for every route: `{"error": {"message", "type", "param", "code"}}`.

Invalid parameters get 400 (not FastAPI's 422), as OpenAI clients expect. Store and engine
errors map to fixed statuses: unknown session 404, busy session 409 with Retry-After, full
queue 429 with Retry-After, unreachable store 503, too large a body or state 413.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from titans.engine import EngineBusySession, EngineStopped, GenerationFailed, QueueFull
from titans.model import StateError, StateModelMismatch
from titans.session_store import (
    CorruptState,
    InvalidSessionId,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    StateTooLarge,
    StoreUnavailable,
    TooManySessions,
    VersionConflict,
)

log = logging.getLogger(__name__)

# Error type by status, following the names OpenAI's API uses where it has one.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error response: status, message and the fields of the JSON error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                                        "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


def invalid_parameter(param: str, message: str) -> APIError:
    """Return a 400 error about one request field."""
    return APIError(400, message, code="invalid_parameter", param=param)


def retry_after_header(seconds: float) -> dict[str, str]:
    """Return a Retry-After header; HTTP takes whole seconds, so the value is rounded up."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def to_api_error(exc: BaseException) -> APIError | None:
    """Map a store, engine or state error to its response, or return None for an unexpected error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SessionNotFound):
        # The same message whether the session never existed or belongs to another API key.
        return APIError(404, f"session {exc.session_id!r} not found", code="session_not_found",
                        param="session_id")

    if isinstance(exc, InvalidSessionId):
        return APIError(400, str(exc), code="invalid_session_id", param="session_id")
    if isinstance(exc, SessionExists):
        return APIError(409, str(exc), code="session_exists", param="id")

    if isinstance(exc, EngineBusySession):
        return APIError(409, str(exc), code="session_busy", headers=retry_after_header(exc.retry_after))
    if isinstance(exc, SessionBusy):
        return APIError(409, str(exc), code="session_busy", headers=retry_after_header(1.0))
    if isinstance(exc, VersionConflict):
        return APIError(409, str(exc), code="version_conflict", headers=retry_after_header(1.0))
    if isinstance(exc, TooManySessions):
        return APIError(409, str(exc), code="too_many_sessions")

    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", headers=retry_after_header(exc.retry_after))
    if isinstance(exc, StateTooLarge):
        return APIError(413, str(exc), code="state_too_large")
    if isinstance(exc, StoreUnavailable):
        return APIError(503, str(exc), code="store_unavailable", headers=retry_after_header(1.0))
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), code="engine_stopped", headers=retry_after_header(1.0))

    if isinstance(exc, CorruptState):
        return APIError(500, str(exc), code="corrupt_state")
    if isinstance(exc, StateModelMismatch):
        return APIError(400, f"invalid state: {exc}", code="state_model_mismatch")
    if isinstance(exc, StateError):
        return APIError(400, f"invalid state: {exc}", code="invalid_state")
    if isinstance(exc, GenerationFailed):
        return APIError(500, str(exc), code="generation_failed")
    return None


def error_response(error: APIError) -> JSONResponse:
    """Build the JSON response of `error` and log it (4xx at INFO, 5xx at ERROR)."""
    level = logging.ERROR if error.status >= 500 else logging.INFO
    log.log(level, "error response %d %s: %s", error.status, error.code or error.error_type, error.message)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _field_name(location: tuple[Any, ...]) -> str | None:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn FastAPI's validation error into one 400 error naming the first invalid field."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    param = _field_name(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    if param is None and isinstance(first.get("input"), (bytes, str)):
        # FastAPI passes a body it did not parse as JSON (another Content-Type) through as is.
        return APIError(400, "the request body must be a JSON object sent with Content-Type: application/json",
                        code="invalid_json")
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {param!r}" if param else "missing request body",
                        code="missing_parameter", param=param)
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}", code="unknown_parameter", param=param)
    if "input" in first and first.get("type") not in ("model_type", "dict_type"):
        value = repr(first["input"])
        if len(value) > 100:
            value = value[:100] + "..."
        message = f"{message}, got {value}"
    if param:
        message = f"invalid {param}: {message}"
    return APIError(400, message, code="invalid_parameter", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers that render every error in the one JSON shape."""

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))

    async def on_known_error(request: Request, exc: Exception) -> JSONResponse:
        error = to_api_error(exc)
        if error is None:  # not reached: only mapped classes are registered below
            raise exc
        return error_response(error)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for error_class in (SessionNotFound, InvalidSessionId, SessionExists, SessionBusy, VersionConflict,
                        TooManySessions, StateTooLarge, StoreUnavailable, CorruptState, StateError,
                        EngineBusySession, QueueFull, EngineStopped, GenerationFailed):
        app.add_exception_handler(error_class, on_known_error)
    # Any other exception reaches RequestContextMiddleware, which logs it and sends a 500.
