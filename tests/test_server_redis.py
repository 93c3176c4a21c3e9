"""The server with the Redis store: restarts, graceful shutdown, several processes on one Redis.

Each test uses its own key prefix on the real Redis at 127.0.0.1:6379 and deletes only its
own keys. The tests are skipped when Redis is unreachable, except with CI=true, where
they fail instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from server_fixtures import (  # noqa: F401  (fixtures are registered by import)
    REDIS_URL,
    assert_error,
    create_session,
    greedy_tokens,
    metric,
    parse_metrics,
    redis_prefix,
    reference,
    server_factory,
    sse_data,
    tiny_checkpoint,
)

PROMPT_1 = "MENENIUS:\nI will tell you a pretty tale."
PROMPT_2 = "\nFIRST CITIZEN:\nWell, I'll hear it, sir."
PROMPT_3 = "\nMENENIUS:\nThere was a time"


def redis_options(prefix: str) -> list[str]:
    return ["--store-url", REDIS_URL, "--store-prefix", prefix]


def generate(client: httpx.Client, session_id: str, prompt: str, max_tokens: int) -> dict:
    response = client.post(f"/v1/sessions/{session_id}/generate",
                           json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_refused(url: str, timeout: float = 10.0) -> bool:
    """Return True once new connections to `url` are refused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/healthz", timeout=1.0)
        except httpx.ConnectError:
            return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def test_sigterm_finishes_stream_and_restart_continues(server_factory, redis_prefix, reference):
    tokenizer = reference.tokenizer
    first = server_factory(redis_options(redis_prefix) + ["--shutdown-grace-seconds", "60"])
    with first.client(None) as client:
        session_id = create_session(client)
        generate(client, session_id, PROMPT_1, 8)
        body = {"prompt": PROMPT_2, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with client.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            first.terminate()
            # Shutdown stops accepting connections while the running stream goes on.
            assert wait_until_refused(first.url), first.log_tail()
            events = [json.loads(data) for data in sse_data(list(lines))]
    assert first.wait(60) == 0, first.log_tail()
    final = events[-1]
    assert final["object"] == "generation", final
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 400

    second = server_factory(redis_options(redis_prefix))
    with second.client(None) as client:
        info = client.get(f"/v1/sessions/{session_id}").json()
        turn_1 = greedy_tokens(reference, tokenizer.encode(PROMPT_1), 8)
        history = tokenizer.encode(PROMPT_1) + turn_1 + tokenizer.encode(PROMPT_2)
        turn_2 = greedy_tokens(reference, history, 400)
        assert final["text"] == tokenizer.decode(turn_2)
        history += turn_2
        assert info["tokens"] == len(history)
        assert info["version"] == 3
        result = generate(client, session_id, PROMPT_3, 6)
        history += tokenizer.encode(PROMPT_3)
        assert result["text"] == tokenizer.decode(greedy_tokens(reference, history, 6))


def test_two_processes_alternate_on_one_session(server_factory, redis_prefix, reference):
    tokenizer = reference.tokenizer
    left = server_factory(redis_options(redis_prefix))
    right = server_factory(redis_options(redis_prefix))
    with left.client(None) as on_left, right.client(None) as on_right:
        session_id = create_session(on_left)
        results = [generate(on_left, session_id, PROMPT_1, 5), generate(on_right, session_id, PROMPT_2, 5),
                   generate(on_left, session_id, PROMPT_3, 5)]
        assert on_right.get(f"/v1/sessions/{session_id}").json()["version"] == 4

        history: list[int] = []
        for prompt, result in zip((PROMPT_1, PROMPT_2, PROMPT_3), results):
            history += tokenizer.encode(prompt)
            expected = greedy_tokens(reference, history, 5)
            assert result["text"] == tokenizer.decode(expected), prompt
            history += expected
            assert result["session_tokens"] == len(history)

        # The lease is shared through Redis, so the other process gets 409 for the busy session.
        body = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with on_left.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines)
            busy = on_right.post(f"/v1/sessions/{session_id}/generate", json={"prompt": "y", "max_tokens": 1})
            assert_error(busy, 409, "session_busy")
            assert_error(on_right.post(f"/v1/sessions/{session_id}/memory/reset"), 409, "session_busy")
            assert next(lines) is not None

        # After the disconnect the lease is released and the other process can use the session.
        deadline = time.monotonic() + 15
        while True:
            response = on_right.post(f"/v1/sessions/{session_id}/generate", json={"prompt": "y", "max_tokens": 1})
            if response.status_code != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 200, response.text


def test_workers_share_sessions_and_metrics(server_factory, redis_prefix, reference, tmp_path: Path):
    """Two uvicorn workers: sessions continue across workers and /metrics adds up both workers."""
    tokenizer = reference.tokenizer
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    server = server_factory(redis_options(redis_prefix) + ["--workers", "2"],
                            environment={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    # Every request goes on a new connection, so the kernel may hand it to either worker.
    session_id = httpx.post(server.url + "/v1/sessions").json()["id"]
    history: list[int] = []
    for prompt in (PROMPT_1, PROMPT_2, PROMPT_3):
        response = httpx.post(f"{server.url}/v1/sessions/{session_id}/generate", timeout=60,
                              json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        history += tokenizer.encode(prompt)
        expected = greedy_tokens(reference, history, 4)
        assert response.json()["text"] == tokenizer.decode(expected)
        history += expected

    for _ in range(20):
        assert httpx.post(server.url + "/v1/tokenize", json={"text": "abc"}).status_code == 200
    for _ in range(5):
        samples = parse_metrics(httpx.get(server.url + "/metrics").text)
        assert metric(samples, "titans_requests_total", route="/v1/tokenize", method="POST", status="200") == 20
        assert metric(samples, "titans_requests_total", route="/v1/sessions/{session_id}/generate", method="POST",
                      status="200") == 3
        assert metric(samples, "titans_generated_tokens_total") == 12
    # Each worker writes its own counter file, named after its process id.
    worker_files = {path.name.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}
    assert len(worker_files) == 2, sorted(path.name for path in metrics_dir.iterdir())
