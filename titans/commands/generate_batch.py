"""Batch mode of `titans generate`: a JSONL file of prompts run through the engine.

Lines with a session_id run in file order on that session's memory; different sessions
and lines without a session run concurrently in the decode batch. Each finished line is
appended to the output at once, so a rerun skips the lines whose id is already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OUTPUT_OWNER = "titans-generate"  # session store owner of the sessions batch mode creates
DEFAULT_STORE_TTL_SECONDS = 10 * 365 * 86400  # ten years, so the default store's sessions last as long as its file
MAX_SEED = 2**63 - 1  # the server's limit too; torch.Generator.manual_seed takes 64-bit seeds
LINE_FIELDS = ("id", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
               "repetition_penalty", "seed", "stop", "session_id", "metadata")



# --- batch mode: input lines ------------------------------------------------------------


class LineError(ValueError):
    """An input line that cannot run. The exception message gives the reason."""


@dataclass
class BatchLine:
    number: int  # 1-based line number in the input file
    id: str | int
    prompt_tokens: list[int]
    max_tokens: int
    sampling: Any  # SamplingParams
    stop: list[str]
    session_id: str | None
    metadata: Any = None
    has_metadata: bool = False

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value: Any) -> str:
    """Identity of a line id: the string "1" and the integer 1 are different ids."""
    return json.dumps(value)


def _number(record: dict, name: str, default: float) -> float:
    value = record.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LineError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(record: dict, name: str, default: int | None, allow_null: bool = False) -> int | None:
    value = record.get(name, default)
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LineError(f"{name} must be an integer, got {value!r}")
    return value


def parse_line(text: str, number: int, args: argparse.Namespace, tokenizer) -> BatchLine:
    """Validate one input line, filling in the command-line defaults. Raises LineError."""
    from titans.model.sampling import SamplingParams
    from titans.session_store import validate_session_id

    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise LineError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(LINE_FIELDS))
    if unknown:
        raise LineError(f"unknown fields {unknown}; known fields: {', '.join(LINE_FIELDS)}")

    line_id = record.get("id", f"line-{number}")
    if isinstance(line_id, bool) or not isinstance(line_id, (str, int)) or line_id == "":
        raise LineError(f"id must be a non-empty string or an integer, got {line_id!r}")

    if "prompt" not in record:
        raise LineError("missing required field 'prompt'")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise LineError(f"prompt must be a string, got {type(prompt).__name__}")

    session_id = record.get("session_id")
    if session_id is not None:
        try:
            session_id = validate_session_id(session_id)
        except ValueError as exc:
            raise LineError(str(exc)) from None
    prompt_tokens = tokenizer.encode(prompt)
    if not prompt_tokens and session_id is None:
        raise LineError("prompt must not be empty on a line without a session_id")

    max_tokens = _integer(record, "max_tokens", args.max_tokens)
    if max_tokens < 0:
        raise LineError(f"max_tokens must be 0 or more, got {max_tokens}")

    stop = record.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise LineError(f"stop must be a string or a list of strings, got {stop!r}")

    try:
        sampling = SamplingParams(
            temperature=_number(record, "temperature", args.temperature),
            top_k=_integer(record, "top_k", args.top_k),
            top_p=_number(record, "top_p", args.top_p),
            min_p=_number(record, "min_p", args.min_p),
            repetition_penalty=_number(record, "repetition_penalty", args.repetition_penalty),
            seed=_integer(record, "seed", args.seed, allow_null=True))
    except LineError:
        raise
    except ValueError as exc:
        raise LineError(f"invalid sampling parameters: {exc}") from None
    if sampling.seed is not None and not 0 <= sampling.seed <= MAX_SEED:
        raise LineError(f"seed must be in 0..{MAX_SEED}, got {sampling.seed}")

    return BatchLine(number=number, id=line_id, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                     sampling=sampling, stop=stop, session_id=session_id,
                     metadata=record.get("metadata"), has_metadata="metadata" in record)


def read_done(output: Path) -> dict[str, dict]:
    """Read the results already in the output, by id key, and end a partial last line with a newline.

    A run that was killed while writing can leave a last line without its newline. Adding
    one makes the next result start on a line of its own. If that line is not valid JSON,
    it is reported and its input line runs again.
    """
    done: dict[str, dict] = {}
    if not output.exists():
        return done
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        with output.open("ab") as handle:
            handle.write(b"\n")
    # Split on newlines only: str.splitlines() would also split on U+2028 and other separators
    # that json.dumps(ensure_ascii=False) leaves inside strings.
    for number, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            _report(f"{output}: line {number} is not valid JSON; ignored (its input line runs again)")
            continue
        if isinstance(record, dict) and "id" in record:
            done[id_key(record["id"])] = record
    return done


def _report(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# --- batch mode: planning ---------------------------------------------------------------


@dataclass
class Lane:
    """Lines that run one after another: all pending lines of one session, or one sessionless line."""

    session_id: str | None
    lines: list[BatchLine]
    expected_tokens: int = 0  # tokens the session's memory contains after its last done line
    has_done_lines: bool = False


@dataclass
class Plan:
    lanes: list[Lane] = field(default_factory=list)
    done: int = 0  # lines whose id is already in the output
    problems: int = 0  # invalid lines and lines skipped because of them


def plan_batch(lines_text: list[str], args: argparse.Namespace, tokenizer, done: dict[str, dict]) -> Plan:
    """Parse the input, report invalid lines, and group pending lines into lanes."""
    plan = Plan()
    seen: dict[str, int] = {}  # id key -> line number
    # session id -> (first line number it applies to, reason): pending lines from there on cannot run
    blocked: dict[str, tuple[int, str]] = {}
    sessions: dict[str, Lane] = {}

    def block(session: str, number: int) -> None:
        reason = (f"line {number} of session {session!r} did not run, and later lines of a session "
                  f"depend on it")
        blocked.setdefault(session, (number, reason))

    for number, text in enumerate(lines_text, start=1):
        if not text.strip():
            continue  # blank lines, and the empty string after a final newline
        try:
            line = parse_line(text, number, args, tokenizer)
        except LineError as exc:
            plan.problems += 1
            _report(f"line {number}: skipped: {exc}")
            session = _session_of(text)
            if session is not None:
                block(session, number)
            continue
        if line.key in seen:
            plan.problems += 1
            _report(f"line {number}: skipped: duplicate id {line.id!r} (first on line {seen[line.key]})")
            if line.session_id is not None:
                block(line.session_id, number)
            continue
        seen[line.key] = number

        if line.session_id is None:
            if line.key in done:
                plan.done += 1
            else:
                plan.lanes.append(Lane(None, [line]))
            continue

        lane = sessions.get(line.session_id)
        if lane is None:
            lane = sessions[line.session_id] = Lane(line.session_id, [])
            plan.lanes.append(lane)
        if line.key not in done:
            lane.lines.append(line)
            continue
        plan.done += 1
        lane.has_done_lines = True
        lane.expected_tokens = int(done[line.key].get("session_tokens", 0))
        if lane.lines:
            # The memory already absorbed this line, so the earlier pending lines cannot run in order.
            blocked[line.session_id] = (0, f"session {line.session_id!r} already has a result for the later "
                                           f"line {number}, so its memory cannot run this line in order; "
                                           f"remove line {number}'s result from the output to rerun both")

    for lane in plan.lanes:
        if lane.session_id not in blocked:
            continue
        first, reason = blocked[lane.session_id]
        for line in lane.lines:
            if line.number >= first:
                plan.problems += 1
                _report(f"line {line.number}: skipped: {reason}")
        lane.lines = [line for line in lane.lines if line.number < first]
    plan.lanes = [lane for lane in plan.lanes if lane.lines]
    return plan


def _session_of(text: str) -> str | None:
    """Return the session_id of a line that failed validation, or None if it has no string session_id."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("session_id"), str):
        return record["session_id"]
    return None


# --- batch mode: running ----------------------------------------------------------------


def default_store_path(output: Path) -> Path:
    return output.with_name(output.name + ".sessions.db")


def _open_batch_store(args: argparse.Namespace, output: Path, has_results: bool):
    from titans.session_store import open_store

    if args.store:
        return open_store(args.store, max_sessions_per_owner=10**9)
    path = default_store_path(output).resolve()
    if not has_results:
        # The default store belongs to the output: a new output starts new sessions.
        for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if stale.exists():
                log.info("removing %s from an earlier run, because %s has no results", stale, output)
                stale.unlink()
    return open_store(f"sqlite:///{path}", ttl_seconds=DEFAULT_STORE_TTL_SECONDS, max_sessions_per_owner=10**9)


class BatchRunner:
    """Runs lanes through the engine, appends each result to the output and counts failures."""

    def __init__(self, engine, store, output: Path, bar) -> None:
        self.engine = engine
        self.store = store
        self.output = output
        self.bar = bar
        self.handle = None
        self.written = 0
        self.failures = 0  # lines that failed, or were skipped because an earlier line of their session failed
        self.interrupted = False
        self._workers: list = []

    def interrupt(self) -> None:
        """Handle Ctrl-C: the first lets running lines finish and be written, the second stops at once."""
        if not self.interrupted:
            self.interrupted = True
            _report("interrupted: finishing the lines that are running; press Ctrl-C again to stop at once "
                    "(their sessions may then hold tokens that have no result in the output)")
            return
        for task in self._workers:
            task.cancel()

    def _write(self, line: BatchLine, text: str, finished) -> None:
        record: dict[str, Any] = {
            "id": line.id, "line": line.number, "text": text, "finish_reason": finished.finish_reason,
            "prompt_tokens": finished.usage.prompt_tokens, "completion_tokens": finished.usage.completion_tokens,
        }
        if line.session_id is not None:
            record["session_id"] = line.session_id
            record["session_tokens"] = finished.session_tokens
        if line.has_metadata:
            record["metadata"] = line.metadata
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        self.written += 1

    def _skip(self, lines: list[BatchLine], reason: str) -> None:
        for line in lines:
            self.failures += 1
            _report(f"line {line.number}: skipped: {reason}")
            self.bar.update(1)

    async def _prepare_session(self, lane: Lane) -> str | None:
        """Create the lane's session, or check that its stored memory matches the output.

        Returns None when the lane can run, else the reason it cannot.
        """
        from titans.session_store import SessionNotFound

        session = lane.session_id
        try:
            meta = await self.store.get(session)
        except SessionNotFound:
            meta = None
        if meta is None:
            if lane.has_done_lines:
                return (f"session {session!r} has results in the output but its memory is not in the store "
                        f"(a memory:// store does not outlive a run); use the store of the earlier run")
            await self.store.create(owner=OUTPUT_OWNER, fingerprint=self.engine.model.fingerprint,
                                    session_id=session)
            return None
        if meta.fingerprint != self.engine.model.fingerprint:
            return f"session {session!r} in the store belongs to another model (fingerprint {meta.fingerprint[:16]})"
        if meta.tokens != lane.expected_tokens:
            return (f"session {session!r} contains {meta.tokens} tokens in the store, but the output's last "
                    f"result for it leaves {lane.expected_tokens}. An earlier run probably stopped between "
                    f"saving the session and writing its result, or another program uses the session id. "
                    f"Use a new session id, or delete the session's results and its store")
        return None

    async def run_lane(self, lane: Lane) -> None:
        from titans.engine import EngineError, GenerateRequest
        from titans.model.state import StateError
        from titans.session_store import StoreError

        if lane.session_id is not None:
            try:
                problem = await self._prepare_session(lane)
            except StoreError as exc:
                problem = f"session store failed for session {lane.session_id!r}: {exc}"
            if problem:
                self._skip(lane.lines, problem)
                return

        for index, line in enumerate(lane.lines):
            if self.interrupted:
                return
            request = GenerateRequest(prompt_tokens=line.prompt_tokens, max_tokens=line.max_tokens,
                                      sampling=line.sampling, stop=line.stop, session_id=line.session_id,
                                      request_id=str(line.id))
            try:
                stream = await self.engine.generate(request)
                text, finished = await stream.result()
            except (EngineError, StoreError, StateError) as exc:
                self.failures += 1
                _report(f"line {line.number}: failed: {exc}")
                self.bar.update(1)
                if lane.session_id is not None:
                    self._skip(lane.lines[index + 1:], f"line {line.number} of session {lane.session_id!r} "
                                                       f"failed, and later lines of a session depend on it")
                    return
                continue
            self._write(line, text, finished)
            self.bar.update(1)

    async def run(self, lanes: list[Lane], workers: int) -> None:
        import asyncio

        queue: asyncio.Queue[Lane] = asyncio.Queue()
        for lane in lanes:
            queue.put_nowait(lane)

        async def worker() -> None:
            while not queue.empty():
                await self.run_lane(queue.get_nowait())

        with self.output.open("a", encoding="utf-8") as handle:
            self.handle = handle
            self._workers = [asyncio.create_task(worker()) for _ in range(max(1, min(workers, len(lanes))))]
            await asyncio.gather(*self._workers, return_exceptions=True)
            for task in self._workers:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()


def run_batch(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from titans.cli import CommandError
    from titans.model.checkpoint import load_checkpoint

    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        raise FileNotFoundError(f"input file not found: {source}")
    if not output.resolve().parent.is_dir():
        raise CommandError(f"directory of --output {output} not found; create it first")
    if args.max_tokens < 0:
        raise CommandError(f"--max-tokens must be 0 or more, got {args.max_tokens}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        lines_text = source.read_text(encoding="utf-8").split("\n")  # newlines only, as in read_done
    except UnicodeDecodeError as exc:
        raise CommandError(f"input file {source} is not valid UTF-8: {exc}") from None

    checkpoint = load_checkpoint(args.checkpoint, args.device)
    done = read_done(output)
    plan = plan_batch(lines_text, args, checkpoint.tokenizer, done)
    pending = sum(len(lane.lines) for lane in plan.lanes)

    runner = None
    if pending:
        needs_store = any(lane.session_id is not None for lane in plan.lanes)
        store = _open_batch_store(args, output, has_results=bool(done)) if needs_store else None
        # The engine logs every request at INFO, which the results file and progress bar replace here.
        engine_log = logging.getLogger("titans.engine")
        level = engine_log.level
        if log.getEffectiveLevel() > logging.DEBUG:
            engine_log.setLevel(logging.WARNING)
        try:
            runner = asyncio.run(_run_engine(checkpoint, store, output, plan, args.batch_size, tqdm))
        finally:
            engine_log.setLevel(level)

    written = runner.written if runner else 0
    problems = plan.problems + (runner.failures if runner else 0)
    summary = (f"{written} lines ran, {plan.done} were already in {output}, "
               f"{problems} were invalid, failed or skipped")
    if runner and runner.interrupted:
        not_run = pending - written - runner.failures
        print(f"{summary}. Interrupted with {not_run} lines not run: rerun the command to run them",
              file=sys.stderr)
        return 130
    print(summary, file=sys.stderr)
    return 1 if problems else 0


async def _run_engine(checkpoint, store, output: Path, plan: Plan, batch_size: int, tqdm) -> BatchRunner:
    import asyncio
    import signal

    from titans.engine import Engine, EngineConfig
    from titans.session_store import open_store

    # Sessionless lines never touch the store, but the engine needs one.
    store = store or open_store("memory://")
    config = EngineConfig(max_batch_size=batch_size, max_queued_requests=max(64, 2 * batch_size))
    engine = Engine(checkpoint, store, config)
    total = sum(len(lane.lines) for lane in plan.lanes)
    await engine.start()
    try:
        with tqdm(total=total, unit="line", desc="generating", disable=None) as bar:
            runner = BatchRunner(engine, store, output, bar)
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGINT, runner.interrupt)
                handling_interrupts = True
            except (NotImplementedError, RuntimeError, ValueError):
                # No loop signal handlers on Windows or outside the main thread: Ctrl-C stops at once.
                handling_interrupts = False
            try:
                await runner.run(plan.lanes, batch_size)
            finally:
                if handling_interrupts:
                    loop.remove_signal_handler(signal.SIGINT)
    finally:
        await engine.stop()
        await store.close()
    return runner
