"""Requests, events, settings and errors of the generation engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from titans.model.sampling import SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # sessions decoded together in one forward pass
    max_queued_requests: int = 64  # admitted requests waiting for a batch slot
    prefill_chunk_tokens: int = 256  # prompt tokens prefilled per engine step, shared by all prefills
    lease_ttl_seconds: float = 30.0  # session lease, renewed while a request runs
    retry_after_seconds: float = 1.0  # hint sent with "queue full" and "session busy"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queued_requests", "prefill_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class GenerateRequest:
    """One generation (or, with max_tokens=0, an append) on a session.

    session_id None runs on a fresh memory that is discarded afterwards.
    """

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop: list[str] = field(default_factory=list)
    session_id: str | None = None
    request_id: str = ""
    stop_at_eos: bool = True


@dataclass(frozen=True)
class TextDelta:
    text: str  # new text; never half a UTF-8 character, never part of a stop string
    token_ids: list[int]  # tokens sampled since the previous delta


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # tokens of this request's prompt (a token pending from the previous request
    # is fed too, but was counted as a completion token of that request)
    completion_tokens: int  # tokens sampled in this request

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop", "length" or "cancelled"
    text: str  # the whole completion, without the stop string
    usage: Usage
    session_tokens: int  # tokens the session's memory has absorbed after this request
    session_version: int | None  # store version after the commit; None for ephemeral sessions


class EngineError(Exception):
    """Base class of engine errors."""


class QueueFull(EngineError):
    def __init__(self, queued: int, retry_after: float) -> None:
        super().__init__(f"the request queue is full ({queued} requests waiting); retry after {retry_after:g} s")
        self.retry_after = retry_after


class EngineBusySession(EngineError):
    """Raised when the session is leased by another request (here or on another replica)."""

    def __init__(self, session_id: str, retry_after: float) -> None:
        super().__init__(f"session {session_id!r} is busy with another request; retry after {retry_after:g} s")
        self.session_id = session_id
        self.retry_after = retry_after


class EngineStopped(EngineError):
    def __init__(self) -> None:
        super().__init__("the engine is not running (starting up or shutting down)")


class GenerationFailed(EngineError):
    """Generation failed after it started; the session keeps its last committed state."""
