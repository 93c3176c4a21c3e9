"""Session metadata, store errors, the abstract store and the lease shared by all backends.

The store keeps each session's neural-memory state as opaque bytes plus a small metadata
record. It never deserializes the state, so it never unpickles anything.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""Pattern that a whole session id must match (used with ``fullmatch``)."""


# --- errors -------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of every error raised by the session store."""


class StoreUnavailable(StoreError):
    """The backend could not be reached or rejected the request (timeout, out of memory, read-only)."""

    def __init__(self, cause: BaseException, message: str | None = None) -> None:
        self.cause = cause
        text = message or f"session store is unavailable: {type(cause).__name__}: {cause}"
        super().__init__(text)


class SessionNotFound(StoreError):
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} not found (it never existed, was deleted or expired)")


class SessionExists(StoreError):
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} already exists; choose another id or omit it")


class VersionConflict(StoreError):
    """A commit was based on a version that is no longer the stored one."""

    def __init__(self, expected: int, actual: int, session_id: str | None = None) -> None:
        self.expected = expected
        self.actual = actual
        self.session_id = session_id
        subject = f"session {session_id!r}" if session_id is not None else "session"
        super().__init__(
            f"version conflict on {subject}: commit is based on version {expected}, "
            f"but the stored version is {actual}; reload the session and retry"
        )


class SessionBusy(StoreError):
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} is busy: another request holds its lease; retry later")


class StateTooLarge(StoreError):
    def __init__(self, size: int, limit: int, session_id: str | None = None) -> None:
        self.size = size
        self.limit = limit
        self.session_id = session_id
        subject = f" for session {session_id!r}" if session_id is not None else ""
        super().__init__(f"state of {size} bytes{subject} exceeds the limit of {limit} bytes")


class TooManySessions(StoreError):
    def __init__(self, owner: str, limit: int) -> None:
        self.owner = owner
        self.limit = limit
        super().__init__(
            f"owner {owner!r} already has the maximum of {limit} sessions; delete one before creating another"
        )


class InvalidSessionId(StoreError, ValueError):
    def __init__(self, session_id: object) -> None:
        self.session_id = session_id
        super().__init__(
            f"invalid session id {session_id!r}: expected 1 to 128 characters from A-Z, a-z, 0-9, '_' and '-'"
        )


class CorruptState(StoreError):
    def __init__(self, session_id: str, reason: str) -> None:
        self.session_id = session_id
        self.reason = reason
        super().__init__(f"stored state of session {session_id!r} is corrupt: {reason}")


# --- metadata and checks ----------------------------------------------------------------


@dataclass(frozen=True)
class SessionMeta:
    """Metadata record of one session. Times are unix seconds."""

    id: str
    owner: str
    fingerprint: str
    created_at: float
    updated_at: float
    tokens: int
    state_bytes: int
    version: int
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "fingerprint": self.fingerprint,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "tokens": self.tokens,
            "state_bytes": self.state_bytes,
            "version": self.version,
            "metadata": dict(self.metadata),
        }


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` unchanged, or raise InvalidSessionId unless it matches SESSION_ID_PATTERN."""
    if not isinstance(session_id, str) or SESSION_ID_PATTERN.fullmatch(session_id) is None:
        raise InvalidSessionId(session_id)
    return session_id


def new_session_id() -> str:
    """Generate a random session id of 32 URL-safe characters (192 bits), matching SESSION_ID_PATTERN.

    The id never starts with '-' or '_', so it can follow a command-line option as its value.
    """
    while True:
        session_id = secrets.token_urlsafe(24)
        if session_id[0].isalnum():
            return session_id


def state_digest(state: bytes) -> str:
    return hashlib.sha256(state).hexdigest()


def check_state(state: bytes | None, limit: int, session_id: str | None = None) -> bytes | None:
    """Return the state as immutable bytes, or raise StateTooLarge when it exceeds ``limit``."""
    if state is None:
        return None
    if not isinstance(state, (bytes, bytearray, memoryview)):
        raise TypeError(f"state must be bytes or None, not {type(state).__name__}")
    size = memoryview(state).nbytes
    if size > limit:
        raise StateTooLarge(size, limit, session_id)
    return bytes(state)


def check_tokens(tokens: int) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
    return tokens


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map strings to strings, got {key!r}: {value!r}")
    return dict(metadata)


def check_owner(owner: str) -> str:
    if not isinstance(owner, str):
        raise ValueError(f"owner must be a string, got {owner!r}")
    return owner


def verify_state(session_id: str, state: bytes | None, state_bytes: int, sha256: str | None) -> None:
    """Raise CorruptState unless ``state`` matches the size and SHA-256 recorded in its metadata."""
    if state is None:
        if sha256:
            raise CorruptState(session_id, "metadata records a state blob, but none is stored")
        return
    if not sha256:
        raise CorruptState(session_id, "a state blob is stored, but metadata records none")
    if len(state) != state_bytes:
        raise CorruptState(session_id, f"blob has {len(state)} bytes, metadata records {state_bytes}")
    actual = state_digest(state)
    if actual != sha256:
        raise CorruptState(session_id, f"SHA-256 is {actual}, metadata records {sha256}")


# --- abstract store ---------------------------------------------------------------------


class SessionStore(abc.ABC):
    """Async store of session states and metadata, implemented by MemoryStore, SqliteStore and RedisStore.

    Every method that reads or writes one session renews its idle TTL. An expired session
    behaves as if it never existed.
    """

    backend: str = ""

    def __init__(
        self,
        *,
        ttl_seconds: float,
        max_state_bytes: int,
        max_sessions_per_owner: int,
        timeout_seconds: float,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_state_bytes = max_state_bytes
        self.max_sessions_per_owner = max_sessions_per_owner
        self.timeout_seconds = timeout_seconds

    @property
    def evictions(self) -> int:
        """Number of sessions evicted to stay within the memory budget (memory backend only)."""
        return 0

    @abc.abstractmethod
    async def create(
        self,
        *,
        owner: str,
        fingerprint: str,
        session_id: str | None = None,
        state: bytes | None = None,
        tokens: int = 0,
        metadata: dict[str, str] | None = None,
    ) -> SessionMeta:
        """Create a session at version 1. ``state=None`` means fresh memory with nothing stored.

        Raises InvalidSessionId, SessionExists, StateTooLarge or TooManySessions.
        """

    @abc.abstractmethod
    async def get(self, session_id: str) -> SessionMeta:
        """Return the metadata of a session, or raise SessionNotFound."""

    @abc.abstractmethod
    async def load(self, session_id: str) -> tuple[SessionMeta, bytes | None]:
        """Return metadata and state read together, or raise CorruptState if the state fails its SHA-256 check."""

    @abc.abstractmethod
    async def commit(
        self, session_id: str, *, state: bytes | None, tokens: int, base_version: int
    ) -> SessionMeta:
        """Replace state and token count atomically and increment the version.

        Raises VersionConflict when the stored version differs from ``base_version``.
        """

    @abc.abstractmethod
    async def reset(self, session_id: str) -> SessionMeta:
        """Drop the state, set tokens to 0 and increment the version, whatever the current version is."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None:
        """Delete a session, or raise SessionNotFound."""

    @abc.abstractmethod
    async def list(self, owner: str) -> list[SessionMeta]:
        """Return the live sessions of ``owner`` sorted by creation time, without renewing their TTLs."""

    @abc.abstractmethod
    async def touch(self, session_id: str) -> None:
        """Renew the idle TTL of a session, or raise SessionNotFound."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the backend responds."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and files. The store must not be used afterwards."""

    def lease(self, session_id: str, ttl_seconds: float = 30.0) -> Lease:
        """Return an exclusive, self-renewing lease on a session for use with ``async with``."""
        return Lease(self, validate_session_id(session_id), ttl_seconds)

    # Lease primitives. ``token`` identifies the holder, so a holder never renews or releases
    # a lease that expired and was taken over by another holder.

    @abc.abstractmethod
    async def _acquire_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        """Take the lease unless another holder has an unexpired one, and return whether it was taken."""

    @abc.abstractmethod
    async def _renew_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        """Extend the lease if ``token`` still owns it, and return whether it did."""

    @abc.abstractmethod
    async def _release_lease(self, session_id: str, token: str) -> bool:
        """Delete the lease if ``token`` still owns it, and return whether it did."""


class Lease:
    """Exclusive claim on one session, held by ``async with`` and renewed every ttl/3.

    ``lost`` turns True when a renewal or the release finds that the lease expired and
    another holder took it, so the work done under it may overlap with another request.
    """

    def __init__(self, store: SessionStore, session_id: str, ttl_seconds: float) -> None:
        if not ttl_seconds > 0:
            raise ValueError(f"lease ttl_seconds must be positive, got {ttl_seconds!r}")
        self.store = store
        self.session_id = session_id
        self.ttl_seconds = float(ttl_seconds)
        self.token = secrets.token_hex(16)
        self.lost = False
        self._acquired = False
        self._renewal: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        if self._acquired:
            raise RuntimeError(f"lease on session {self.session_id!r} is already held by this object")
        if not await self.store._acquire_lease(self.session_id, self.token, self.ttl_seconds):
            raise SessionBusy(self.session_id)
        self._acquired = True
        self.lost = False
        self._renewal = asyncio.create_task(
            self._renew_until_cancelled(), name=f"lease-renewal:{self.session_id}"
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop_renewal()
        self._acquired = False
        try:
            released = await self.store._release_lease(self.session_id, self.token)
        except StoreUnavailable as error:
            # The lease expires on its own after ttl_seconds, so the session is freed anyway.
            logger.warning(
                "Failed to release lease on session %s, which expires in %.1f s: %s",
                self.session_id, self.ttl_seconds, error,
            )
            return
        if not released and not self.lost:
            self.lost = True
            logger.warning("Lease on session %s had expired and was taken over before release", self.session_id)

    async def _stop_renewal(self) -> None:
        task, self._renewal = self._renewal, None
        if task is None:
            return
        task.cancel()
        # asyncio.wait never raises the task's CancelledError, so a cancellation of the
        # caller itself still propagates instead of being swallowed here.
        await asyncio.wait({task})

    async def _renew_until_cancelled(self) -> None:
        interval = self.ttl_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self.store._renew_lease(self.session_id, self.token, self.ttl_seconds)
            except StoreUnavailable as error:
                logger.warning(
                    "Failed to renew lease on session %s, retrying in %.2f s: %s",
                    self.session_id, interval, error,
                )
                continue
            if not renewed:
                self.lost = True
                logger.warning("Lease on session %s expired and was taken over by another holder", self.session_id)
                return
