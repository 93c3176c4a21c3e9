"""`titans chat`: chat with a running server in the terminal, one session across runs.

Each line read is one user message, unless it starts with `/` (see HELP). Replies stream to
stdout as they arrive. Notes about the session (its id, resets, exports) go to stderr, and so
does the `you>` prompt, which is shown only when stdin is a terminal, so piped output is the
replies and the output of /info and /help alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from titans_client import TitansClient

HELP = """commands:
  /info         show the session: id, model, tokens absorbed, state size, times
  /reset        reset the session's memory to the fresh state (the id stays)
  /export FILE  save the session's memory to FILE
  /import FILE  replace the session's memory with FILE (from /export or the HTTP API)
  /help         show this help
  /quit         exit (so do /exit and end of input, Ctrl-D)
Ctrl-C while a reply streams cancels the reply; the session stays usable."""

# The chat template of POST /v1/chat/completions (titans.server.chat_template), repeated here
# because this command needs only the client package. A session then absorbs the same text
# whichever way the user chats, and a test checks that the two stay equal. Each message is
# sent alone, because the session's memory already contains the earlier turns.
USER_PREFIX = "user: "
ASSISTANT_PREFIX = "assistant:"
TURN_STOP = "\nuser:"

# Retries of a message that the server turned away before generating (busy session, full
# queue, store unavailable): right after a cancelled reply the session stays busy until
# the server has committed the cancelled request.
MESSAGE_RETRIES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="server URL (default: $TITANS_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--session", default=None,
                        help="id of a session to continue; a new session is created when omitted")
    parser.add_argument("--api-key", default=None, help="API key (default: $TITANS_API_KEY)")
    parser.add_argument("--max-tokens", type=int, default=256, help="maximum tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling probability mass; 1 = off")
    parser.add_argument("--seed", type=int, default=None, help="random seed that makes replies reproducible")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the server's next bytes before giving up on a request")


def format_turn(message: str) -> str:
    """Return the prompt that feeds one user message and opens the assistant's reply."""
    return f"{USER_PREFIX}{message}\n{ASSISTANT_PREFIX}"


def import_client():
    """Import titans_client, or raise a CommandError that explains how to install it."""
    from titans.cli import CommandError

    try:
        import titans_client
    except ImportError as exc:
        raise CommandError("titans chat needs the Python client package titans_client, which is not "
                           f"installed ({exc}); install it with: pip install -e clients/python") from None
    return titans_client


class Chat:
    """The chat loop: reads lines, runs commands, streams replies."""

    def __init__(self, client: "TitansClient", session_id: str, args: argparse.Namespace,
                 stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.tc = import_client()
        self.client = client
        self.session_id = session_id
        self.args = args
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.interactive = stdin.isatty()
        self.failures = 0

    def note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def fail(self, text: str) -> None:
        self.failures += 1
        print(f"error: {text}", file=self.stderr, flush=True)

    def read_line(self) -> str | None:
        """Return the next input line without its newline, or None at end of input."""
        if self.interactive:
            self.stderr.write("you> ")
            self.stderr.flush()
            try:
                return input()
            except EOFError:
                self.stderr.write("\n")
                return None
        line = self.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def run(self) -> int:
        """Run until /quit or end of input; return 1 if a piped run had a failed message or command."""
        if self.interactive:
            self.note("type a message, or /help for commands")
        while True:
            try:
                line = self.read_line()
            except KeyboardInterrupt:
                self.stderr.write("\n")
                self.note("(use /quit or Ctrl-D to exit)")
                continue
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.run_command(line):
                    break
                continue
            self.send_message(line)
        if self.failures and not self.interactive:
            return 1
        return 0

    # --- messages -------------------------------------------------------------------------

    def send_message(self, message: str) -> None:
        tc = self.tc
        try:
            stream = self.client.generate(self.session_id, format_turn(message), stream=True,
                                          max_tokens=self.args.max_tokens, temperature=self.args.temperature,
                                          top_p=self.args.top_p, seed=self.args.seed, stop=[TURN_STOP],
                                          max_retries=MESSAGE_RETRIES)
        except KeyboardInterrupt:
            self.note("(message cancelled before the reply started)")
            return
        except tc.TitansError as exc:
            self.fail(f"message not sent: {exc}")
            return
        try:
            with stream:
                for delta in stream:
                    self.stdout.write(delta)
                    self.stdout.flush()
        except KeyboardInterrupt:
            self.stdout.write("\n")
            self.stdout.flush()
            self.note("(reply cancelled; the session keeps the message and the part of the reply generated so far)")
            return
        except tc.TitansError as exc:
            self.stdout.write("\n")
            self.fail(f"reply failed: {exc}")
            return
        self.stdout.write("\n")
        self.stdout.flush()
        result = stream.result
        if result is not None and result.finish_reason == "length":
            self.note(f"(reply cut at --max-tokens {self.args.max_tokens})")

    # --- commands -------------------------------------------------------------------------

    def run_command(self, line: str) -> bool:
        """Run one /command; return False when the chat should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        handlers = {"/help": self.show_help, "/info": self.show_info, "/reset": self.reset,
                    "/export": self.export, "/import": self.import_}
        handler = handlers.get(name)
        if handler is None:
            self.fail(f"unknown command {name!r}; /help lists the commands")
            return True
        try:
            handler(argument)
        except self.tc.TitansError as exc:
            self.fail(f"{name} failed: {exc}")
        except OSError as exc:
            self.fail(f"{name} failed: {exc}")
        return True

    def show_help(self, argument: str) -> None:
        print(HELP, file=self.stdout, flush=True)

    def show_info(self, argument: str) -> None:
        import time

        session = self.client.get_session(self.session_id)

        def when(seconds: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))

        lines = [f"session:     {session.id}", f"model:       {session.model}",
                 f"tokens:      {session.tokens}", f"state bytes: {session.state_bytes}",
                 f"version:     {session.version}", f"created:     {when(session.created_at)}",
                 f"updated:     {when(session.updated_at)}"]
        lines += [f"metadata:    {key}={value}" for key, value in sorted(session.metadata.items())]
        print("\n".join(lines), file=self.stdout, flush=True)

    def reset(self, argument: str) -> None:
        self.client.reset_memory(self.session_id)
        self.note("memory reset")

    def export(self, argument: str) -> None:
        if not argument:
            self.fail("/export needs a file name: /export FILE")
            return
        path = self.client.export_memory(self.session_id, os.path.expanduser(argument))
        self.note(f"exported the memory to {path} ({path.stat().st_size} bytes)")

    def import_(self, argument: str) -> None:
        if not argument:
            self.fail("/import needs a file name: /import FILE")
            return
        session = self.client.import_memory(self.session_id, os.path.expanduser(argument))
        self.note(f"imported {argument} ({session.tokens} tokens)")


def open_session(client: "TitansClient", session_id: str | None, stderr: TextIO) -> str:
    """Return the id of the session to chat in, creating one when none is given."""
    if session_id is not None:
        client.get_session(session_id)  # raises SessionNotFound with the server's message
        print(f"continuing session {session_id}", file=stderr, flush=True)
        return session_id
    session = client.create_session(metadata={"client": "titans chat"})
    print(f"session {session.id} (continue it later with: titans chat --session={session.id})",
          file=stderr, flush=True)
    return session.id


def run(args: argparse.Namespace) -> int:
    from titans.cli import CommandError

    tc = import_client()
    # A reply can hold any character; on a terminal without UTF-8 it is shown replaced, not raised.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    # httpx logs every request at INFO; those lines would bury the chat on stderr.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    if args.max_tokens < 1:
        raise CommandError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    with tc.TitansClient(args.url, args.api_key, timeout=args.timeout) as client:
        try:
            session_id = open_session(client, args.session, sys.stderr)
        except tc.SessionNotFound as exc:
            raise CommandError(f"{exc.message}; omit --session to start a new one") from None
        except tc.TitansError as exc:
            raise CommandError(f"cannot open a session on {client.base_url}: {exc}") from None
        return Chat(client, session_id, args, sys.stdin, sys.stdout, sys.stderr).run()
