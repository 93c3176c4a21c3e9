"""Where time goes in prefill and decode, by model stage (`titans profile`).

The model labels its stages with `torch.profiler.record_function`: memory_read (memory read
and output gate), attention, mlp, memory_update (write inputs and chunk updates) and
output_head. This module adds `sampling` (one Sampler call per row) and
`state_serialisation` (`State.to_bytes()` of one session), runs one profiled pass of

    prefill      B prompts of P random tokens fed as one batch, then one sampled token per row
    decode_step  one token per row fed as one batch, then one sampled token per row (repeated)
    state_serialisation  to_bytes() of each row after the decode steps

and sums the record_function ranges under each phase. Time that falls in no stage range
(embedding, RoPE tables, Python between stages) is reported as "other". A warm-up pass and
an unprofiled pass run first; the unprofiled wall times are reported next to the profiled
ones, because profiling adds a fixed cost to every operator.

FLOPs come in two columns:

- analytic: an estimate from the configuration that counts 2 FLOPs per multiply-add of every
  matrix product: the linear projections, each head's memory MLP (read, gate, and the chunk
  update's forward pass, backward pass and weighted gradient sums), attention scores and
  values over the whole window of N_p + C keys (N_p + 2C in memory layers, because the
  retrieved entries double it), which the attention kernel computes densely under the mask,
  the SwiGLU and the output head. Elementwise work, norms, convolutions and softmax are
  left out. GFLOP/s uses this column.
- profiler: what `torch.profiler` counts with with_flops=True. It covers matrix products
  (mm, bmm, addmm) and elementwise mul/add, but not the fused attention kernel or the
  depthwise convolutions, so it undercounts attention.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from titans.model.config import MACConfig
from titans.model.mac import MACModel
from titans.model.sampling import Sampler, SamplingParams

MODEL_STAGES = ("attention", "memory_read", "memory_update", "mlp", "output_head")
STAGES = MODEL_STAGES + ("sampling",)
PHASES = ("prefill", "decode_step", "state_serialisation")
# Sampling settings under which every step of the sampler runs (penalty, top-k, top-p).
PROFILE_SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)


# --- analytic FLOPs ---------------------------------------------------------------------


def _memory_mlp_sizes(config: MACConfig) -> tuple[int, int]:
    """Multiply-adds of one head's memory MLP for one token, and of its backward pass."""
    d = config.head_dim
    widths = [d] + [config.memory_expansion * d] * (config.memory_depth - 1) + [d]
    products = [widths[j] * widths[j + 1] for j in range(config.memory_depth)]
    return sum(products), sum(products[1:])


def analytic_flops(config: MACConfig, tokens: int, logit_rows: int, chunk_updates: int) -> dict[str, float]:
    """Estimated matrix-product FLOPs per model stage for `tokens` fed tokens (all rows together),
    `logit_rows` rows of output logits and `chunk_updates` per-session chunk updates."""
    dim, heads, window = config.dim, config.heads, config.segment_len + config.persistent_tokens
    mlp_products, backward_products = _memory_mlp_sizes(config)
    memory_layers = sum(config.has_memory(i) for i in range(config.layers))
    plain_layers = config.layers - memory_layers
    b = config.chunk_size

    # qkv and output projections, plus scores and values over the window for every head
    attention = 8 * dim * dim + 4 * dim * window
    # ... plus the K/V projections of the retrieved memory and its C extra keys
    attention_memory = attention + 4 * dim * dim + 4 * dim * config.segment_len
    # query and output projections around the memory MLP, twice when the output gate repeats the read
    read = (4 * dim * dim + 2 * heads * mlp_products) * (2 if config.output_gate else 1)
    write_inputs = 4 * dim * dim + 6 * dim * heads  # key, value and gate projections
    # per chunk and head: forward pass, backward pass, weighted sums for W and S, coefficients
    update = heads * (2 * b * mlp_products + 2 * b * backward_products + 4 * b * mlp_products + 2 * b * (b + 1))
    return {
        "attention": float(tokens * (memory_layers * attention_memory + plain_layers * attention)),
        "memory_read": float(tokens * memory_layers * read),
        "memory_update": float(tokens * memory_layers * write_inputs + chunk_updates * memory_layers * update),
        "mlp": float(tokens * config.layers * 6 * dim * config.hidden_dim),
        "output_head": float(logit_rows * 2 * dim * config.vocab_size),
        "sampling": 0.0,
    }


# --- report -----------------------------------------------------------------------------


@dataclass
class StageTime:
    name: str
    ms: float  # per phase unit: the prefill, one decode step, or one session's serialisation
    calls: int  # record_function ranges per phase unit
    analytic_gflop: float
    profiler_gflop: float

    def gflops_per_second(self) -> float:
        return self.analytic_gflop / (self.ms / 1000) if self.ms > 0 else 0.0


@dataclass
class PhaseProfile:
    name: str
    ms: float  # profiled time per phase unit
    wall_ms: float  # unprofiled time per phase unit
    units: int  # prefills, decode steps or serialised sessions measured
    stages: list[StageTime] = field(default_factory=list)

    @property
    def other_ms(self) -> float:
        return max(0.0, self.ms - sum(s.ms for s in self.stages))

    @property
    def analytic_gflop(self) -> float:
        return sum(s.analytic_gflop for s in self.stages)


@dataclass
class ProfileReport:
    checkpoint: str
    device: str
    dtype: str
    threads: int
    torch_version: str
    parameters: int
    batch: int
    prompt_tokens: int
    decode_steps: int
    decode_chunk_updates: int  # per-session chunk updates that fell in the decode steps
    prefill: PhaseProfile
    decode: PhaseProfile
    serialisation: PhaseProfile  # per session
    state_bytes_after_prefill: int  # to_bytes() size of one session
    state_bytes_after_decode: int
    state_buffer_bytes: int  # in-memory tensors of one session's state (fixed-size buffers)
    trace: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("prefill", "decode", "serialisation"):
            phase = getattr(self, name)
            data[name]["other_ms"] = phase.other_ms
            for stage, row in zip(phase.stages, data[name]["stages"]):
                row["gflops_per_second"] = stage.gflops_per_second()
        return data


# --- measuring --------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_buffer_bytes(model: MACModel) -> int:
    state = model.new_state(1)
    return sum(t.numel() * t.element_size() for layer in state.layers for t in layer.tensors().values())


class _Run:
    """One pass of prefill, decode steps and serialisation over a fixed prompt batch."""

    def __init__(self, model: MACModel, prompts: torch.Tensor, decode_steps: int, seed: int) -> None:
        self.model = model
        self.prompts = prompts
        self.decode_steps = decode_steps
        self.seed = seed
        self.prefill_seconds = 0.0
        self.step_seconds: list[float] = []
        self.serialise_seconds: list[float] = []
        self.bytes_after_prefill = 0
        self.bytes_after_decode = 0
        self.chunk_updates = 0

    def _sample(self, samplers: list[Sampler], logits: torch.Tensor, histories: list[list[int]]) -> list[int]:
        tokens = []
        for row, sampler in enumerate(samplers):
            with record_function("sampling"):
                token = sampler(logits[row, -1], histories[row])
            histories[row].append(token)
            tokens.append(token)
        return tokens

    @torch.inference_mode()
    def __call__(self, measure_sizes: bool = False) -> None:
        model, device = self.model, self.model.device
        batch = self.prompts.shape[0]
        samplers = [Sampler(SamplingParams(seed=self.seed + row, **PROFILE_SAMPLING)) for row in range(batch)]
        histories = [row.tolist() for row in self.prompts]
        state = model.new_state(batch)

        _synchronize(device)
        started = time.perf_counter()
        with record_function("prefill"):
            logits, _ = model.feed(state, self.prompts.to(device), last_only=True)
            tokens = self._sample(samplers, logits, histories)
        _synchronize(device)
        self.prefill_seconds = time.perf_counter() - started
        if measure_sizes:
            self.bytes_after_prefill = len(state.split()[0].to_bytes())

        chunk = model.config.chunk_size
        self.step_seconds, self.chunk_updates = [], 0
        for _ in range(self.decode_steps):
            before = [c // chunk for c in state.consumed]
            started = time.perf_counter()
            with record_function("decode_step"):
                logits, _ = model.feed(state, torch.tensor([[t] for t in tokens], device=device))
                tokens = self._sample(samplers, logits, histories)
            _synchronize(device)
            self.step_seconds.append(time.perf_counter() - started)
            self.chunk_updates += sum(c // chunk != b for c, b in zip(state.consumed, before))

        self.serialise_seconds = []
        for row in state.split():
            started = time.perf_counter()
            with record_function("state_serialisation"):
                data = row.to_bytes()
            self.serialise_seconds.append(time.perf_counter() - started)
            self.bytes_after_decode = len(data)


def _phase_and_stage(event) -> tuple[str | None, str | None]:
    """Find the phase and stage ranges that enclose a profiler event (or are the event)."""
    phase = stage = None
    node = event
    while node is not None:
        if stage is None and node.name in STAGES:
            stage = node.name
        if node.name in PHASES:
            phase = node.name
            break
        node = node.cpu_parent
    return phase, stage


def _collect(events, use_device_time: bool) -> tuple[dict, dict, dict, dict]:
    """Sum range times, range counts and counted FLOPs by (phase, stage), and phase times."""
    times: dict[tuple[str, str], float] = {}
    calls: dict[tuple[str, str], int] = {}
    flops: dict[tuple[str, str], float] = {}
    phase_times: dict[str, float] = {}
    for event in events:
        duration = event.device_time_total if use_device_time else event.cpu_time_total
        if event.name in PHASES:
            phase_times[event.name] = phase_times.get(event.name, 0.0) + duration
            continue
        if event.name in STAGES:
            phase, _ = _phase_and_stage(event)
            if phase is not None:
                key = (phase, event.name)
                times[key] = times.get(key, 0.0) + duration
                calls[key] = calls.get(key, 0) + 1
        if event.flops:
            phase, stage = _phase_and_stage(event)
            if phase is not None:
                key = (phase, stage or "other")
                flops[key] = flops.get(key, 0.0) + event.flops
    return times, calls, flops, phase_times


def profile_model(model: MACModel, *, batch: int, prompt_tokens: int, decode_steps: int, seed: int = 0,
                  trace: str | Path | None = None, checkpoint: str = "") -> ProfileReport:
    """Profile prefill, decode steps and state serialisation, and write a Chrome trace if `trace` is set."""
    for name, value in (("batch", batch), ("prompt_tokens", prompt_tokens), ("decode_steps", decode_steps)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=generator)
    device = model.device

    run = _Run(model, prompts, decode_steps, seed)
    run()  # warm-up: first calls pay for allocation and kernel selection
    run(measure_sizes=True)  # unprofiled wall times
    wall_prefill, wall_steps, wall_serialise = run.prefill_seconds, list(run.step_seconds), list(run.serialise_seconds)
    sizes = (run.bytes_after_prefill, run.bytes_after_decode)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, with_flops=True) as profiler:
        run()
    if trace is not None:
        profiler.export_chrome_trace(str(trace))
    # NOTE: on CUDA the stage times are the kernels' device time under each range. This path
    # has not been run on a GPU.
    times, calls, counted, phase_times = _collect(profiler.events(), use_device_time=device.type == "cuda")

    config = model.config
    tokens_decoded = batch * decode_steps
    estimates = {
        "prefill": analytic_flops(config, batch * prompt_tokens, batch, batch * (prompt_tokens // config.chunk_size)),
        "decode_step": analytic_flops(config, tokens_decoded, tokens_decoded, run.chunk_updates),
    }
    units = {"prefill": 1, "decode_step": decode_steps, "state_serialisation": batch}
    wall = {"prefill": wall_prefill, "decode_step": sum(wall_steps), "state_serialisation": sum(wall_serialise)}

    def phase_profile(phase: str) -> PhaseProfile:
        count = units[phase]
        stages = STAGES if phase != "state_serialisation" else ()
        rows = [StageTime(name=stage,
                          ms=times.get((phase, stage), 0.0) / 1000 / count,
                          calls=round(calls.get((phase, stage), 0) / count),
                          analytic_gflop=estimates[phase][stage] / 1e9 / count,
                          profiler_gflop=counted.get((phase, stage), 0.0) / 1e9 / count)
                for stage in stages]
        return PhaseProfile(phase, phase_times.get(phase, 0.0) / 1000 / count, 1000 * wall[phase] / count, count, rows)

    return ProfileReport(
        checkpoint=checkpoint, device=str(device), dtype=str(model.embed.weight.dtype).replace("torch.", ""),
        threads=torch.get_num_threads(), torch_version=torch.__version__, parameters=model.num_parameters(),
        batch=batch, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
        decode_chunk_updates=run.chunk_updates, prefill=phase_profile("prefill"),
        decode=phase_profile("decode_step"), serialisation=phase_profile("state_serialisation"),
        state_bytes_after_prefill=sizes[0], state_bytes_after_decode=sizes[1],
        state_buffer_bytes=_state_buffer_bytes(model), trace=str(trace) if trace is not None else None)


# --- text -------------------------------------------------------------------------------

STAGE_LABELS = {
    "attention": "attention", "memory_read": "memory read", "memory_update": "memory update",
    "mlp": "MLP", "output_head": "output head", "sampling": "sampling",
}


def _phase_table(phase: PhaseProfile) -> list[str]:
    lines = [f"  {'stage':<15}{'ms':>10}{'share':>8}{'calls':>7}{'GFLOP':>11}{'GFLOP/s':>10}{'profiler GFLOP':>16}"]
    for stage in phase.stages:
        share = 100 * stage.ms / phase.ms if phase.ms else 0.0
        lines.append(f"  {STAGE_LABELS[stage.name]:<15}{stage.ms:>10.3f}{share:>7.1f}%{stage.calls:>7d}"
                     f"{stage.analytic_gflop:>11.5f}{stage.gflops_per_second():>10.2f}{stage.profiler_gflop:>16.5f}")
    other_share = 100 * phase.other_ms / phase.ms if phase.ms else 0.0
    lines.append(f"  {'other':<15}{phase.other_ms:>10.3f}{other_share:>7.1f}%")
    total_rate = phase.analytic_gflop / (phase.ms / 1000) if phase.ms else 0.0
    profiled = sum(s.profiler_gflop for s in phase.stages)
    lines.append(f"  {'total':<15}{phase.ms:>10.3f}{100.0:>7.1f}%{'':>7}{phase.analytic_gflop:>11.5f}"
                 f"{total_rate:>10.2f}{profiled:>16.5f}")
    return lines


def format_report(report: ProfileReport) -> str:
    sampling = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in PROFILE_SAMPLING.items())
    b, p = report.batch, report.prompt_tokens
    out = [
        f"checkpoint {report.checkpoint}: {report.parameters / 1e6:.2f}M parameters, {report.dtype} on "
        f"{report.device}, {report.threads} CPU thread{'s' if report.threads != 1 else ''}, "
        f"torch {report.torch_version}",
        f"batch {b}, {p} random prompt tokens per row, {report.decode_steps} decode steps; sampling with {sampling}",
        "",
        f"prefill ({b} x {p} tokens in one feed, then one sampled token per row): "
        f"{report.prefill.ms:.2f} ms profiled, {report.prefill.wall_ms:.2f} ms without the profiler "
        f"({b * p / (report.prefill.wall_ms / 1000):.0f} tokens/s)",
    ]
    out += _phase_table(report.prefill)
    out += [
        "",
        f"decode step ({b} rows, mean of {report.decode_steps} steps, which include "
        f"{report.decode_chunk_updates} per-session chunk updates): {report.decode.ms:.3f} ms profiled, "
        f"{report.decode.wall_ms:.3f} ms without the profiler ({b / (report.decode.wall_ms / 1000):.0f} tokens/s)",
    ]
    out += _phase_table(report.decode)
    out += [
        "",
        f"state serialisation (to_bytes of one session after the decode steps): {report.serialisation.ms:.3f} ms "
        f"profiled, {report.serialisation.wall_ms:.3f} ms without the profiler",
        f"session state: {report.state_bytes_after_prefill:,} bytes serialised after prefill, "
        f"{report.state_bytes_after_decode:,} after the decode steps; {report.state_buffer_bytes:,} bytes of "
        f"in-memory buffers per session, a fixed size whatever the session's length",
        "",
        "GFLOP is an analytic estimate of matrix-product FLOPs; 'profiler GFLOP' is what torch.profiler "
        "counts, which leaves out the attention kernel. 'other' is time outside the labelled stages.",
    ]
    if report.trace:
        out.append(f"Chrome trace written to {report.trace} (open it in chrome://tracing or ui.perfetto.dev)")
    return "\n".join(out)
