"""Session store in one SQLite file, shared safely by several processes on one machine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .base import (
    SessionExists,
    SessionMeta,
    SessionNotFound,
    SessionStore,
    StoreError,
    StoreUnavailable,
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

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    tokens INTEGER NOT NULL,
    state BLOB,
    state_bytes INTEGER NOT NULL,
    state_sha256 TEXT,
    version INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, created_at);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS leases (
    session_id TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

_META_COLUMNS = "id, owner, fingerprint, created_at, updated_at, tokens, state_bytes, version, metadata"


def _meta_from_row(row: tuple[Any, ...]) -> SessionMeta:
    return SessionMeta(
        id=row[0],
        owner=row[1],
        fingerprint=row[2],
        created_at=row[3],
        updated_at=row[4],
        tokens=row[5],
        state_bytes=row[6],
        version=row[7],
        metadata=json.loads(row[8]),
    )


class SqliteStore(SessionStore):
    """Session store in a SQLite database file (WAL mode) using the standard-library sqlite3.

    Blocking calls run in worker threads through asyncio.to_thread and share one connection
    under a lock. Every operation is one IMMEDIATE transaction, so state and metadata change
    together and processes that open the same file exclude each other. Expiry uses wall-clock
    time, because several processes compare the same ``expires_at`` values. ``timeout_seconds``
    is the SQLite busy timeout: a write lock held longer by another process raises
    StoreUnavailable.
    """

    backend = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        ttl_seconds: float,
        max_state_bytes: int,
        max_sessions_per_owner: int,
        timeout_seconds: float,
    ) -> None:
        super().__init__(
            ttl_seconds=ttl_seconds,
            max_state_bytes=max_state_bytes,
            max_sessions_per_owner=max_sessions_per_owner,
            timeout_seconds=timeout_seconds,
        )
        self.path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    # --- connection and transactions --------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"SQLite session store {self.path!r} is closed")
        if self._connection is None:
            connection = sqlite3.connect(
                self.path, timeout=self.timeout_seconds, isolation_level=None, check_same_thread=False
            )
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                # In WAL mode, NORMAL never corrupts the file, but a power loss can drop
                # the last commits. The store contains resumable session state, not ledgers.
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.executescript(_SCHEMA)
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            logger.info("Opened SQLite session store %s", self.path)
        return self._connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and an IMMEDIATE (write) transaction, committed unless the body raises."""
        with self._lock:
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(function, *args)
        except sqlite3.Error as error:
            raise StoreUnavailable(error, f"SQLite session store {self.path!r} failed: {error}") from error

    def _expires_at(self, now: float) -> float:
        return now + self.ttl_seconds

    def _renew(self, connection: sqlite3.Connection, session_id: str, now: float) -> None:
        """Renew the TTL of a live session, or raise SessionNotFound if it is missing or expired.

        Expired rows stay until the sweep in ``_create`` deletes them, because raising here
        rolls back the transaction.
        """
        cursor = connection.execute(
            "UPDATE sessions SET expires_at = ? WHERE id = ? AND expires_at > ?",
            (self._expires_at(now), session_id, now),
        )
        if cursor.rowcount == 0:
            raise SessionNotFound(session_id)

    @staticmethod
    def _select_meta(connection: sqlite3.Connection, session_id: str) -> SessionMeta:
        row = connection.execute(f"SELECT {_META_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return _meta_from_row(row)

    # --- public API ---------------------------------------------------------------------------

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
        return await self._run(self._create, session_id, owner, str(fingerprint), state, tokens, labels)

    def _create(
        self, session_id: str, owner: str, fingerprint: str, state: bytes | None, tokens: int, labels: dict[str, str]
    ) -> SessionMeta:
        digest = state_digest(state) if state is not None else None
        size = len(state) if state is not None else 0
        with self._transaction() as connection:
            now = time.time()
            # Expired rows would otherwise stay in the file until their id is read again.
            connection.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            connection.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))
            if connection.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionExists(session_id)
            (count,) = connection.execute("SELECT COUNT(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()
            if count >= self.max_sessions_per_owner:
                raise TooManySessions(owner, self.max_sessions_per_owner)
            connection.execute(
                "INSERT INTO sessions (id, owner, fingerprint, created_at, updated_at, tokens, state, state_bytes,"
                " state_sha256, version, metadata, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                (session_id, owner, fingerprint, now, now, tokens, state, size, digest,
                 json.dumps(labels), self._expires_at(now)),
            )
        return SessionMeta(
            id=session_id, owner=owner, fingerprint=fingerprint, created_at=now, updated_at=now,
            tokens=tokens, state_bytes=size, version=1, metadata=labels,
        )

    async def get(self, session_id: str) -> SessionMeta:
        validate_session_id(session_id)
        return await self._run(self._get, session_id)

    def _get(self, session_id: str) -> SessionMeta:
        with self._transaction() as connection:
            self._renew(connection, session_id, time.time())
            return self._select_meta(connection, session_id)

    async def load(self, session_id: str) -> tuple[SessionMeta, bytes | None]:
        validate_session_id(session_id)
        return await self._run(self._load, session_id)

    def _load(self, session_id: str) -> tuple[SessionMeta, bytes | None]:
        with self._transaction() as connection:
            self._renew(connection, session_id, time.time())
            row = connection.execute(
                f"SELECT {_META_COLUMNS}, state, state_sha256 FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        meta = _meta_from_row(row)
        state, digest = row[-2], row[-1]
        # Hash after the transaction, so other requests need not wait for it.
        verify_state(session_id, state, meta.state_bytes, digest)
        return meta, state

    async def commit(
        self, session_id: str, *, state: bytes | None, tokens: int, base_version: int
    ) -> SessionMeta:
        validate_session_id(session_id)
        state = check_state(state, self.max_state_bytes, session_id)
        tokens = check_tokens(tokens)
        return await self._run(self._replace_state, session_id, state, tokens, base_version)

    async def reset(self, session_id: str) -> SessionMeta:
        validate_session_id(session_id)
        return await self._run(self._replace_state, session_id, None, 0, None)

    def _replace_state(
        self, session_id: str, state: bytes | None, tokens: int, base_version: int | None
    ) -> SessionMeta:
        """Write state and tokens and increment the version. ``base_version=None`` skips the version check."""
        digest = state_digest(state) if state is not None else None
        size = len(state) if state is not None else 0
        with self._transaction() as connection:
            now = time.time()
            self._renew(connection, session_id, now)
            if base_version is not None:
                (version,) = connection.execute(
                    "SELECT version FROM sessions WHERE id = ?", (session_id,)
                ).fetchone()
                if version != base_version:
                    raise VersionConflict(base_version, version, session_id)
            connection.execute(
                "UPDATE sessions SET state = ?, state_sha256 = ?, state_bytes = ?, tokens = ?, updated_at = ?,"
                " version = version + 1 WHERE id = ?",
                (state, digest, size, tokens, now, session_id),
            )
            return self._select_meta(connection, session_id)

    async def delete(self, session_id: str) -> None:
        validate_session_id(session_id)
        await self._run(self._delete, session_id)

    def _delete(self, session_id: str) -> None:
        with self._transaction() as connection:
            self._renew(connection, session_id, time.time())
            connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    async def list(self, owner: str) -> list[SessionMeta]:
        return await self._run(self._list, owner)

    def _list(self, owner: str) -> list[SessionMeta]:
        with self._lock:
            connection = self._connect()
            rows = connection.execute(
                f"SELECT {_META_COLUMNS} FROM sessions WHERE owner = ? AND expires_at > ? ORDER BY created_at",
                (owner, time.time()),
            ).fetchall()
        return [_meta_from_row(row) for row in rows]

    async def touch(self, session_id: str) -> None:
        validate_session_id(session_id)
        await self._run(self._touch, session_id)

    def _touch(self, session_id: str) -> None:
        with self._transaction() as connection:
            self._renew(connection, session_id, time.time())

    async def ping(self) -> None:
        await self._run(self._ping)

    def _ping(self) -> None:
        with self._lock:
            self._connect().execute("SELECT 1").fetchone()

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # --- leases -------------------------------------------------------------------------------

    async def _acquire_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        return await self._run(self._acquire_lease_sync, session_id, token, ttl_seconds)

    def _acquire_lease_sync(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        with self._transaction() as connection:
            now = time.time()
            connection.execute("DELETE FROM leases WHERE session_id = ? AND expires_at <= ?", (session_id, now))
            cursor = connection.execute(
                "INSERT OR IGNORE INTO leases (session_id, token, expires_at) VALUES (?, ?, ?)",
                (session_id, token, now + ttl_seconds),
            )
            return cursor.rowcount == 1

    async def _renew_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        return await self._run(self._renew_lease_sync, session_id, token, ttl_seconds)

    def _renew_lease_sync(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        with self._transaction() as connection:
            now = time.time()
            cursor = connection.execute(
                "UPDATE leases SET expires_at = ? WHERE session_id = ? AND token = ? AND expires_at > ?",
                (now + ttl_seconds, session_id, token, now),
            )
            return cursor.rowcount == 1

    async def _release_lease(self, session_id: str, token: str) -> bool:
        return await self._run(self._release_lease_sync, session_id, token)

    def _release_lease_sync(self, session_id: str, token: str) -> bool:
        with self._transaction() as connection:
            row = connection.execute(
                "SELECT expires_at FROM leases WHERE session_id = ? AND token = ?", (session_id, token)
            ).fetchone()
            if row is None:
                return False
            connection.execute("DELETE FROM leases WHERE session_id = ? AND token = ?", (session_id, token))
            # A lease past its expiry counts as lost even if no other holder took it over yet, as in
            # Redis, where its key would already be gone.
            return row[0] > time.time()
