"""Tests of the generation engine on tiny random checkpoints, the CPU and real session stores.

The reference for every generated token is `generate_tokens`, the model's own single-session
loop. Greedy and seeded runs are deterministic, so the engine must reproduce it token for
token, whatever else runs in the batch.

The Redis tests use the real server at 127.0.0.1:6379 with a unique key prefix per test and
delete only that prefix's keys. They are skipped when Redis is not reachable, except with
CI=true, where they fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis_support import REDIS_HOST, REDIS_PORT, REDIS_URL, require_redis
import torch

import titans.engine.scheduler as scheduler_module
from titans.engine import (
    Engine,
    EngineBusySession,
    EngineConfig,
    EngineObserver,
    EngineStopped,
    Finished,
    GenerateRequest,
    GenerationFailed,
    QueueFull,
    RequestStream,
    TextDelta,
)
from titans.model import MACConfig, MACModel, State
from titans.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from titans.model.generate import generate_tokens
from titans.model.sampling import SamplingParams
from titans.model.tokenizer import Tokenizer
from titans.session_store import MemoryStore, SessionStore, StoreUnavailable, open_store

# The corpus sits in shared/ beside the repository (as CI lays it out).
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
GREEDY = SamplingParams(temperature=0.0)
OWNER = "engine-tests"


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def corpus() -> str:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"training text not found: {SHAKESPEARE}")
    return SHAKESPEARE.read_text(encoding="utf-8")


def build_checkpoint(directory: Path, text: str, vocab_size: int) -> Checkpoint:
    tokenizer = Tokenizer.train([text], vocab_size)
    torch.manual_seed(0)
    model = MACModel(MACConfig.from_name("tiny").replace(vocab_size=vocab_size))
    save_checkpoint(model, tokenizer, directory)
    return load_checkpoint(directory, "cpu")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: str) -> Checkpoint:
    """Tiny random model with a 300-token BPE trained on the first 50,000 characters."""
    return build_checkpoint(tmp_path_factory.mktemp("bpe-checkpoint"), corpus[:50_000], 300)


@pytest.fixture(scope="session")
def byte_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: str) -> Checkpoint:
    """Tiny random model with a byte-level vocabulary (256 bytes and 2 special tokens).

    Every byte is its own token, so each non-ASCII character spans several tokens.
    """
    return build_checkpoint(tmp_path_factory.mktemp("byte-checkpoint"), corpus[:5_000], 258)


# --- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_engine(checkpoint: Checkpoint, store: SessionStore | None = None,
                         observer: EngineObserver | None = None, **config):
    """Start an engine on `store` (a new memory store if None) and stop it on exit."""
    store = store if store is not None else open_store("memory://")
    engine = Engine(checkpoint, store, EngineConfig(**config), observer)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(grace_seconds=5.0)


async def new_session(engine: Engine) -> str:
    meta = await engine.store.create(owner=OWNER, fingerprint=engine.checkpoint.fingerprint)
    return meta.id


@dataclass
class Outcome:
    deltas: list[TextDelta]
    finished: Finished

    @property
    def tokens(self) -> list[int]:
        return [token for delta in self.deltas for token in delta.token_ids]

    @property
    def text(self) -> str:
        return "".join(delta.text for delta in self.deltas)


STREAM_TIMEOUT = 60.0  # seconds; a stream that never ends fails the test instead of hanging it


async def drain(iterator) -> Outcome:
    """Read the rest of a stream's events, up to and including Finished."""

    async def read() -> Outcome:
        deltas: list[TextDelta] = []
        async for event in iterator:
            if isinstance(event, TextDelta):
                deltas.append(event)
            else:
                return Outcome(deltas, event)
        raise AssertionError("stream ended without a Finished event")

    try:
        return await asyncio.wait_for(read(), STREAM_TIMEOUT)
    except asyncio.TimeoutError:
        raise AssertionError(f"stream did not finish within {STREAM_TIMEOUT} s") from None


async def collect(stream: RequestStream) -> Outcome:
    return await drain(aiter(stream))


async def run(engine: Engine, prompt: list[int], max_tokens: int, session_id: str | None = None,
              sampling: SamplingParams = GREEDY, stop: list[str] | None = None) -> Outcome:
    request = GenerateRequest(prompt_tokens=prompt, max_tokens=max_tokens, sampling=sampling,
                              stop=stop or [], session_id=session_id, stop_at_eos=False)
    return await collect(await engine.generate(request))


def reference(checkpoint: Checkpoint, history: list[int], max_tokens: int,
              sampling: SamplingParams = GREEDY) -> list[int]:
    """Tokens that the model's own generation loop samples after feeding `history`."""
    return list(generate_tokens(checkpoint.model, history, max_tokens, sampling))


async def wait_until(condition, description: str, timeout: float = 30.0) -> None:
    """Poll `condition` on the event loop, and fail the test naming `description` if it stays false."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {description}")
        await asyncio.sleep(0.005)


async def next_tokens(iterator, count: int) -> list[int]:
    """Read deltas from a stream iterator until at least `count` tokens have arrived."""
    tokens: list[int] = []
    while len(tokens) < count:
        event = await asyncio.wait_for(anext(iterator), STREAM_TIMEOUT)
        assert isinstance(event, TextDelta), f"stream ended early with {event!r}"
        tokens.extend(event.token_ids)
    return tokens


def shakespeare_tokens(checkpoint: Checkpoint, corpus: str, count: int, start: int = 100_000) -> list[int]:
    """`count` tokens of Shakespeare from character `start` on (past the tokenizer's training text)."""
    tokens = checkpoint.tokenizer.encode(corpus[start:start + 4 * count])
    assert len(tokens) >= count, f"text slice too short for {count} tokens"
    return tokens[:count]


class RecordingObserver(EngineObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []  # (batch size, prefill tokens, decode tokens)
        self.first_tokens = 0
        self.later_tokens = 0

    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        self.steps.append((batch_size, prefill_tokens, decode_tokens))

    def on_first_token(self, seconds: float) -> None:
        self.first_tokens += 1

    def on_token(self, seconds_since_previous: float) -> None:
        self.later_tokens += 1


# --- Redis availability ---------------------------------------------------------------------


@pytest.fixture
def redis_prefix():
    """A unique Redis key prefix; its keys are deleted after the test."""
    require_redis()
    import redis

    prefix = f"test-engine-{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5.0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class LoopbackProxy:
    """TCP proxy on 127.0.0.1 that forwards to the test Redis until `break_all` drops every link."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(REDIS_HOST, REDIS_PORT)
        self.writers += [client_writer, upstream_writer]
        await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer),
                             return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def break_all(self) -> None:
        """Stop listening and reset every open connection, as a crashed network path would."""
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


# --- greedy equivalence ---------------------------------------------------------------------


async def test_greedy_session_matches_generate_tokens(checkpoint: Checkpoint) -> None:
    tokenizer = checkpoint.tokenizer
    document = tokenizer.encode("ROMEO:\nBut, soft! what light through yonder window breaks?\n")
    prompt = tokenizer.encode("JULIET:\nO Romeo, Romeo!")
    observer = RecordingObserver()

    async with running_engine(checkpoint, observer=observer) as engine:
        session = await new_session(engine)
        appended = await run(engine, document, 0, session)
        outcome = await run(engine, prompt, 40, session)

    expected = reference(checkpoint, document + prompt, 40)
    assert appended.deltas == []
    assert outcome.tokens == expected
    assert outcome.text == tokenizer.decode(expected)
    assert outcome.finished.text == outcome.text
    assert outcome.finished.finish_reason == "length"
    assert outcome.finished.usage.prompt_tokens == len(prompt)
    assert outcome.finished.usage.completion_tokens == 40
    assert outcome.finished.session_tokens == len(document) + len(prompt) + 40
    assert outcome.finished.session_version == 3
    assert observer.first_tokens == 1
    assert observer.later_tokens == 39


async def test_ephemeral_request_matches_generate_tokens(checkpoint: Checkpoint) -> None:
    prompt = checkpoint.tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.")

    async with running_engine(checkpoint) as engine:
        outcome = await run(engine, prompt, 30)

    assert outcome.tokens == reference(checkpoint, prompt, 30)
    assert outcome.finished.session_version is None
    assert outcome.finished.session_tokens == len(prompt) + 30


async def test_two_requests_equal_one_on_concatenation(checkpoint: Checkpoint) -> None:
    tokenizer = checkpoint.tokenizer
    first_prompt = tokenizer.encode("MENENIUS:\nWhat work's, my countrymen, in hand?")
    second_prompt = tokenizer.encode(" Where go you with bats and clubs?")

    async with running_engine(checkpoint) as engine:
        session = await new_session(engine)
        first = await run(engine, first_prompt, 17, session)
        second = await run(engine, second_prompt, 23, session)
        # The same history in one request on a fresh session.
        joined = await run(engine, first_prompt + first.tokens + second_prompt, 23, await new_session(engine))

    assert first.tokens == reference(checkpoint, first_prompt, 17)
    expected = reference(checkpoint, first_prompt + first.tokens + second_prompt, 23)
    assert second.tokens == expected
    assert joined.tokens == expected
    # The last token of the first request is fed at the start of the second, but usage
    # counts it once, as a completion token of the first request.
    assert second.finished.usage.prompt_tokens == len(second_prompt)
    assert second.finished.session_tokens == len(first_prompt) + 17 + len(second_prompt) + 23
    assert second.finished.session_tokens == joined.finished.session_tokens


# --- batching -------------------------------------------------------------------------------


def varied_sampling(index: int) -> SamplingParams:
    """Different seeds and sampling parameters for each of the concurrent requests."""
    return SamplingParams(
        temperature=0.6 + 0.1 * (index % 8),
        top_k=(0, 5, 40, 0)[index % 4],
        top_p=(1.0, 0.9, 1.0, 0.8)[index % 4],
        min_p=(0.0, 0.0, 0.05)[index % 3],
        repetition_penalty=(1.0, 1.3)[index % 2],
        seed=1000 + index,
    )


async def test_sixteen_concurrent_sessions_match_solo_runs(checkpoint: Checkpoint, corpus: str) -> None:
    # Prompts of different lengths put the sessions at different in-segment and in-chunk
    # positions; different max_tokens make requests leave the batch at different steps.
    count = 16
    prompts = [shakespeare_tokens(checkpoint, corpus, 3 + 5 * i, start=120_000 + 997 * i) for i in range(count)]
    lengths = [10 + 2 * i for i in range(count)]
    samplings = [varied_sampling(i) for i in range(count)]
    expected = [reference(checkpoint, p, n, s) for p, n, s in zip(prompts, lengths, samplings)]

    async with running_engine(checkpoint, max_batch_size=32) as engine:
        solo = [await run(engine, p, n, await new_session(engine), s) for p, n, s in zip(prompts, lengths, samplings)]

        sessions = [await new_session(engine) for _ in range(count)]
        first_half = [asyncio.create_task(run(engine, prompts[i], lengths[i], sessions[i], samplings[i]))
                      for i in range(count // 2)]
        # The second half joins while the first half is decoding.
        await wait_until(lambda: engine.batch_size == count // 2, "the first half is in the batch")
        second_half = [asyncio.create_task(run(engine, prompts[i], lengths[i], sessions[i], samplings[i]))
                       for i in range(count // 2, count)]
        concurrent = await asyncio.gather(*first_half, *second_half)

    for i in range(count):
        assert solo[i].tokens == expected[i], f"solo run {i} differs from generate_tokens"
        assert concurrent[i].tokens == expected[i], f"concurrent run {i} differs from its solo run"
        assert concurrent[i].finished.finish_reason == "length"
        assert concurrent[i].finished.session_tokens == len(prompts[i]) + lengths[i]
    assert len({tuple(outcome.tokens) for outcome in concurrent}) == count


async def test_long_prefill_interleaves_decoding(checkpoint: Checkpoint, corpus: str) -> None:
    chunk = 64
    long_prompt = shakespeare_tokens(checkpoint, corpus, 2000)
    short_prompt = checkpoint.tokenizer.encode("KING RICHARD III:\nNow is the winter of our discontent")
    observer = RecordingObserver()
    timeline: list[tuple[str, int]] = []  # (request, tokens) in arrival order on the event loop

    async def consume(name: str, stream: RequestStream) -> Outcome:
        deltas: list[TextDelta] = []
        async for event in stream:
            if isinstance(event, TextDelta):
                timeline.append((name, len(event.token_ids)))
                deltas.append(event)
            else:
                timeline.append((name, 0))
                return Outcome(deltas, event)
        raise AssertionError(f"stream {name} ended without a Finished event")

    async with running_engine(checkpoint, observer=observer, prefill_chunk_tokens=chunk) as engine:
        running = await engine.generate(GenerateRequest(short_prompt, 100, GREEDY, session_id=await new_session(engine),
                                                        stop_at_eos=False))
        running_task = asyncio.create_task(consume("running", running))
        await wait_until(lambda: sum(n for name, n in timeline if name == "running") >= 3,
                         "the running stream has sent 3 tokens")
        steps_before = len(observer.steps)
        timeline.append(("long submitted", 0))
        long = await engine.generate(GenerateRequest(long_prompt, 4, GREEDY, session_id=await new_session(engine),
                                                     stop_at_eos=False))
        long_outcome = await consume("long", long)
        running_outcome = await running_task

    prefill_steps = [step for step in observer.steps[steps_before:] if step[1] > 0]
    assert len(prefill_steps) >= math.ceil(len(long_prompt) / chunk)
    assert all(prefill <= chunk for _, prefill, _ in prefill_steps)
    assert all(decode >= 1 for _, _, decode in prefill_steps), "a prefill step decoded no token of the running stream"

    submitted = timeline.index(("long submitted", 0))
    long_first = next(i for i, (name, _) in enumerate(timeline) if name == "long")
    streamed_meanwhile = sum(n for name, n in timeline[submitted:long_first] if name == "running")
    assert streamed_meanwhile >= 0.8 * len(prefill_steps), (
        f"the running stream sent {streamed_meanwhile} tokens during {len(prefill_steps)} prefill steps")

    assert running_outcome.tokens == reference(checkpoint, short_prompt, 100)
    assert long_outcome.tokens == reference(checkpoint, long_prompt, 4)
    assert long_outcome.finished.session_tokens == len(long_prompt) + 4


# --- UTF-8 and stop strings -----------------------------------------------------------------


class ScriptedSampler:
    """Stand-in for the model's Sampler that returns a fixed token sequence chosen by the seed.

    A random model does not write an emoji on request, so a script picks the tokens. The engine
    still feeds each of them through the model, detokenizes them and commits the state as usual.
    """

    scripts: dict[int, list[int]] = {}
    eos_id = 0

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self._tokens = iter(self.scripts[params.seed])

    def __call__(self, logits: torch.Tensor, history: list[int] | None = None) -> int:
        assert logits.dim() == 1
        assert torch.isfinite(logits).all()
        return next(self._tokens, self.eos_id)


@pytest.fixture
def scripted_sampler(monkeypatch: pytest.MonkeyPatch, byte_checkpoint: Checkpoint):
    monkeypatch.setattr(ScriptedSampler, "scripts", {})
    monkeypatch.setattr(ScriptedSampler, "eos_id", byte_checkpoint.tokenizer.eos_id)
    monkeypatch.setattr(scheduler_module, "Sampler", ScriptedSampler)
    return ScriptedSampler


async def test_multibyte_characters_never_sent_broken(byte_checkpoint: Checkpoint, scripted_sampler) -> None:
    tokenizer = byte_checkpoint.tokenizer
    completion = "Ünïcode 😀 and 世界 and 🎭 done"
    script = tokenizer.encode(completion)
    assert len(script) == len(completion.encode("utf-8")), "expected one token per byte"
    scripted_sampler.scripts[1] = script

    async with running_engine(byte_checkpoint) as engine:
        session = await new_session(engine)
        outcome = await run(engine, tokenizer.encode("Say it: "), len(script), session, SamplingParams(seed=1))

    assert outcome.text == completion
    assert outcome.finished.text == completion
    assert outcome.tokens == script
    for delta in outcome.deltas:
        assert "\ufffd" not in delta.text, f"delta {delta.text!r} contains a broken character"
        assert delta.text.encode("utf-8") == tokenizer.decode_bytes(delta.token_ids)
    # The 4-byte emoji arrives whole, in the delta of its last byte.
    emoji = next(delta for delta in outcome.deltas if "😀" in delta.text)
    assert emoji.text == "😀"
    assert len(emoji.token_ids) == 4


async def test_stop_string_over_three_tokens(byte_checkpoint: Checkpoint, scripted_sampler) -> None:
    tokenizer = byte_checkpoint.tokenizer
    # "EN" without "D" first: held back, then sent once the next token rules out the stop string.
    before = "世界 ENd 😀 "
    script = tokenizer.encode(before + "END and what follows")
    scripted_sampler.scripts[2] = script

    async with running_engine(byte_checkpoint) as engine:
        session = await new_session(engine)
        outcome = await run(engine, tokenizer.encode("Q: "), 100, session, SamplingParams(seed=2), stop=["END"])
        meta, blob = await engine.store.load(session)

    assert outcome.finished.finish_reason == "stop"
    assert outcome.finished.text == before
    assert outcome.text == before
    for delta in outcome.deltas:
        assert "E" not in delta.text or "ENd" in delta.text, f"delta {delta.text!r} sent part of the stop string"
    stop_end = len(tokenizer.encode(before + "END"))
    assert outcome.finished.usage.completion_tokens == stop_end
    # The session absorbed the stop string's tokens; the last one is pending.
    state = State.from_bytes(blob, byte_checkpoint.model)
    assert state.pending == [[script[stop_end - 1]]]
    assert meta.tokens == outcome.finished.session_tokens == len(tokenizer.encode("Q: ")) + stop_end


async def test_stop_prefix_flushed_at_length(byte_checkpoint: Checkpoint, scripted_sampler) -> None:
    tokenizer = byte_checkpoint.tokenizer
    script = tokenizer.encode("abc EN")
    scripted_sampler.scripts[3] = script

    async with running_engine(byte_checkpoint) as engine:
        outcome = await run(engine, tokenizer.encode("x"), len(script), None, SamplingParams(seed=3), stop=["END"])

    assert outcome.finished.finish_reason == "length"
    assert outcome.finished.text == "abc EN"
    assert outcome.text == "abc EN"
    assert outcome.tokens == script


# --- cancellation ---------------------------------------------------------------------------


async def test_cancel_mid_stream_frees_slot_and_commits(checkpoint: Checkpoint) -> None:
    tokenizer = checkpoint.tokenizer
    prompt = tokenizer.encode("GLOUCESTER:\nNow is the winter")
    queued_prompt = tokenizer.encode("CLARENCE:\nYour grace")
    follow_up = tokenizer.encode(" and then?")

    async with running_engine(checkpoint, max_batch_size=1) as engine:
        session = await new_session(engine)
        stream = await engine.generate(GenerateRequest(prompt, 100_000, GREEDY, session_id=session, stop_at_eos=False))
        events = aiter(stream)
        received = await next_tokens(events, 5)
        # The only batch slot is taken, so this request waits in the queue.
        queued = await engine.generate(GenerateRequest(queued_prompt, 8, GREEDY, stop_at_eos=False))
        assert engine.queue_depth == 1

        stream.cancel()
        rest = await drain(events)
        cancelled = rest.finished
        queued_outcome = await collect(queued)
        await wait_until(lambda: engine.batch_size == 0, "the batch is empty")

        meta, blob = await engine.store.load(session)
        after = await run(engine, follow_up, 10, session)

    generated = received + rest.tokens
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.usage.completion_tokens == len(generated)
    assert len(generated) < 100
    assert generated == reference(checkpoint, prompt, len(generated))
    assert queued_outcome.tokens == reference(checkpoint, queued_prompt, 8)

    assert meta.tokens == cancelled.session_tokens == len(prompt) + len(generated)
    assert meta.version == cancelled.session_version == 2
    state = State.from_bytes(blob, checkpoint.model)
    assert state.consumed[0] + len(state.pending[0]) == meta.tokens
    assert state.pending == [[generated[-1]]]
    assert after.tokens == reference(checkpoint, prompt + generated + follow_up, 10)


async def test_cancel_during_prefill_keeps_prompt_pending(checkpoint: Checkpoint, corpus: str) -> None:
    prompt = shakespeare_tokens(checkpoint, corpus, 800)
    follow_up = checkpoint.tokenizer.encode(" So ends the tale.")

    async with running_engine(checkpoint, prefill_chunk_tokens=16) as engine:
        session = await new_session(engine)
        stream = await engine.generate(GenerateRequest(prompt, 20, GREEDY, session_id=session, stop_at_eos=False))
        await wait_until(lambda: engine.batch_size == 1, "the request is prefilling")
        stream.cancel()
        cancelled = await collect(stream)
        assert engine.batch_size == 0
        meta, blob = await engine.store.load(session)
        after = await run(engine, follow_up, 8, session)

    assert cancelled.finished.finish_reason == "cancelled"
    assert cancelled.finished.usage.completion_tokens == 0
    assert cancelled.deltas == []
    assert meta.tokens == cancelled.finished.session_tokens == len(prompt)
    state = State.from_bytes(blob, checkpoint.model)
    assert 0 < state.consumed[0] < len(prompt), "the cancel did not land during the prefill"
    assert state.consumed[0] + len(state.pending[0]) == len(prompt)
    assert after.tokens == reference(checkpoint, prompt + follow_up, 8)


async def test_stop_cancels_running_requests(checkpoint: Checkpoint) -> None:
    engine = Engine(checkpoint, open_store("memory://"), EngineConfig())
    request = GenerateRequest(checkpoint.tokenizer.encode("Hello"), 100_000, GREEDY, stop_at_eos=False)
    with pytest.raises(EngineStopped):
        await engine.generate(request)

    await engine.start()
    stream = await engine.generate(request)
    events = aiter(stream)
    await next_tokens(events, 2)
    await engine.stop(grace_seconds=0.1)
    outcome = await drain(events)

    assert outcome.finished.finish_reason == "cancelled"
    assert not engine.running
    with pytest.raises(EngineStopped):
        await engine.generate(request)


# --- rejections -----------------------------------------------------------------------------


async def test_busy_session_rejected(checkpoint: Checkpoint) -> None:
    prompt = checkpoint.tokenizer.encode("Hark")

    async with running_engine(checkpoint, retry_after_seconds=2.5) as engine:
        session = await new_session(engine)
        first = await engine.generate(GenerateRequest(prompt, 100_000, GREEDY, session_id=session, stop_at_eos=False))
        with pytest.raises(EngineBusySession) as rejected:
            await engine.generate(GenerateRequest(prompt, 5, GREEDY, session_id=session))
        assert rejected.value.session_id == session
        assert rejected.value.retry_after == 2.5
        assert engine.queue_depth + engine.batch_size == 1

        first.cancel()
        cancelled = await collect(first)
        after = await run(engine, prompt, 5, session)

    assert cancelled.finished.finish_reason == "cancelled"
    assert after.finished.finish_reason == "length"
    assert after.finished.session_version == 3


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_queue_full_rejected(checkpoint: Checkpoint, backend: str, request: pytest.FixtureRequest) -> None:
    # With Redis every admission awaits the network, so the flood's calls overlap.
    if backend == "redis":
        store = open_store(REDIS_URL, prefix=request.getfixturevalue("redis_prefix"))
    else:
        store = open_store("memory://")
    prompt = checkpoint.tokenizer.encode("Hark")

    try:
        async with running_engine(checkpoint, store, max_batch_size=1, max_queued_requests=1,
                                  retry_after_seconds=0.5) as engine:
            running = await engine.generate(GenerateRequest(prompt, 100_000, GREEDY, stop_at_eos=False))
            await wait_until(lambda: engine.batch_size == 1 and engine.queue_depth == 0,
                             "the first request is running")

            sessions = [await new_session(engine) for _ in range(10)]
            flood = await asyncio.gather(
                *(engine.generate(GenerateRequest(prompt, 100_000, GREEDY, session_id=session, stop_at_eos=False))
                  for session in sessions),
                return_exceptions=True)
            accepted = [result for result in flood if isinstance(result, RequestStream)]
            rejections = [result for result in flood if isinstance(result, QueueFull)]
            assert len(accepted) == 1, f"flood results: {flood}"
            assert len(rejections) == 9, f"flood results: {flood}"
            assert all(error.retry_after == 0.5 for error in rejections)
            assert engine.queue_depth == 1

            for stream in [running, *accepted]:
                stream.cancel()
            outcomes = [await collect(stream) for stream in [running, *accepted]]
    finally:
        await store.close()

    assert [outcome.finished.finish_reason for outcome in outcomes] == ["cancelled", "cancelled"]


# --- store failures -------------------------------------------------------------------------


class FailingCommitStore(MemoryStore):
    """Memory store whose commits raise StoreUnavailable while `failing` is set."""

    failing = False

    async def commit(self, session_id: str, *, state: bytes | None, tokens: int, base_version: int):
        if self.failing:
            raise StoreUnavailable(ConnectionError("commit failure injected by the test"))
        return await super().commit(session_id, state=state, tokens=tokens, base_version=base_version)


async def test_commit_failure_keeps_previous_state(checkpoint: Checkpoint) -> None:
    tokenizer = checkpoint.tokenizer
    store = FailingCommitStore(ttl_seconds=3600, max_state_bytes=2**26, max_sessions_per_owner=100,
                               memory_budget_bytes=2**30, timeout_seconds=5)
    prompt = tokenizer.encode("LEONTES:\nToo hot, too hot!")
    lost_prompt = tokenizer.encode(" To mingle friendship far")
    follow_up = tokenizer.encode(" is mingling bloods.")

    async with running_engine(checkpoint, store) as engine:
        session = await new_session(engine)
        first = await run(engine, prompt, 12, session)
        meta_before, blob_before = await store.load(session)

        store.failing = True
        failed = await engine.generate(GenerateRequest(lost_prompt, 12, GREEDY, session_id=session, stop_at_eos=False))
        with pytest.raises(GenerationFailed, match="commit failure injected"):
            await collect(failed)
        store.failing = False

        meta_after, blob_after = await store.load(session)
        after = await run(engine, follow_up, 10, session)

    assert meta_after.version == meta_before.version == first.finished.session_version
    assert meta_after.tokens == meta_before.tokens == len(prompt) + 12
    assert blob_after == blob_before
    assert after.tokens == reference(checkpoint, prompt + first.tokens + follow_up, 10)


async def test_redis_connection_lost_keeps_previous_state(checkpoint: Checkpoint, redis_prefix: str) -> None:
    tokenizer = checkpoint.tokenizer
    prompt = tokenizer.encode("PROSPERO:\nOur revels now are ended.")
    lost_prompt = tokenizer.encode(" These our actors")
    follow_up = tokenizer.encode(" melted into air")
    direct = open_store(REDIS_URL, prefix=redis_prefix, timeout_seconds=2.0)
    proxy = LoopbackProxy()
    await proxy.start()
    proxied = open_store(f"redis://127.0.0.1:{proxy.port}/0", prefix=redis_prefix, timeout_seconds=1.0)
    lease_ttl = 1.0

    try:
        async with running_engine(checkpoint, proxied, lease_ttl_seconds=lease_ttl) as engine:
            session = await new_session(engine)
            first = await run(engine, prompt, 12, session)
            meta_before, blob_before = await direct.load(session)

            stream = await engine.generate(GenerateRequest(lost_prompt, 30, GREEDY, session_id=session,
                                                           stop_at_eos=False))
            events = aiter(stream)
            await next_tokens(events, 1)
            await proxy.break_all()
            with pytest.raises(GenerationFailed, match="saving the session state failed"):
                await drain(events)

        meta_after, blob_after = await direct.load(session)
        # The lease could not be released over the broken link; it expires on its own.
        await asyncio.sleep(lease_ttl + 0.2)
        async with running_engine(checkpoint, direct) as engine:
            after = await run(engine, follow_up, 10, session)
    finally:
        await proxied.close()
        await direct.close()

    assert meta_after.version == meta_before.version == first.finished.session_version
    assert meta_after.tokens == meta_before.tokens == len(prompt) + 12
    assert blob_after == blob_before
    assert after.tokens == reference(checkpoint, prompt + first.tokens + follow_up, 10)


# --- appends and persistence ----------------------------------------------------------------


async def test_append_is_absorbed(checkpoint: Checkpoint, corpus: str) -> None:
    tokenizer = checkpoint.tokenizer
    question = tokenizer.encode("HAMLET:\nTo be, or not to be")
    document = shakespeare_tokens(checkpoint, corpus, 300)
    answer_prompt = tokenizer.encode("\nOPHELIA:\n")

    async with running_engine(checkpoint) as engine:
        session = await new_session(engine)
        first = await run(engine, question, 6, session)
        appended = await run(engine, document, 0, session)
        meta = await engine.store.get(session)
        answer = await run(engine, answer_prompt, 15, session)

    assert appended.deltas == []
    assert appended.finished.text == ""
    assert appended.finished.usage.completion_tokens == 0
    # The append feeds the token left pending by the first request, then the document;
    # usage counts only the document.
    assert appended.finished.usage.prompt_tokens == len(document)
    assert appended.finished.session_tokens == meta.tokens == len(question) + 6 + len(document)
    assert answer.finished.usage.prompt_tokens == len(answer_prompt)
    assert answer.tokens == reference(checkpoint, question + first.tokens + document + answer_prompt, 15)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_session_survives_store_round_trip(checkpoint: Checkpoint, tmp_path: Path, backend: str,
                                                 request: pytest.FixtureRequest) -> None:
    if backend == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        url = REDIS_URL
    else:
        prefix = "unused"
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
    tokenizer = checkpoint.tokenizer
    prompt = tokenizer.encode("PORTIA:\nThe quality of mercy is not strain'd")
    follow_up = tokenizer.encode("\nIt droppeth as the gentle rain")

    store = open_store(url, prefix=prefix)
    try:
        async with running_engine(checkpoint, store) as engine:
            session = await new_session(engine)
            first = await run(engine, prompt, 14, session)
    finally:
        await store.close()

    # A new store and a new copy of the model, as after a server restart.
    reloaded = load_checkpoint(checkpoint.path, "cpu")
    store = open_store(url, prefix=prefix)
    try:
        meta, blob = await store.load(session)
        async with running_engine(reloaded, store) as engine:
            second = await run(engine, follow_up, 14, session)
    finally:
        await store.close()

    assert blob is not None
    assert meta.tokens == len(prompt) + 14
    assert State.from_bytes(blob, reloaded.model).pending == [[first.tokens[-1]]]
    assert second.tokens == reference(checkpoint, prompt + first.tokens + follow_up, 14)
    assert second.finished.session_version == 3
