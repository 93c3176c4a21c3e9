"""Objects the app keeps while it serves: the checkpoint, the session store and the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from titans.engine import Engine, EngineConfig
from titans.model.checkpoint import Checkpoint, load_checkpoint
from titans.session_store import StoreUnavailable, open_store

from .instrumented_store import InstrumentedStore
from .metrics import Metrics, MetricsObserver
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    checkpoint: Checkpoint
    store: InstrumentedStore
    engine: Engine
    observer: MetricsObserver
    model_name: str
    started_at: float = field(default_factory=time.time)
    # Tasks that finish abandoned requests (usage accounting after a disconnect); kept so
    # they are not garbage-collected while they run.
    background: set[asyncio.Task] = field(default_factory=set)

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    def spawn(self, coroutine) -> None:
        """Run `coroutine` in the background, holding a reference until it ends."""
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop(self) -> None:
        """Stop the engine (running requests get the grace period, then commit), then close the store."""
        grace = self.settings.shutdown_grace_seconds
        log.info("stopping the engine (grace period %.0f s)", grace)
        await self.engine.stop(grace)
        if self.background:
            await asyncio.wait(self.background, timeout=5.0)
        await self.store.close()
        self.metrics.mark_process_dead()
        log.info("server stopped")


async def start_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Load the checkpoint, open the session store and start the engine."""
    log.info("loading checkpoint %s on device %s", settings.checkpoint, settings.device)
    checkpoint = await asyncio.to_thread(load_checkpoint, settings.checkpoint, settings.device)

    inner = open_store(settings.store_url, prefix=settings.store_prefix, ttl_seconds=settings.session_ttl_seconds,
                       max_state_bytes=settings.max_state_bytes,
                       max_sessions_per_owner=settings.max_sessions_per_owner,
                       memory_budget_bytes=settings.memory_store_budget_bytes,
                       timeout_seconds=settings.store_timeout_seconds)
    store = InstrumentedStore(inner, metrics)
    try:
        await store.ping()
    except StoreUnavailable as exc:
        # Serving starts anyway, and /readyz reports 503 until the store responds.
        log.warning("the %s session store is not reachable yet: %s", store.backend, exc)

    observer = MetricsObserver(metrics)
    config = EngineConfig(max_batch_size=settings.max_batch_size, max_queued_requests=settings.max_queued_requests,
                          prefill_chunk_tokens=settings.prefill_chunk_tokens,
                          lease_ttl_seconds=settings.lease_ttl_seconds,
                          retry_after_seconds=settings.retry_after_seconds)
    engine = Engine(checkpoint, store, config, observer)
    observer.engine = engine
    await engine.start()

    model_name = settings.model_name or checkpoint.name
    log.info("serving model %s (%s config, fingerprint %s) with the %s session store; max batch %d",
             model_name, checkpoint.config.name, checkpoint.fingerprint[:16], store.backend, config.max_batch_size)
    return Runtime(settings=settings, metrics=metrics, checkpoint=checkpoint, store=store, engine=engine,
                   observer=observer, model_name=model_name)
