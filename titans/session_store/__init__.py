"""Persistent per-session neural-memory state, stored as opaque bytes with versioned metadata.

``open_store(url)`` picks the backend from the URL scheme:

- ``memory://`` (also for ``None`` or ``""``): in this process only, with a byte budget
- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: one SQLite file,
  following the SQLAlchemy convention that a fourth slash starts an absolute path
- ``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock``: Redis, shared
  by every replica

The Redis backend imports redis-py only when such a URL is opened.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from .base import (
    CorruptState,
    InvalidSessionId,
    Lease,
    SessionBusy,
    SessionExists,
    SessionMeta,
    SessionNotFound,
    SessionStore,
    StateTooLarge,
    StoreError,
    StoreUnavailable,
    TooManySessions,
    VersionConflict,
    validate_session_id,
)
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "ACCEPTED_SCHEMES",
    "CorruptState",
    "InvalidSessionId",
    "Lease",
    "MemoryStore",
    "SessionBusy",
    "SessionExists",
    "SessionMeta",
    "SessionNotFound",
    "SessionStore",
    "SqliteStore",
    "StateTooLarge",
    "StoreError",
    "StoreUnavailable",
    "TooManySessions",
    "VersionConflict",
    "open_store",
    "validate_session_id",
]

ACCEPTED_SCHEMES = ("memory://", "sqlite:///", "redis://", "rediss://", "unix://")


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _sqlite_path(url: str) -> str:
    path = url[len("sqlite:///"):]
    if not path or path == ":memory:":
        raise ValueError(
            f"invalid SQLite session store URL {url!r}: expected sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db (use memory:// for an in-process store)"
        )
    return path


def open_store(
    url: str | None = None,
    *,
    prefix: str = "titans",
    ttl_seconds: float = 86400,
    max_state_bytes: int = 64 * 2**20,
    max_sessions_per_owner: int = 1000,
    memory_budget_bytes: int = 1 * 2**30,
    timeout_seconds: float = 5.0,
) -> SessionStore:
    """Create the session store that ``url`` names. It connects lazily, on the first call.

    ``prefix`` namespaces Redis keys, so several deployments can share one Redis. The memory
    and SQLite backends ignore it, because each has its own process or file.
    ``memory_budget_bytes`` applies to the memory backend only. ``timeout_seconds`` bounds each
    Redis call and is the SQLite busy timeout. Raises ValueError for an unknown scheme or a
    non-positive limit.
    """
    _check_positive("ttl_seconds", ttl_seconds)
    _check_positive("max_state_bytes", max_state_bytes)
    _check_positive("max_sessions_per_owner", max_sessions_per_owner)
    _check_positive("memory_budget_bytes", memory_budget_bytes)
    _check_positive("timeout_seconds", timeout_seconds)
    limits = {
        "ttl_seconds": float(ttl_seconds),
        "max_state_bytes": int(max_state_bytes),
        "max_sessions_per_owner": int(max_sessions_per_owner),
        "timeout_seconds": float(timeout_seconds),
    }

    url = url or "memory://"
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        if url.lower() != "memory://":
            raise ValueError(f"invalid memory session store URL {url!r}: expected exactly 'memory://'")
        return MemoryStore(memory_budget_bytes=int(memory_budget_bytes), **limits)
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ValueError(f"invalid SQLite session store URL {url!r}: expected sqlite:///path/to/file.db")
        return SqliteStore(_sqlite_path(url), **limits)
    if scheme in ("redis", "rediss", "unix"):
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        from .redis import RedisStore

        return RedisStore(url, prefix=prefix, **limits)
    raise ValueError(
        f"unsupported session store URL {_redact(url)!r}: "
        f"expected one of the schemes {', '.join(ACCEPTED_SCHEMES)}"
    )
