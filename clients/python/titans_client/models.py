"""Result objects built from the server's JSON responses.

Each keeps the whole response in ``raw``, so fields that a newer server adds stay reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AppendResult", "GenerateResult", "Session", "Usage"]


def _optional_int(value: Any) -> int | None:
    return int(value) if value is not None else None


@dataclass(frozen=True)
class Session:
    """A session's metadata: how much its memory has absorbed, its size and its times (unix seconds)."""

    id: str
    tokens: int
    """Tokens the session's memory has absorbed so far."""
    state_bytes: int
    """Size in bytes of the stored memory state; 0 while the memory is fresh."""
    version: int
    """Incremented by every change of the state."""
    created_at: float
    updated_at: float
    model: str
    """Served model id, or ``unknown`` for a session stored by another model."""
    model_fingerprint: str
    metadata: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Session":
        return cls(id=str(data["id"]), tokens=int(data.get("tokens") or 0),
                   state_bytes=int(data.get("state_bytes") or 0), version=int(data.get("version") or 0),
                   created_at=float(data.get("created_at") or 0.0), updated_at=float(data.get("updated_at") or 0.0),
                   model=str(data.get("model") or ""), model_fingerprint=str(data.get("model_fingerprint") or ""),
                   metadata=dict(data.get("metadata") or {}), raw=data)


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Usage":
        data = data or {}
        prompt = int(data.get("prompt_tokens") or 0)
        completion = int(data.get("completion_tokens") or 0)
        total = data.get("total_tokens")
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=int(total) if total is not None else prompt + completion)


@dataclass(frozen=True)
class GenerateResult:
    """The outcome of a generate request."""

    text: str
    """The generated text, without the stop string that ended it."""
    finish_reason: str
    """``stop`` (end-of-text token or stop string), ``length`` (max_tokens reached) or
    ``cancelled`` (server shutdown)."""
    usage: Usage
    session_id: str
    session_tokens: int
    """Tokens the session's memory has absorbed after this request."""
    session_version: int | None
    request_id: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], session_id: str, text: str | None = None) -> "GenerateResult":
        """Build the result from a response body; ``text`` replaces the body's text (for streams)."""
        return cls(text=text if text is not None else str(data.get("text") or ""),
                   finish_reason=str(data.get("finish_reason") or ""), usage=Usage.from_json(data.get("usage")),
                   session_id=str(data.get("session_id") or session_id),
                   session_tokens=int(data.get("session_tokens") or 0),
                   session_version=_optional_int(data.get("session_version")), request_id=data.get("id"), raw=data)


@dataclass(frozen=True)
class AppendResult:
    """The outcome of an append request: how much text entered the session's memory."""

    session_id: str
    usage: Usage
    """``usage.prompt_tokens`` counts the tokens fed into the memory by this request."""
    session_tokens: int
    """Tokens the session's memory has absorbed after this request."""
    session_version: int | None
    request_id: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], session_id: str) -> "AppendResult":
        return cls(session_id=str(data.get("session_id") or session_id), usage=Usage.from_json(data.get("usage")),
                   session_tokens=int(data.get("session_tokens") or 0),
                   session_version=_optional_int(data.get("session_version")), request_id=data.get("id"), raw=data)
