"""Utility and operations routes: tokenize, detokenize, health, readiness, metrics."""

from __future__ import annotations

import httpx
import pytest

from server_fixtures import (  # noqa: F401  (fixtures are registered by import)
    KEY_A,
    assert_error,
    create_session,
    main_server,
    metric,
    parse_metrics,
    reference,
    scrape,
    server_factory,
    tiny_checkpoint,
)


@pytest.fixture
def client(main_server):
    with main_server.client(KEY_A) as client:
        yield client


def test_tokenize_detokenize_round_trip(client, reference):
    text = "Fair is foul, and foul is fair: ♥ 漢字"
    tokenized = client.post("/v1/tokenize", json={"text": text})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert body["tokens"] == reference.tokenizer.encode(text)
    assert body["count"] == len(body["tokens"])
    detokenized = client.post("/v1/detokenize", json={"tokens": body["tokens"]})
    assert detokenized.json() == {"text": text}


def test_tokenizer_errors(client):
    assert_error(client.post("/v1/detokenize", json={"tokens": [1, 300]}), 400, "invalid_parameter", "tokens.1")
    assert_error(client.post("/v1/detokenize", json={"tokens": [-1]}), 400, "invalid_parameter", "tokens.0")
    assert_error(client.post("/v1/detokenize", json={"tokens": "abc"}), 400, param="tokens")
    assert_error(client.post("/v1/tokenize", json={}), 400, "missing_parameter", "text")
    assert_error(client.post("/v1/tokenize", content=b"text=abc",
                             headers={"Content-Type": "application/x-www-form-urlencoded"}), 400, "invalid_json")


def test_health_and_readiness(main_server):
    with httpx.Client(base_url=main_server.url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"model": "ok", "store": "ok", "engine": "ok"}


def test_metrics_parse_and_count_requests(client):
    """Counters move by exactly the requests made between two scrapes."""
    hi_tokens = client.post("/v1/tokenize", json={"text": "Hi"}).json()["count"]
    before = scrape(client)
    for _ in range(3):
        assert client.post("/v1/tokenize", json={"text": "abc"}).status_code == 200
    for _ in range(2):
        assert client.post("/v1/detokenize", json={"tokens": [999]}).status_code == 400
    session_id = create_session(client)
    generated = client.post(f"/v1/sessions/{session_id}/generate",
                            json={"prompt": "Hello there", "max_tokens": 7, "ignore_eos": True}).json()
    streamed = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True,
                                                    "stream": True})
    assert streamed.status_code == 200
    with httpx.Client(base_url=client.base_url) as anonymous:
        assert anonymous.get("/v1/sessions").status_code == 401
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("titans_requests_total", route="/v1/tokenize", method="POST", status="200") == 3
    assert delta("titans_requests_total", route="/v1/detokenize", method="POST", status="400") == 2
    assert delta("titans_requests_total", route="/v1/sessions", method="POST", status="201") == 1
    assert delta("titans_requests_total", route="/v1/sessions/{session_id}/generate", method="POST",
                 status="200") == 1
    assert delta("titans_requests_total", route="/v1/completions", method="POST", status="200") == 1
    assert delta("titans_requests_total", route="/v1/sessions", method="GET", status="401") == 1
    assert delta("titans_requests_total", route="/metrics", method="GET", status="200") == 1
    assert delta("titans_request_duration_seconds_count", route="/v1/tokenize", method="POST") == 3
    assert delta("titans_generated_tokens_total") == generated["usage"]["completion_tokens"] + 4
    assert delta("titans_prompt_tokens_total") == generated["usage"]["prompt_tokens"] + hi_tokens
    assert delta("titans_time_to_first_token_seconds_count") == 2
    assert delta("titans_inter_token_latency_seconds_count") == (7 - 1) + (4 - 1)
    assert delta("titans_state_size_bytes_count") == 1
    assert delta("titans_store_operation_duration_seconds_count", backend="memory", operation="commit") == 1
    assert delta("titans_store_operation_duration_seconds_count", backend="memory", operation="create") == 1
    assert delta("titans_memory_updates_total") > 0
    assert metric(after, "titans_active_streams") == 0
    assert metric(after, "titans_queue_depth") == 0


def test_metrics_exposition_format(client):
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse_metrics(response.text)
    names = {name for name, _ in samples}
    for name in ("titans_requests_total", "titans_request_duration_seconds_bucket",
                 "titans_time_to_first_token_seconds_bucket", "titans_inter_token_latency_seconds_bucket",
                 "titans_prompt_tokens_total", "titans_generated_tokens_total", "titans_running_batch_size",
                 "titans_queue_depth", "titans_active_streams", "titans_store_operation_duration_seconds_bucket",
                 "titans_state_size_bytes_bucket", "titans_memory_updates_total"):
        assert name in names, name


def test_unreachable_store(server_factory, tmp_path):
    """A store that does not respond: the process is alive, not ready, and store routes return 503."""
    server = server_factory(["--store-url", "redis://127.0.0.1:1/0", "--store-timeout-seconds", "0.5"],
                            ready_path="/healthz")
    with server.client(key=None) as client:
        assert client.get("/healthz").status_code == 200
        error = assert_error(client.get("/readyz"), 503, "not_ready")
        assert "store" in error["message"]
        created = client.post("/v1/sessions")
        assert_error(created, 503, "store_unavailable")
        assert "retry-after" in created.headers
        assert_error(client.get("/v1/sessions/some-session"), 503, "store_unavailable")
        # Requests without a session do not need the store.
        completion = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert completion.status_code == 200, completion.text
        samples = scrape(client)
        assert metric(samples, "titans_store_errors_total", backend="redis", operation="create",
                      error="StoreUnavailable") == 1


def test_serve_command_rejects_bad_settings(tmp_path):
    """`titans serve` exits with status 2 and one line naming the problem, never echoing API keys."""
    import subprocess
    import sys

    missing = subprocess.run([sys.executable, "-m", "titans.cli", "serve", "--checkpoint", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "checkpoint directory not found" in missing.stderr

    invalid = subprocess.run([sys.executable, "-m", "titans.cli", "serve", "--checkpoint", str(tmp_path),
                              "--workers", "2", "--api-keys", "secret-key-123"],
                             capture_output=True, text=True, timeout=120)
    assert invalid.returncode == 2
    assert "invalid server settings" in invalid.stderr
    assert "memory://" in invalid.stderr
    assert "secret-key-123" not in invalid.stderr
