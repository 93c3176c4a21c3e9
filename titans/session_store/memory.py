"""In-process session store with a byte budget and least-recently-used eviction."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from .base import (
    SessionExists,
    SessionMeta,
    SessionNotFound,
    SessionStore,
    StateTooLarge,
    TooManySessions,
    VersionConflict,
    check_metadata,
    check_owner,
    check_state,
    check_tokens,
    new_session_id,
    state_digest,
    validate_session_id,
    verify_state,
)

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    meta: SessionMeta
    state: bytes | None
    sha256: str | None
    expires_at: float  # time.monotonic() deadline


class MemoryStore(SessionStore):
    """Session store held in this process's memory and lost when it exits.

    The sum of stored state sizes stays within ``memory_budget_bytes``. A write that would
    exceed it first evicts the least recently used other sessions and logs each eviction.
    All methods run without awaiting, so each one is atomic within one event loop. The
    store is not safe to share between threads.
    """

    backend = "memory"

    def __init__(
        self,
        *,
        ttl_seconds: float,
        max_state_bytes: int,
        max_sessions_per_owner: int,
        memory_budget_bytes: int,
        timeout_seconds: float,
    ) -> None:
        super().__init__(
            ttl_seconds=ttl_seconds,
            max_state_bytes=max_state_bytes,
            max_sessions_per_owner=max_sessions_per_owner,
            timeout_seconds=timeout_seconds,
        )
        self.memory_budget_bytes = memory_budget_bytes
        self.stored_bytes = 0
        self._evictions = 0
        # Ordered from least to most recently used. Every access renews the TTL by the same
        # ttl_seconds, so this is also the order of expiry, which lets _sweep stop early.
        self._sessions: OrderedDict[str, _Entry] = OrderedDict()
        self._owners: dict[str, dict[str, None]] = {}
        self._leases: dict[str, tuple[str, float]] = {}

    @property
    def evictions(self) -> int:
        return self._evictions

    # --- internal helpers -----------------------------------------------------------------

    def _sweep(self) -> None:
        now = time.monotonic()
        while self._sessions:
            session_id, entry = next(iter(self._sessions.items()))
            if entry.expires_at > now:
                break
            self._remove(session_id)
            logger.debug("Session %s expired after %.0f s idle", session_id, self.ttl_seconds)

    def _remove(self, session_id: str) -> _Entry:
        entry = self._sessions.pop(session_id)
        self.stored_bytes -= entry.meta.state_bytes
        owned = self._owners.get(entry.meta.owner)
        if owned is not None:
            owned.pop(session_id, None)
            if not owned:
                del self._owners[entry.meta.owner]
        return entry

    def _use(self, session_id: str) -> _Entry:
        """Return a live entry, renewing its TTL and marking it most recently used."""
        validate_session_id(session_id)
        self._sweep()
        entry = self._sessions.get(session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        entry.expires_at = time.monotonic() + self.ttl_seconds
        self._sessions.move_to_end(session_id)
        return entry

    def _check_budget(self, session_id: str, size: int) -> None:
        if size > self.memory_budget_bytes:
            raise StateTooLarge(size, self.memory_budget_bytes, session_id)

    def _make_room(self, session_id: str, old_size: int, new_size: int) -> None:
        """Evict least recently used sessions other than ``session_id`` until ``new_size`` fits."""
        for victim_id in list(self._sessions):
            if self.stored_bytes - old_size + new_size <= self.memory_budget_bytes:
                return
            if victim_id == session_id:
                continue
            victim = self._remove(victim_id)
            self._evictions += 1
            logger.warning(
                "Evicted session %s (owner %r, %d state bytes) to stay within the memory budget of %d bytes",
                victim_id, victim.meta.owner, victim.meta.state_bytes, self.memory_budget_bytes,
            )

    @staticmethod
    def _public(meta: SessionMeta) -> SessionMeta:
        # Copy the labels so that a caller mutating them cannot change the stored record.
        return dataclasses.replace(meta, metadata=dict(meta.metadata))

    # --- public API -------------------------------------------------------------------------

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
        session_id = new_session_id() if session_id is None else validate_session_id(session_id)
        owner = check_owner(owner)
        state = check_state(state, self.max_state_bytes, session_id)
        tokens = check_tokens(tokens)
        labels = check_metadata(metadata)
        size = len(state) if state is not None else 0
        self._check_budget(session_id, size)
        digest = state_digest(state) if state is not None else None

        self._sweep()
        if session_id in self._sessions:
            raise SessionExists(session_id)
        if len(self._owners.get(owner, ())) >= self.max_sessions_per_owner:
            raise TooManySessions(owner, self.max_sessions_per_owner)

        self._make_room(session_id, 0, size)
        now = time.time()
        meta = SessionMeta(
            id=session_id,
            owner=owner,
            fingerprint=str(fingerprint),
            created_at=now,
            updated_at=now,
            tokens=tokens,
            state_bytes=size,
            version=1,
            metadata=labels,
        )
        self._sessions[session_id] = _Entry(meta, state, digest, time.monotonic() + self.ttl_seconds)
        self._owners.setdefault(owner, {})[session_id] = None
        self.stored_bytes += size
        return self._public(meta)

    async def get(self, session_id: str) -> SessionMeta:
        return self._public(self._use(session_id).meta)

    async def load(self, session_id: str) -> tuple[SessionMeta, bytes | None]:
        entry = self._use(session_id)
        verify_state(session_id, entry.state, entry.meta.state_bytes, entry.sha256)
        return self._public(entry.meta), entry.state

    async def commit(
        self, session_id: str, *, state: bytes | None, tokens: int, base_version: int
    ) -> SessionMeta:
        validate_session_id(session_id)
        state = check_state(state, self.max_state_bytes, session_id)
        tokens = check_tokens(tokens)
        size = len(state) if state is not None else 0
        self._check_budget(session_id, size)
        digest = state_digest(state) if state is not None else None

        entry = self._use(session_id)
        if entry.meta.version != base_version:
            raise VersionConflict(base_version, entry.meta.version, session_id)
        return self._replace_state(session_id, entry, state, digest, tokens)

    async def reset(self, session_id: str) -> SessionMeta:
        entry = self._use(session_id)
        return self._replace_state(session_id, entry, None, None, 0)

    def _replace_state(
        self, session_id: str, entry: _Entry, state: bytes | None, digest: str | None, tokens: int
    ) -> SessionMeta:
        old_size = entry.meta.state_bytes
        new_size = len(state) if state is not None else 0
        self._make_room(session_id, old_size, new_size)
        entry.meta = dataclasses.replace(
            entry.meta,
            updated_at=time.time(),
            tokens=tokens,
            state_bytes=new_size,
            version=entry.meta.version + 1,
        )
        entry.state = state
        entry.sha256 = digest
        self.stored_bytes += new_size - old_size
        return self._public(entry.meta)

    async def delete(self, session_id: str) -> None:
        self._use(session_id)
        self._remove(session_id)

    async def list(self, owner: str) -> list[SessionMeta]:
        self._sweep()
        metas = [self._public(self._sessions[session_id].meta) for session_id in self._owners.get(owner, ())]
        metas.sort(key=lambda meta: meta.created_at)
        return metas

    async def touch(self, session_id: str) -> None:
        self._use(session_id)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._sessions.clear()
        self._owners.clear()
        self._leases.clear()
        self.stored_bytes = 0

    # --- leases -------------------------------------------------------------------------------

    async def _acquire_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        now = time.monotonic()
        # Drop expired leases, whose holders died or stopped renewing, so the dict stays small.
        for expired_id in [key for key, (_, expires_at) in self._leases.items() if expires_at <= now]:
            del self._leases[expired_id]
        if session_id in self._leases:
            return False
        self._leases[session_id] = (token, now + ttl_seconds)
        return True

    async def _renew_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        now = time.monotonic()
        current = self._leases.get(session_id)
        if current is None or current[0] != token or current[1] <= now:
            return False
        self._leases[session_id] = (token, now + ttl_seconds)
        return True

    async def _release_lease(self, session_id: str, token: str) -> bool:
        current = self._leases.get(session_id)
        if current is None or current[0] != token:
            return False
        del self._leases[session_id]
        # An expired lease counts as lost, as in Redis, where its key would already be gone.
        return current[1] > time.monotonic()
