"""Queue limit and request timeout, on a server with one batch slot, one queue slot and a 2 s timeout."""

from __future__ import annotations

import json
import time

import pytest

from server_fixtures import (  # noqa: F401  (fixtures are registered by import)
    assert_error,
    create_session,
    scrape,
    metric,
    server_factory,
    sse_data,
    tiny_checkpoint,
)

TIMEOUT_SECONDS = 2
# Enough tokens to outlast the timeout unless a decode step takes under 0.1 ms. The tiny model
# took about 5 ms per token on a 2-core CPU (one measurement).
LONG_GENERATION = 20000


@pytest.fixture(scope="module")
def limited_server(server_factory):
    return server_factory(["--max-batch-size", "1", "--max-queued-requests", "1",
                           "--request-timeout-seconds", str(TIMEOUT_SECONDS), "--retry-after-seconds", "2.5",
                           "--max-max-tokens", str(LONG_GENERATION)])


def test_queue_full_returns_429(limited_server):
    long_body = {"prompt": "Hi", "max_tokens": LONG_GENERATION, "ignore_eos": True, "stream": True}
    with limited_server.client(None) as running, limited_server.client(None) as queued, \
            limited_server.client(None) as rejected:
        first, second = create_session(running), create_session(running)
        with running.stream("POST", f"/v1/sessions/{first}/generate", json=long_body) as in_batch:
            assert in_batch.status_code == 200
            batch_lines = in_batch.iter_lines()
            assert next(line for line in batch_lines if line.startswith("data: "))
            with queued.stream("POST", f"/v1/sessions/{second}/generate", json=long_body) as waiting:
                assert waiting.status_code == 200
                assert metric(scrape(rejected), "titans_queue_depth") == 1
                for request in ({"prompt": "x", "max_tokens": 1}, {"prompt": "x", "max_tokens": 1, "stream": True}):
                    response = rejected.post("/v1/completions", json=request)
                    error = assert_error(response, 429, "queue_full")
                    assert response.headers["retry-after"] == "3"
                    assert "queue" in error["message"]
                    assert error["type"] == "rate_limit_error"
    # Both streams were closed, so the slots free up and requests pass again.
    with limited_server.client(None) as client:
        for _ in range(100):
            samples = scrape(client)
            if metric(samples, "titans_queue_depth") == 0 and metric(samples, "titans_running_batch_size") == 0:
                break
            time.sleep(0.1)
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert response.status_code == 200, response.text


def test_timeout_returns_504_and_keeps_tokens(limited_server):
    with limited_server.client(None) as client:
        session_id = create_session(client)
        prompt_tokens = client.post("/v1/tokenize", json={"text": "Hello"}).json()["count"]
        response = client.post(f"/v1/sessions/{session_id}/generate",
                               json={"prompt": "Hello", "max_tokens": LONG_GENERATION, "ignore_eos": True})
        error = assert_error(response, 504, "timeout")
        assert "timed out after 2 s" in error["message"]
        info = client.get(f"/v1/sessions/{session_id}").json()
        assert info["version"] == 2
        assert prompt_tokens < info["tokens"] < prompt_tokens + LONG_GENERATION
        assert f"({info['tokens']} tokens in total)" in error["message"]


def test_timeout_mid_stream_sends_error_event(limited_server):
    with limited_server.client(None) as client:
        session_id = create_session(client)
        body = {"prompt": "Hello", "max_tokens": LONG_GENERATION, "ignore_eos": True, "stream": True}
        with client.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
            assert response.status_code == 200
            events = [json.loads(data) for data in sse_data(list(response.iter_lines()))]
        assert events[-1]["error"]["code"] == "timeout"
        assert all(event.get("object") == "generation.delta" for event in events[:-1])
        streamed = "".join(event["text"] for event in events[:-1])
        assert streamed

        body = {"prompt": "Hello", "max_tokens": LONG_GENERATION, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            data = sse_data(list(response.iter_lines()))
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["code"] == "timeout"


def test_failure_mid_stream_sends_error_event(server_factory):
    """A state over max_state_bytes fails the commit after the last token: the stream ends with an error."""
    server = server_factory(["--max-state-bytes", "100000"])
    with server.client(None) as client:
        session_id = create_session(client)
        body = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "stream": True}
        with client.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
            assert response.status_code == 200
            events = [json.loads(data) for data in sse_data(list(response.iter_lines()))]
        assert events[-1]["error"]["code"] == "generation_failed"
        assert "100000" in events[-1]["error"]["message"]
        assert all(event.get("object") == "generation.delta" for event in events[:-1])

        with client.stream("POST", "/v1/chat/completions", headers={"X-Session-Id": session_id},
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                 "ignore_eos": True, "stream": True}) as response:
            data = sse_data(list(response.iter_lines()))
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["code"] == "generation_failed"

        response = client.post(f"/v1/sessions/{session_id}/generate", json={"prompt": "Hello", "max_tokens": 2})
        assert_error(response, 500, "generation_failed")
        # The session keeps its last committed state: still the fresh one.
        info = client.get(f"/v1/sessions/{session_id}").json()
        assert info["version"] == 1
        assert info["tokens"] == 0
