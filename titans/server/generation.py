"""Generation requests as the routes run them: validation, admission, deadlines, disconnects.

Every check that can reject a request runs in `start_generation`, before a route returns
a response, so a streaming request gets the same 4xx as a non-streaming one. After that,
`Generation` reads the engine's events under the request timeout and keeps the token
metrics, also for requests that the client abandoned.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from starlette.types import Receive

from titans.engine import Finished, GenerateRequest, GenerationFailed, RequestStream, TextDelta
from titans.model.sampling import SamplingParams
from titans.session_store import SessionMeta

from .context import current_request_id
from .errors import APIError, invalid_parameter, to_api_error
from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
# Prompts longer than this many characters are tokenized in a worker thread, so a large
# prompt does not stall other requests on the event loop.
THREADED_ENCODE_CHARS = 20_000
# Time that a cancelled request gets to commit its state before the server stops waiting.
CANCEL_WAIT_SECONDS = 10.0


def normalize_stop(stop: str | list[str] | None, param: str = "stop") -> list[str]:
    """Return the stop strings as a list, or raise a 400 naming `param` when one is empty or too long."""
    if stop is None:
        return []
    strings = [stop] if isinstance(stop, str) else list(stop)
    if len(strings) > MAX_STOP_STRINGS:
        raise invalid_parameter(param, f"{param} takes at most {MAX_STOP_STRINGS} strings, got {len(strings)}")
    for text in strings:
        if not text:
            raise invalid_parameter(param, f"{param} strings must not be empty")
        if len(text) > MAX_STOP_CHARS:
            raise invalid_parameter(param, f"{param} strings must have at most {MAX_STOP_CHARS} characters, "
                                           f"got {len(text)}")
    return strings


def resolve_max_tokens(value: int | None, default: int, runtime: Runtime, param: str = "max_tokens") -> int:
    """Return `value` (or `default` when None) after checking it against max_max_tokens."""
    limit = runtime.settings.max_max_tokens
    max_tokens = default if value is None else value
    if not 1 <= max_tokens <= limit:
        raise invalid_parameter(param, f"{param} must be between 1 and {limit}, got {max_tokens}")
    return max_tokens


def build_sampling(*, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0, seed: int | None = None) -> SamplingParams:
    """Build SamplingParams, turning its ValueError (which starts with the field name) into a 400."""
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    except ValueError as exc:
        raise invalid_parameter(str(exc).split(" ", 1)[0], str(exc)) from None


async def encode_prompt(runtime: Runtime, text: str, param: str = "prompt") -> list[int]:
    """Tokenize `text` and check its length against max_prompt_tokens."""
    if len(text) > THREADED_ENCODE_CHARS:
        tokens = await asyncio.to_thread(runtime.tokenizer.encode, text)
    else:
        tokens = runtime.tokenizer.encode(text)
    check_prompt_length(runtime, tokens, param)
    return tokens


def check_prompt_length(runtime: Runtime, tokens: list[int], param: str = "prompt") -> None:
    limit = runtime.settings.max_prompt_tokens
    if len(tokens) > limit:
        raise invalid_parameter(param, f"{param} has {len(tokens)} tokens, more than the maximum of {limit} "
                                       "(max_prompt_tokens)")


async def start_generation(runtime: Runtime, *, session: SessionMeta | None, prompt_tokens: list[int],
                           max_tokens: int, sampling: SamplingParams, stop: list[str],
                           stop_at_eos: bool = True) -> Generation:
    """Admit a request to the engine. Raises APIError, a store error or an engine error before any event.

    `max_tokens=0` appends the prompt without generating. `session=None` runs on a fresh
    memory that is discarded afterwards.
    """
    if not prompt_tokens and (session is None or session.tokens == 0):
        where = "a session that has absorbed no tokens" if session is not None else "a request without a session"
        raise invalid_parameter("prompt", f"prompt must not be empty on {where}")
    request = GenerateRequest(prompt_tokens=prompt_tokens, max_tokens=max_tokens, sampling=sampling, stop=stop,
                              session_id=session.id if session is not None else None,
                              request_id=current_request_id(), stop_at_eos=stop_at_eos)
    stream = await runtime.engine.generate(request)
    runtime.observer.update_gauges()
    return Generation(runtime, stream)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the request body must have been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Generation:
    """One admitted engine request: its events under the request timeout, and its cleanup."""

    def __init__(self, runtime: Runtime, stream: RequestStream) -> None:
        self.runtime = runtime
        self.stream = stream
        self.session_id = stream.request.session_id
        self.request_id = stream.request.request_id
        self.timeout = runtime.settings.request_timeout_seconds
        self.deadline = asyncio.get_running_loop().time() + self.timeout
        self.finished: Finished | None = None
        self._ended = False  # the final event or the failure was read
        self._abandoned = False

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        """Yield the engine's events; raise APIError when the request fails or times out."""
        iterator = aiter(self.stream)
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = await asyncio.wait_for(anext(iterator), max(self.deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:  # the same class as the builtin TimeoutError only from Python 3.11
                raise await self._time_out() from None
            except GenerationFailed as exc:
                self._ended = True
                raise to_api_error(exc) from None
            if isinstance(event, Finished):
                self._record(event)
                yield event
                return
            yield event

    async def result(self, receive: Receive) -> Finished:
        """Wait for the final event of a non-streaming request; cancel it if the client disconnects."""
        reader = asyncio.ensure_future(self._last_event())
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            reader.cancel()
            self.abandon()
            raise
        finally:
            watcher.cancel()
        if reader in done:
            return reader.result()
        reader.cancel()
        log.info("client disconnected; cancelling request %s", self.request_id)
        self.abandon()
        raise APIError(499, "client closed the request", code="client_closed_request")

    def abandon(self) -> None:
        """Cancel the engine request unless it finished, and record its usage once it ends."""
        if self._ended or self._abandoned:
            return
        self._abandoned = True
        self.stream.cancel()
        self.runtime.spawn(self._finish_abandoned())

    async def _last_event(self) -> Finished:
        async for event in self.events():
            if isinstance(event, Finished):
                return event
        raise APIError(500, "generation ended without a final event", code="generation_failed")

    async def _wait_after_cancel(self) -> Finished | None:
        try:
            _, finished = await asyncio.wait_for(self.stream.result(), CANCEL_WAIT_SECONDS)
        except (asyncio.TimeoutError, GenerationFailed) as exc:
            self._ended = True
            log.warning("request %s did not end cleanly after cancellation: %s", self.request_id, exc)
            return None
        self._record(finished)
        return finished

    async def _finish_abandoned(self) -> None:
        finished = await self._wait_after_cancel()
        if finished is not None:
            log.info("abandoned request %s ended: %s after %d tokens; session now has %d tokens",
                     self.request_id, finished.finish_reason, finished.usage.completion_tokens,
                     finished.session_tokens)

    async def _time_out(self) -> APIError:
        self.stream.cancel()
        finished = await self._wait_after_cancel()
        log.warning("request %s timed out after %g s", self.request_id, self.timeout)
        message = f"generation timed out after {self.timeout:g} s (request_timeout_seconds)"
        if self.session_id is not None and finished is not None:
            message += (f"; the session kept the prompt and the {finished.usage.completion_tokens} tokens "
                        f"generated before the timeout ({finished.session_tokens} tokens in total)")
        return APIError(504, message, code="timeout")

    def _record(self, finished: Finished) -> None:
        self._ended = True
        if self.finished is not None:
            return
        self.finished = finished
        self.runtime.metrics.prompt_tokens.inc(finished.usage.prompt_tokens)
        self.runtime.metrics.generated_tokens.inc(finished.usage.completion_tokens)
