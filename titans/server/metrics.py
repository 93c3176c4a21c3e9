"""Prometheus metrics of the server, all named `titans_*`.

With one worker the metrics live in a registry of their own. When the environment variable
PROMETHEUS_MULTIPROC_DIR names a directory (as `titans serve --workers N` sets up), every
worker writes its values to files there and /metrics adds up the files of all workers,
so a scrape that lands on any worker returns the totals. Gauges then sum over live workers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from titans.engine import EngineObserver

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
SIZE_BUCKETS = tuple(float(2**power) for power in range(10, 31, 2))  # 1 KiB to 1 GiB


def multiprocess_directory() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


class Metrics:
    """The server's metric objects, registered once per app."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_directory() is not None
        # In multiprocess mode values go to files, and a registry is built per scrape instead.
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        gauge_mode = {"multiprocess_mode": "livesum"}

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, labels, registry=registry)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...],
                      labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, documentation, labels, buckets=buckets, registry=registry)

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, registry=registry, **gauge_mode)

        self.requests = counter("titans_requests", "HTTP requests by route template, method and status",
                                ("route", "method", "status"))
        self.request_duration = histogram("titans_request_duration_seconds",
                                          "HTTP request duration until the response ends, streams included",
                                          LATENCY_BUCKETS, ("route", "method"))
        self.time_to_first_token = histogram("titans_time_to_first_token_seconds",
                                             "time from admission to the first sampled token", LATENCY_BUCKETS)
        self.inter_token_latency = histogram("titans_inter_token_latency_seconds",
                                             "time between consecutive sampled tokens of one request",
                                             TOKEN_LATENCY_BUCKETS)
        self.prompt_tokens = counter("titans_prompt_tokens", "prompt tokens fed, appends included")
        self.generated_tokens = counter("titans_generated_tokens", "tokens sampled")
        self.engine_step_duration = histogram("titans_engine_step_seconds", "duration of one engine step",
                                              TOKEN_LATENCY_BUCKETS)
        self.engine_prefill_tokens = counter("titans_engine_prefill_tokens", "prompt tokens prefilled by the engine")
        self.engine_decode_tokens = counter("titans_engine_decode_tokens", "tokens decoded by the engine")
        self.memory_updates = counter("titans_memory_updates", "neural memory updates (one per layer and chunk)")
        self.batch_size = gauge("titans_running_batch_size", "requests in the engine's batch (decoding or "
                                                             "prefilling)")
        self.queue_depth = gauge("titans_queue_depth", "requests waiting for a batch slot")
        self.active_streams = gauge("titans_active_streams", "open SSE responses")
        self.store_duration = histogram("titans_store_operation_duration_seconds",
                                        "session store operation duration", STORE_BUCKETS,
                                        ("backend", "operation"))
        self.store_errors = counter("titans_store_errors", "session store operations that raised, by error class",
                                    ("backend", "operation", "error"))
        self.state_size = histogram("titans_state_size_bytes", "size of session states written to the store",
                                    SIZE_BUCKETS)

    def exposition(self) -> tuple[bytes, str]:
        """Return the text exposition of every metric and its content type."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def mark_process_dead(self) -> None:
        """Drop this worker's live gauges from the shared files (call when the worker exits)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


class MetricsObserver(EngineObserver):
    """Engine hooks that update the metrics. The engine calls them on its own thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.engine = None  # set once the engine exists, for its queue depth and batch size

    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        self.metrics.engine_step_duration.observe(seconds)
        if prefill_tokens:
            self.metrics.engine_prefill_tokens.inc(prefill_tokens)
        if decode_tokens:
            self.metrics.engine_decode_tokens.inc(decode_tokens)
        self.update_gauges()

    def on_first_token(self, seconds: float) -> None:
        self.metrics.time_to_first_token.observe(seconds)

    def on_token(self, seconds_since_previous: float) -> None:
        self.metrics.inter_token_latency.observe(seconds_since_previous)

    def on_memory_updates(self, count: int) -> None:
        if count:
            self.metrics.memory_updates.inc(count)

    def update_gauges(self) -> None:
        if self.engine is not None:
            self.metrics.batch_size.set(self.engine.batch_size)
            self.metrics.queue_depth.set(self.engine.queue_depth)
