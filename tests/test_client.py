"""Tests of the titans_client package (clients/python) against a real `titans serve` on loopback.

One server per module serves a tiny random model. It runs with API keys, one batch slot and
a queue of one request, so the tests can provoke 401, 404, 409 and 429 on purpose, and with
small body limits for 413. The retry policy's handling of 503, HTTP-date Retry-After values
and broken streams is tested against httpx's MockTransport, because a healthy server with
the memory store does not return those.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from email.utils import formatdate
from pathlib import Path
from typing import Iterator

import httpx
import pytest

titans_client = pytest.importorskip("titans_client", reason="install the client: pip install -e clients/python")

from titans_client import (  # noqa: E402
    APIConnectionError,
    APITimeoutError,
    AsyncTitansClient,
    AuthenticationError,
    BadRequest,
    PayloadTooLarge,
    RateLimited,
    RetryPolicy,
    ServerUnavailable,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    StreamError,
    TitansClient,
)

REPO = Path(__file__).resolve().parent.parent
KEY = "client-test-key"
OTHER_KEY = "client-test-other-key"
MAX_BODY_BYTES = 256 * 1024
MAX_STATE_UPLOAD_BYTES = 1024 * 1024
# Long enough that a greedy stream of the tiny model (about 80 tokens/s on one CPU core)
# is still running when the test acts on it, short enough to stay under max_max_tokens.
LONG_REPLY_TOKENS = 4000


# --- server -----------------------------------------------------------------------------------


def training_text() -> str:
    """Return text for the test tokenizer: the Shakespeare corpus when present, else a built-in passage."""
    candidates = (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                  Path("/work/shared/data/tinyshakespeare.txt"))
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")[:50_000]
    passage = ("Two households, both alike in dignity, in fair Verona, where we lay our scene, from ancient "
               "grudge break to new mutiny, where civil blood makes civil hands unclean.\n")
    return passage * 200


def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build (once per test run) a random tiny MAC model with a 300-token BPE tokenizer."""
    directory = tmp_path_factory.getbasetemp() / "tiny-client-checkpoint"
    if (directory / "model.safetensors").is_file():
        return directory
    import torch

    from titans.model import MACConfig, MACModel
    from titans.model.checkpoint import save_checkpoint
    from titans.model.tokenizer import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.train([training_text()], 300)
    model = MACModel(MACConfig.from_name("tiny").replace(vocab_size=300))
    save_checkpoint(model, tokenizer, directory)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(checkpoint: Path, log_path: Path, *flags: str, api_keys: str = "") -> Iterator[str]:
    """Run `titans serve` on a free loopback port until the block ends; yield its URL."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("TITANS_")}
    env["OMP_NUM_THREADS"] = "1"
    if api_keys:
        env["TITANS_API_KEYS"] = api_keys
    command = [sys.executable, "-m", "titans.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--checkpoint", str(checkpoint), "--shutdown-grace-seconds", "2", *flags]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"titans serve exited with status {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"titans serve was not ready within 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    checkpoint = tiny_checkpoint(tmp_path_factory)
    log_path = tmp_path_factory.mktemp("client-server") / "server.log"
    flags = ("--max-batch-size", "1", "--max-queued-requests", "1", "--retry-after-seconds", "1",
             "--max-body-bytes", str(MAX_BODY_BYTES), "--max-state-upload-bytes", str(MAX_STATE_UPLOAD_BYTES))
    with running_server(checkpoint, log_path, *flags, api_keys=f"{KEY},{OTHER_KEY}") as url:
        yield url


@pytest.fixture()
def client(server_url: str) -> Iterator[TitansClient]:
    with TitansClient(server_url, KEY, timeout=60) as test_client:
        yield test_client


class RecordingClient:
    """A TitansClient whose HTTP client records (time, status) of every response."""

    def __init__(self, url: str, **options) -> None:
        self.responses: list[tuple[float, int]] = []
        hooks = {"response": [lambda response: self.responses.append((time.monotonic(), response.status_code))]}
        self.http = httpx.Client(timeout=60, event_hooks=hooks)
        self.client = TitansClient(url, KEY, http_client=self.http, **options)

    @property
    def statuses(self) -> list[int]:
        return [status for _, status in self.responses]

    def gaps(self) -> list[float]:
        times = [when for when, _ in self.responses]
        return [later - earlier for earlier, later in zip(times, times[1:])]

    def close(self) -> None:
        self.http.close()


def start_long_stream(client: TitansClient, session_id: str):
    """Start a greedy stream that runs for tens of seconds, and wait for its first delta."""
    stream = client.generate(session_id, "ROMEO:", max_tokens=LONG_REPLY_TOKENS, temperature=0, ignore_eos=True,
                             stream=True)
    first = next(iter(stream))
    assert first
    return stream


def close_later(stream, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, stream.close)
    timer.start()
    return timer


def wait_until_free(client: TitansClient, session_id: str) -> None:
    """Wait until a cancelled request has released the session (the server commits it first)."""
    client.generate(session_id, " ", max_tokens=1, max_retries=20)


# --- sessions ---------------------------------------------------------------------------------


def test_session_lifecycle(client: TitansClient) -> None:
    created = client.create_session("lifecycle-1", metadata={"purpose": "test"})
    assert created.id == "lifecycle-1"
    assert created.tokens == 0
    assert created.state_bytes == 0
    assert created.metadata == {"purpose": "test"}
    assert created.model

    fetched = client.get_session("lifecycle-1")
    assert fetched.id == created.id
    assert fetched.created_at == created.created_at
    assert "lifecycle-1" in [session.id for session in client.list_sessions()]

    client.append("lifecycle-1", "Two households, both alike in dignity.")
    fork = client.fork_session("lifecycle-1", "lifecycle-1-fork", metadata={"purpose": "fork"})
    source = client.get_session("lifecycle-1")
    assert fork.id == "lifecycle-1-fork"
    assert fork.tokens == source.tokens
    assert fork.tokens > 0
    assert fork.metadata == {"purpose": "fork"}

    client.delete_session("lifecycle-1-fork")
    client.delete_session("lifecycle-1")
    with pytest.raises(SessionNotFound) as caught:
        client.get_session("lifecycle-1")
    error = caught.value
    assert error.status_code == 404
    assert error.code == "session_not_found"
    assert error.param == "session_id"
    assert error.type == "not_found_error"
    assert "lifecycle-1" in error.message
    assert error.request_id


def test_server_chosen_session_id(client: TitansClient) -> None:
    first = client.create_session()
    second = client.create_session()
    assert first.id != second.id
    fork = client.fork_session(first.id)
    assert fork.id not in (first.id, second.id)
    for session_id in (first.id, second.id, fork.id):
        client.delete_session(session_id)


def test_duplicate_session_id_conflicts(client: TitansClient) -> None:
    client.create_session("duplicate-1")
    with pytest.raises(SessionExists) as caught:
        client.create_session("duplicate-1")
    assert caught.value.status_code == 409
    assert caught.value.retry_after is None
    client.delete_session("duplicate-1")


# --- generation -------------------------------------------------------------------------------


def test_generate_returns_result(client: TitansClient) -> None:
    session = client.create_session()
    result = client.generate(session.id, "ROMEO:", max_tokens=12, temperature=0, ignore_eos=True)
    prompt_tokens = len(client.tokenize("ROMEO:"))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 12
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.total_tokens == prompt_tokens + 12
    assert result.session_id == session.id
    assert result.session_tokens == prompt_tokens + 12
    assert result.request_id
    assert isinstance(result.text, str)
    assert client.get_session(session.id).tokens == result.session_tokens
    client.delete_session(session.id)


def test_stream_matches_non_streaming(client: TitansClient) -> None:
    source = client.create_session()
    client.append(source.id, "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n")
    plain_session = client.fork_session(source.id)
    streamed_session = client.fork_session(source.id)

    plain = client.generate(plain_session.id, "ROMEO:", max_tokens=20, temperature=0, ignore_eos=True)
    stream = client.generate(streamed_session.id, "ROMEO:", max_tokens=20, temperature=0, ignore_eos=True,
                             stream=True)
    assert stream.result is None
    deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == plain.text
    assert stream.text == plain.text
    assert stream.result is not None
    assert stream.result.text == plain.text
    assert stream.result.finish_reason == "length"
    assert stream.result.usage == plain.usage
    assert stream.result.session_tokens == plain.session_tokens
    for session_id in (source.id, plain_session.id, streamed_session.id):
        client.delete_session(session_id)


def test_stream_until_done_and_stop(client: TitansClient) -> None:
    session = client.create_session()
    with client.generate(session.id, "ROMEO:", max_tokens=8, temperature=0.8, seed=3, stream=True) as stream:
        result = stream.until_done()
    assert result.usage.completion_tokens <= 8
    assert result.finish_reason in ("length", "stop")
    assert result.text == stream.text
    client.delete_session(session.id)


def test_stream_close_keeps_session_usable(client: TitansClient) -> None:
    session = client.create_session()
    before = client.get_session(session.id).tokens
    stream = start_long_stream(client, session.id)
    stream.close()
    assert stream.result is None

    result = client.generate(session.id, "JULIET:", max_tokens=4, temperature=0, ignore_eos=True, max_retries=20)
    assert result.finish_reason == "length"
    assert result.session_tokens > before
    assert client.get_session(session.id).tokens == result.session_tokens
    client.delete_session(session.id)


def test_append_feeds_memory(client: TitansClient) -> None:
    session = client.create_session()
    text = "But, soft! what light through yonder window breaks?"
    appended = client.append(session.id, text)
    assert appended.usage.prompt_tokens == len(client.tokenize(text))
    assert appended.usage.completion_tokens == 0
    assert appended.session_tokens == appended.usage.prompt_tokens
    again = client.append(session.id, text)
    assert again.session_tokens == 2 * appended.session_tokens
    assert client.get_session(session.id).tokens == again.session_tokens
    client.delete_session(session.id)


# --- memory -----------------------------------------------------------------------------------


def test_memory_export_import_reset(client: TitansClient, tmp_path: Path) -> None:
    session = client.create_session()
    client.append(session.id, "It is the east, and Juliet is the sun.\n")
    tokens = client.get_session(session.id).tokens

    data = client.export_memory(session.id)
    assert isinstance(data, bytes)
    assert len(data) == client.get_session(session.id).state_bytes
    path = client.export_memory(session.id, tmp_path / "memory.safetensors")
    assert path == tmp_path / "memory.safetensors"
    assert path.read_bytes() == data
    assert not (tmp_path / "memory.safetensors.part").exists()

    reset = client.reset_memory(session.id)
    assert reset.tokens == 0
    assert reset.state_bytes == 0
    assert client.import_memory(session.id, path).tokens == tokens
    client.reset_memory(session.id)
    assert client.import_memory(session.id, data).tokens == tokens
    assert client.import_memory(session.id, str(path)).tokens == tokens
    client.delete_session(session.id)


def test_imported_memory_continues_identically(client: TitansClient) -> None:
    source = client.create_session()
    client.append(source.id, "MERCUTIO:\nA plague o' both your houses!\n")
    copy = client.create_session()
    client.import_memory(copy.id, client.export_memory(source.id))
    original = client.generate(source.id, "ROMEO:", max_tokens=16, temperature=0, ignore_eos=True)
    imported = client.generate(copy.id, "ROMEO:", max_tokens=16, temperature=0, ignore_eos=True)
    assert imported.text == original.text
    assert imported.session_tokens == original.session_tokens
    for session_id in (source.id, copy.id):
        client.delete_session(session_id)


def test_invalid_import_keeps_old_state(client: TitansClient) -> None:
    session = client.create_session()
    client.append(session.id, "Parting is such sweet sorrow.")
    before = client.get_session(session.id)
    with pytest.raises(BadRequest) as caught:
        client.import_memory(session.id, b"not a safetensors file")
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_state"
    after = client.get_session(session.id)
    assert after.tokens == before.tokens
    assert after.version == before.version
    client.delete_session(session.id)


def test_import_rejects_wrong_argument_type(client: TitansClient) -> None:
    with pytest.raises(TypeError):
        client.import_memory("any-session", 42)  # type: ignore[arg-type]


# --- errors -----------------------------------------------------------------------------------


def test_invalid_parameter_is_bad_request(client: TitansClient) -> None:
    session = client.create_session()
    for stream in (False, True):
        with pytest.raises(BadRequest) as caught:
            client.generate(session.id, "x", temperature=-1, stream=stream)
        assert caught.value.status_code == 400
        assert caught.value.param == "temperature"
        assert caught.value.type == "invalid_request_error"
        assert "temperature" in caught.value.message
    with pytest.raises(BadRequest) as caught:
        client.generate(session.id, "x", max_tokens=10**6)
    assert caught.value.param == "max_tokens"
    client.delete_session(session.id)


def test_unknown_session_is_not_found(client: TitansClient) -> None:
    calls = [lambda: client.generate("no-such-session", "x"),
             lambda: client.generate("no-such-session", "x", stream=True),
             lambda: client.append("no-such-session", "x"),
             lambda: client.export_memory("no-such-session"),
             lambda: client.reset_memory("no-such-session"),
             lambda: client.delete_session("no-such-session"),
             lambda: client.fork_session("no-such-session")]
    for call in calls:
        with pytest.raises(SessionNotFound) as caught:
            call()
        assert caught.value.status_code == 404


def test_api_key_errors_and_isolation(server_url: str, client: TitansClient,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TITANS_API_KEY", raising=False)
    with TitansClient(server_url) as anonymous, pytest.raises(AuthenticationError) as caught:
        anonymous.list_sessions()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"

    session = client.create_session()
    with TitansClient(server_url, OTHER_KEY) as other:
        with pytest.raises(SessionNotFound):
            other.get_session(session.id)
        assert session.id not in [item.id for item in other.list_sessions()]
    client.delete_session(session.id)


def test_environment_configures_client(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TITANS_URL", server_url + "/")
    monkeypatch.setenv("TITANS_API_KEY", KEY)
    with TitansClient() as from_environment:
        assert from_environment.base_url == server_url
        session = from_environment.create_session()
        from_environment.delete_session(session.id)
    monkeypatch.delenv("TITANS_URL")
    with TitansClient() as default:
        assert default.base_url == "http://127.0.0.1:8000"


def test_too_large_body_and_state(client: TitansClient) -> None:
    session = client.create_session()
    with pytest.raises(PayloadTooLarge) as caught:
        client.generate(session.id, "x" * (MAX_BODY_BYTES + 1000))
    assert caught.value.status_code == 413
    assert caught.value.code == "body_too_large"
    assert str(MAX_BODY_BYTES) in caught.value.message
    with pytest.raises(PayloadTooLarge) as caught:
        client.import_memory(session.id, b"x" * (MAX_STATE_UPLOAD_BYTES + 1000))
    assert caught.value.status_code == 413
    assert caught.value.code == "body_too_large"
    assert str(MAX_STATE_UPLOAD_BYTES) in caught.value.message
    client.delete_session(session.id)


def test_busy_session_conflict_is_not_retried(server_url: str, client: TitansClient) -> None:
    session = client.create_session()
    stream = start_long_stream(client, session.id)
    recorder = RecordingClient(server_url)
    try:
        with pytest.raises(SessionBusy) as caught:
            recorder.client.generate(session.id, "JULIET:", max_tokens=4)
        assert caught.value.status_code == 409
        assert caught.value.code == "session_busy"
        assert caught.value.retry_after == 1.0
        assert recorder.statuses == [409]
    finally:
        stream.close()
        recorder.close()
    wait_until_free(client, session.id)
    client.delete_session(session.id)


def test_idempotent_call_retries_after_busy(server_url: str, client: TitansClient) -> None:
    session = client.create_session()
    stream = start_long_stream(client, session.id)
    recorder = RecordingClient(server_url, retry=RetryPolicy(max_retries=6))
    timer = close_later(stream, 1.5)
    try:
        reset = recorder.client.reset_memory(session.id)
    finally:
        timer.join()
        recorder.close()
    assert reset.tokens == 0
    assert recorder.statuses[0] == 409
    assert recorder.statuses[-1] == 200
    assert set(recorder.statuses[:-1]) == {409}
    # Each retry waited for the server's Retry-After of 1 s.
    assert min(recorder.gaps()) >= 0.95
    client.delete_session(session.id)


def test_queue_full_is_rate_limited_then_retried(server_url: str, client: TitansClient) -> None:
    running, queued, third = (client.create_session() for _ in range(3))
    stream = start_long_stream(client, running.id)
    waiting = client.generate(queued.id, "B", max_tokens=2, stream=True)
    plain = RecordingClient(server_url)
    retrying = RecordingClient(server_url, retry_generation=True, retry=RetryPolicy(max_retries=8))
    try:
        with pytest.raises(RateLimited) as caught:
            plain.client.generate(third.id, "C", max_tokens=2)
        assert caught.value.status_code == 429
        assert caught.value.retry_after == 1.0
        assert plain.statuses == [429]

        timer = close_later(stream, 1.5)
        result = retrying.client.generate(third.id, "C", max_tokens=2, temperature=0, ignore_eos=True)
        timer.join()
        assert result.usage.completion_tokens == 2
        assert retrying.statuses[0] == 429
        assert retrying.statuses[-1] == 200
        assert min(retrying.gaps()) >= 0.95
        assert waiting.until_done().usage.completion_tokens <= 2
    finally:
        stream.close()
        waiting.close()
        plain.close()
        retrying.close()
    for session in (running, queued, third):
        client.delete_session(session.id)


def test_per_call_retries_for_generation(server_url: str, client: TitansClient) -> None:
    session = client.create_session()
    stream = start_long_stream(client, session.id)
    recorder = RecordingClient(server_url)
    timer = close_later(stream, 1.2)
    try:
        result = recorder.client.generate(session.id, "JULIET:", max_tokens=2, max_retries=8)
    finally:
        timer.join()
        recorder.close()
    assert result.usage.completion_tokens <= 2
    assert recorder.statuses[0] == 409
    assert recorder.statuses[-1] == 200
    client.delete_session(session.id)


def test_read_timeout_raises_and_session_recovers(server_url: str, client: TitansClient) -> None:
    session = client.create_session()
    with TitansClient(server_url, KEY, timeout=0.5) as impatient:
        started = time.monotonic()
        with pytest.raises(APITimeoutError):
            impatient.generate(session.id, "ROMEO:", max_tokens=LONG_REPLY_TOKENS, temperature=0, ignore_eos=True)
        assert time.monotonic() - started < 10
    # The server notices the closed connection and cancels the generation.
    wait_until_free(client, session.id)
    client.delete_session(session.id)


def test_per_call_timeout_on_stream(client: TitansClient) -> None:
    session = client.create_session()
    stream = client.generate(session.id, "ROMEO:", max_tokens=2, stream=True, timeout=30)
    assert stream.until_done().usage.completion_tokens <= 2
    client.delete_session(session.id)


def test_connection_refused() -> None:
    port = free_port()
    with TitansClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_retries=1, backoff_seconds=0.01)) as dead:
        with pytest.raises(APIConnectionError) as caught:
            dead.list_sessions()
        assert not isinstance(caught.value, APITimeoutError)
        assert caught.value.status_code is None
        assert dead.ready() is False


def test_utility_endpoints(client: TitansClient) -> None:
    assert client.health() is True
    assert client.ready() is True
    session = client.create_session()
    assert client.models() == [session.model]
    client.delete_session(session.id)
    tokens = client.tokenize("Wherefore art thou Romeo?")
    assert all(isinstance(token, int) for token in tokens)
    assert client.detokenize(tokens) == "Wherefore art thou Romeo?"
    with pytest.raises(BadRequest) as caught:
        client.detokenize([10**6])
    assert caught.value.param == "tokens.0"


# --- retry policy and stream parsing against a mock transport --------------------------------


def mock_client(handler, **options) -> TitansClient:
    transport = httpx.MockTransport(handler)
    return TitansClient("http://127.0.0.1:9", "key", http_client=httpx.Client(transport=transport), **options)


def error_response(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": f"{code} for the test", "type": "test_error", "param": None, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


SESSION_JSON = {"id": "s1", "object": "session", "model": "m", "model_fingerprint": "f", "created_at": 1.0,
                "updated_at": 2.0, "tokens": 3, "state_bytes": 4, "version": 5, "metadata": {}}


def test_unavailable_retried_with_backoff() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) < 3:
            return error_response(503, "store_unavailable")
        return httpx.Response(200, json=SESSION_JSON)

    policy = RetryPolicy(max_retries=3, backoff_seconds=0.2, max_backoff_seconds=0.3)
    with mock_client(handler, retry=policy) as client:
        assert client.get_session("s1").tokens == 3
    assert len(calls) == 3
    gaps = [later - earlier for earlier, later in zip(calls, calls[1:])]
    # Jittered exponential backoff: 0.1-0.2 s, then 0.15-0.3 s (capped at 0.3 s).
    assert 0.09 <= gaps[0] <= 0.5
    assert 0.14 <= gaps[1] <= 0.6


def test_unavailable_raised_after_max_retries() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return error_response(503, "store_unavailable", {"Retry-After": "0"})

    with mock_client(handler, max_retries=2) as client, pytest.raises(ServerUnavailable) as caught:
        client.list_sessions()
    assert len(calls) == 3
    assert caught.value.status_code == 503
    assert caught.value.code == "store_unavailable"


def test_retry_after_http_date_and_limit() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return error_response(429, "queue_full", {"Retry-After": formatdate(time.time() + 3600, usegmt=True)})

    with mock_client(handler) as client, pytest.raises(RateLimited) as caught:
        client.list_sessions()
    # An hour is beyond max_retry_after_seconds, so the error comes back at once.
    assert len(calls) == 1
    assert 3500 < caught.value.retry_after <= 3600


def test_generation_not_retried_by_default() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return error_response(503, "engine_stopped", {"Retry-After": "0"})

    with mock_client(handler) as client:
        with pytest.raises(ServerUnavailable):
            client.generate("s1", "x")
        with pytest.raises(ServerUnavailable):
            client.append("s1", "x")
        with pytest.raises(ServerUnavailable):
            client.create_session()
    assert len(calls) == 3


def test_plain_text_error_body() -> None:
    with mock_client(lambda request: httpx.Response(413, text="Content Too Large")) as client:
        with pytest.raises(PayloadTooLarge) as caught:
            client.append("s1", "x")
    assert caught.value.status_code == 413
    assert "Content Too Large" in caught.value.message
    assert caught.value.code is None


def sse_response(*frames: str) -> httpx.Response:
    body = "".join(f"{frame}\n\n" for frame in frames).encode()
    return httpx.Response(200, content=body, headers={"Content-Type": "text/event-stream"})


def test_stream_error_event_raises() -> None:
    delta = 'data: {"object":"generation.delta","text":"Hi","token_ids":[1]}'
    error = ('data: {"error":{"message":"generation failed","type":"server_error","param":null,'
             '"code":"generation_failed"}}')
    with mock_client(lambda request: sse_response(": keep-alive", delta, error)) as client:
        stream = client.generate("s1", "x", stream=True)
        assert next(stream) == "Hi"
        with pytest.raises(StreamError) as caught:
            next(stream)
    assert caught.value.code == "generation_failed"
    assert caught.value.message == "generation failed"
    assert stream.result is None


def test_stream_without_final_event_raises() -> None:
    delta = 'data: {"object":"generation.delta","text":"Hi","token_ids":[1]}'
    with mock_client(lambda request: sse_response(delta)) as client:
        stream = client.generate("s1", "x", stream=True)
        with pytest.raises(StreamError, match="before its final event"):
            list(stream)
    assert stream.text == "Hi"


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


# --- async client -----------------------------------------------------------------------------


async def test_async_session_lifecycle(server_url: str, tmp_path: Path) -> None:
    async with AsyncTitansClient(server_url, KEY, timeout=60) as client:
        session = await client.create_session(metadata={"client": "async"})
        assert session.metadata == {"client": "async"}
        assert session.id in [item.id for item in await client.list_sessions()]
        appended = await client.append(session.id, "Good night, good night!")
        assert appended.session_tokens == appended.usage.prompt_tokens

        fork = await client.fork_session(session.id)
        assert fork.tokens == appended.session_tokens
        data = await client.export_memory(session.id)
        path = await client.export_memory(session.id, tmp_path / "state.safetensors")
        assert path.read_bytes() == data
        assert (await client.reset_memory(session.id)).tokens == 0
        assert (await client.import_memory(session.id, path)).tokens == appended.session_tokens

        await client.delete_session(fork.id)
        await client.delete_session(session.id)
        with pytest.raises(SessionNotFound):
            await client.get_session(session.id)
        assert await client.health() is True
        assert await client.ready() is True
        assert await client.detokenize(await client.tokenize("Romeo")) == "Romeo"


async def test_async_generate_and_stream(server_url: str) -> None:
    async with AsyncTitansClient(server_url, KEY, timeout=60) as client:
        source = await client.create_session()
        await client.append(source.id, "ROMEO:\nShe speaks!\n")
        plain_session = await client.fork_session(source.id)
        streamed_session = await client.fork_session(source.id)

        plain = await client.generate(plain_session.id, "JULIET:", max_tokens=10, temperature=0, ignore_eos=True)
        assert plain.usage.completion_tokens == 10
        stream = await client.generate(streamed_session.id, "JULIET:", max_tokens=10, temperature=0,
                                       ignore_eos=True, stream=True)
        deltas = [delta async for delta in stream]
        assert "".join(deltas) == plain.text
        assert stream.result is not None
        assert stream.result.session_tokens == plain.session_tokens

        async with await client.generate(source.id, "x", max_tokens=3, stream=True) as short:
            result = await short.until_done()
        assert result.usage.completion_tokens <= 3
        for session_id in (source.id, plain_session.id, streamed_session.id):
            await client.delete_session(session_id)


async def test_async_errors(server_url: str) -> None:
    async with AsyncTitansClient(server_url, KEY, timeout=60) as client:
        with pytest.raises(SessionNotFound):
            await client.generate("no-such-session", "x", stream=True)
        session = await client.create_session()
        with pytest.raises(BadRequest) as caught:
            await client.generate(session.id, "x", top_p=2.0)
        assert caught.value.param == "top_p"
        with pytest.raises(BadRequest):
            await client.import_memory(session.id, b"garbage")
        await client.delete_session(session.id)
    async with AsyncTitansClient(server_url, "wrong-key") as stranger:
        with pytest.raises(AuthenticationError):
            await stranger.list_sessions()


async def test_async_busy_then_retry(server_url: str, client: TitansClient) -> None:
    import asyncio

    session = client.create_session()
    async with AsyncTitansClient(server_url, KEY, timeout=60, retry=RetryPolicy(max_retries=6)) as async_client:
        stream = await async_client.generate(session.id, "ROMEO:", max_tokens=LONG_REPLY_TOKENS, temperature=0,
                                             ignore_eos=True, stream=True)
        assert await stream.__anext__()
        with pytest.raises(SessionBusy):
            await async_client.generate(session.id, "x", max_tokens=2)

        async def close_soon() -> None:
            await asyncio.sleep(1.5)
            await stream.aclose()

        closer = asyncio.create_task(close_soon())
        started = time.monotonic()
        reset = await async_client.reset_memory(session.id)
        await closer
        assert reset.tokens == 0
        assert time.monotonic() - started >= 1.0
    client.delete_session(session.id)


async def test_async_timeout(server_url: str, client: TitansClient) -> None:
    session = client.create_session()
    async with AsyncTitansClient(server_url, KEY, timeout=0.5) as impatient:
        with pytest.raises(APITimeoutError):
            await impatient.generate(session.id, "ROMEO:", max_tokens=LONG_REPLY_TOKENS, temperature=0,
                                     ignore_eos=True)
    wait_until_free(client, session.id)
    client.delete_session(session.id)
