"""Measure session store latency and throughput for each backend and state size.

For each backend and state size, the benchmark times ``commit`` and ``load`` of one session
sequentially (p50 and p99 over --iterations runs), then counts commits per second while
--clients concurrent clients each commit to their own session for --seconds. It prints a
table and writes the figures and the machine description as JSON.

Example:
    python benchmarks/store_bench.py --backends memory,sqlite,redis --sizes 1,4,16 --iterations 20

Redis keys go under a random prefix and are deleted afterwards. The SQLite file lives in a
temporary directory unless --sqlite-path is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from titans.session_store import SessionStore, open_store

MB = 2**20


def percentile(samples: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile. With fewer than 100 samples, p99 is the maximum."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="memory,sqlite,redis",
                        help="comma-separated backends to measure: memory, sqlite, redis (default: all)")
    parser.add_argument("--sizes", default="1,4,16", help="comma-separated state sizes in MB (default: 1,4,16)")
    parser.add_argument("--iterations", type=int, default=20,
                        help="sequential commit and load runs per backend and size (default: 20)")
    parser.add_argument("--clients", type=int, default=16,
                        help="concurrent clients in the throughput run, each with its own session (default: 16)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="duration of each throughput run in seconds (default: 2.0)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis to measure (default: redis://127.0.0.1:6379/0)")
    parser.add_argument("--sqlite-path", default=None,
                        help="SQLite file to measure (default: a file in a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/store_bench.json",
                        help="JSON output path (default: benchmarks/results/store_bench.json)")
    args = parser.parse_args(argv)
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(args.backends) - {"memory", "sqlite", "redis"})
    if unknown:
        parser.error(f"unknown backends {unknown}: expected memory, sqlite or redis")
    args.sizes = [float(size) for size in args.sizes.split(",") if size.strip()]
    if args.iterations < 1 or args.clients < 1 or args.seconds <= 0:
        parser.error("--iterations and --clients must be at least 1, and --seconds must be positive")
    return args


def backend_url(backend: str, args: argparse.Namespace, temporary_directory: str) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{args.sqlite_path or os.path.join(temporary_directory, 'sessions.db')}"
    return args.redis_url


async def measure_latency(store: SessionStore, state: bytes, iterations: int) -> dict[str, float]:
    """Time sequential commits and loads of one session, in milliseconds."""
    meta = await store.create(owner="bench-latency", fingerprint="bench", state=state)
    version = meta.version
    # One untimed round warms up connections, the SQLite page cache and the script cache.
    version = (await store.commit(meta.id, state=state, tokens=1, base_version=version)).version
    await store.load(meta.id)

    commit_ms: list[float] = []
    load_ms: list[float] = []
    for iteration in range(iterations):
        started = time.perf_counter()
        version = (await store.commit(meta.id, state=state, tokens=iteration, base_version=version)).version
        commit_ms.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        _, loaded = await store.load(meta.id)
        load_ms.append((time.perf_counter() - started) * 1000)
        if loaded is None or len(loaded) != len(state):
            raise RuntimeError(f"load returned {0 if loaded is None else len(loaded)} bytes, expected {len(state)}")
    await store.delete(meta.id)
    return {
        "load_p50_ms": percentile(load_ms, 0.50),
        "load_p99_ms": percentile(load_ms, 0.99),
        "commit_p50_ms": percentile(commit_ms, 0.50),
        "commit_p99_ms": percentile(commit_ms, 0.99),
    }


async def measure_throughput(store: SessionStore, state: bytes, clients: int, seconds: float) -> dict[str, float]:
    """Count commits per second from concurrent clients, each committing to its own session."""
    metas = [
        await store.create(owner=f"bench-client-{index}", fingerprint="bench", state=state)
        for index in range(clients)
    ]
    deadline = time.perf_counter() + seconds
    counts = [0] * clients

    async def run_client(index: int) -> None:
        version = metas[index].version
        while time.perf_counter() < deadline:
            version = (await store.commit(metas[index].id, state=state, tokens=1, base_version=version)).version
            counts[index] += 1

    started = time.perf_counter()
    await asyncio.gather(*(run_client(index) for index in range(clients)))
    elapsed = time.perf_counter() - started
    for meta in metas:
        await store.delete(meta.id)
    return {"commits_per_second": sum(counts) / elapsed, "throughput_seconds": elapsed}


async def redis_version(url: str) -> str | None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        return (await client.info("server")).get("redis_version")
    finally:
        await client.aclose()


async def delete_redis_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    largest = max(args.sizes)
    max_state_bytes = int(largest * MB) + MB
    results: list[dict[str, Any]] = []
    prefix = f"titans-bench-{uuid.uuid4().hex}"
    machine: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }

    with tempfile.TemporaryDirectory(prefix="store-bench-") as temporary_directory:
        for backend in args.backends:
            url = backend_url(backend, args, temporary_directory)
            store = open_store(
                url,
                prefix=prefix,
                max_state_bytes=max_state_bytes,
                max_sessions_per_owner=args.clients + 1,
                # Room for every client's session plus the latency session.
                memory_budget_bytes=(args.clients + 2) * max_state_bytes,
                timeout_seconds=30.0,
            )
            try:
                if backend == "redis":
                    machine["redis"] = await redis_version(url)
                for size_mb in args.sizes:
                    state = os.urandom(int(size_mb * MB))
                    row: dict[str, Any] = {"backend": backend, "size_mb": size_mb, "iterations": args.iterations,
                                           "clients": args.clients}
                    row.update(await measure_latency(store, state, args.iterations))
                    row.update(await measure_throughput(store, state, args.clients, args.seconds))
                    results.append(row)
                    print_row(row)
            finally:
                await store.close()
                if backend == "redis":
                    await delete_redis_prefix(url, prefix)

    return {
        "benchmark": "session_store",
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "config": {"iterations": args.iterations, "clients": args.clients, "seconds": args.seconds,
                   "sizes_mb": args.sizes, "backends": args.backends},
        "results": results,
    }


HEADER = (
    f"{'backend':<8} {'MB':>5} {'load p50':>9} {'load p99':>9} {'commit p50':>11} {'commit p99':>11} "
    f"{'commits/s':>10}"
)


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['backend']:<8} {row['size_mb']:>5g} {row['load_p50_ms']:>9.2f} {row['load_p99_ms']:>9.2f} "
        f"{row['commit_p50_ms']:>11.2f} {row['commit_p99_ms']:>11.2f} {row['commits_per_second']:>10.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"latencies in ms; commits/s from {args.clients} concurrent clients over {args.seconds:g} s")
    print(HEADER, flush=True)
    report = asyncio.run(run(args))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
