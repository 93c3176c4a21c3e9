"""Use the official `openai` package against `titans serve`: completions, chat, streaming, sessions.

    pip install openai
    titans serve &
    python clients/examples/openai_example.py

Reads TITANS_URL (default http://127.0.0.1:8000), TITANS_API_KEY when the server requires
keys (any placeholder otherwise, because the openai package insists on one), and
EXAMPLE_MAX_TOKENS (default 40), the maximum tokens per reply.

Without a session every request runs on a fresh memory that is discarded afterwards. With
the X-Session-Id header (or a `session_id` body field) the request continues a session of
the native API, so each turn sends only its new messages: the memory already contains the earlier ones.
"""

from __future__ import annotations

import os

import httpx
from openai import OpenAI

BASE_URL = os.environ.get("TITANS_URL", "http://127.0.0.1:8000").rstrip("/")
API_KEY = os.environ.get("TITANS_API_KEY") or "no-key"
MAX_TOKENS = int(os.environ.get("EXAMPLE_MAX_TOKENS", "40"))


def main() -> None:
    client = OpenAI(base_url=f"{BASE_URL}/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    completion = client.completions.create(model=model, prompt="ROMEO:\n", max_tokens=MAX_TOKENS,
                                           temperature=0.8, seed=1)
    print(f"--- completion ({completion.choices[0].finish_reason}) ---")
    print(completion.choices[0].text)

    chat = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, temperature=0.8, seed=1,
                                          messages=[{"role": "system", "content": "You speak in verse."},
                                                    {"role": "user", "content": "Who is Juliet?"}])
    print("--- chat ---")
    print(chat.choices[0].message.content)
    print(f"usage: {chat.usage.prompt_tokens} prompt + {chat.usage.completion_tokens} completion tokens")

    # Sessions are created with the native API; the openai package then names one per request.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    session_id = httpx.post(f"{BASE_URL}/v1/sessions", headers=headers).raise_for_status().json()["id"]
    print(f"--- streamed chat in session {session_id} ---")
    for question in ("Who is Romeo?", "And where does he live?"):
        print(f"user: {question}\nassistant:", end="", flush=True)
        stream = client.chat.completions.create(
            model=model, max_tokens=MAX_TOKENS, temperature=0.8, seed=2, stream=True,
            stream_options={"include_usage": True}, extra_headers={"X-Session-Id": session_id},
            messages=[{"role": "user", "content": question}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            if chunk.usage is not None:
                print(f"\n[{chunk.usage.completion_tokens} tokens]")

    session = httpx.get(f"{BASE_URL}/v1/sessions/{session_id}", headers=headers).raise_for_status().json()
    print(f"the session's memory has absorbed {session['tokens']} tokens")
    httpx.delete(f"{BASE_URL}/v1/sessions/{session_id}", headers=headers).raise_for_status()


if __name__ == "__main__":
    main()
