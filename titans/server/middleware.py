"""ASGI middleware: request ids, access logs and request metrics; API key checks."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import begin_request, new_request_id
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("titans.server.access")

# Routes that load balancers and orchestrators probe; they need no API key and log at DEBUG.
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

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
        if route is not None and hasattr(route, "path"):
            return route.path
        # Requests rejected before routing (a missing API key) are matched here.
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", []):
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                return candidate.path
        return "unmatched"


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
