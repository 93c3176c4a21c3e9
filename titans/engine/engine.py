"""The async face of the engine: session leases, state loading and commits, request streams.

The event loop never runs tensor work: the model lives on the scheduler thread, and state
parsing runs in a worker thread. What a session has absorbed after a request ends:

- finished ("length") or stopped by a stop string ("stop"): the prompt and every sampled
  token, the stop string's tokens included (the last sampled token is kept as pending
  and fed at the start of the next request);
- stopped by the end-of-text token: the prompt and every token before it;
- cancelled (client disconnect, `cancel()`, shutdown): the prompt and every token sampled
  before the cancel took effect; prompt tokens not yet prefilled are kept as pending;
- failed: nothing; the session keeps its last committed state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from titans.model import State
from titans.model.checkpoint import Checkpoint
from titans.session_store import SessionBusy, SessionStore

from .scheduler import EngineObserver, Job, JobResult, Scheduler
from .types import (
    EngineBusySession,
    EngineConfig,
    EngineStopped,
    Finished,
    GenerateRequest,
    GenerationFailed,
    QueueFull,
    TextDelta,
    Usage,
)

log = logging.getLogger(__name__)


class RequestStream:
    """Events of one request: TextDelta..., then one Finished (or GenerationFailed raised)."""

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self._events: asyncio.Queue = asyncio.Queue()
        self._job: Job | None = None
        self.finished: Finished | None = None

    def cancel(self) -> None:
        """Stop generating; the engine drops the request within one step and commits its state."""
        if self._job is not None:
            self._job.cancelled = True

    def __aiter__(self) -> AsyncIterator[TextDelta | Finished]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TextDelta | Finished]:
        while True:
            event = await self._events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, Finished):
                self.finished = event
                return

    async def result(self) -> tuple[str, Finished]:
        """Wait for the end; returns (text, final event)."""
        async for event in self:
            if isinstance(event, Finished):
                return event.text, event
        raise GenerationFailed("stream ended without a final event")


class Engine:
    def __init__(self, checkpoint: Checkpoint, store: SessionStore, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.store = store
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.model, self.tokenizer, self.config, observer)
        self._accepting = False
        self._active: set[RequestStream] = set()
        self._admitting = 0  # generate() calls between the queue check and the submit
        self._fresh_state_bytes: bytes | None = None

    # --- life cycle ---

    async def start(self) -> None:
        self.scheduler.start()
        self._accepting = True

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; let running requests finish within the grace period, then cancel the rest."""
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + grace_seconds
        while self._active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for stream in list(self._active):
            stream.cancel()
        while self._active and asyncio.get_running_loop().time() < deadline + 5.0:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.scheduler.stop)

    @property
    def running(self) -> bool:
        return self._accepting and self.scheduler.alive

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def batch_size(self) -> int:
        return self.scheduler.running

    # --- generation ---

    async def generate(self, request: GenerateRequest) -> RequestStream:
        """Admit a request: take the session's lease and load its state; raises before any event.

        Raises EngineStopped, QueueFull, EngineBusySession, SessionNotFound, StoreUnavailable.
        """
        if not self.running:
            raise EngineStopped()
        waiting = self.scheduler.queue_depth + self._admitting
        if waiting >= self.config.max_queued_requests:
            raise QueueFull(waiting, self.config.retry_after_seconds)
        if request.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {request.max_tokens}")

        # A request that is still taking its lease or loading its state holds a queue place,
        # so concurrent calls cannot all pass the check above before any of them is queued.
        self._admitting += 1
        try:
            lease, meta, state = await self._lease_and_load(request)
        finally:
            self._admitting -= 1

        stream = RequestStream(request)
        loop = asyncio.get_running_loop()
        self._active.add(stream)

        def emit(delta: TextDelta) -> None:
            loop.call_soon_threadsafe(stream._events.put_nowait, delta)

        def done(result: JobResult) -> None:
            asyncio.run_coroutine_threadsafe(self._complete(stream, result, lease, meta), loop)

        job = Job(request=request, state=state, emit=emit, done=done)
        stream._job = job
        self.scheduler.submit(job)
        log.info("request %s admitted on session %s (%d prompt tokens, max_tokens %d)",
                 request.request_id, request.session_id, len(request.prompt_tokens), request.max_tokens)
        return stream

    async def _lease_and_load(self, request: GenerateRequest):
        """Take the session's lease and load its state. Ephemeral requests get (None, None, None)."""
        lease, meta, state = None, None, None
        if request.session_id is not None:
            lease = self.store.lease(request.session_id, self.config.lease_ttl_seconds)
            try:
                await lease.__aenter__()
            except SessionBusy:
                raise EngineBusySession(request.session_id, self.config.retry_after_seconds) from None
            try:
                meta, blob = await self.store.load(request.session_id)
                if blob is not None:
                    state = await asyncio.to_thread(State.from_bytes, blob, self.model)
            except BaseException:
                await lease.__aexit__(None, None, None)
                raise
        return lease, meta, state

    async def _complete(self, stream: RequestStream, result: JobResult, lease, meta) -> None:
        # The final event goes out only after the lease is released, so a client may send
        # its next request on the session as soon as it receives this one's final event.
        request = stream.request
        event: Finished | GenerationFailed
        try:
            event = await self._commit(request, result, lease, meta)
        except BaseException as exc:
            # Nothing awaits this coroutine's result, so log here before re-raising.
            log.exception("request %s: completing on session %s failed", request.request_id, request.session_id)
            event = GenerationFailed(f"completing the request failed: {exc}")
            raise
        finally:
            try:
                if lease is not None:
                    await lease.__aexit__(None, None, None)
            finally:
                self._active.discard(stream)
                stream._events.put_nowait(event)

    async def _commit(self, request: GenerateRequest, result: JobResult, lease, meta) -> Finished | GenerationFailed:
        """Commit the session's new state and return the request's final event."""
        if result.finish_reason == "error":
            log.error("request %s on session %s failed: %s", request.request_id, request.session_id, result.error)
            return GenerationFailed(f"generation failed: {result.error}")
        version = None
        if request.session_id is not None and lease is not None:
            try:
                data = await asyncio.to_thread(result.state.to_bytes)
                committed = await self.store.commit(request.session_id, state=data,
                                                    tokens=result.consumed, base_version=meta.version)
                version = committed.version
            except Exception as exc:
                log.error("request %s: commit of session %s failed: %s", request.request_id,
                          request.session_id, exc)
                return GenerationFailed(f"saving the session state failed: {exc}")
        usage = Usage(result.prompt_tokens, result.completion_tokens)
        log.info("request %s on session %s finished: %s, %d prompt + %d completion tokens",
                 request.request_id, request.session_id, result.finish_reason, usage.prompt_tokens,
                 usage.completion_tokens)
        return Finished(result.finish_reason, result.text, usage, result.consumed, version)

    # --- session memory ---

    @contextlib.asynccontextmanager
    async def exclusive(self, session_id: str):
        """Hold the session's lease for an operation outside generation (reset, import, delete)."""
        lease = self.store.lease(session_id, self.config.lease_ttl_seconds)
        try:
            await lease.__aenter__()
        except SessionBusy:
            raise EngineBusySession(session_id, self.config.retry_after_seconds) from None
        try:
            yield
        finally:
            await lease.__aexit__(None, None, None)

    async def fresh_state_bytes(self) -> bytes:
        """Bytes of a new session's state (what a session with no stored state holds)."""
        if self._fresh_state_bytes is None:
            self._fresh_state_bytes = await asyncio.to_thread(lambda: self.model.new_state(1, "cpu").to_bytes())
        return self._fresh_state_bytes

    async def validate_state(self, data: bytes) -> int:
        """Parse state bytes fully for this model; returns the tokens they hold. Raises StateError."""
        state = await asyncio.to_thread(State.from_bytes, data, self.model)
        return state.consumed[0] + len(state.pending[0])
