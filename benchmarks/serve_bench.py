"""Measure `titans serve` end to end: N concurrent streaming clients, each with its own session.

For each session store (memory, Redis) the benchmark starts `python -m titans.cli serve` on a
free loopback port, creates one session per client, and runs N clients at once (N from
--clients). Each client sends --requests streaming generate requests to its session, one
after another: a --prompt-chars prompt, then exactly --max-tokens tokens (`ignore_eos`). It
reports per store and N:

- tokens/s: completion tokens of all requests divided by the wall time of the N-client run;
- speedup: that throughput over the 1-client throughput on the same store;
- time to first token (TTFT) p50 and p99: from sending a request to its first text event;
- inter-token latency (ITL) p50 and p99: the gap between consecutive text events, divided
  evenly over the tokens of the later event (an event contains several tokens when the
  detokenizer held text back, for example inside a multi-byte character);
- errors: non-200 responses, error events and transport failures (the target is zero).

The clients run in this process on the same machine, so they take CPU time from the server.
Pin both with `taskset` to measure on chosen cores. Results are printed as a Markdown table
and written as JSON with the machine description.

Examples:
    python benchmarks/serve_bench.py --checkpoint checkpoints/shakespeare-small
    python benchmarks/serve_bench.py --random-config tiny --clients 1,4,16 --requests 2 --max-tokens 32

Redis keys go under a random prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
START_TIMEOUT_SECONDS = 180.0
# Targets: no errors, and batching pays off: 16 clients get at least 4x the throughput of 1.
SPEEDUP_TARGET = 4.0
SPEEDUP_CLIENTS = 16


def percentile(samples: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile. With fewer than 100 samples, p99 is the maximum."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None,
                        help="serving checkpoint directory (default: the titans CLI's default checkpoint)")
    source.add_argument("--random-config", default=None, metavar="NAME",
                        help="serve a randomly initialised model of this config (tiny, small, ...) with a "
                             "tokenizer trained on --corpus, instead of a checkpoint")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                        help="text for prompts and for the tokenizer of --random-config (default: %(default)s)")
    parser.add_argument("--stores", default="memory,redis",
                        help="comma-separated session stores: memory, redis (default: memory,redis)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis for the redis store (default: %(default)s)")
    parser.add_argument("--clients", default="1,4,16,64",
                        help="comma-separated numbers of concurrent clients (default: 1,4,16,64)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    parser.add_argument("--prompt-chars", type=int, default=40,
                        help="characters of corpus text in each prompt (default: 40)")
    parser.add_argument("--out", default="benchmarks/results/serve_bench.json",
                        help="JSON output path (default: %(default)s)")
    args = parser.parse_args(argv)

    args.stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    unknown = sorted(set(args.stores) - {"memory", "redis"})
    if unknown:
        parser.error(f"unknown stores {unknown}: expected memory or redis")
    args.clients = [int(count) for count in args.clients.split(",") if count.strip()]
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients must list positive numbers")
    if args.requests < 1 or args.max_tokens < 1 or args.prompt_chars < 1:
        parser.error("--requests, --max-tokens and --prompt-chars must be at least 1")
    return args


# --- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_random_checkpoint(config_name: str, corpus: str, directory: Path) -> Path:
    import torch

    from titans.model import MACConfig, MACModel
    from titans.model.checkpoint import save_checkpoint
    from titans.model.tokenizer import Tokenizer

    config = MACConfig.from_name(config_name)
    tokenizer = Tokenizer.train([corpus[:200_000]], config.vocab_size)
    torch.manual_seed(0)
    save_checkpoint(MACModel(config.replace(vocab_size=tokenizer.vocab_size)), tokenizer, directory)
    return directory


class Server:
    """A `titans serve` subprocess on a free loopback port."""

    def __init__(self, checkpoint: str, store_url: str, prefix: str, max_clients: int, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "titans.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--checkpoint", checkpoint, "--store-url", store_url, "--store-prefix", prefix,
                   "--max-batch-size", str(max_clients), "--max-queued-requests", str(max_clients),
                   "--log-level", "warning"]
        environment = {name: value for name, value in os.environ.items() if not name.startswith("TITANS_")}
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                                             cwd=REPO_ROOT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with status {self.process.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready within {START_TIMEOUT_SECONDS} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# --- one run ---------------------------------------------------------------------------------------


async def stream_request(client: httpx.AsyncClient, session_id: str, body: dict, record: dict) -> None:
    """Run one streaming request and add its token count, TTFT, ITLs and errors to `record`."""
    sent = time.perf_counter()
    previous = None
    try:
        async with aconnect_sse(client, "POST", f"/v1/sessions/{session_id}/generate", json=body) as source:
            if source.response.status_code != 200:
                record["errors"].append(f"HTTP {source.response.status_code}: {(await source.response.aread())[:200]!r}")
                return
            async for event in source.aiter_sse():
                payload = json.loads(event.data)
                now = time.perf_counter()
                if "error" in payload:
                    record["errors"].append(payload["error"].get("message", "error event"))
                    return
                if payload.get("object") == "generation.delta":
                    count = max(1, len(payload["token_ids"]))
                    if previous is None:
                        record["ttft"].append(now - sent)
                    else:
                        record["itl"].extend([(now - previous) / count] * count)
                    previous = now
                elif payload.get("object") == "generation":
                    record["tokens"] += payload["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        record["errors"].append(f"{type(exc).__name__}: {exc}")


async def run_clients(url: str, clients: int, args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(600.0)
    record: dict[str, Any] = {"tokens": 0, "ttft": [], "itl": [], "errors": []}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        sessions = []
        for _ in range(clients):
            response = await client.post("/v1/sessions")
            response.raise_for_status()
            sessions.append(response.json()["id"])

        async def one_client(index: int) -> None:
            for request in range(args.requests):
                body = {"prompt": prompts[(index + request) % len(prompts)], "max_tokens": args.max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True}
                await stream_request(client, sessions[index], body, record)

        started = time.perf_counter()
        await asyncio.gather(*(one_client(index) for index in range(clients)))
        seconds = time.perf_counter() - started
        for session_id in sessions:
            await client.delete(f"/v1/sessions/{session_id}")

    return {
        "clients": clients,
        "requests": clients * args.requests,
        "tokens": record["tokens"],
        "seconds": seconds,
        "tokens_per_second": record["tokens"] / seconds,
        "ttft_p50_ms": percentile(record["ttft"], 0.50) * 1000,
        "ttft_p99_ms": percentile(record["ttft"], 0.99) * 1000,
        "itl_p50_ms": percentile(record["itl"], 0.50) * 1000,
        "itl_p99_ms": percentile(record["itl"], 0.99) * 1000,
        "errors": len(record["errors"]),
        "error_samples": record["errors"][:5],
    }


async def warm_up(url: str, prompt: str) -> None:
    """Run one untimed request, so the first measured run does not pay for lazy initialisation."""
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
        response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "ignore_eos": True})
        response.raise_for_status()


# --- output --------------------------------------------------------------------------------------------


HEADER = ("| store | clients | requests | tokens | seconds | tokens/s | speedup | TTFT p50 ms | TTFT p99 ms "
          "| ITL p50 ms | ITL p99 ms | errors |")


def print_header() -> None:
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))


def print_row(row: dict[str, Any]) -> None:
    print(f"| {row['store']} | {row['clients']} | {row['requests']} | {row['tokens']} | {row['seconds']:.1f} "
          f"| {row['tokens_per_second']:.1f} | {row['speedup']:.2f}x | {row['ttft_p50_ms']:.0f} "
          f"| {row['ttft_p99_ms']:.0f} | {row['itl_p50_ms']:.1f} | {row['itl_p99_ms']:.1f} | {row['errors']} |",
          flush=True)


def delete_redis_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    corpus = Path(args.corpus).read_text(encoding="utf-8")
    # Prompts from different places in the corpus, so clients do not all send the same text.
    prompts = [corpus[start:start + args.prompt_chars] for start in range(0, 64 * 997, 997)]
    prefix = f"titans-serve-bench-{uuid.uuid4().hex}"
    rows: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as temporary_directory:
        if args.random_config is not None:
            checkpoint = str(build_random_checkpoint(args.random_config, corpus,
                                                     Path(temporary_directory) / "checkpoint"))
            checkpoint_label = f"random:{args.random_config}"
        else:
            from titans.cli import DEFAULT_CHECKPOINT

            checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
            checkpoint_label = checkpoint
            if not Path(checkpoint).is_dir():
                print(f"error: checkpoint directory not found: {checkpoint}; pass --checkpoint DIR or "
                      "--random-config NAME", file=sys.stderr)
                return 2

        print_header()
        for store in args.stores:
            store_url = "memory://" if store == "memory" else args.redis_url
            server = Server(checkpoint, store_url, prefix, max(args.clients),
                            Path(temporary_directory) / f"server-{store}.log")
            try:
                server.wait_ready()
                asyncio.run(warm_up(server.url, prompts[0]))
                baseline = None
                for clients in args.clients:
                    row = {"store": store, **asyncio.run(run_clients(server.url, clients, args, prompts))}
                    if clients == 1:
                        baseline = row["tokens_per_second"]
                    row["speedup"] = row["tokens_per_second"] / baseline if baseline else float("nan")
                    rows.append(row)
                    print_row(row)
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                print(Path(server.log_path).read_text(errors="replace")[-3000:], file=sys.stderr)
                return 1
            finally:
                server.stop()
                if store == "redis":
                    delete_redis_prefix(args.redis_url, prefix)

    report = {
        "benchmark": "serve",
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version()},
        "config": {"checkpoint": checkpoint_label, "stores": args.stores, "clients": args.clients,
                   "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                   "prompt_chars": args.prompt_chars},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")

    failures = [f"{row['errors']} errors with {row['clients']} clients on {row['store']}"
                for row in rows if row["errors"]]
    for row in rows:
        if row["clients"] == SPEEDUP_CLIENTS and row["speedup"] < SPEEDUP_TARGET:
            failures.append(f"speedup {row['speedup']:.2f}x at {SPEEDUP_CLIENTS} clients on {row['store']} is below "
                            f"the target of {SPEEDUP_TARGET:g}x")
    for failure in failures:
        print(f"target missed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
