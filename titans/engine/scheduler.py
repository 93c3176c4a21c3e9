"""The engine thread: continuous batching of many sessions over one model.

Every step (1) admits waiting jobs up to `max_batch_size`, (2) drops cancelled jobs,
(3) prefills prompts in chunks within a shared token budget, and (4) decodes one token
for every session in the decode batch in a single forward pass. A job finishes as soon as
its own stop condition holds; it never waits for the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from titans.model import MACModel, State
from titans.model.sampling import Sampler
from titans.model.tokenizer import Tokenizer

from .batch import SlotBatch
from .detokenizer import TextStream
from .types import EngineConfig, GenerateRequest, TextDelta

log = logging.getLogger(__name__)


class EngineObserver:
    """Metrics hooks; the server overrides these. Called on the engine thread."""

    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_token(self, seconds_since_previous: float) -> None: ...

    def on_memory_updates(self, count: int) -> None: ...


@dataclass
class JobResult:
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    text: str
    prompt_tokens: int
    completion_tokens: int
    consumed: int  # tokens the state absorbed (the pending token counts once fed)
    # The session's final state, serialised off this thread by the async side so that a
    # commit never stalls the decode batch; None for ephemeral sessions and failures.
    state: State | None
    error: str | None = None


@dataclass
class Job:
    request: GenerateRequest
    state: State | None  # single-session state while waiting or prefilling
    emit: Callable[[TextDelta], None]  # thread-safe hand-off of deltas to the async side
    done: Callable[[JobResult], None]  # thread-safe hand-off of the result
    to_feed: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    stream: TextStream | None = None
    history: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled but not yet fed
    prompt_tokens: int = 0
    cancelled: bool = False
    submitted: float = 0.0
    last_token_at: float = 0.0


class Scheduler:
    def __init__(self, model: MACModel, tokenizer: Tokenizer, config: EngineConfig,
                 observer: EngineObserver | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.observer = observer or EngineObserver()
        self.batch = SlotBatch(model)
        self._rows: list[Job] = []  # decode jobs, in batch row order
        self._prefilling: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # --- called from any thread ---

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows) + len(self._prefilling)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        job.submitted = time.perf_counter()
        with self._lock:
            self._waiting.append(job)
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="titans-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ---

    def _run(self) -> None:
        log.info("engine thread started (max batch %d)", self.config.max_batch_size)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not (self._waiting or self._rows or self._prefilling):
                        self._lock.wait()
                    if self._stopping:
                        break
                    self._admit()
                self._step()
        for job in list(self._waiting) + self._prefilling + self._rows:
            self._finish(job, "cancelled")
        log.info("engine thread stopped after %d steps", self.steps)

    def _admit(self) -> None:
        # A cancelled request still waiting for a slot leaves now, so its session's lease
        # and its queue place free up without waiting for the batch to drain.
        for job in [j for j in self._waiting if j.cancelled]:
            self._finish(job, "cancelled")
        while self._waiting and self.running < self.config.max_batch_size:
            job = self._waiting.popleft()
            if job.state is None:
                job.state = self.model.new_state(1)
            job.to_feed = list(job.state.pending[0]) + list(job.request.prompt_tokens)
            job.state.pending[0] = []
            job.prompt_tokens = len(job.request.prompt_tokens)  # the pending token was billed already
            job.history = list(job.to_feed)
            try:
                job.sampler = Sampler(job.request.sampling)
            except (ValueError, RuntimeError) as exc:  # e.g. a seed torch rejects
                job.done(JobResult("error", "", job.prompt_tokens, 0, 0, None, f"invalid sampling: {exc}"))
                continue
            job.stream = TextStream(self.tokenizer, job.request.stop)
            self._prefilling.append(job)

    def _step(self) -> None:
        started = time.perf_counter()
        for job in [j for j in self._prefilling + self._rows if j.cancelled]:
            self._finish(job, "cancelled")
        prefilled = self._prefill()
        decoded = self._decode()
        self.steps += 1
        self.observer.on_step(len(self._rows), prefilled, decoded, time.perf_counter() - started)

    def _prefill(self) -> int:
        budget = self.config.prefill_chunk_tokens
        used = 0
        for job in list(self._prefilling):
            if used >= budget:
                break
            take = job.to_feed[:budget - used]
            try:
                logits = None
                if take:
                    logits, _ = self.model.feed(job.state, torch.tensor([take]), last_only=True)
            except Exception as exc:  # a model failure fails this request only
                log.exception("request %s: prefill failed", job.request.request_id)
                self._fail(job, exc)
                continue
            job.to_feed = job.to_feed[len(take):]
            used += len(take)
            if job.to_feed:
                continue
            self._prefilling.remove(job)
            if job.request.max_tokens == 0 or logits is None:
                self._finish(job, "length")
                continue
            self._rows.append(job)
            self.batch.add(job.state)
            job.state = None
            self._accept(job, logits[0, -1])
        return used

    def _decode(self) -> int:
        # Every row has a sampled, unfed token, because rows leave the batch as soon as they finish.
        if not self._rows:
            return 0
        tokens = torch.tensor([[j.next_token] for j in self._rows], device=self.model.device)
        view = self.batch.view()
        try:
            before = [c // self.model.config.chunk_size for c in view.consumed]
            logits, view = self.model.feed(view, tokens)
            self.batch.sync(view)
        except Exception as exc:
            log.exception("decode step failed for %d sessions", len(self._rows))
            for job in list(self._rows):
                self._fail(job, exc)
            return 0
        updates = sum(c // self.model.config.chunk_size != b for c, b in zip(view.consumed, before))
        self.observer.on_memory_updates(updates * len(self.model.blocks))
        for job in list(self._rows):
            job.next_token = None
        for row, job in enumerate(list(self._rows)):
            self._accept(job, logits[row, -1])
        return len(tokens)

    def _accept(self, job: Job, logits: torch.Tensor) -> None:
        """Sample the job's next token and decide whether the job goes on."""
        token = job.sampler(logits, job.history)
        now = time.perf_counter()
        if not job.generated:
            self.observer.on_first_token(now - job.submitted)
        else:
            self.observer.on_token(now - job.last_token_at)
        job.last_token_at = now
        request = job.request
        if (request.stop_at_eos and token == self.tokenizer.eos_id) or token in request.sampling.stop_token_ids:
            self._finish(job, "stop")
            return
        job.generated.append(token)
        job.history.append(token)
        job.next_token = token
        text, ids = job.stream.push(token)
        if text:
            job.emit(TextDelta(text, ids))
        if job.stream.stopped:
            self._finish(job, "stop")
        elif len(job.generated) >= request.max_tokens:
            self._finish(job, "length")

    def _take_state(self, job: Job) -> State:
        if job in self._rows:
            row = self._rows.index(job)
            state = self.batch.remove(row)
            last = self._rows.pop()
            if last is not job:
                self._rows[row] = last
            return state
        if job in self._prefilling:
            self._prefilling.remove(job)
        elif job in self._waiting:
            self._waiting.remove(job)
        return job.state if job.state is not None else self.model.new_state(1)

    def _finish(self, job: Job, reason: str) -> None:
        state = self._take_state(job)
        if job.to_feed and reason == "cancelled":
            # Cancelled mid-prefill: keep the unfed prompt tail as pending, so nothing is lost.
            state.pending[0] = list(state.pending[0]) + job.to_feed
        if job.next_token is not None:
            state.pending[0] = list(state.pending[0]) + [job.next_token]
        text, ids = job.stream.finish() if job.stream else ("", [])
        if text:
            job.emit(TextDelta(text, ids))
        keep = state if job.request.session_id is not None else None
        job.done(JobResult(reason, job.stream.text if job.stream else "", job.prompt_tokens,
                           len(job.generated), state.consumed[0] + len(state.pending[0]), keep))

    def _fail(self, job: Job, exc: Exception) -> None:
        self._take_state(job)
        job.done(JobResult("error", "", job.prompt_tokens, len(job.generated), 0, None,
                           f"{type(exc).__name__}: {exc}"))
