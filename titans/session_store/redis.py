"""Session store in Redis, shared by all replicas of the server.

Keys of one session, under the configured prefix:

- ``{prefix}:session:{id}:meta``: hash with the metadata fields and the state's SHA-256
- ``{prefix}:session:{id}:state``: string with the state bytes, absent when there is no state
- ``{prefix}:session:{id}:staging:{random}``: a new state uploaded before the write script
  renames it over ``:state``, expiring on its own if the writer dies in between
- ``{prefix}:session:{id}:lease``: string with the lease holder's random token
- ``{prefix}:owner:{owner}:sessions``: sorted set of the owner's session ids, scored by creation time

Every change of metadata and state happens in one Lua script (redis_scripts.py), and ``load``
reads both in one MULTI/EXEC, so no reader sees one without the other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .base import (
    CorruptState,
    SessionExists,
    SessionMeta,
    SessionNotFound,
    SessionStore,
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
from .redis_scripts import (
    CREATE_LUA,
    DELETE_LUA,
    READ_LUA,
    RELEASE_LEASE_LUA,
    RENEW_LEASE_LUA,
    WRITE_LUA,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

def _describe_url(url: str) -> str:
    """Return the URL without user name and password, for messages and logs."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisStore(SessionStore):
    """Session store in Redis through ``redis.asyncio`` with a connection pool.

    Each call is bounded by ``timeout_seconds`` (socket connect and read timeouts and an
    overall deadline). A refused or dropped connection is retried once, immediately, which
    replaces pooled connections that died while Redis restarted. Any Redis error raises
    StoreUnavailable, and the next call opens fresh connections.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
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
        self.prefix = prefix
        self.location = _describe_url(url)
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._read = self._client.register_script(READ_LUA)
        self._write = self._client.register_script(WRITE_LUA)
        self._create = self._client.register_script(CREATE_LUA)
        self._delete = self._client.register_script(DELETE_LUA)
        self._renew_lease_script = self._client.register_script(RENEW_LEASE_LUA)
        self._release_lease_script = self._client.register_script(RELEASE_LEASE_LUA)
        logger.info("Using Redis session store at %s with key prefix %r", self.location, prefix)

    # --- keys and helpers ---------------------------------------------------------------------

    def _session_keys(self, session_id: str) -> list[str]:
        base = f"{self.prefix}:session:{session_id}"
        return [f"{base}:meta", f"{base}:state"]

    def _lease_key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}:lease"

    @property
    def _owner_key_prefix(self) -> str:
        return f"{self.prefix}:owner:"

    def _owner_key(self, owner: str) -> str:
        return f"{self._owner_key_prefix}{owner}:sessions"

    @property
    def _ttl_ms(self) -> int:
        return _milliseconds(self.ttl_seconds)

    @property
    def _staging_ttl_ms(self) -> int:
        # NOTE: 60 s is a guess: long enough for the write script that follows the upload
        # within one timeout, short enough that a crashed client's upload soon goes away.
        return _milliseconds(max(60.0, 4 * self.timeout_seconds))

    async def _call(self, operation: Awaitable[T]) -> T:
        """Await one Redis operation within timeout_seconds and map its failures to StoreUnavailable."""
        try:
            return await asyncio.wait_for(operation, self.timeout_seconds)
        except (RedisError, OSError) as error:
            # OSError covers TimeoutError from wait_for and socket errors outside redis-py.
            raise StoreUnavailable(
                error, f"Redis session store at {self.location} is unavailable: {type(error).__name__}: {error}"
            ) from error

    @staticmethod
    def _meta_from_fields(session_id: str, fields: Mapping[bytes, bytes] | Sequence[bytes]) -> tuple[SessionMeta, str]:
        """Parse a meta hash (HGETALL as a dict or a flat list) into metadata and the state SHA-256."""
        if not isinstance(fields, Mapping):
            fields = dict(zip(fields[::2], fields[1::2]))
        values = {key.decode(): value.decode() for key, value in fields.items()}
        try:
            meta = SessionMeta(
                id=values["id"],
                owner=values["owner"],
                fingerprint=values["fingerprint"],
                created_at=float(values["created_at"]),
                updated_at=float(values["updated_at"]),
                tokens=int(values["tokens"]),
                state_bytes=int(values["state_bytes"]),
                version=int(values["version"]),
                metadata=json.loads(values["metadata"]),
            )
        except (KeyError, ValueError) as error:
            raise CorruptState(session_id, f"metadata hash is malformed: {type(error).__name__}: {error}") from error
        return meta, values.get("state_sha256", "")

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
        digest, staging_key = await self._stage(session_id, state)

        now = time.time()
        meta = SessionMeta(
            id=session_id, owner=owner, fingerprint=str(fingerprint), created_at=now, updated_at=now,
            tokens=tokens, state_bytes=len(state) if state is not None else 0, version=1, metadata=labels,
        )
        fields = {
            "id": meta.id,
            "owner": meta.owner,
            "fingerprint": meta.fingerprint,
            "created_at": repr(meta.created_at),
            "updated_at": repr(meta.updated_at),
            "tokens": str(meta.tokens),
            "state_bytes": str(meta.state_bytes),
            "state_sha256": digest,
            "version": "1",
            "metadata": json.dumps(labels),
        }
        flat_fields = [item for pair in fields.items() for item in pair]

        reply = await self._call(self._create(
            keys=[*self._session_keys(session_id), self._owner_key(owner), staging_key],
            args=[
                self._ttl_ms, session_id, self.max_sessions_per_owner, repr(now),
                "1" if state is not None else "0", f"{self.prefix}:session:", *flat_fields,
            ],
        ))
        status = reply[0]
        if status == b"exists":
            raise SessionExists(session_id)
        if status == b"too_many":
            raise TooManySessions(owner, self.max_sessions_per_owner)
        self._check_staging(status, session_id)
        return meta

    async def _stage(self, session_id: str, state: bytes | None) -> tuple[str, str]:
        """Upload ``state`` to a fresh staging key while hashing it, and return the SHA-256 and the key.

        Without a state, nothing is uploaded and the SHA-256 is empty. The staging key expires
        on its own if this client dies before a script renames it.
        """
        staging_key = f"{self.prefix}:session:{session_id}:staging:{secrets.token_hex(8)}"
        if state is None:
            return "", staging_key
        digest, _ = await asyncio.gather(
            asyncio.to_thread(state_digest, state),
            self._call(self._client.set(staging_key, state, px=self._staging_ttl_ms)),
        )
        return digest, staging_key

    def _check_staging(self, status: bytes, session_id: str) -> None:
        if status == b"staging_lost":
            cause = TimeoutError(f"staged state of session {session_id!r} expired before the write script ran")
            raise StoreUnavailable(cause, f"Redis session store at {self.location} failed to write: {cause}")

    async def _read_session(self, session_id: str, mode: str) -> list[Any]:
        validate_session_id(session_id)
        reply = await self._call(self._read(
            keys=self._session_keys(session_id), args=[self._ttl_ms, self._owner_key_prefix, mode]
        ))
        if reply[0] == b"not_found":
            raise SessionNotFound(session_id)
        return reply

    async def get(self, session_id: str) -> SessionMeta:
        reply = await self._read_session(session_id, "meta")
        return self._meta_from_fields(session_id, reply[1])[0]

    async def load(self, session_id: str) -> tuple[SessionMeta, bytes | None]:
        validate_session_id(session_id)
        meta_key, state_key = self._session_keys(session_id)
        # MULTI/EXEC runs the three commands with no other command between them. The state
        # is read by GET rather than inside the script, which copies large values slowly.
        pipeline = self._client.pipeline(transaction=True)
        await self._read(keys=[meta_key, state_key], args=[self._ttl_ms, self._owner_key_prefix, "touch"],
                         client=pipeline)
        pipeline.hgetall(meta_key)
        pipeline.get(state_key)
        reply, fields, state = await self._call(pipeline.execute())
        if reply[0] == b"not_found":
            raise SessionNotFound(session_id)
        meta, digest = self._meta_from_fields(session_id, fields)
        await asyncio.to_thread(verify_state, session_id, state, meta.state_bytes, digest)
        return meta, state

    async def touch(self, session_id: str) -> None:
        await self._read_session(session_id, "touch")

    async def commit(
        self, session_id: str, *, state: bytes | None, tokens: int, base_version: int
    ) -> SessionMeta:
        validate_session_id(session_id)
        state = check_state(state, self.max_state_bytes, session_id)
        tokens = check_tokens(tokens)
        return await self._replace_state(session_id, state, tokens, str(int(base_version)))

    async def reset(self, session_id: str) -> SessionMeta:
        validate_session_id(session_id)
        return await self._replace_state(session_id, None, 0, "")

    async def _replace_state(self, session_id: str, state: bytes | None, tokens: int, base_version: str) -> SessionMeta:
        """Write state and tokens and increment the version. An empty ``base_version`` skips the check."""
        digest, staging_key = await self._stage(session_id, state)
        reply = await self._call(self._write(
            keys=[*self._session_keys(session_id), staging_key],
            args=[
                self._ttl_ms, self._owner_key_prefix, base_version, "1" if state is not None else "0",
                len(state) if state is not None else 0, digest, tokens, repr(time.time()),
            ],
        ))
        status = reply[0]
        if status == b"not_found":
            raise SessionNotFound(session_id)
        if status == b"conflict":
            raise VersionConflict(int(base_version), int(reply[1]), session_id)
        self._check_staging(status, session_id)
        return self._meta_from_fields(session_id, reply[1])[0]

    async def delete(self, session_id: str) -> None:
        validate_session_id(session_id)
        reply = await self._call(self._delete(
            keys=self._session_keys(session_id), args=[self._owner_key_prefix, session_id]
        ))
        if reply[0] == b"not_found":
            raise SessionNotFound(session_id)

    async def list(self, owner: str) -> list[SessionMeta]:
        owner_key = self._owner_key(owner)
        session_ids = [member.decode() for member in await self._call(self._client.zrange(owner_key, 0, -1))]
        if not session_ids:
            return []
        pipeline = self._client.pipeline(transaction=False)
        for session_id in session_ids:
            pipeline.hgetall(self._session_keys(session_id)[0])
        replies = await self._call(pipeline.execute())

        metas = []
        expired = []
        for session_id, fields in zip(session_ids, replies):
            if not fields:
                expired.append(session_id)
                continue
            metas.append(self._meta_from_fields(session_id, fields)[0])
        if expired:
            await self._call(self._client.zrem(owner_key, *expired))
        metas.sort(key=lambda meta: meta.created_at)
        return metas

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        # redis-py renamed close() to aclose() in 5.0.1.
        close = getattr(self._client, "aclose", None) or self._client.close
        await close()

    # --- leases -------------------------------------------------------------------------------

    async def _acquire_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        acquired = await self._call(self._client.set(
            self._lease_key(session_id), token, nx=True, px=_milliseconds(ttl_seconds)
        ))
        return bool(acquired)

    async def _renew_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        renewed = await self._call(self._renew_lease_script(
            keys=[self._lease_key(session_id)], args=[token, _milliseconds(ttl_seconds)]
        ))
        return renewed == 1

    async def _release_lease(self, session_id: str, token: str) -> bool:
        released = await self._call(self._release_lease_script(keys=[self._lease_key(session_id)], args=[token]))
        return released == 1
