"""Use titans_client against a running `titans serve`: a session, a reply, a streamed reply, a fork.

    pip install -e clients/python
    titans serve &                                   # or set TITANS_URL to another server
    python clients/examples/client_example.py

Reads TITANS_URL (default http://127.0.0.1:8000), TITANS_API_KEY when the server requires
keys, and EXAMPLE_MAX_TOKENS (default 60), the maximum tokens per reply.
"""

from __future__ import annotations

import os
import sys

from titans_client import SessionNotFound, TitansClient, TitansError

MAX_TOKENS = int(os.environ.get("EXAMPLE_MAX_TOKENS", "60"))


def main() -> int:
    with TitansClient() as client:
        if not client.ready():
            print(f"the server at {client.base_url} is not ready; start it with: titans serve", file=sys.stderr)
            return 1

        session = client.create_session(metadata={"example": "client_example"})
        print(f"created session {session.id} on model {session.model}")

        # One request: the prompt enters the session's memory, then the model continues it.
        result = client.generate(session.id, "ROMEO:\n", max_tokens=MAX_TOKENS, temperature=0.8, seed=1)
        print(f"--- reply ({result.finish_reason}, {result.usage.completion_tokens} tokens) ---")
        print(result.text)

        # Streaming: the deltas arrive as the server generates them; the final result follows.
        print("--- streamed reply ---")
        with client.generate(session.id, "\n\nJULIET:\n", max_tokens=MAX_TOKENS, temperature=0.8, seed=2,
                             stream=True) as stream:
            for delta in stream:
                print(delta, end="", flush=True)
        print()
        print(f"finish reason {stream.result.finish_reason}; the session has absorbed "
              f"{stream.result.session_tokens} tokens")

        # A fork copies the memory: both sessions continue from the same point independently.
        fork = client.fork_session(session.id)
        info = client.get_session(session.id)
        print(f"session {info.id}: {info.tokens} tokens, state {info.state_bytes} bytes; "
              f"fork {fork.id}: {fork.tokens} tokens")

        for session_id in (fork.id, session.id):
            client.delete_session(session_id)
        try:
            client.get_session(session.id)
        except SessionNotFound as exc:
            print(f"deleted both sessions ({exc.message})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TitansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
