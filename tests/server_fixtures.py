"""Helpers of the server tests: a tiny checkpoint, real `titans serve` processes, metrics, Redis.

Each server is `python -m titans.cli serve` on a free loopback port in a subprocess, so the
tests exercise uvicorn, the lifespan and signal handling as a user would. Servers inherit
the test process's CPU affinity and thread settings.

Import what a test module needs explicitly (`from server_fixtures import ...`); fixtures
imported into a module are registered there. The main server is shared by every module
that uses `main_server`, through a cache in this module, because starting one takes
seconds.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from redis_support import REDIS_URL, require_redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from titans.model import MACConfig, MACModel
from titans.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from titans.model.generate import generate_tokens
from titans.model.sampling import SamplingParams
from titans.model.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("TITANS_TEST_CORPUS", REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
CORPUS_CHARS = 50_000
VOCAB_SIZE = 300


KEY_A = "test-key-a"
KEY_B = "test-key-b"
START_TIMEOUT_SECONDS = 90.0


# --- checkpoint and reference generation ----------------------------------------------------


@functools.cache
def corpus_text() -> str:
    if not CORPUS.is_file():
        pytest.fail(f"training text not found: {CORPUS}; set TITANS_TEST_CORPUS to a copy of tinyshakespeare.txt")
    return CORPUS.read_text(encoding="utf-8")


def build_tiny_checkpoint(directory: Path) -> Path:
    """Write a tiny random model (seed 0) with a 300-token BPE trained on the corpus's start."""
    if (directory / "model.safetensors").is_file():
        return directory
    tokenizer = Tokenizer.train([corpus_text()[:CORPUS_CHARS]], VOCAB_SIZE)
    torch.manual_seed(0)
    model = MACModel(MACConfig.from_name("tiny").replace(vocab_size=VOCAB_SIZE))
    save_checkpoint(model, tokenizer, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny-checkpoint")


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path) -> Checkpoint:
    """The same checkpoint loaded in the test process, for reference generations."""
    return load_checkpoint(tiny_checkpoint, "cpu")


def greedy_tokens(checkpoint: Checkpoint, prompt_tokens: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by the model's own loop, ignoring the end-of-text token like ignore_eos."""
    return list(generate_tokens(checkpoint.model, prompt_tokens, max_tokens, SamplingParams(temperature=0.0)))


# --- server processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One `titans serve` subprocess on a loopback port, with its log in a file."""

    def __init__(self, checkpoint: Path, log_path: Path, options: list[str] | None = None,
                 environment: dict[str, str] | None = None, port: int | None = None) -> None:
        self.checkpoint = checkpoint
        self.log_path = log_path
        self.options = list(options or [])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # TITANS_* variables of the test environment must not change the server's settings.
        self.environment = {name: value for name, value in os.environ.items()
                            if not name.startswith("TITANS_") and name != "PROMETHEUS_MULTIPROC_DIR"}
        self.environment.update(environment or {})
        self.environment["PYTHONUNBUFFERED"] = "1"
        self.process: subprocess.Popen | None = None

    def start(self, ready_path: str = "/readyz") -> "ServerProcess":
        """Start the server and wait until `ready_path` returns 200."""
        command = [sys.executable, "-m", "titans.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--checkpoint", str(self.checkpoint), *self.options]
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=self.environment,
                                        cwd=REPO_ROOT)
        log_file.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with status {self.process.returncode} during startup:\n"
                                     f"{self.log_tail()}")
            try:
                if httpx.get(self.url + ready_path, timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"server did not answer {ready_path} within {START_TIMEOUT_SECONDS} s:\n"
                             f"{self.log_tail()}")

    def terminate(self) -> None:
        """Send SIGTERM, the signal of a graceful shutdown."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Shut down gracefully and return the exit status (None if it was not running)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout} s of SIGTERM:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def client(self, key: str | None = KEY_A, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def async_client(self, key: str | None = KEY_A, timeout: float = 60.0) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def server_factory(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Start servers on the tiny checkpoint; every one still running is stopped after the module."""
    servers: list[ServerProcess] = []
    directory = tmp_path_factory.mktemp("server-logs")

    def start(options: list[str] | None = None, environment: dict[str, str] | None = None,
              ready_path: str = "/readyz", port: int | None = None) -> ServerProcess:
        server = ServerProcess(tiny_checkpoint, directory / f"server-{len(servers)}.log", options, environment, port)
        servers.append(server)
        return server.start(ready_path)

    yield start
    for server in servers:
        server.stop()


# The main server's options: two API keys, short keep-alives and small prefill chunks so a
# long prompt shows keep-alive comments, small prompt and body limits to test, and a
# max_tokens limit high enough that a stream outlasts the checks made while it runs.
MAIN_SERVER_OPTIONS = [
    "--api-keys", f"{KEY_A},{KEY_B}",
    "--keepalive-seconds", "0.1",
    "--prefill-chunk-tokens", "32",
    "--max-prompt-tokens", "2000",
    "--max-max-tokens", "20000",
    "--max-body-bytes", "65536",
    "--max-state-upload-bytes", "1048576",
    "--cors-origins", "http://app.example",
]
# A max_tokens that keeps a stream running for seconds unless a decode step takes under
# 0.1 ms (the tiny model took about 5 ms on one core). Tests close such streams early,
# which cancels them.
LONG_GENERATION = 20000
_main_server: ServerProcess | None = None


@pytest.fixture(scope="session")
def main_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> ServerProcess:
    """The shared server with the memory store and MAIN_SERVER_OPTIONS, started on first use."""
    global _main_server
    if _main_server is None or _main_server.process is None or _main_server.process.poll() is not None:
        log_path = tmp_path_factory.getbasetemp() / "main-server.log"
        _main_server = ServerProcess(tiny_checkpoint, log_path, MAIN_SERVER_OPTIONS).start()
        request.config.add_cleanup(_main_server.stop)
    return _main_server


# --- requests and responses --------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """Check the status and the one error shape; return the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def create_session(client: httpx.Client, **body) -> str:
    response = client.post("/v1/sessions", json=body or None)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def sse_data(lines: list[str]) -> list[str]:
    """Return the data fields of raw SSE lines (comments and blank lines dropped)."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def stream_json_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """POST a streaming request and return its JSON events, parsed with httpx-sse."""
    from httpx_sse import connect_sse

    events = []
    with connect_sse(client, "POST", path, json=body) as source:
        assert source.response.status_code == 200, source.response.read()
        for event in source.iter_sse():
            if event.data == "[DONE]":
                events.append({"done": True})
                continue
            events.append(json.loads(event.data))
    return events


# --- metrics --------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse the Prometheus text format into {(sample name, labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Return one sample's value, or 0 when it does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse_metrics(response.text)


def wait_for_metric(client: httpx.Client, name: str, expected: float, timeout: float = 15.0) -> float:
    """Poll /metrics until the unlabelled sample `name` equals `expected`; return its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = metric(scrape(client), name)
        if value == expected:
            return value
        time.sleep(0.1)
    return value


# --- Redis ------------------------------------------------------------------------------------------


def delete_redis_prefix(prefix: str) -> None:
    """Delete the keys under `prefix` (and only those)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique Redis key prefix whose keys are deleted after the test."""
    require_redis()
    prefix = unique_id("titans-server-test")
    yield prefix
    delete_redis_prefix(prefix)
