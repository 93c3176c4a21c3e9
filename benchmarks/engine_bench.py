"""Measure the generation engine's decode throughput and per-token latency at several concurrencies.

For each session store and each concurrency N, the benchmark creates N sessions and starts one
request on each at the same time (a short prompt, then --tokens-per-request sampled tokens). It
reports, per run:

- decode tokens/s: tokens decoded in engine steps that prefilled nothing, divided by those
  steps' time. This is the engine's aggregate decode throughput over all sessions. The step
  time includes serializing the state of each request that ends in that step;
- end-to-end tokens/s: all completion tokens divided by the wall time from the first submission
  to the last final event, so it includes admission, prefill and the state commits;
- per-token latency p50 and p99: time between two consecutive tokens of one request, measured
  on the engine thread;
- time to first token p50.

Each figure is the median over --repeats runs, each on new sessions; the JSON also keeps every run.

Example:
    python benchmarks/engine_bench.py --random-config small --sessions 1,4,16,64

Redis keys go under a random prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from titans.engine import Engine, EngineConfig, EngineObserver, Finished, GenerateRequest
from titans.model import MACConfig, MACModel
from titans.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from titans.model.sampling import SamplingParams
from titans.model.tokenizer import Tokenizer
from titans.session_store import SessionStore, open_store

# Targets on a CPU: batching 16 sessions must pay off in throughput without making each
# session's stream much slower.
THROUGHPUT_TARGET = 4.0  # aggregate decode tokens/s at 16 sessions over that at 1, at least
LATENCY_TARGET = 3.0  # per-token latency p50 at 16 sessions over that at 1, at most


def percentile(samples: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile. With fewer than 100 samples, p99 is the maximum."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def parse_int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/shakespeare-small",
                        help="serving checkpoint directory to measure (default: checkpoints/shakespeare-small)")
    parser.add_argument("--random-config", default=None, metavar="NAME",
                        help="measure a randomly initialised model of this config (for example 'small') "
                             "saved to a temporary directory, in place of --checkpoint")
    parser.add_argument("--tokenizer-text", default=None, metavar="PATH",
                        help="text to train the random checkpoint's tokenizer on "
                             "(default: generated pseudo-words, which give the same vocabulary size)")
    parser.add_argument("--sessions", type=parse_int_list, default=[1, 4, 16, 64],
                        help="comma-separated numbers of concurrent sessions (default: 1,4,16,64)")
    parser.add_argument("--stores", default="memory,redis",
                        help="comma-separated session stores to measure: memory, redis (default: memory,redis)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis to use for the redis store (default: redis://127.0.0.1:6379/0)")
    parser.add_argument("--tokens-per-request", type=int, default=64,
                        help="tokens sampled by each request (default: 64)")
    parser.add_argument("--prompt-tokens", type=int, default=32,
                        help="prompt tokens of each request (default: 32)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256,
                        help="prompt tokens prefilled per engine step (default: 256, the engine's default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per store and concurrency; the table shows their medians (default: 3)")
    parser.add_argument("--device", default="cpu", help="device for the model: cpu, cuda or auto (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model and the sampling (default: 0)")
    parser.add_argument("--out", default="benchmarks/results/engine_bench.json",
                        help="JSON output path (default: benchmarks/results/engine_bench.json)")
    args = parser.parse_args(argv)

    args.stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    unknown = sorted(set(args.stores) - {"memory", "redis"})
    if unknown or not args.stores:
        parser.error(f"--stores accepts memory and redis, got {args.stores}")
    if args.tokens_per_request < 2:
        parser.error(f"--tokens-per-request must be at least 2 to measure a latency, got {args.tokens_per_request}")
    if args.prompt_tokens < 1:
        parser.error(f"--prompt-tokens must be at least 1, got {args.prompt_tokens}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.prefill_chunk_tokens < 1:
        parser.error(f"--prefill-chunk-tokens must be at least 1, got {args.prefill_chunk_tokens}")
    return args


# --- the checkpoint --------------------------------------------------------------------------


def pseudo_words(count: int, seed: int) -> str:
    """Generate `count` words of random syllables, a training text for the random model's tokenizer."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count))
    return " ".join(words)


def build_random_checkpoint(config_name: str, directory: Path, tokenizer_text: str | None, seed: int) -> Path:
    config = MACConfig.from_name(config_name)
    if tokenizer_text is not None:
        text = Path(tokenizer_text).read_text(encoding="utf-8")
    else:
        text = pseudo_words(200_000, seed)
    tokenizer = Tokenizer.train([text], config.vocab_size)
    torch.manual_seed(seed)
    save_checkpoint(MACModel(config.replace(vocab_size=tokenizer.vocab_size)), tokenizer, directory)
    return directory


# --- one measurement -------------------------------------------------------------------------


class StepRecorder(EngineObserver):
    """Step times and token intervals of the engine, recorded on the engine thread."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.decode_tokens = 0
        self.decode_seconds = 0.0
        self.steps = 0
        self.token_intervals: list[float] = []
        self.first_token_seconds: list[float] = []
        self.max_batch = 0

    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        self.steps += 1
        self.max_batch = max(self.max_batch, batch_size)
        if decode_tokens and not prefill_tokens:
            self.decode_tokens += decode_tokens
            self.decode_seconds += seconds

    def on_first_token(self, seconds: float) -> None:
        self.first_token_seconds.append(seconds)

    def on_token(self, seconds_since_previous: float) -> None:
        self.token_intervals.append(seconds_since_previous)


def open_bench_store(name: str, args: argparse.Namespace, prefix: str) -> SessionStore:
    limits = {"max_sessions_per_owner": max(args.sessions) + 1, "max_state_bytes": 256 * 2**20}
    if name == "memory":
        return open_store("memory://", memory_budget_bytes=8 * 2**30, **limits)
    return open_store(args.redis_url, prefix=prefix, **limits)


async def measure(engine: Engine, recorder: StepRecorder, sessions: list[str], args: argparse.Namespace,
                  prompts: list[list[int]]) -> dict[str, Any]:
    """Run one request on each session at once and return the figures of that run."""
    recorder.reset()
    requests = [
        GenerateRequest(prompt_tokens=prompts[index % len(prompts)], max_tokens=args.tokens_per_request,
                        sampling=SamplingParams(temperature=0.8, top_k=50, seed=args.seed + index),
                        session_id=session, request_id=f"bench-{index}", stop_at_eos=False)
        for index, session in enumerate(sessions)
    ]
    started = time.perf_counter()
    streams = [await engine.generate(request) for request in requests]
    results = await asyncio.gather(*(stream.result() for stream in streams))
    wall = time.perf_counter() - started

    finals: list[Finished] = [final for _, final in results]
    completion = sum(final.usage.completion_tokens for final in finals)
    if completion != len(sessions) * args.tokens_per_request:
        raise RuntimeError(f"expected {len(sessions) * args.tokens_per_request} completion tokens, got {completion}")
    return {
        "sessions": len(sessions),
        "completion_tokens": completion,
        "wall_seconds": wall,
        "engine_steps": recorder.steps,
        "max_batch_size_seen": recorder.max_batch,
        "decode_tokens_per_second": recorder.decode_tokens / recorder.decode_seconds,
        "end_to_end_tokens_per_second": completion / wall,
        "token_latency_p50_ms": 1000 * percentile(recorder.token_intervals, 0.50),
        "token_latency_p99_ms": 1000 * percentile(recorder.token_intervals, 0.99),
        "time_to_first_token_p50_ms": 1000 * percentile(recorder.first_token_seconds, 0.50),
    }


async def measure_store(checkpoint: Checkpoint, store_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    prefix = f"titans-engine-bench-{uuid.uuid4().hex}"
    store = open_bench_store(store_name, args, prefix)
    recorder = StepRecorder()
    config = EngineConfig(max_batch_size=max(args.sessions), max_queued_requests=max(args.sessions) + 1,
                          prefill_chunk_tokens=args.prefill_chunk_tokens)
    engine = Engine(checkpoint, store, config, recorder)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(checkpoint.tokenizer.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(8)]
    rows: list[dict[str, Any]] = []
    try:
        await store.ping()
        await engine.start()
        # A warm-up request, so the first measurement does not pay for one-time allocations.
        warmup = await store.create(owner="bench", fingerprint=checkpoint.fingerprint)
        await (await engine.generate(GenerateRequest(prompts[0], 8, session_id=warmup.id))).result()
        for count in args.sessions:
            runs = []
            for _ in range(args.repeats):
                sessions = [(await store.create(owner="bench", fingerprint=checkpoint.fingerprint)).id
                            for _ in range(count)]
                runs.append(await measure(engine, recorder, sessions, args, prompts))
                for session in sessions:
                    await store.delete(session)
            row = {key: statistics.median(run[key] for run in runs) if isinstance(runs[0][key], float)
                   else statistics.median_low(run[key] for run in runs) for key in runs[0]}
            row["store"] = store_name
            row["runs"] = runs
            rows.append(row)
            print_row(row)
        await store.delete(warmup.id)
    finally:
        if engine.running:
            await engine.stop()
        await store.close()
        if store_name == "redis":
            await delete_redis_prefix(args.redis_url, prefix)
    return rows


async def delete_redis_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# --- report ----------------------------------------------------------------------------------

HEADER = (f"{'store':<7} {'sessions':>8} {'decode tok/s':>12} {'e2e tok/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'TTFT p50 ms':>11} {'wall s':>7}")


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['store']:<7} {row['sessions']:>8} {row['decode_tokens_per_second']:>12.1f} "
          f"{row['end_to_end_tokens_per_second']:>10.1f} {row['token_latency_p50_ms']:>8.2f} "
          f"{row['token_latency_p99_ms']:>8.2f} {row['time_to_first_token_p50_ms']:>11.1f} "
          f"{row['wall_seconds']:>7.2f}", flush=True)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compare 16 sessions with 1 session per store; return one record per store that has both."""
    checks = []
    for store in sorted({row["store"] for row in rows}):
        by_count = {row["sessions"]: row for row in rows if row["store"] == store}
        if 1 not in by_count or 16 not in by_count:
            continue
        single, sixteen = by_count[1], by_count[16]
        throughput_ratio = sixteen["decode_tokens_per_second"] / single["decode_tokens_per_second"]
        latency_ratio = sixteen["token_latency_p50_ms"] / single["token_latency_p50_ms"]
        checks.append({
            "store": store,
            "throughput_ratio_16_to_1": throughput_ratio,
            "throughput_target": THROUGHPUT_TARGET,
            "throughput_met": throughput_ratio >= THROUGHPUT_TARGET,
            "latency_ratio_16_to_1": latency_ratio,
            "latency_target": LATENCY_TARGET,
            "latency_met": latency_ratio <= LATENCY_TARGET,
        })
    return checks


def machine_info(device: str) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


async def run(args: argparse.Namespace, checkpoint_dir: Path) -> dict[str, Any]:
    checkpoint = load_checkpoint(checkpoint_dir, args.device)
    print(f"checkpoint {checkpoint_dir} ({checkpoint.config.name}, "
          f"{checkpoint.model.num_parameters() / 1e6:.1f} M parameters) on {checkpoint.model.device}; "
          f"{args.prompt_tokens} prompt + {args.tokens_per_request} sampled tokens per request")
    print(HEADER)
    rows: list[dict[str, Any]] = []
    for store_name in args.stores:
        rows += await measure_store(checkpoint, store_name, args)
    checks = check_targets(rows)
    for check in checks:
        print(f"{check['store']}: 16 sessions give {check['throughput_ratio_16_to_1']:.2f}x the decode throughput "
              f"of 1 (target >= {THROUGHPUT_TARGET:g}x: {'met' if check['throughput_met'] else 'missed'}) and "
              f"{check['latency_ratio_16_to_1']:.2f}x its per-token latency p50 "
              f"(target <= {LATENCY_TARGET:g}x: {'met' if check['latency_met'] else 'missed'})")
    return {
        "checkpoint": str(checkpoint_dir) if args.random_config is None else f"random:{args.random_config}",
        "model_config": checkpoint.config.to_dict(),
        "parameters": checkpoint.model.num_parameters(),
        "prompt_tokens": args.prompt_tokens,
        "tokens_per_request": args.tokens_per_request,
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
        "sampling": {"temperature": 0.8, "top_k": 50},
        "machine": machine_info(str(checkpoint.model.device)),
        "results": rows,
        "targets": checks,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as temporary_directory:
        if args.random_config is not None:
            checkpoint_dir = build_random_checkpoint(args.random_config, Path(temporary_directory) / "checkpoint",
                                                     args.tokenizer_text, args.seed)
        else:
            checkpoint_dir = Path(args.checkpoint)
            if not checkpoint_dir.is_dir():
                print(f"checkpoint directory not found: {checkpoint_dir}; pass --checkpoint DIR, or "
                      f"--random-config small to measure a randomly initialised model", file=sys.stderr)
                return 2
        report = asyncio.run(run(args, checkpoint_dir))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
