"""Server-Sent Events: `data: <json>` frames, keep-alive comments and the streaming response.

Each frame is one `data:` line holding compact JSON (JSON escapes newlines, so a frame never
spans lines) and a blank line. While no frame is ready for `keepalive_seconds`, for example
during a long prefill, a comment line `: keep-alive` keeps proxies from closing the
connection. Responses carry `X-Accel-Buffering: no` so nginx forwards every frame at once,
and the app adds no compression, which would hold tokens back to fill a block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .metrics import Metrics

log = logging.getLogger(__name__)

KEEPALIVE_FRAME = b": keep-alive\n\n"
DONE_FRAME = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def data_frame(payload: Any) -> bytes:
    """Encode one event as a `data:` frame."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def with_keepalive(frames: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """Yield the frames of `frames`, and a keep-alive comment whenever none came for `interval` seconds.

    The next frame is awaited in a task that a keep-alive does not cancel, so no event is lost.
    """
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(frames))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE_FRAME
                continue
            try:
                frame = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield frame
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(BaseException):
            await frames.aclose()


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that counts itself in `titans_active_streams`.

    `on_close` runs when the response ends for any reason: completed, failed, or cancelled
    because the client disconnected. Routes pass a callback that cancels the engine request.
    """

    def __init__(self, frames: AsyncIterator[bytes], *, keepalive_seconds: float, metrics: Metrics,
                 on_close: Callable[[], None], headers: dict[str, str] | None = None) -> None:
        super().__init__(with_keepalive(frames, keepalive_seconds), media_type="text/event-stream",
                         headers={**SSE_HEADERS, **(headers or {})})
        self._metrics = metrics
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._metrics.active_streams.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._metrics.active_streams.dec()
            try:
                self._on_close()
            except Exception:
                log.exception("closing the event stream failed")
