"""The synchronous client, :class:`TitansClient`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence, overload

import httpx
from httpx_sse import EventSource

from ._base import (
    Call,
    RetryPolicy,
    StreamState,
    append_call,
    create_session_call,
    default_headers,
    fork_session_call,
    generate_call,
    import_memory_call,
    resolve_api_key,
    resolve_base_url,
    resolve_timeout,
    session_list,
    session_path,
)
from .errors import APIConnectionError, APITimeoutError, StreamError, TitansError, error_from_response
from .models import AppendResult, GenerateResult, Session

log = logging.getLogger("titans_client")

__all__ = ["GenerateStream", "TitansClient"]


class GenerateStream:
    """The text deltas of a streaming generate request, in order, as they arrive.

    Iterate to receive each delta. ``result`` is the final :class:`GenerateResult` once the
    stream has ended. ``close()`` (or leaving a ``with`` block) ends the request early: the
    server cancels the generation, and the session keeps the prompt and the tokens generated
    before the cancel took effect.
    """

    def __init__(self, response: httpx.Response, session_id: str) -> None:
        self.response = response
        self._state = StreamState(session_id)
        self._events = EventSource(response).iter_sse()
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._closed and self._state.result is None:
            raise StopIteration  # closed early: nothing more will arrive
        try:
            while True:
                try:
                    event = next(self._events)
                except StopIteration:
                    self.close()
                    self._state.finish()  # raises StreamError when the final event is missing
                    raise
                delta = self._state.feed(event.event, event.data)
                if delta is not None:
                    return delta
        except httpx.TimeoutException as exc:
            self.close()
            raise APITimeoutError(f"timed out waiting for the next stream event: {exc}") from exc
        except httpx.TransportError as exc:
            self.close()
            raise APIConnectionError(f"the stream connection broke: {exc}") from exc
        except StreamError:
            self.close()
            raise

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._state.text

    @property
    def result(self) -> GenerateResult | None:
        """The final result, or None while the stream runs or after it was closed early."""
        return self._state.result

    def until_done(self) -> GenerateResult:
        """Consume the remaining deltas and return the final result."""
        for _ in self:
            pass
        return self._state.finish()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.response.close()

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TitansClient:
    """A client for the native API of a Titans server.

    ``base_url`` defaults to ``TITANS_URL`` and then ``http://127.0.0.1:8000``; ``api_key``
    defaults to ``TITANS_API_KEY``. ``timeout`` is in seconds (or an ``httpx.Timeout``).
    Requests that the server turns away with 429, 503 or a busy 409 are retried as ``retry``
    describes. Generate, append and creating a session without an id are not retried unless
    ``retry_generation`` is True or the call passes ``max_retries``, because a repeat would run
    the request twice if the first attempt did reach the engine.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, max_retries: int | None = None,
                 retry: RetryPolicy | None = None, retry_generation: bool = False,
                 headers: Mapping[str, str] | None = None, http_client: httpx.Client | None = None) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = resolve_timeout(timeout)
        retry = retry or RetryPolicy()
        if max_retries is not None:
            retry = RetryPolicy(max_retries=max_retries, backoff_seconds=retry.backoff_seconds,
                                max_backoff_seconds=retry.max_backoff_seconds,
                                max_retry_after_seconds=retry.max_retry_after_seconds,
                                retry_statuses=retry.retry_statuses)
        self.retry = retry
        self.retry_generation = retry_generation
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout)
        self._headers = default_headers(self.api_key, headers)

    # --- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (only when this client created it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "TitansClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _retries_for(self, call: Call, max_retries: int | None) -> int:
        if max_retries is not None:
            return max_retries
        if call.idempotent or self.retry_generation:
            return self.retry.max_retries
        return 0

    def _send(self, call: Call, *, stream: bool = False, max_retries: int | None = None,
              timeout: float | httpx.Timeout | None = None) -> httpx.Response:
        """Send ``call``, retrying refused attempts, and return a successful response."""
        retries = self._retries_for(call, max_retries)
        headers = dict(self._headers)
        headers.update(call.headers or {})
        request_timeout = resolve_timeout(timeout) if timeout is not None else self.timeout
        attempt = 0
        while True:
            request = self._http.build_request(call.method, self.base_url + call.path, json=call.json,
                                               content=call.content, headers=headers, timeout=request_timeout)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                raise APITimeoutError(f"{call.method} {call.path} timed out: {exc}") from exc
            except httpx.ConnectError as exc:
                error: TitansError = APIConnectionError(f"cannot connect to {self.base_url}: {exc}")
                error.__cause__ = exc
            except httpx.TransportError as exc:
                raise APIConnectionError(f"{call.method} {call.path} failed: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                if stream:
                    response.read()
                    response.close()
                error = error_from_response(response)

            delay = self.retry.delay(error, attempt) if attempt < retries else None
            if delay is None:
                raise error
            attempt += 1
            log.info("%s %s failed (%s); retry %d of %d in %.2f s", call.method, call.path, error, attempt,
                     retries, delay)
            time.sleep(delay)

    def _json(self, call: Call, **options: Any) -> Any:
        response = self._send(call, **options)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # --- sessions -------------------------------------------------------------------------

    def create_session(self, session_id: str | None = None, *,
                       metadata: Mapping[str, str] | None = None) -> Session:
        """Create a session with a fresh memory; the server picks the id unless one is given."""
        return Session.from_json(self._json(create_session_call(session_id, metadata)))

    def get_session(self, session_id: str) -> Session:
        return Session.from_json(self._json(Call("GET", session_path(session_id))))

    def list_sessions(self) -> list[Session]:
        """Return the sessions that this API key owns."""
        return [Session.from_json(item) for item in session_list(self._json(Call("GET", "/v1/sessions")))]

    def delete_session(self, session_id: str) -> None:
        self._send(Call("DELETE", session_path(session_id)))

    def fork_session(self, session_id: str, new_session_id: str | None = None, *,
                     metadata: Mapping[str, str] | None = None) -> Session:
        """Create a new session whose memory is a copy of ``session_id``'s memory."""
        return Session.from_json(self._json(fork_session_call(session_id, new_session_id, metadata)))

    # --- generation -----------------------------------------------------------------------

    @overload
    def generate(self, session_id: str, prompt: str, *, stream: Literal[False] = False, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool | None = None,
                 max_retries: int | None = None,
                 timeout: float | httpx.Timeout | None = None) -> GenerateResult: ...

    @overload
    def generate(self, session_id: str, prompt: str, *, stream: Literal[True], max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool | None = None,
                 max_retries: int | None = None,
                 timeout: float | httpx.Timeout | None = None) -> GenerateStream: ...

    def generate(self, session_id: str, prompt: str, *, stream: bool = False, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool | None = None,
                 max_retries: int | None = None,
                 timeout: float | httpx.Timeout | None = None) -> GenerateResult | GenerateStream:
        """Feed ``prompt`` into the session's memory and generate a continuation.

        Sampling parameters left as None take the server's defaults. With ``stream=True`` the
        return value is a :class:`GenerateStream` of text deltas. Errors that the server finds
        before generating (400, 404, 409, ...) are raised here in both modes.
        """
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                    "min_p": min_p, "repetition_penalty": repetition_penalty, "stop": stop, "seed": seed,
                    "ignore_eos": ignore_eos}
        call = generate_call(session_id, prompt, stream, sampling)
        if stream:
            response = self._send(call, stream=True, max_retries=max_retries, timeout=timeout)
            return GenerateStream(response, session_id)
        return GenerateResult.from_json(self._json(call, max_retries=max_retries, timeout=timeout), session_id)

    def append(self, session_id: str, text: str, *, max_retries: int | None = None,
               timeout: float | httpx.Timeout | None = None) -> AppendResult:
        """Feed ``text`` into the session's memory without generating."""
        data = self._json(append_call(session_id, text), max_retries=max_retries, timeout=timeout)
        return AppendResult.from_json(data, session_id)

    # --- memory ---------------------------------------------------------------------------

    def reset_memory(self, session_id: str) -> Session:
        """Replace the session's memory with a fresh one; its id and metadata stay."""
        data = self._json(Call("POST", session_path(session_id, "/memory/reset")))
        return Session.from_json(data)

    @overload
    def export_memory(self, session_id: str, path: None = None) -> bytes: ...

    @overload
    def export_memory(self, session_id: str, path: str | os.PathLike) -> Path: ...

    def export_memory(self, session_id: str, path: str | os.PathLike | None = None) -> bytes | Path:
        """Download the session's memory state (a safetensors file).

        Returns the bytes, or writes them to ``path`` and returns that path. The file is
        written only after the whole download succeeded.
        """
        call = Call("GET", session_path(session_id, "/memory"), headers={"Accept": "application/octet-stream"})
        if path is None:
            return self._send(call).content
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        response = self._send(call, stream=True)
        try:
            with partial.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
        except httpx.HTTPError as exc:
            partial.unlink(missing_ok=True)
            raise APIConnectionError(f"download of the memory of session {session_id!r} failed: {exc}") from exc
        finally:
            response.close()
        partial.replace(target)
        return target

    def import_memory(self, session_id: str, data: bytes | str | os.PathLike) -> Session:
        """Replace the session's memory with a state from :meth:`export_memory` (bytes or a file path).

        The server validates the whole state first, so a state of another model or a corrupt
        file raises :class:`BadRequest` and leaves the old memory in place.
        """
        result = self._json(import_memory_call(session_id, data))
        return Session.from_json(result)

    # --- utility --------------------------------------------------------------------------

    def health(self) -> bool:
        """Return True when ``/healthz`` returns 200, so the server process is alive."""
        return self._send(Call("GET", "/healthz"), max_retries=0).status_code == 200

    def ready(self) -> bool:
        """Return True when ``/readyz`` reports the model loaded, the store reachable and the engine running."""
        try:
            self._send(Call("GET", "/readyz"), max_retries=0)
        except TitansError:
            return False
        return True

    def models(self) -> list[str]:
        """Return the ids of the models the server serves."""
        return [item["id"] for item in self._json(Call("GET", "/v1/models")).get("data", [])]

    def tokenize(self, text: str) -> list[int]:
        return list(self._json(Call("POST", "/v1/tokenize", json={"text": text}))["tokens"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return str(self._json(Call("POST", "/v1/detokenize", json={"tokens": list(tokens)}))["text"])
