"""ASGI middleware: request ids, access logs, request metrics, API key checks and body size limits."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import begin_request, new_request_id
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("titans.server.access")

# Routes that load balancers and orchestrators probe. They need no API key and log at DEBUG.
PROBE_PATHS = ("/healthz", "/readyz")
ANONYMOUS_OWNER = "anonymous"


async def send_error(send: Send, error: APIError, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Send `error` as a complete JSON response."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    headers += list(extra_headers)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Give each request an id, echo it as X-Request-Id, log one access line and count it.

    The id comes from the client's X-Request-Id header when that is a valid token. An
    exception that escapes the app becomes a 500 JSON error if no response has started.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # every route with a path, for requests that never reach the router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        context = begin_request(new_request_id(Headers(scope=scope).get("x-request-id")))
        status = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (b"x-request-id", context.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            status = 500
            error = APIError(500, "internal server error; the server log has the details", code="internal_error")
            await send_error(send, error, [(b"x-request-id", context.request_id.encode())])
        finally:
            seconds = time.perf_counter() - started
            route = self._route_template(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.request_duration.labels(route, scope["method"]).observe(seconds)
            level = logging.DEBUG if scope["path"] in PROBE_PATHS or scope["path"] == "/metrics" else logging.INFO
            log.log(level, "%s %s %d in %.1f ms", scope["method"], scope["path"], status, seconds * 1000)

    def _route_template(self, scope: Scope) -> str:
        """Return the matched route's path template, so the label set stays bounded."""
        route = scope.get("route")
        if route is not None and isinstance(getattr(route, "path", None), str):
            return route.path
        # Requests rejected before routing (a missing API key, a body too large) are matched here.
        partial = None
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                return candidate.path
            if match == Match.PARTIAL and partial is None:
                partial = candidate.path
        return partial or "unmatched"


def owner_of_key(key: str) -> str:
    """Return the session owner id of an API key: a digest, so stores and logs never hold the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:24]


class ApiKeyMiddleware:
    """Require `Authorization: Bearer KEY` on every route except the probes, when keys are configured.

    Sets `scope["state"]["owner"]` to the key's owner id (ANONYMOUS_OWNER without keys).
    Every configured key is compared in constant time, whichever matches.
    """

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self._keys = [(key.encode(), owner_of_key(key)) for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self._keys:
            state["owner"] = ANONYMOUS_OWNER
            await self.app(scope, receive, send)
            return
        if scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return

        owner = self._authenticate(Headers(scope=scope).get("authorization"))
        if owner is None:
            error = APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer KEY' "
                                  "with a configured key", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            log.info("rejected %s %s: missing or invalid API key", scope["method"], scope["path"])
            await send_error(send, error)
            return
        state["owner"] = owner
        await self.app(scope, receive, send)

    def _authenticate(self, header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return None
        presented = credential.strip().encode()
        owner = None
        for key, key_owner in self._keys:
            # No early exit: the time taken does not depend on which key matched.
            if hmac.compare_digest(presented, key):
                owner = key_owner
        return owner


# The memory import route, whose body is a state file with a limit of its own.
STATE_UPLOAD_PATH = re.compile(r"/v1/sessions/[^/]+/memory")


class BodyTooLarge(HTTPException):
    """Raised while a request body is read, once it exceeds the limit (rendered as a 413 error)."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes ({setting})")


class BodyLimitMiddleware:
    """Reject request bodies over max_body_bytes (max_state_upload_bytes for a memory import) with 413.

    The rest of a rejected body is read and discarded, up to DISCARD_LIMIT_BYTES, because a
    server that closes a connection with unread data resets it, and the client may then
    never see the 413. A Content-Length over the limit is rejected without passing the
    request on. A body without one (chunked) is counted as it arrives.
    """

    DISCARD_LIMIT_BYTES = 16 * 2**20

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_state_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_state_upload_bytes = max_state_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "PUT" and STATE_UPLOAD_PATH.fullmatch(scope["path"]):
            limit, setting = self.max_state_upload_bytes, "max_state_upload_bytes"
        else:
            limit, setting = self.max_body_bytes, "max_body_bytes"

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            error = BodyTooLarge(limit, setting)
            if int(declared) <= limit + self.DISCARD_LIMIT_BYTES:
                await self._discard_body(receive, 0)
            await send_error(send, APIError(413, error.detail, code="body_too_large"))
            return

        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await self._discard_body(receive, received - limit)
                    raise BodyTooLarge(limit, setting)
            return message

        await self.app(scope, receive_with_limit, send)

    async def _discard_body(self, receive: Receive, discarded: int) -> None:
        while discarded <= self.DISCARD_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            discarded += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
