"""Configuration, request descriptions, retry policy and stream parsing shared by both clients."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import httpx

from . import __version__
from .errors import APIStatusError, StreamError, TitansError, stream_error
from .models import GenerateResult

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
"""Default timeouts in seconds: 10 to connect, 300 for each read, write and pool wait.

A read timeout bounds the wait between two chunks, so a stream of any length stays open as
long as tokens or keep-alive comments keep arriving.
"""

SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed", "ignore_eos",
)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before repeating a request that the server turned away.

    A request is repeated after 429 (queue full), 503 (store or engine unavailable), a 409 that
    carries ``Retry-After`` (session busy), or a connection that could not be opened. The wait
    is the server's ``Retry-After`` when it sends one, otherwise ``backoff_seconds`` doubled per
    attempt with random jitter, at most ``max_backoff_seconds``.
    """

    max_retries: int = 2
    """Retries of idempotent requests (GET, PUT, DELETE, memory reset); 0 turns them off."""
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0
    max_retry_after_seconds: float = 60.0
    """A longer ``Retry-After`` is not waited for: the error is raised at once."""
    retry_statuses: frozenset[int] = frozenset({409, 429, 503})

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")
        if self.backoff_seconds < 0 or self.max_backoff_seconds < 0 or self.max_retry_after_seconds < 0:
            raise ValueError("backoff_seconds, max_backoff_seconds and max_retry_after_seconds must not be negative")

    def delay(self, error: TitansError, attempt: int) -> float | None:
        """Return the wait in seconds before retry number ``attempt + 1``, or None to raise ``error``."""
        if isinstance(error, APIStatusError):
            if error.status_code not in self.retry_statuses:
                return None
            if error.status_code == 409 and error.retry_after is None:
                return None  # a 409 without Retry-After (session exists) will not change by waiting
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after_seconds else None
        backoff = min(self.max_backoff_seconds, self.backoff_seconds * 2**attempt)
        return backoff * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Call:
    """One HTTP request of the API, before it is sent."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    idempotent: bool = True
    """True when repeating the request after a refused attempt cannot change the outcome."""


def resolve_base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get("TITANS_URL") or DEFAULT_URL
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get("TITANS_API_KEY") or None)


def default_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": f"titans-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def resolve_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(float(timeout))


def session_path(session_id: str, suffix: str = "") -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
    return f"/v1/sessions/{quote(session_id, safe='')}{suffix}"


# --- request descriptions, one per endpoint -------------------------------------------------


def create_session_call(session_id: str | None, metadata: Mapping[str, str] | None) -> Call:
    body: dict[str, Any] = {}
    if session_id is not None:
        body["id"] = session_id
    if metadata is not None:
        body["metadata"] = dict(metadata)
    # With an explicit id a repeat cannot create a second session, so it is safe to retry.
    return Call("POST", "/v1/sessions", json=body, idempotent=session_id is not None)


def fork_session_call(session_id: str, new_session_id: str | None, metadata: Mapping[str, str] | None) -> Call:
    body: dict[str, Any] = {}
    if new_session_id is not None:
        body["id"] = new_session_id
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return Call("POST", session_path(session_id, "/fork"), json=body, idempotent=new_session_id is not None)


def generate_call(session_id: str, prompt: str, stream: bool, sampling: Mapping[str, Any]) -> Call:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    body: dict[str, Any] = {"prompt": prompt}
    body.update(sampling_body(sampling))
    if stream:
        body["stream"] = True
    headers = {"Accept": "text/event-stream"} if stream else None
    return Call("POST", session_path(session_id, "/generate"), json=body, headers=headers, idempotent=False)


def append_call(session_id: str, text: str) -> Call:
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return Call("POST", session_path(session_id, "/append"), json={"text": text}, idempotent=False)


def import_memory_call(session_id: str, data: bytes | bytearray | memoryview | str | os.PathLike) -> Call:
    if isinstance(data, (bytes, bytearray, memoryview)):
        content = bytes(data)
    elif isinstance(data, (str, os.PathLike)):
        content = Path(data).read_bytes()
    else:
        raise TypeError(f"data must be bytes or a file path, got {type(data).__name__}")
    return Call("PUT", session_path(session_id, "/memory"), content=content,
                headers={"Content-Type": "application/octet-stream"})


def sampling_body(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Return the sampling fields that were given (not None), with a lone stop string wrapped in a list."""
    body = {}
    for name in SAMPLING_FIELDS:
        value = sampling.get(name)
        if value is None:
            continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        body[name] = list(value) if name == "stop" else value
    return body


def session_list(data: Any) -> list[dict[str, Any]]:
    """Return the session objects of a list response, ``{"object": "list", "data": [...]}``."""
    return list(data["data"])


# --- streams --------------------------------------------------------------------------------


class StreamState:
    """Turns the events of a generate stream into text deltas and a final result.

    The server sends one ``generation.delta`` object (``{"text": ...}``) per delta, then one
    ``generation`` object with ``finish_reason``, ``usage`` and ``session_tokens``. A failure
    after the first byte arrives as ``{"error": {...}}`` and ends the stream.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.parts: list[str] = []
        self.result: GenerateResult | None = None

    def feed(self, event: str, data: str) -> str | None:
        """Return the text delta carried by one event, or None; raise StreamError for an error event."""
        if not data or data == "[DONE]":
            return None
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            raise StreamError(f"invalid JSON in stream event: {data[:200]!r}") from exc
        if not isinstance(payload, dict):
            raise StreamError(f"unexpected stream event: {data[:200]!r}")
        if event == "error" or "error" in payload:
            raise stream_error(payload)
        if payload.get("object") == "generation" or payload.get("finish_reason"):
            self.result = GenerateResult.from_json(payload, self.session_id, text="".join(self.parts))
            return None
        delta = payload.get("text")
        if delta:
            self.parts.append(delta)
            return delta
        return None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def finish(self) -> GenerateResult:
        """Return the final result; raise StreamError when the stream ended without one."""
        if self.result is None:
            raise StreamError("the stream ended before its final event; the reply may be incomplete")
        return self.result
