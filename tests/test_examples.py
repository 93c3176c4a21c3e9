"""Run the examples in clients/examples as written against a real `titans serve` on loopback.

The server requires an API key, so every example is also checked to send TITANS_API_KEY.
The last test installs clients/python into a fresh virtual environment and runs the
client example from there, which proves that the package needs neither torch nor the server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("titans_client", reason="install the client: pip install -e clients/python")

# The server helpers live in test_client.py; pytest puts this directory on sys.path.
from test_client import REPO, running_server, tiny_checkpoint, training_text  # noqa: E402
from titans_client import TitansClient  # noqa: E402

EXAMPLES = REPO / "clients" / "examples"
KEY = "examples-test-key"
# pip prints these when it cannot reach a package index; only then is the install test skipped.
UNREACHABLE_REGISTRY = ("Could not find a version that satisfies", "No matching distribution found",
                        "Failed to establish a new connection", "Network is unreachable")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    checkpoint = tiny_checkpoint(tmp_path_factory)
    log_path = tmp_path_factory.mktemp("examples-server") / "server.log"
    with running_server(checkpoint, log_path, api_keys=KEY) as url:
        yield url


def example_environment(url: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TITANS_")}
    env.update(TITANS_URL=url, TITANS_API_KEY=KEY, EXAMPLE_MAX_TOKENS="8", OMP_NUM_THREADS="1")
    return env


def run_example(url: str, *command: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    if command[0].endswith(".py"):
        command = (python, str(EXAMPLES / command[0]), *command[1:])
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=example_environment(url),
                            cwd=REPO)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def assert_no_sessions_left(url: str) -> None:
    with TitansClient(url, KEY) as client:
        assert client.list_sessions() == []


def test_client_example(server_url: str) -> None:
    result = run_example(server_url, "client_example.py")
    assert re.search(r"^created session \S+ on model \S+$", result.stdout, re.MULTILINE)
    assert "--- reply (length, 8 tokens) ---" in result.stdout
    assert "--- streamed reply ---" in result.stdout
    assert "finish reason length" in result.stdout
    assert "deleted both sessions" in result.stdout
    assert_no_sessions_left(server_url)


def test_openai_example(server_url: str) -> None:
    result = run_example(server_url, "openai_example.py")
    assert "--- completion (length) ---" in result.stdout
    assert "--- chat ---" in result.stdout
    assert re.search(r"^usage: \d+ prompt \+ 8 completion tokens$", result.stdout, re.MULTILINE)
    assert result.stdout.count("[8 tokens]") == 2
    match = re.search(r"the session's memory has absorbed (\d+) tokens", result.stdout)
    assert match
    assert int(match.group(1)) > 16
    assert_no_sessions_left(server_url)


def test_read_document_in_pieces(server_url: str, tmp_path: Path) -> None:
    document = tmp_path / "document.txt"
    document.write_text(training_text()[:9_000], encoding="utf-8")
    result = run_example(server_url, "read_document.py", str(document), "--piece-chars", "3000",
                         "--question", "Who speaks first?")
    pieces = re.findall(r"^  piece (\d+): \+(\d+) tokens, (\d+) in memory$", result.stdout, re.MULTILINE)
    # Pieces end at line breaks, so 9,000 characters take at least 3 pieces of at most 3,000.
    assert len(pieces) >= 3
    assert [int(number) for number, _, _ in pieces] == list(range(1, len(pieces) + 1))
    assert int(pieces[-1][2]) == sum(int(added) for _, added, _ in pieces)
    assert "memory state: " in result.stdout
    assert "Q: Who speaks first?\nA:" in result.stdout
    assert_no_sessions_left(server_url)


def test_read_document_built_in_sample(server_url: str) -> None:
    result = run_example(server_url, "read_document.py")
    assert "  piece 1: +" in result.stdout
    assert "  piece 2:" not in result.stdout
    assert "Q: Where do the two households live?" in result.stdout


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None, reason="needs bash and curl")
def test_curl_script(server_url: str) -> None:
    result = run_example(server_url, "bash", str(EXAMPLES / "curl.sh"))
    sections = re.findall(r"^### (.*)$", result.stdout, re.MULTILINE)
    assert len(sections) == 16
    assert '"object":"generation.delta"' in result.stdout
    assert '"object":"chat.completion.chunk"' in result.stdout
    assert "data: [DONE]" in result.stdout
    assert "status: 404 (expected 404)" in result.stdout
    assert "titans_requests" in result.stdout
    assert KEY not in result.stdout
    assert_no_sessions_left(server_url)


def test_client_installs_without_torch(server_url: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    python = str(venv / "bin" / "python")
    # A copy, because building the wheel writes build/ and egg-info folders into the source.
    source = tmp_path / "titans-client"
    shutil.copytree(REPO / "clients" / "python", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    # pip builds the wheel in an isolated environment, so it also fetches setuptools. This
    # took about 20 s with a local package index.
    install = subprocess.run([python, "-m", "pip", "install", str(source)], capture_output=True, text=True,
                             timeout=600)
    output = install.stdout + install.stderr
    if install.returncode != 0 and any(marker in output for marker in UNREACHABLE_REGISTRY):
        pytest.skip(f"pip cannot reach a package index: {output[-500:]}")
    assert install.returncode == 0, output[-3000:]

    check = ("import importlib.util, titans_client; "
             "present = [name for name in ('torch', 'titans', 'fastapi') if importlib.util.find_spec(name)]; "
             "print(present)")
    probe = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"

    result = run_example(server_url, "client_example.py", python=python)
    assert "deleted both sessions" in result.stdout
