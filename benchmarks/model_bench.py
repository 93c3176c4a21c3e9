"""Measure the MAC model core's prefill and decode speed, and how decode cost grows with context.

The model has random weights and runs under torch.inference_mode(). The benchmark reports:

- prefill tokens/s: one `feed` call of a --prompt-tokens prompt into a new session, the median
  of --prefill-repeats runs;
- decode tokens/s at each batch size in --batch-sizes: --decode-steps calls of `feed` with one
  token per session. Session i of a batch has consumed --decode-context + i tokens before, so
  the sessions sit at different offsets. Tokens/s counts every session of the batch, so it is
  the aggregate throughput. The figure is the median over --rounds;
- per-token decode latency (batch 1) after each count in --latency-after consumed tokens: the
  median and mean time of one-token `feed` calls, --latency-steps per round. One session
  reaches each count by real `feed` calls of up to --fill-piece tokens, and a copy of its state
  is kept at each count, so every copy has really consumed that many tokens. The fill rate is
  reported too;
- serialised state bytes, `len(state.to_bytes())`, at each of those counts. The segment's
  keys and values are stored up to the in-segment offset (consumed mod segment_len), so the
  size depends on that offset but not on the count.

Decode and latency runs alternate between their cases within each round, so a change in the
load of a shared machine hits every case alike. The JSON records the load average too.

Two targets are checked: median latency after the last count within 10% of that after the
first (constant cost per token), and decode throughput at batch 8 at least 3x batch 1.

Example:
    python benchmarks/model_bench.py --config small --threads 2 --out benchmarks/results/model_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from titans.model import MACConfig, MACModel, State

LATENCY_GROWTH_TARGET = 1.10  # latency after the last count over latency after the first, at most
BATCH_8_SPEEDUP_TARGET = 3.0  # aggregate decode tokens/s at batch 8 over batch 1, at least


def parse_int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small",
                        help="config name (tiny, small, base, large) or YAML/JSON file (default: small)")
    parser.add_argument("--out", default="benchmarks/results/model_bench.json",
                        help="path of the JSON results file (default: benchmarks/results/model_bench.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default, usually the core count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default: 0)")
    parser.add_argument("--prompt-tokens", type=int, default=4096,
                        help="prompt length of the prefill measurement, in tokens (default: 4096)")
    parser.add_argument("--batch-sizes", type=parse_int_list, default=[1, 8, 32],
                        help="comma-separated batch sizes of the decode measurement (default: 1,8,32)")
    parser.add_argument("--decode-context", type=int, default=100,
                        help="tokens the first session of a batch consumes before decode timing starts; "
                             "session i consumes this many plus i (default: 100)")
    parser.add_argument("--decode-steps", type=int, default=32,
                        help="timed one-token decode steps per batch size and round (default: 32)")
    parser.add_argument("--latency-after", type=parse_int_list, default=[1000, 16000, 64000],
                        help="comma-separated consumed-token counts at which to time batch-1 decode "
                             "(default: 1000,16000,64000)")
    parser.add_argument("--latency-steps", type=int, default=32,
                        help="timed one-token decode steps per count and round (default: 32)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the decode and latency measurements (default: 5)")
    parser.add_argument("--prefill-repeats", type=int, default=3,
                        help="timed runs of the prefill measurement (default: 3)")
    parser.add_argument("--fill-piece", type=int, default=4096,
                        help="tokens per `feed` call while filling a session up to a count (default: 4096)")
    parser.add_argument("--warmup-steps", type=int, default=4,
                        help="untimed one-token steps before the first round of each decode case (default: 4)")

    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "decode_steps", "latency_steps", "rounds", "prefill_repeats", "fill_piece"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.decode_context < 0 or args.warmup_steps < 0:
        parser.error("--decode-context and --warmup-steps must be at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if any(later <= earlier for earlier, later in zip(args.latency_after, args.latency_after[1:])):
        parser.error(f"--latency-after must be strictly increasing, got {args.latency_after}")
    return args


def log_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_tokens(generator: torch.Generator, vocab_size: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def time_decode_steps(model: MACModel, state: State, generator: torch.Generator, steps: int) -> list[float]:
    """Feed one token per session `steps` times and return each step's wall time in seconds."""
    times = []
    for _ in range(steps):
        tokens = random_tokens(generator, model.config.vocab_size, state.batch_size, 1)
        start = time.perf_counter()
        model.feed(state, tokens)
        times.append(time.perf_counter() - start)
    return times


def measure_prefill(model: MACModel, generator: torch.Generator, args: argparse.Namespace) -> dict[str, Any]:
    log_progress(f"prefill: {args.prefill_repeats} runs of {args.prompt_tokens} tokens")
    runs = []
    for _ in range(args.prefill_repeats):
        prompt = random_tokens(generator, model.config.vocab_size, 1, args.prompt_tokens)
        state = model.new_state(1)
        start = time.perf_counter()
        model.feed(state, prompt, last_only=True)
        runs.append(args.prompt_tokens / (time.perf_counter() - start))
    return {"prompt_tokens": args.prompt_tokens, "tokens_per_s": statistics.median(runs), "runs_tokens_per_s": runs}


def measure_decode(model: MACModel, generator: torch.Generator, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time one-token decode steps at each batch size, alternating the batch sizes in each round."""
    states = []
    for batch_size in args.batch_sizes:
        # Session i consumes decode_context + i tokens, so the sessions of a batch sit at
        # different chunk offsets and reach their chunk updates at different steps, as stored
        # sessions that a server batches together do.
        sessions = []
        for index in range(batch_size):
            session = model.new_state(1)
            context = random_tokens(generator, model.config.vocab_size, 1, args.decode_context + index)
            model.feed(session, context, last_only=True)
            sessions.append(session)
        state = State.stack(sessions)
        time_decode_steps(model, state, generator, args.warmup_steps)
        states.append(state)

    log_progress(f"decode: {args.rounds} rounds of {args.decode_steps} steps at batch sizes {args.batch_sizes}")
    rounds: list[list[float]] = [[] for _ in states]
    step_times: list[list[float]] = [[] for _ in states]
    for _ in range(args.rounds):
        for index, state in enumerate(states):
            times = time_decode_steps(model, state, generator, args.decode_steps)
            rounds[index].append(state.batch_size * len(times) / sum(times))
            step_times[index].extend(times)

    return [{
        "batch_size": state.batch_size,
        "tokens_per_s": statistics.median(rounds[index]),
        "rounds_tokens_per_s": rounds[index],
        "step_ms_median": 1000 * statistics.median(step_times[index]),
    } for index, state in enumerate(states)]


def largest_memory_weight(state: State) -> float:
    """Return the largest |w| over all memory weights.

    Below 1.2e-38 every float32 weight is subnormal or zero. Subnormal operands can make
    arithmetic on x86 CPUs much slower unless subnormals are flushed to zero."""
    values = [w.abs().max().item() for layer in state.layers for w in (layer.weights or [])]
    return max(values, default=float("nan"))


def measure_latency_growth(model: MACModel, generator: torch.Generator,
                           args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fill one session up to each count with real `feed` calls and keep a copy of its state at
    each count. Then time one-token steps on the copies, alternating between them in each round."""
    state = model.new_state(1)
    copies = []
    fills = []
    for target in args.latency_after:
        fill_tokens = target - state.consumed[0]
        fill_start = time.perf_counter()
        while state.consumed[0] < target:
            piece = min(args.fill_piece, target - state.consumed[0])
            model.feed(state, random_tokens(generator, model.config.vocab_size, 1, piece), last_only=True)
        fill_seconds = time.perf_counter() - fill_start
        log_progress(f"filled a session to {target} tokens at {fill_tokens / fill_seconds:.0f} tokens/s")
        copies.append(state.clone())
        fills.append((fill_tokens, fill_seconds))

    sizes = [len(copy.to_bytes()) for copy in copies]
    weights = [largest_memory_weight(copy) for copy in copies]
    step_times: list[list[float]] = [[] for _ in copies]
    log_progress(f"latency: {args.rounds} rounds of {args.latency_steps} steps after {args.latency_after} tokens")
    # No warm-up steps here, so that the timed steps start right at each count.
    for _ in range(args.rounds):
        for index, copy in enumerate(copies):
            step_times[index].extend(time_decode_steps(model, copy, generator, args.latency_steps))

    results = []
    for index, target in enumerate(args.latency_after):
        fill_tokens, fill_seconds = fills[index]
        results.append({
            "consumed": target,
            "segment_offset": target % model.config.segment_len,
            "state_bytes": sizes[index],
            "memory_weight_max_abs": weights[index],
            "latency_ms_median": 1000 * statistics.median(step_times[index]),
            "latency_ms_mean": 1000 * statistics.fmean(step_times[index]),
            "timed_steps": len(step_times[index]),
            "fill_tokens": fill_tokens,
            "fill_seconds": fill_seconds,
            "fill_tokens_per_s": fill_tokens / fill_seconds if fill_seconds > 0 else float("nan"),
        })
    return results


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
    }


def check_targets(decode: list[dict[str, float]], latency: list[dict[str, float]]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if len(latency) >= 2:
        growth = latency[-1]["latency_ms_median"] / latency[0]["latency_ms_median"]
        targets["latency_growth"] = {
            "description": f"median latency after {latency[-1]['consumed']} tokens over after "
                           f"{latency[0]['consumed']}, at most {LATENCY_GROWTH_TARGET}",
            "value": growth,
            "met": growth <= LATENCY_GROWTH_TARGET,
        }
    by_batch = {row["batch_size"]: row["tokens_per_s"] for row in decode}
    if 1 in by_batch and 8 in by_batch:
        speedup = by_batch[8] / by_batch[1]
        targets["batch_8_speedup"] = {
            "description": f"aggregate decode tokens/s at batch 8 over batch 1, at least {BATCH_8_SPEEDUP_TARGET}",
            "value": speedup,
            "met": speedup >= BATCH_8_SPEEDUP_TARGET,
        }
    return targets


def format_table(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"config {results['config']['name']}, {results['parameters']:,} parameters, "
        f"torch {machine['torch']}, {machine['threads']} threads, {machine['cpu_count']} CPUs, "
        f"load average {results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} after",
        "",
        "| measurement | value |",
        "| --- | --- |",
    ]

    prefill = results["prefill"]
    lines.append(f"| prefill, {prefill['prompt_tokens']}-token prompt | {prefill['tokens_per_s']:.0f} tokens/s |")
    for row in results["decode"]:
        lines.append(f"| decode, batch {row['batch_size']} | {row['tokens_per_s']:.1f} tokens/s "
                     f"({row['step_ms_median']:.2f} ms per step) |")

    for row in results["latency"]:
        lines.append(f"| decode latency after {row['consumed']:,} tokens (batch 1) | "
                     f"{row['latency_ms_median']:.2f} ms median, {row['latency_ms_mean']:.2f} ms mean |")

    for row in results["latency"]:
        lines.append(f"| state bytes after {row['consumed']:,} tokens (in-segment offset "
                     f"{row['segment_offset']}) | {row['state_bytes']:,} |")
    for row in results["latency"]:
        lines.append(f"| largest memory weight after {row['consumed']:,} tokens | "
                     f"{row['memory_weight_max_abs']:.3g} |")
    for row in results["latency"]:
        lines.append(f"| fill rate up to {row['consumed']:,} tokens ({row['fill_tokens']:,} tokens) | "
                     f"{row['fill_tokens_per_s']:.0f} tokens/s |")

    lines.append("")
    for target in results["targets"].values():
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"target: {target['description']}: {target['value']:.2f}, {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = MACConfig.load(args.config)
    model = MACModel(config).eval()
    load_before = os.getloadavg()

    with torch.inference_mode():
        # One short untimed run so that first-call setup does not land in the prefill figure.
        model.feed(model.new_state(1), random_tokens(generator, config.vocab_size, 1, config.chunk_size))
        prefill = measure_prefill(model, generator, args)
        decode = measure_decode(model, generator, args)
        latency = measure_latency_growth(model, generator, args)

    results = {
        "config": config.to_dict(),
        "parameters": model.num_parameters(),
        "machine": machine_info(torch.get_num_threads()),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "prefill": prefill,
        "decode": decode,
        "latency": latency,
        "targets": check_targets(decode, latency),
    }
    print(format_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
