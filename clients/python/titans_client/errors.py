"""Typed exceptions for the errors the Titans server returns and for failed connections.

The server returns every error as one JSON body, ``{"error": {"message", "type", "param",
"code"}}``. :func:`error_from_response` turns such a response into the exception class of
its status (and, for 404 and 409, of its ``code``), keeping every field of the body.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequest",
    "Conflict",
    "InternalServerError",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ServerUnavailable",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "StreamError",
    "Timeout",
    "TitansError",
    "error_from_response",
    "parse_retry_after",
]


class TitansError(Exception):
    """Base class of every error this package raises.

    ``status_code`` is the HTTP status, or None when no response arrived. ``type``, ``param``
    and ``code`` are the fields of the server's error body, None where it had none.
    """

    def __init__(self, message: str, *, status_code: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, request_id: str | None = None,
                 retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.insert(0, f"HTTP {self.status_code}:")
        if self.code:
            parts.append(f"(code {self.code})")
        return " ".join(parts)


class APIStatusError(TitansError):
    """The server returned an error status (4xx or 5xx)."""


class BadRequest(APIStatusError):
    """400: a request parameter is invalid; ``param`` names it."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or not accepted."""


class PermissionDenied(APIStatusError):
    """403: the API key may not use this route."""


class NotFound(APIStatusError):
    """404: the route or resource does not exist."""


class SessionNotFound(NotFound):
    """404: the session does not exist, was deleted, expired, or belongs to another API key."""


class Conflict(APIStatusError):
    """409: the request conflicts with the session's current state."""


class SessionBusy(Conflict):
    """409: another request is using the session; ``retry_after`` gives the server's wait in seconds."""


class SessionExists(Conflict):
    """409: a session with the requested id already exists."""


class PayloadTooLarge(APIStatusError):
    """413: the request body or the uploaded memory state exceeds the server's limit."""


class RateLimited(APIStatusError):
    """429: the server's request queue is full; ``retry_after`` gives its wait in seconds."""


class InternalServerError(APIStatusError):
    """500 or another 5xx status that has no class of its own."""


class ServerUnavailable(APIStatusError):
    """503: the session store is unreachable, or the engine is starting or stopping."""


class StreamError(TitansError):
    """An error event that ended a stream after it started; the session keeps its last committed state."""


class APIConnectionError(TitansError):
    """No response arrived: the connection failed or broke."""


class APITimeoutError(APIConnectionError):
    """No response arrived within the configured timeout."""


Timeout = APITimeoutError
"""Short name of :class:`APITimeoutError`."""


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    503: ServerUnavailable,
}

# Finer classes chosen by the error body's code, for the status that code comes with.
_CODE_CLASSES: dict[tuple[int, str], type[APIStatusError]] = {
    (404, "session_not_found"): SessionNotFound,
    (409, "session_busy"): SessionBusy,
    (409, "version_conflict"): SessionBusy,
    (409, "session_exists"): SessionExists,
}


def parse_retry_after(value: str | None) -> float | None:
    """Return a ``Retry-After`` header value in seconds, or None if absent or not understood.

    Accepts both forms HTTP defines: delay seconds and an HTTP date.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _error_fields(body: Any) -> dict[str, Any]:
    """Return the ``error`` object of a server error body, or an empty dict for another shape."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return {}


def error_class(status_code: int, code: str | None) -> type[APIStatusError]:
    """Return the exception class for an error status and the server's error code."""
    if (status_code, code) in _CODE_CLASSES:
        return _CODE_CLASSES[(status_code, code)]
    if status_code in _STATUS_CLASSES:
        return _STATUS_CLASSES[status_code]
    if status_code >= 500:
        return InternalServerError
    return APIStatusError


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Build the typed exception for an error response whose body has been read."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text
    fields = _error_fields(body)
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        text = body if isinstance(body, str) else json.dumps(body)
        message = f"{response.reason_phrase or 'error'}: {text[:500]}" if text else (response.reason_phrase or "error")
    code = fields.get("code")
    cls = error_class(response.status_code, code)
    return cls(message, status_code=response.status_code, type=fields.get("type"), param=fields.get("param"),
               code=code, request_id=response.headers.get("x-request-id"),
               retry_after=parse_retry_after(response.headers.get("retry-after")), body=body)


def stream_error(payload: dict[str, Any]) -> StreamError:
    """Build the exception for an ``{"error": {...}}`` event received inside a stream."""
    fields = _error_fields(payload)
    return StreamError(str(fields.get("message") or "the stream ended with an error"),
                       type=fields.get("type"), param=fields.get("param"), code=fields.get("code"), body=payload)
