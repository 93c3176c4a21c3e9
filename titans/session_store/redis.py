"""Session store in Redis, shared by all replicas of the server.

Keys of one session, under the configured prefix:

- ``{prefix}:session:{id}:meta``: hash with the metadata fields and the state's SHA-256
- ``{prefix}:session:{id}:state``: string with the state bytes, absent when there is no state
- ``{prefix}:session:{id}:lease``: string with the lease holder's random token
- ``{prefix}:owner:{owner}:sessions``: sorted set of the owner's session ids, scored by creation time

Every change runs as one Lua script, so state and metadata change together and readers never
see one without the other. The scripts build the owner key from the stored owner, which
standalone Redis allows but Redis Cluster does not.
"""

from __future__ import annotations

import asyncio
import json
import logging
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

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Renew the TTL of a session's keys and of its owner's index. ARGV[1] is the TTL in ms and
# ARGV[2] the owner key prefix "{prefix}:owner:".
_RENEW_LUA = """
local function renew(meta_key, state_key)
  redis.call('PEXPIRE', meta_key, ARGV[1])
  redis.call('PEXPIRE', state_key, ARGV[1])
  local owner = redis.call('HGET', meta_key, 'owner')
  redis.call('PEXPIRE', ARGV[2] .. owner .. ':sessions', ARGV[1])
end
"""

# KEYS: meta, state. ARGV[3]: "meta", "load" or "touch".
_READ_LUA = _RENEW_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
renew(KEYS[1], KEYS[2])
if ARGV[3] == 'touch' then return {'ok'} end
local fields = redis.call('HGETALL', KEYS[1])
if ARGV[3] == 'load' then return {'ok', fields, redis.call('GET', KEYS[2])} end
return {'ok', fields}
"""

# KEYS: meta, state. ARGV[3]: base version, or '' to skip the check; ARGV[4]: '1' if a state
# follows in ARGV[5]; ARGV[6..9]: state_bytes, state_sha256, tokens, updated_at.
_WRITE_LUA = _RENEW_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if ARGV[3] ~= '' and version ~= tonumber(ARGV[3]) then return {'conflict', tostring(version)} end
if ARGV[4] == '1' then redis.call('SET', KEYS[2], ARGV[5]) else redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[1], 'state_bytes', ARGV[6], 'state_sha256', ARGV[7], 'tokens', ARGV[8],
           'updated_at', ARGV[9])
redis.call('HINCRBY', KEYS[1], 'version', 1)
renew(KEYS[1], KEYS[2])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: meta, state, owner index. ARGV: ttl ms, session id, max sessions, created_at,
# has state ('1'/'0'), state, session key prefix "{prefix}:session:", then field/value pairs.
# Index members whose meta key expired are dropped before counting.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if redis.call('EXISTS', ARGV[7] .. member .. ':meta') == 0 then redis.call('ZREM', KEYS[3], member) end
end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then return {'too_many'} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if ARGV[5] == '1' then redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[1]) end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return {'ok'}
"""

# KEYS: meta, state. ARGV: owner key prefix, session id.
_DELETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', ARGV[1] .. owner .. ':sessions', ARGV[2])
return {'ok'}
"""

# KEYS: lease. ARGV: token, ttl ms. Both scripts act only if the caller's token holds the lease.
_RENEW_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
    overall deadline). A refused or dropped connection is retried once at once, which
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
        self._read = self._client.register_script(_READ_LUA)
        self._write = self._client.register_script(_WRITE_LUA)
        self._create = self._client.register_script(_CREATE_LUA)
        self._delete = self._client.register_script(_DELETE_LUA)
        self._renew_lease_script = self._client.register_script(_RENEW_LEASE_LUA)
        self._release_lease_script = self._client.register_script(_RELEASE_LEASE_LUA)

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
        digest = await asyncio.to_thread(state_digest, state) if state is not None else ""
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
            keys=[*self._session_keys(session_id), self._owner_key(owner)],
            args=[
                self._ttl_ms, session_id, self.max_sessions_per_owner, repr(now),
                "1" if state is not None else "0", state if state is not None else b"",
                f"{self.prefix}:session:", *flat_fields,
            ],
        ))
        status = reply[0]
        if status == b"exists":
            raise SessionExists(session_id)
        if status == b"too_many":
            raise TooManySessions(owner, self.max_sessions_per_owner)
        return meta

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
        reply = await self._read_session(session_id, "load")
        meta, digest = self._meta_from_fields(session_id, reply[1])
        state = reply[2] if len(reply) > 2 else None
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
        """Write state and tokens and increment the version; an empty ``base_version`` skips the check."""
        digest = await asyncio.to_thread(state_digest, state) if state is not None else ""
        reply = await self._call(self._write(
            keys=self._session_keys(session_id),
            args=[
                self._ttl_ms, self._owner_key_prefix, base_version,
                "1" if state is not None else "0", state if state is not None else b"",
                len(state) if state is not None else 0, digest, tokens, repr(time.time()),
            ],
        ))
        status = reply[0]
        if status == b"not_found":
            raise SessionNotFound(session_id)
        if status == b"conflict":
            raise VersionConflict(int(base_version), int(reply[1]), session_id)
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
