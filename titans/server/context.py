"""Request context for log lines: the request id and session id of the request being served.

A middleware sets the context when a request arrives, and routes add the session id once
they have resolved it. A logging filter copies both ids into every record, so each line about a
request carries them, including lines from the store and engine modules that run in the
request's task.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

# Accepted X-Request-Id values: printable token characters only, so a client cannot forge
# log lines or headers with it.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [request=%(request_id)s session=%(session_id)s] %(message)s"


@dataclass
class RequestContext:
    request_id: str
    session_id: str | None = None


_current: ContextVar[RequestContext | None] = ContextVar("titans_request_context", default=None)


def new_request_id(header_value: str | None) -> str:
    """Return the client's X-Request-Id when it is a valid token, else a new random id."""
    if header_value and REQUEST_ID_PATTERN.fullmatch(header_value):
        return header_value
    return uuid.uuid4().hex


def begin_request(request_id: str) -> RequestContext:
    context = RequestContext(request_id)
    _current.set(context)
    return context


def current_request() -> RequestContext | None:
    return _current.get()


def current_request_id() -> str:
    context = _current.get()
    return context.request_id if context is not None else ""


def set_session_id(session_id: str | None) -> None:
    """Record the session the current request works on, for its log lines."""
    context = _current.get()
    if context is not None:
        context.session_id = session_id


class RequestContextFilter(logging.Filter):
    """Add `request_id` and `session_id` attributes ('-' outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        record.request_id = context.request_id if context is not None else "-"
        record.session_id = (context.session_id or "-") if context is not None else "-"
        return True


def configure_logging(level: str) -> None:
    """Log to stderr in LOG_FORMAT at `level`, replacing the root logger's handlers."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to the root handler. Its access log is replaced by
    # the server's, which carries the request id.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
