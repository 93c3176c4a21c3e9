"""Contract tests of titans.session_store against the memory, SQLite and Redis backends.

The Redis tests use the real server at 127.0.0.1:6379 with a unique key prefix per test and
delete only that prefix's keys. They are skipped when Redis is not reachable, except with
CI=true, where they fail instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from redis_support import REDIS_HOST, REDIS_PORT, REDIS_URL, require_redis

from titans.session_store import (
    CorruptState,
    InvalidSessionId,
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
    open_store,
)
from titans.session_store.base import SESSION_ID_PATTERN

MB = 2**20


# --- Redis availability -------------------------------------------------------------------


async def delete_redis_prefix(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# --- backend harness ----------------------------------------------------------------------


class Harness:
    """Opens store clients on one backend's storage and tampers with it directly."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.prefix = f"titans-test-{uuid.uuid4().hex}"
        self.sqlite_path = tmp_path / "sessions.db"
        self.stores: list[SessionStore] = []

    @property
    def url(self) -> str:
        if self.backend == "memory":
            return "memory://"
        if self.backend == "sqlite":
            return f"sqlite:///{self.sqlite_path}"
        return REDIS_URL

    def open(self, **limits: Any) -> SessionStore:
        store = open_store(self.url, prefix=self.prefix, **limits)
        self.stores.append(store)
        return store

    def open_peer(self, store: SessionStore, **limits: Any) -> SessionStore:
        """Open a second client on the same storage; an in-process memory store is its own peer."""
        if self.backend == "memory":
            return store
        return self.open(**limits)

    async def corrupt(self, store: SessionStore, session_id: str, kind: str) -> None:
        """Flip one byte of the stored state blob, or remove the blob, bypassing the store."""
        if self.backend == "memory":
            entry = store._sessions[session_id]
            entry.state = None if kind == "missing" else _flip_byte(entry.state, 100)
        elif self.backend == "sqlite":
            with sqlite3.connect(self.sqlite_path) as connection:
                if kind == "missing":
                    connection.execute("UPDATE sessions SET state = NULL WHERE id = ?", (session_id,))
                else:
                    (state,) = connection.execute("SELECT state FROM sessions WHERE id = ?", (session_id,)).fetchone()
                    connection.execute(
                        "UPDATE sessions SET state = ? WHERE id = ?", (_flip_byte(state, 100), session_id)
                    )
            connection.close()
        else:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(REDIS_URL)
            key = f"{self.prefix}:session:{session_id}:state"
            try:
                if kind == "missing":
                    assert await client.delete(key) == 1
                else:
                    original = await client.getrange(key, 100, 100)
                    await client.setrange(key, 100, bytes([original[0] ^ 0xFF]))
            finally:
                await client.aclose()

    async def staging_keys(self) -> list[bytes]:
        """Return the Redis staging keys left under this test's prefix (always empty elsewhere)."""
        if self.backend != "redis":
            return []
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return [key async for key in client.scan_iter(match=f"{self.prefix}:*:staging:*")]
        finally:
            await client.aclose()

    async def cleanup(self) -> None:
        for store in self.stores:
            await store.close()
        if self.backend == "redis":
            await delete_redis_prefix(self.prefix)


def _flip_byte(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0xFF
    return bytes(changed)


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "redis":
        require_redis()
    harness = Harness(request.param, tmp_path)
    yield harness
    await harness.cleanup()


# --- contract tests -----------------------------------------------------------------------


async def test_round_trip_of_multi_megabyte_state(harness: Harness) -> None:
    store = harness.open()
    state = random_bytes(6 * MB, seed=1)

    meta = await store.create(owner="alice", fingerprint="model-a", state=state, tokens=512)
    assert meta.state_bytes == len(state)
    assert meta.version == 1
    assert meta.tokens == 512

    loaded_meta, loaded_state = await store.load(meta.id)
    assert loaded_state == state
    assert loaded_meta == meta

    new_state = random_bytes(6 * MB, seed=2)
    committed = await store.commit(meta.id, state=new_state, tokens=1024, base_version=1)
    assert committed.version == 2
    assert committed.state_bytes == len(new_state)

    peer = harness.open_peer(store)
    peer_meta, peer_state = await peer.load(meta.id)
    assert peer_state == new_state
    assert peer_meta.version == 2
    assert peer_meta.tokens == 1024


async def test_create_fresh_session(harness: Harness) -> None:
    store = harness.open()

    meta = await store.create(owner="alice", fingerprint="fp-1", metadata={"label": "chat"})
    assert SESSION_ID_PATTERN.fullmatch(meta.id)
    assert meta.state_bytes == 0
    assert meta.tokens == 0
    assert meta.version == 1
    assert meta.created_at == meta.updated_at
    assert meta.to_dict() == {
        "id": meta.id, "owner": "alice", "fingerprint": "fp-1", "created_at": meta.created_at,
        "updated_at": meta.updated_at, "tokens": 0, "state_bytes": 0, "version": 1, "metadata": {"label": "chat"},
    }

    loaded_meta, state = await store.load(meta.id)
    assert state is None
    assert loaded_meta == meta
    assert await store.get(meta.id) == meta

    other = await store.create(owner="alice", fingerprint="fp-1")
    assert other.id != meta.id


async def test_empty_state_differs_from_none(harness: Harness) -> None:
    store = harness.open()
    meta = await store.create(owner="alice", fingerprint="fp", session_id="empty", state=b"")

    _, state = await store.load(meta.id)
    assert state == b""


async def test_create_with_existing_id_raises(harness: Harness) -> None:
    store = harness.open()
    await store.create(owner="alice", fingerprint="fp", session_id="fixed-id", state=b"first")

    with pytest.raises(SessionExists, match="fixed-id"):
        await store.create(owner="bob", fingerprint="fp", session_id="fixed-id", state=b"second")

    meta, state = await store.load("fixed-id")
    assert state == b"first"
    assert meta.owner == "alice"


async def test_unknown_session_raises_not_found(harness: Harness) -> None:
    store = harness.open()
    calls = {
        "get": lambda: store.get("missing"),
        "load": lambda: store.load("missing"),
        "commit": lambda: store.commit("missing", state=b"x", tokens=1, base_version=1),
        "reset": lambda: store.reset("missing"),
        "delete": lambda: store.delete("missing"),
        "touch": lambda: store.touch("missing"),
    }
    for call in calls.values():
        with pytest.raises(SessionNotFound, match="'missing'"):
            await call()


async def test_fork_copies_state(harness: Harness) -> None:
    store = harness.open()
    source = await store.create(owner="alice", fingerprint="fp", state=b"memory-bytes", tokens=7)
    _, state = await store.load(source.id)

    fork = await store.create(owner="alice", fingerprint="fp", state=state, tokens=source.tokens)
    await store.commit(source.id, state=b"changed", tokens=8, base_version=1)

    _, fork_state = await store.load(fork.id)
    assert fork_state == b"memory-bytes"
    assert fork.tokens == 7


async def test_concurrent_commits_exactly_one_wins(harness: Harness) -> None:
    store = harness.open()
    peer = harness.open_peer(store)
    meta = await store.create(owner="alice", fingerprint="fp", state=b"base")
    states = [f"state-{index}".encode() * 1000 for index in range(8)]
    clients = [store if index % 2 == 0 else peer for index in range(8)]

    results = await asyncio.gather(
        *(
            client.commit(meta.id, state=state, tokens=index, base_version=1)
            for index, (client, state) in enumerate(zip(clients, states))
        ),
        return_exceptions=True,
    )

    winners = [result for result in results if isinstance(result, SessionMeta)]
    conflicts = [result for result in results if isinstance(result, VersionConflict)]
    assert len(winners) == 1
    assert len(conflicts) == 7
    assert winners[0].version == 2
    for conflict in conflicts:
        assert conflict.expected == 1
        assert conflict.actual == 2
    loaded_meta, loaded_state = await store.load(meta.id)
    assert loaded_meta.version == 2
    assert loaded_state == states[winners[0].tokens]
    assert await harness.staging_keys() == []


async def test_commit_and_reset_increment_version(harness: Harness) -> None:
    store = harness.open()
    meta = await store.create(owner="alice", fingerprint="fp", state=b"one", tokens=3)

    cleared = await store.commit(meta.id, state=None, tokens=5, base_version=1)
    assert cleared.version == 2
    assert cleared.state_bytes == 0
    assert cleared.updated_at >= meta.updated_at
    assert (await store.load(meta.id))[1] is None

    await store.commit(meta.id, state=b"three", tokens=9, base_version=2)
    reset = await store.reset(meta.id)
    assert reset.version == 4
    assert reset.tokens == 0
    assert reset.state_bytes == 0
    assert reset.created_at == meta.created_at
    assert (await store.load(meta.id))[1] is None

    with pytest.raises(VersionConflict, match="version 3"):
        await store.commit(meta.id, state=b"stale", tokens=1, base_version=3)


async def test_list_returns_owner_sessions_by_creation(harness: Harness) -> None:
    store = harness.open()
    created = [await store.create(owner="alice", fingerprint="fp", session_id=f"s{index}") for index in range(3)]
    await store.create(owner="bob", fingerprint="fp", session_id="bob-1")

    listed = await store.list("alice")
    assert [meta.id for meta in listed] == [meta.id for meta in created]

    await store.delete("s1")
    assert [meta.id for meta in await store.list("alice")] == ["s0", "s2"]
    assert await store.list("nobody") == []


async def test_lease_excludes_second_client(harness: Harness) -> None:
    store = harness.open()
    peer = harness.open_peer(store)
    await store.create(owner="alice", fingerprint="fp", session_id="leased")

    async with store.lease("leased", ttl_seconds=0.4) as lease:
        with pytest.raises(SessionBusy, match="'leased'"):
            async with peer.lease("leased"):
                pass
        # Outlive the TTL twice over: only the background renewal keeps the lease held.
        await asyncio.sleep(0.9)
        with pytest.raises(SessionBusy):
            async with peer.lease("leased"):
                pass
    assert lease.lost is False

    async with peer.lease("leased") as peer_lease:
        assert peer_lease.lost is False


async def test_lease_taken_over_after_holder_dies(harness: Harness) -> None:
    store = harness.open()
    peer = harness.open_peer(store)
    await store.create(owner="alice", fingerprint="fp", session_id="orphan")

    dead = store.lease("orphan", ttl_seconds=0.3)
    await dead.__aenter__()
    await dead._stop_renewal()  # the holder stops renewing, as if its process died
    with pytest.raises(SessionBusy):
        async with peer.lease("orphan"):
            pass

    await asyncio.sleep(0.5)
    async with peer.lease("orphan", ttl_seconds=5) as successor:
        await dead.__aexit__(None, None, None)
        assert dead.lost is True
        with pytest.raises(SessionBusy):
            async with store.lease("orphan"):
                pass
    assert successor.lost is False


async def test_lease_renewal_detects_takeover(harness: Harness) -> None:
    store = harness.open()
    peer = harness.open_peer(store)

    async with store.lease("stolen", ttl_seconds=0.3) as lease:
        # Simulate an expiry followed by another holder's acquisition.
        assert await store._release_lease("stolen", lease.token) is True
        assert await peer._acquire_lease("stolen", "other-holder", 5.0) is True
        await asyncio.sleep(0.25)
        assert lease.lost is True
    assert await peer._release_lease("stolen", "other-holder") is True


async def test_ttl_expiry_and_touch_renewal(harness: Harness) -> None:
    store = harness.open(ttl_seconds=1.0)
    touched = await store.create(owner="alice", fingerprint="fp", session_id="kept", state=b"kept-state")
    await store.create(owner="alice", fingerprint="fp", session_id="idle", state=b"idle-state")

    await asyncio.sleep(0.6)
    await store.touch("kept")
    await asyncio.sleep(0.6)

    assert (await store.get("kept")).id == touched.id
    with pytest.raises(SessionNotFound, match="'idle'"):
        await store.load("idle")
    assert [meta.id for meta in await store.list("alice")] == ["kept"]
    recreated = await store.create(owner="alice", fingerprint="fp", session_id="idle")
    assert recreated.state_bytes == 0

    await asyncio.sleep(1.2)
    with pytest.raises(SessionNotFound, match="'kept'"):
        await store.get("kept")
    assert await store.list("alice") == []


async def test_state_too_large_changes_nothing(harness: Harness) -> None:
    store = harness.open(max_state_bytes=1024)

    with pytest.raises(StateTooLarge) as raised:
        await store.create(owner="alice", fingerprint="fp", session_id="big", state=bytes(1025))
    assert raised.value.size == 1025
    assert raised.value.limit == 1024
    assert "1025" in str(raised.value)
    assert await store.list("alice") == []
    with pytest.raises(SessionNotFound):
        await store.get("big")

    meta = await store.create(owner="alice", fingerprint="fp", session_id="fits", state=bytes(1024), tokens=4)
    with pytest.raises(StateTooLarge):
        await store.commit("fits", state=bytes(2048), tokens=8, base_version=1)
    loaded_meta, state = await store.load("fits")
    assert state == bytes(1024)
    assert loaded_meta.version == meta.version
    assert loaded_meta.tokens == 4


async def test_too_many_sessions_per_owner(harness: Harness) -> None:
    store = harness.open(max_sessions_per_owner=2)
    await store.create(owner="alice", fingerprint="fp", session_id="a1")
    await store.create(owner="alice", fingerprint="fp", session_id="a2")

    with pytest.raises(TooManySessions) as raised:
        await store.create(owner="alice", fingerprint="fp", session_id="a3", state=b"x")
    assert raised.value.owner == "alice"
    assert raised.value.limit == 2
    assert [meta.id for meta in await store.list("alice")] == ["a1", "a2"]
    with pytest.raises(SessionNotFound):
        await store.get("a3")
    assert await harness.staging_keys() == []

    await store.create(owner="bob", fingerprint="fp", session_id="b1")
    await store.delete("a1")
    await store.create(owner="alice", fingerprint="fp", session_id="a3")
    assert [meta.id for meta in await store.list("alice")] == ["a2", "a3"]


@pytest.mark.parametrize("bad_id", ["", "a" * 129, "../x", "a b", "abc\n", "é"])
async def test_invalid_session_id_rejected(harness: Harness, bad_id: str) -> None:
    store = harness.open()
    calls = [
        lambda: store.create(owner="alice", fingerprint="fp", session_id=bad_id),
        lambda: store.get(bad_id),
        lambda: store.load(bad_id),
        lambda: store.commit(bad_id, state=b"x", tokens=1, base_version=1),
        lambda: store.reset(bad_id),
        lambda: store.delete(bad_id),
        lambda: store.touch(bad_id),
    ]
    for call in calls:
        with pytest.raises(InvalidSessionId) as raised:
            await call()
        assert isinstance(raised.value, ValueError)
    with pytest.raises(InvalidSessionId):
        store.lease(bad_id)
    assert await store.list("alice") == []


async def test_longest_valid_session_id_accepted(harness: Harness) -> None:
    store = harness.open()
    session_id = "A-z_9" * 25 + "abc"
    assert len(session_id) == 128

    meta = await store.create(owner="alice", fingerprint="fp", session_id=session_id)
    assert meta.id == session_id


@pytest.mark.parametrize("kind", ["flipped", "missing"])
async def test_corrupted_state_detected_on_load(harness: Harness, kind: str) -> None:
    store = harness.open()
    await store.create(owner="alice", fingerprint="fp", session_id="victim", state=random_bytes(4096))

    await harness.corrupt(store, "victim", kind)

    with pytest.raises(CorruptState, match="'victim'") as raised:
        await store.load("victim")
    assert raised.value.session_id == "victim"
    assert (await store.get("victim")).state_bytes == 4096


# --- memory backend -----------------------------------------------------------------------


async def test_memory_evicts_least_recently_used(caplog: pytest.LogCaptureFixture) -> None:
    store = open_store("memory://", memory_budget_bytes=1000)
    await store.create(owner="alice", fingerprint="fp", session_id="a", state=bytes(400))
    await store.create(owner="alice", fingerprint="fp", session_id="b", state=bytes(400))
    await store.get("a")  # "b" is now the least recently used

    with caplog.at_level(logging.WARNING, logger="titans.session_store.memory"):
        await store.create(owner="alice", fingerprint="fp", session_id="c", state=bytes(400))

    assert store.evictions == 1
    assert "Evicted session b" in caplog.text
    with pytest.raises(SessionNotFound):
        await store.get("b")
    assert [meta.id for meta in await store.list("alice")] == ["a", "c"]
    assert store.stored_bytes == 800

    await store.commit("c", state=bytes(900), tokens=1, base_version=1)
    assert store.evictions == 2
    assert store.stored_bytes == 900
    with pytest.raises(SessionNotFound):
        await store.get("a")

    with pytest.raises(StateTooLarge):
        await store.create(owner="alice", fingerprint="fp", session_id="d", state=bytes(1001))
    assert store.evictions == 2
    assert (await store.load("c"))[1] == bytes(900)


async def test_evictions_zero_for_other_backends(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/x.db")
    assert store.evictions == 0
    assert store.backend == "sqlite"
    await store.close()


# --- opening stores -----------------------------------------------------------------------


def test_open_store_defaults_to_memory() -> None:
    assert open_store(None).backend == "memory"
    assert open_store("").backend == "memory"
    assert open_store("memory://").backend == "memory"


def test_open_store_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="postgres://db/x") as raised:
        open_store("postgres://db/x")
    assert "redis://" in str(raised.value)
    assert "sqlite:///" in str(raised.value)

    with pytest.raises(ValueError) as raised:
        open_store("mongodb://user:hunter2@db/x")
    assert "hunter2" not in str(raised.value)


def test_open_store_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        open_store("memory://", ttl_seconds=0)
    with pytest.raises(ValueError, match="sqlite"):
        open_store("sqlite:///:memory:")


def test_sqlite_url_paths(tmp_path: Path) -> None:
    assert open_store(f"sqlite:///{tmp_path}/a.db").path == f"{tmp_path}/a.db"
    assert open_store("sqlite:///relative/a.db").path == "relative/a.db"


async def test_sqlite_unopenable_file_raises_unavailable(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/missing-dir/sessions.db")

    with pytest.raises(StoreUnavailable) as raised:
        await store.ping()
    assert isinstance(raised.value.cause, sqlite3.Error)
    assert isinstance(raised.value, StoreError)
    await store.close()


# --- Redis failures -----------------------------------------------------------------------


def closed_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_redis_unreachable_raises_store_unavailable() -> None:
    timeout = 1.0
    store = open_store(f"redis://127.0.0.1:{closed_loopback_port()}/0", timeout_seconds=timeout)
    calls = {
        "ping": lambda: store.ping(),
        "create": lambda: store.create(owner="alice", fingerprint="fp", state=b"x"),
        "load": lambda: store.load("some-id"),
    }
    try:
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await call()
            elapsed = time.monotonic() - started
            assert elapsed < timeout + 0.5, f"{name} took {elapsed:.2f} s"
            assert raised.value.cause is not None
            assert "127.0.0.1" in str(raised.value)
    finally:
        await store.close()


async def test_redis_silent_server_times_out() -> None:
    async def accept_and_stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(accept_and_stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    timeout = 0.5
    store = open_store(f"redis://127.0.0.1:{port}/0", timeout_seconds=timeout)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("some-id")
        elapsed = time.monotonic() - started
        assert elapsed < timeout + 0.5, f"get took {elapsed:.2f} s"
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


class LoopbackProxy:
    """TCP proxy from a loopback port to the test Redis, which a test can stop and restart."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection(REDIS_HOST, REDIS_PORT)
        self._writers += [client_writer, redis_writer]
        await asyncio.gather(
            self._pipe(client_reader, redis_writer), self._pipe(redis_reader, client_writer)
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def test_redis_store_recovers_after_outage() -> None:
    require_redis()
    prefix = f"titans-test-{uuid.uuid4().hex}"
    proxy = LoopbackProxy()
    await proxy.start()
    store = open_store(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, timeout_seconds=1.0)
    try:
        await store.create(owner="alice", fingerprint="fp", session_id="survivor", state=b"kept")

        await proxy.stop()
        with pytest.raises(StoreUnavailable):
            await store.get("survivor")

        await proxy.start()
        meta, state = await store.load("survivor")
        assert state == b"kept"
        assert meta.version == 1
    finally:
        await store.close()
        await proxy.stop()
        await delete_redis_prefix(prefix)
