"""Tests of `titans chat` against a real `titans serve` on loopback.

The main tests run the command in a subprocess and pipe the whole input at once, as a
script would. The Ctrl-C test writes to the chat while it streams and sends SIGINT; the
prompt test gives the chat a pseudo-terminal. Tests of failures and of single commands call
`titans.cli.main` in this process, because each `titans` process spends seconds importing
torch for the other commands' options.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from titans.cli import main

pytest.importorskip("titans_client", reason="install the client: pip install -e clients/python")

# The server helpers live in test_client.py; pytest puts this directory on sys.path.
from test_client import REPO, running_server, tiny_checkpoint  # noqa: E402
from titans_client import TitansClient  # noqa: E402

from titans.commands.chat import TURN_STOP, format_turn  # noqa: E402

KEY = "chat-test-key"
SESSION_LINE = re.compile(r"^session (\S+) \(continue it later with: titans chat --session=\1\)$", re.MULTILINE)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    checkpoint = tiny_checkpoint(tmp_path_factory)
    log_path = tmp_path_factory.mktemp("chat-server") / "server.log"
    with running_server(checkpoint, log_path, "--retry-after-seconds", "1", api_keys=KEY) as url:
        yield url


@pytest.fixture()
def client(server_url: str) -> Iterator[TitansClient]:
    with TitansClient(server_url, KEY, timeout=60) as test_client:
        yield test_client


def chat_environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TITANS_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def chat_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "titans.cli", "chat", "--url", url, "--api-key", KEY, *args]


def run_chat(url: str, stdin: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(chat_command(url, *args), input=stdin, capture_output=True, text=True, timeout=120,
                          env=env or chat_environment(), cwd=REPO)


def chat_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, stdin: str,
                    *args: str) -> tuple[int, str, str]:
    """Run `titans chat ARGS` in this process with `stdin` piped in; return status, stdout and stderr."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(["chat", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def info_values(stdout: str, field: str) -> list[str]:
    """Return the values of one field in every /info block of the output."""
    return re.findall(rf"^{field}:\s+(.*)$", stdout, re.MULTILINE)


def test_piped_chat_runs_every_command(server_url: str, client: TitansClient, tmp_path: Path) -> None:
    state = tmp_path / "chat-memory.safetensors"
    script = f"Hello there\n/info\n/export {state}\n/reset\n/info\n/import {state}\n/info\n/help\n/quit\n"
    result = run_chat(server_url, script, "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr

    match = SESSION_LINE.search(result.stderr)
    assert match, result.stderr
    session_id = match.group(1)
    assert info_values(result.stdout, "session") == [session_id] * 3
    tokens = [int(value) for value in info_values(result.stdout, "tokens")]
    assert tokens[0] > 0
    assert tokens[1:] == [0, tokens[0]]
    state_bytes = [int(value) for value in info_values(result.stdout, "state bytes")]
    assert state.stat().st_size == state_bytes[0]
    assert state_bytes[2] == state_bytes[0]
    assert "memory reset" in result.stderr
    assert f"exported the memory to {state}" in result.stderr
    assert f"imported {state} ({tokens[0]} tokens)" in result.stderr
    assert "/export FILE" in result.stdout

    # Piped input gets no prompt, so stdout is the reply and the command output alone.
    assert "you>" not in result.stdout
    assert "you>" not in result.stderr
    reply = result.stdout.split("session:", 1)[0]
    assert reply.endswith("\n")
    assert client.get_session(session_id).tokens == tokens[0]
    assert client.get_session(session_id).metadata == {"client": "titans chat"}
    client.delete_session(session_id)


def test_reply_matches_chat_completions(server_url: str, client: TitansClient) -> None:
    # Bytes, not text mode, because text mode would turn a "\r" in the reply into "\n".
    result = subprocess.run(chat_command(server_url, "--max-tokens", "10", "--temperature", "0"),
                            input=b"Who is Juliet?\n", capture_output=True, timeout=120, env=chat_environment(),
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    session_id = SESSION_LINE.search(result.stderr.decode()).group(1)

    other = client.create_session()
    response = httpx.post(f"{server_url}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "X-Session-Id": other.id},
                          json={"messages": [{"role": "user", "content": "Who is Juliet?"}], "max_tokens": 10,
                                "temperature": 0})
    response.raise_for_status()
    reply = response.json()["choices"][0]["message"]["content"]
    assert result.stdout.decode("utf-8") == reply + "\n"
    # The same template fed the same text into both sessions.
    assert client.get_session(session_id).tokens == client.get_session(other.id).tokens
    for identifier in (session_id, other.id):
        client.delete_session(identifier)


def test_template_matches_server() -> None:
    from titans.server.chat_template import CHAT_STOP, render_chat

    assert format_turn("Hi there") == render_chat([("user", "Hi there")])
    assert TURN_STOP == CHAT_STOP


def test_continue_session_by_id(server_url: str, client: TitansClient, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    session = client.create_session()
    client.append(session.id, "O Romeo, Romeo! wherefore art thou Romeo?")
    tokens = client.get_session(session.id).tokens
    # End of input without /quit ends the chat too; the key comes from the environment here.
    monkeypatch.setenv("TITANS_API_KEY", KEY)
    status, stdout, stderr = chat_in_process(monkeypatch, capsys, "/info\n", "--url", server_url,
                                             "--session", session.id)
    assert status == 0, stderr
    assert f"continuing session {session.id}" in stderr
    assert info_values(stdout, "session") == [session.id]
    assert info_values(stdout, "tokens") == [str(tokens)]
    client.delete_session(session.id)


def test_unknown_session_exits(server_url: str, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    status, stdout, stderr = chat_in_process(monkeypatch, capsys, "hello\n", "--url", server_url, "--api-key", KEY,
                                             "--session", "no-such-session")
    assert status == 2
    assert "session 'no-such-session' not found" in stderr
    assert "omit --session" in stderr
    assert stdout == ""


def test_bad_commands_fail_piped_run(server_url: str, client: TitansClient, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.safetensors"
    status, stdout, stderr = chat_in_process(monkeypatch, capsys, f"/bogus\n/export\n/import {missing}\n/info\n",
                                             "--url", server_url, "--api-key", KEY)
    assert status == 1
    assert "unknown command '/bogus'" in stderr
    assert "/export needs a file name" in stderr
    assert "/import failed" in stderr
    assert str(missing) in stderr
    # The chat went on after each failure.
    session_id = SESSION_LINE.search(stderr).group(1)
    assert info_values(stdout, "session") == [session_id]
    client.delete_session(session_id)


def test_wrong_api_key_exits(server_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    status, stdout, stderr = chat_in_process(monkeypatch, capsys, "", "--url", server_url, "--api-key", "wrong")
    assert status == 2
    assert "missing or invalid API key" in stderr


def test_invalid_max_tokens_exits(server_url: str, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    status, stdout, stderr = chat_in_process(monkeypatch, capsys, "", "--url", server_url, "--max-tokens", "0")
    assert status == 2
    assert "--max-tokens must be at least 1, got 0" in stderr


class OutputReader:
    """Collect a pipe's output in a thread, so the test can wait for text to appear."""

    def __init__(self, pipe) -> None:
        self.text = ""
        self._pipe = pipe
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self._pipe.read1(4096), b""):
            self.text += chunk.decode("utf-8", errors="replace")

    def wait_for_growth(self, length: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.text) <= length:
            assert time.monotonic() < deadline, f"no new output within {timeout} s; output so far: {self.text!r}"
            time.sleep(0.05)

    def join(self) -> None:
        self._thread.join(timeout=30)


def test_ctrl_c_cancels_reply(server_url: str, client: TitansClient) -> None:
    # Greedy decoding of the random test model never emits the end-of-text token, so each
    # reply would run for tens of seconds without the interrupt.
    command = chat_command(server_url, "--max-tokens", "4000", "--temperature", "0")
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=chat_environment(), cwd=REPO)
    stdout = OutputReader(process.stdout)
    stderr = OutputReader(process.stderr)
    try:
        for message in (b"Tell me a long story\n", b"And another one\n"):
            length = len(stdout.text)
            process.stdin.write(message)
            process.stdin.flush()
            stdout.wait_for_growth(length)
            process.send_signal(signal.SIGINT)
            time.sleep(0.3)
        process.stdin.write(b"/info\n/quit\n")
        process.stdin.close()
        assert process.wait(timeout=60) == 0, stderr.text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stdout.join()
    stderr.join()
    assert stderr.text.count("reply cancelled") == 2, stderr.text
    assert "error" not in stderr.text
    session_id = SESSION_LINE.search(stderr.text).group(1)
    assert info_values(stdout.text, "session") == [session_id]

    # The session still takes requests once the server has committed the cancelled reply.
    result = client.generate(session_id, "ROMEO:", max_tokens=2, max_retries=20)
    assert result.session_tokens == client.get_session(session_id).tokens
    client.delete_session(session_id)


def test_interactive_prompt_on_stderr(server_url: str, client: TitansClient) -> None:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(chat_command(server_url), stdin=terminal, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=chat_environment(), cwd=REPO)
        os.write(controller, b"/info\n/quit\n")
        stdout, stderr = process.communicate(timeout=120)
    finally:
        os.close(controller)
        os.close(terminal)
    assert process.returncode == 0, stderr
    assert b"you> " in stderr
    assert b"/help for commands" in stderr
    assert b"you>" not in stdout
    session_id = SESSION_LINE.search(stderr.decode()).group(1)
    assert info_values(stdout.decode(), "session") == [session_id]
    client.delete_session(session_id)


def test_missing_client_package_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # A None entry in sys.modules makes `import titans_client` raise ImportError.
    monkeypatch.setitem(sys.modules, "titans_client", None)
    status, stdout, stderr = chat_in_process(monkeypatch, capsys, "hello\n", "--url", "http://127.0.0.1:9")
    assert status == 2
    assert "pip install -e clients/python" in stderr
    assert stdout == ""
