"""A session store wrapper that records each operation's duration, errors and state sizes."""

from __future__ import annotations

import time
from typing import Any, Awaitable, TypeVar

from titans.session_store import SessionMeta, SessionStore

from .metrics import Metrics

T = TypeVar("T")


class InstrumentedStore(SessionStore):
    """Delegates every operation to `inner` and records it in the `titans_store_*` metrics.

    Leases taken through this wrapper call its lease primitives, so lease operations are
    measured too (as acquire_lease, renew_lease and release_lease).
    """

    def __init__(self, inner: SessionStore, metrics: Metrics) -> None:
        super().__init__(ttl_seconds=inner.ttl_seconds, max_state_bytes=inner.max_state_bytes,
                         max_sessions_per_owner=inner.max_sessions_per_owner,
                         timeout_seconds=inner.timeout_seconds)
        self.inner = inner
        self.backend = inner.backend
        self.metrics = metrics

    @property
    def evictions(self) -> int:
        return self.inner.evictions

    async def _measure(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except Exception as exc:
            self.metrics.store_errors.labels(self.backend, operation, type(exc).__name__).inc()
            raise
        finally:
            self.metrics.store_duration.labels(self.backend, operation).observe(time.perf_counter() - started)

    def _record_state(self, state: bytes | None) -> None:
        if state is not None:
            self.metrics.state_size.observe(len(state))

    async def create(self, *, owner: str, fingerprint: str, session_id: str | None = None,
                     state: bytes | None = None, tokens: int = 0,
                     metadata: dict[str, str] | None = None) -> SessionMeta:
        meta = await self._measure("create", self.inner.create(
            owner=owner, fingerprint=fingerprint, session_id=session_id, state=state, tokens=tokens,
            metadata=metadata))
        self._record_state(state)
        return meta

    async def get(self, session_id: str) -> SessionMeta:
        return await self._measure("get", self.inner.get(session_id))

    async def load(self, session_id: str) -> tuple[SessionMeta, bytes | None]:
        return await self._measure("load", self.inner.load(session_id))

    async def commit(self, session_id: str, *, state: bytes | None, tokens: int, base_version: int) -> SessionMeta:
        meta = await self._measure("commit", self.inner.commit(session_id, state=state, tokens=tokens,
                                                                base_version=base_version))
        self._record_state(state)
        return meta

    async def reset(self, session_id: str) -> SessionMeta:
        return await self._measure("reset", self.inner.reset(session_id))

    async def delete(self, session_id: str) -> None:
        await self._measure("delete", self.inner.delete(session_id))

    async def list(self, owner: str) -> list[SessionMeta]:
        return await self._measure("list", self.inner.list(owner))

    async def touch(self, session_id: str) -> None:
        await self._measure("touch", self.inner.touch(session_id))

    async def ping(self) -> None:
        await self._measure("ping", self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()

    async def _acquire_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        return await self._measure("acquire_lease", self.inner._acquire_lease(session_id, token, ttl_seconds))

    async def _renew_lease(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        return await self._measure("renew_lease", self.inner._renew_lease(session_id, token, ttl_seconds))

    async def _release_lease(self, session_id: str, token: str) -> bool:
        return await self._measure("release_lease", self.inner._release_lease(session_id, token))

    def __getattr__(self, name: str) -> Any:
        # Backend-specific attributes (a Redis store's location, a memory store's budget).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
