"""Native session API against a real `titans serve` process: sessions, generation, memory, auth.

Generation checks compare the server with the model's own greedy loop in the test
process (the tiny random checkpoint is deterministic under greedy decoding), with
`ignore_eos` so both sides generate exactly max_tokens.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from server_fixtures import (  # noqa: F401  (fixtures are registered by import)
    KEY_A,
    KEY_B,
    LONG_GENERATION,
    assert_error,
    create_session,
    greedy_tokens,
    main_server,
    metric,
    reference,
    scrape,
    sse_data,
    stream_json_events,
    tiny_checkpoint,
    unique_id,
    wait_for_metric,
)
from titans.model import MACConfig, MACModel

PROMPT_1 = "ROMEO:\nBut soft, what light through yonder window breaks?"
PROMPT_2 = "\nJULIET:\nAy me!"


@pytest.fixture
def client(main_server):
    with main_server.client(KEY_A) as client:
        yield client


def generate(client: httpx.Client, session_id: str, prompt: str, max_tokens: int, **options) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **options}
    response = client.post(f"/v1/sessions/{session_id}/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- sessions ---------------------------------------------------------------------------------


def test_session_lifecycle(client):
    session_id = unique_id("life")
    created = client.post("/v1/sessions", json={"id": session_id, "metadata": {"user": "ada"}})
    assert created.status_code == 201, created.text
    info = created.json()
    assert info["id"] == session_id
    assert info["object"] == "session"
    assert info["tokens"] == 0
    assert info["state_bytes"] == 0
    assert info["version"] == 1
    assert info["metadata"] == {"user": "ada"}
    assert info["model"] == "tiny-checkpoint"

    listed = client.get("/v1/sessions").json()
    assert listed["object"] == "list"
    assert session_id in [item["id"] for item in listed["data"]]

    generate(client, session_id, "Hello", 5)
    after = client.get(f"/v1/sessions/{session_id}").json()
    assert after["tokens"] > 5
    assert after["state_bytes"] > 0
    assert after["version"] == 2
    assert after["updated_at"] >= info["updated_at"]

    deleted = client.delete(f"/v1/sessions/{session_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": session_id, "object": "session.deleted", "deleted": True}
    assert_error(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")
    assert_error(client.delete(f"/v1/sessions/{session_id}"), 404, "session_not_found")


def test_session_create_without_body(client):
    response = client.post("/v1/sessions")
    assert response.status_code == 201, response.text
    assert len(response.json()["id"]) >= 16


def test_session_create_errors(client):
    session_id = create_session(client)
    assert_error(client.post("/v1/sessions", json={"id": session_id}), 409, "session_exists")
    assert_error(client.post("/v1/sessions", json={"id": "no spaces!"}), 400, "invalid_session_id")
    assert_error(client.post("/v1/sessions", json={"metadata": {"k": 1}}), 400, "invalid_parameter",
                 "metadata.k")
    assert_error(client.post("/v1/sessions", json={"color": "red"}), 400, "unknown_parameter", "color")
    assert_error(client.post("/v1/sessions", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400, "invalid_json")


def test_invalid_session_id_in_path(client):
    assert_error(client.get("/v1/sessions/bad%20id"), 400, "invalid_session_id", "session_id")


def test_fork_copies_memory(client, reference):
    source = create_session(client, metadata={"origin": "yes"})
    generate(client, source, PROMPT_1, 6)
    forked = client.post(f"/v1/sessions/{source}/fork", json={})
    assert forked.status_code == 201, forked.text
    fork = forked.json()
    assert fork["id"] != source
    assert fork["tokens"] == client.get(f"/v1/sessions/{source}").json()["tokens"]
    assert fork["metadata"] == {"origin": "yes"}

    # Both continue identically from the copied memory.
    from_source = generate(client, source, PROMPT_2, 8)
    from_fork = generate(client, fork["id"], PROMPT_2, 8)
    assert from_fork["text"] == from_source["text"]
    assert from_fork["session_tokens"] == from_source["session_tokens"]

    named = client.post(f"/v1/sessions/{source}/fork", json={"id": unique_id("fork"), "metadata": {}})
    assert named.status_code == 201, named.text
    assert named.json()["metadata"] == {}
    assert_error(client.post("/v1/sessions/missing-session/fork"), 404, "session_not_found")


# --- generation ---------------------------------------------------------------------------------


def test_generate_matches_model_greedy(client, reference):
    session_id = create_session(client)
    result = generate(client, session_id, PROMPT_1, 12)
    prompt_tokens = reference.tokenizer.encode(PROMPT_1)
    expected = greedy_tokens(reference, prompt_tokens, 12)
    assert result["text"] == reference.tokenizer.decode(expected)
    assert result["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": len(prompt_tokens), "completion_tokens": 12,
                               "total_tokens": len(prompt_tokens) + 12}
    assert result["session_tokens"] == len(prompt_tokens) + 12
    assert result["session_version"] == 2
    assert result["session_id"] == session_id


def test_multi_turn_equals_one_shot(client, reference):
    """Two turns on a session continue exactly as one generation on the concatenated tokens."""
    tokenizer = reference.tokenizer
    session_id = create_session(client)
    first = generate(client, session_id, PROMPT_1, 10)
    second = generate(client, session_id, PROMPT_2, 10)

    turn_1 = greedy_tokens(reference, tokenizer.encode(PROMPT_1), 10)
    assert first["text"] == tokenizer.decode(turn_1)
    history = tokenizer.encode(PROMPT_1) + turn_1 + tokenizer.encode(PROMPT_2)
    one_shot = greedy_tokens(reference, history, 10)
    assert second["text"] == tokenizer.decode(one_shot)
    assert second["session_tokens"] == len(history) + 10

    # The server agrees on the same one-shot run (token-id prompt on a fresh memory).
    fresh = client.post("/v1/completions", json={"prompt": history, "max_tokens": 10, "temperature": 0,
                                                 "ignore_eos": True})
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["choices"][0]["text"] == second["text"]


def test_generate_stream_events(client, reference):
    session_id = create_session(client)
    events = stream_json_events(client, f"/v1/sessions/{session_id}/generate",
                                {"prompt": PROMPT_1, "max_tokens": 9, "temperature": 0, "ignore_eos": True,
                                 "stream": True})
    deltas = [event for event in events if event.get("object") == "generation.delta"]
    final = events[-1]
    assert final["object"] == "generation"
    assert len(deltas) == len(events) - 1
    assert "".join(delta["text"] for delta in deltas) == final["text"]
    assert sum(len(delta["token_ids"]) for delta in deltas) <= 9
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 9
    expected = greedy_tokens(reference, reference.tokenizer.encode(PROMPT_1), 9)
    assert final["text"] == reference.tokenizer.decode(expected)


def test_stream_headers_and_raw_framing(client):
    session_id = create_session(client)
    body = {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}
    with client.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        assert "content-encoding" not in response.headers
        raw = response.read().decode()
    assert raw.endswith("\n\n")
    for block in raw.strip("\n").split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 1, block
        assert lines[0].startswith("data: ") or lines[0].startswith(":"), block
    events = [json.loads(data) for data in sse_data(raw.splitlines())]
    assert events[-1]["object"] == "generation"


def test_keepalive_comments_during_long_prefill(client, reference):
    """A prompt prefilled in many 32-token chunks takes longer than the 0.1 s keep-alive interval."""
    from server_fixtures import corpus_text

    text = corpus_text()[:2400]
    assert len(reference.tokenizer.encode(text)) <= 2000
    session_id = create_session(client)
    body = {"prompt": text, "max_tokens": 2, "ignore_eos": True, "stream": True}
    with client.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    first_data = next(index for index, line in enumerate(lines) if line.startswith("data: "))
    comments = [line for line in lines[:first_data] if line.startswith(":")]
    assert comments, lines[:5]
    assert json.loads(sse_data(lines)[-1])["finish_reason"] == "length"


def test_stop_string_ends_generation(client, reference):
    session_id = create_session(client)
    full = generate(client, session_id, PROMPT_1, 20)["text"]
    stop = full[6:9]
    assert stop and stop in full
    other = create_session(client)
    stopped = generate(client, other, PROMPT_1, 20, stop=[stop, "zzzz"])
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == full[:full.index(stop)]
    assert stop not in stopped["text"]


def test_seeded_sampling_is_reproducible(client):
    texts = []
    for _ in range(2):
        session_id = create_session(client)
        result = generate(client, session_id, PROMPT_1, 15, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
        texts.append(result["text"])
    assert texts[0] == texts[1]


def test_generate_validation_errors(client):
    session_id = create_session(client)
    path = f"/v1/sessions/{session_id}/generate"
    cases = [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 20001}, "max_tokens"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "min_p": 1.5}, "min_p"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": 5}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "unknown": True}, "unknown"),
    ]
    for body, param in cases:
        for stream in (False, True):
            response = client.post(path, json={**body, "stream": stream})
            error = assert_error(response, 400, param=param)
            assert param in error["message"], (body, error)
    assert client.get(f"/v1/sessions/{session_id}").json()["version"] == 1


def test_max_tokens_error_names_limit(client):
    session_id = create_session(client)
    error = assert_error(client.post(f"/v1/sessions/{session_id}/generate",
                                     json={"prompt": "x", "max_tokens": 25000}), 400, param="max_tokens")
    assert error["message"] == "max_tokens must be between 1 and 20000, got 25000"


def test_prompt_too_long(client):
    session_id = create_session(client)
    prompt = "a b " * 1500
    for path, body in ((f"/v1/sessions/{session_id}/generate", {"prompt": prompt}),
                       (f"/v1/sessions/{session_id}/append", {"text": prompt})):
        error = assert_error(client.post(path, json=body), 400)
        assert "max_prompt_tokens" in error["message"]
        assert "2000" in error["message"]


def test_body_too_large(client):
    session_id = create_session(client)
    response = client.post(f"/v1/sessions/{session_id}/generate", json={"prompt": "x" * 70_000})
    error = assert_error(response, 413, "body_too_large")
    assert "65536" in error["message"]

    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'

    chunked = client.post(f"/v1/sessions/{session_id}/generate", content=chunks(),
                          headers={"Content-Type": "application/json"})
    assert_error(chunked, 413, "body_too_large")
    assert client.get(f"/v1/sessions/{session_id}").json()["version"] == 1


def test_unknown_session_errors(client):
    for method, path, body in (("POST", "/v1/sessions/nope-1/generate", {"prompt": "x"}),
                               ("POST", "/v1/sessions/nope-1/append", {"text": "x"}),
                               ("GET", "/v1/sessions/nope-1", None),
                               ("DELETE", "/v1/sessions/nope-1", None),
                               ("POST", "/v1/sessions/nope-1/memory/reset", None),
                               ("GET", "/v1/sessions/nope-1/memory", None),
                               ("PUT", "/v1/sessions/nope-1/memory", None)):
        response = client.request(method, path, json=body)
        error = assert_error(response, 404, "session_not_found", "session_id")
        assert error["message"] == "session 'nope-1' not found"
    # A streaming request on an unknown session fails before the stream starts.
    response = client.post("/v1/sessions/nope-1/generate", json={"prompt": "x", "stream": True})
    assert_error(response, 404, "session_not_found")


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.put("/v1/sessions"), 405, "method_not_allowed")


def test_append_then_generate_equals_one_shot(client, reference):
    tokenizer = reference.tokenizer
    session_id = create_session(client)
    appended = client.post(f"/v1/sessions/{session_id}/append", json={"text": PROMPT_1})
    assert appended.status_code == 200, appended.text
    body = appended.json()
    assert body["object"] == "append"
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(PROMPT_1))
    assert body["usage"]["completion_tokens"] == 0
    assert body["session_tokens"] == len(tokenizer.encode(PROMPT_1))

    result = generate(client, session_id, PROMPT_2, 8)
    history = tokenizer.encode(PROMPT_1) + tokenizer.encode(PROMPT_2)
    assert result["text"] == tokenizer.decode(greedy_tokens(reference, history, 8))
    assert_error(client.post(f"/v1/sessions/{session_id}/append", json={"text": ""}), 400, param="text")


def test_empty_prompt_continues_session(client, reference):
    tokenizer = reference.tokenizer
    session_id = create_session(client)
    first = generate(client, session_id, PROMPT_1, 5)
    second = generate(client, session_id, "", 5)
    expected = greedy_tokens(reference, tokenizer.encode(PROMPT_1), 10)
    assert first["text"] + second["text"] == tokenizer.decode(expected)


# --- memory export, import, reset ---------------------------------------------------------------


def test_export_import_continues_identically(client):
    source = create_session(client)
    generate(client, source, PROMPT_1, 7)
    exported = client.get(f"/v1/sessions/{source}/memory")
    assert exported.status_code == 200, exported.text
    assert exported.headers["content-type"] == "application/octet-stream"
    assert int(exported.headers["x-session-tokens"]) == client.get(f"/v1/sessions/{source}").json()["tokens"]

    target = create_session(client)
    imported = client.put(f"/v1/sessions/{target}/memory", content=exported.content,
                          headers={"Content-Type": "application/octet-stream"})
    assert imported.status_code == 200, imported.text
    assert imported.json()["tokens"] == int(exported.headers["x-session-tokens"])
    assert imported.json()["state_bytes"] == len(exported.content)
    assert imported.json()["version"] == 2

    from_source = generate(client, source, PROMPT_2, 10)
    from_target = generate(client, target, PROMPT_2, 10)
    assert from_target["text"] == from_source["text"]
    assert from_target["session_tokens"] == from_source["session_tokens"]


def test_export_of_fresh_session(client):
    session_id = create_session(client)
    exported = client.get(f"/v1/sessions/{session_id}/memory")
    assert exported.status_code == 200
    assert exported.headers["x-session-tokens"] == "0"
    assert len(exported.content) > 0
    other = create_session(client)
    imported = client.put(f"/v1/sessions/{other}/memory", content=exported.content)
    assert imported.status_code == 200, imported.text
    assert imported.json()["tokens"] == 0


def test_import_rejects_bad_states(client):
    source = create_session(client)
    generate(client, source, PROMPT_1, 4)
    good = client.get(f"/v1/sessions/{source}/memory").content
    target = create_session(client)
    generate(client, target, "Some other text", 3)
    before = client.get(f"/v1/sessions/{target}").json()
    before_state = client.get(f"/v1/sessions/{target}/memory").content

    torch.manual_seed(1)
    other_model = MACModel(MACConfig.from_name("tiny").replace(vocab_size=300))
    other_model.fingerprint = "f" * 64
    foreign = other_model.new_state(1).to_bytes()

    cases = [
        (b"", "invalid_state"),
        (b"definitely not a state file", "invalid_state"),
        (good[: len(good) // 2], "invalid_state"),
        (foreign, "state_model_mismatch"),
    ]
    for data, code in cases:
        response = client.put(f"/v1/sessions/{target}/memory", content=data)
        assert_error(response, 400, code)
    assert_error(client.put(f"/v1/sessions/{target}/memory", content=b"\0" * 1_100_000), 413)

    after = client.get(f"/v1/sessions/{target}").json()
    assert after["version"] == before["version"]
    assert after["tokens"] == before["tokens"]
    assert client.get(f"/v1/sessions/{target}/memory").content == before_state


def test_reset_memory(client, reference):
    tokenizer = reference.tokenizer
    session_id = create_session(client)
    generate(client, session_id, PROMPT_1, 5)
    reset = client.post(f"/v1/sessions/{session_id}/memory/reset")
    assert reset.status_code == 200, reset.text
    assert reset.json()["tokens"] == 0
    assert reset.json()["state_bytes"] == 0
    assert reset.json()["version"] == 3
    result = generate(client, session_id, PROMPT_2, 6)
    assert result["text"] == tokenizer.decode(greedy_tokens(reference, tokenizer.encode(PROMPT_2), 6))


# --- concurrency and disconnects -------------------------------------------------------------------


async def test_simultaneous_requests_one_conflict(main_server):
    with main_server.client() as client:
        session_id = create_session(client)
    body = {"prompt": PROMPT_1, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    async with main_server.async_client() as client:
        responses = await asyncio.gather(*(client.post(f"/v1/sessions/{session_id}/generate", json=body)
                                           for _ in range(2)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 409], [response.text for response in responses]
    busy = next(response for response in responses if response.status_code == 409)
    assert_error(busy, 409, "session_busy")
    assert int(busy.headers["retry-after"]) >= 1
    with main_server.client() as client:
        assert client.get(f"/v1/sessions/{session_id}").json()["version"] == 2


def test_busy_session_rejects_memory_operations(main_server):
    with main_server.client() as client, main_server.client() as other:
        session_id = create_session(client)
        body = {"prompt": "Hi", "max_tokens": LONG_GENERATION, "ignore_eos": True, "stream": True}
        with client.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
            assert response.status_code == 200
            # Keep the iterator referenced: closing it would close the stream.
            lines = response.iter_lines()
            next(lines)
            assert_error(other.post(f"/v1/sessions/{session_id}/memory/reset"), 409, "session_busy")
            assert_error(other.delete(f"/v1/sessions/{session_id}"), 409, "session_busy")
            assert_error(other.post(f"/v1/sessions/{session_id}/generate", json={"prompt": "x", "stream": True}),
                         409, "session_busy")
            assert next(lines) is not None


def test_disconnect_cancels_generation(main_server, reference):
    tokenizer = reference.tokenizer
    with main_server.client() as client:
        session_id = create_session(client)
        body = {"prompt": PROMPT_1, "max_tokens": LONG_GENERATION, "temperature": 0, "ignore_eos": True,
                "stream": True}
        received = 0
        with client.stream("POST", f"/v1/sessions/{session_id}/generate", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received += 1
                if received == 3:
                    break
        # Leaving the block closed the connection mid-stream.
        assert wait_for_metric(client, "titans_active_streams", 0.0) == 0.0
        assert wait_for_metric(client, "titans_running_batch_size", 0.0) == 0.0

        info = client.get(f"/v1/sessions/{session_id}").json()
        prompt_tokens = len(tokenizer.encode(PROMPT_1))
        generated = info["tokens"] - prompt_tokens
        assert info["version"] == 2
        assert 3 <= generated < LONG_GENERATION

        # The session absorbed the prompt and the tokens generated before the cancel, and
        # it continues from there.
        result = generate(client, session_id, PROMPT_2, 6)
        history = tokenizer.encode(PROMPT_1) + greedy_tokens(reference, tokenizer.encode(PROMPT_1), generated)
        history += tokenizer.encode(PROMPT_2)
        assert result["text"] == tokenizer.decode(greedy_tokens(reference, history, 6))


# --- auth, request ids, CORS --------------------------------------------------------------------------


def test_auth_required_except_probes(main_server):
    with httpx.Client(base_url=main_server.url) as anonymous:
        for path in ("/v1/sessions", "/v1/models", "/metrics", "/docs", "/openapi.json"):
            response = anonymous.get(path)
            assert_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        for header in ("Bearer wrong-key", f"Basic {KEY_A}", "Bearer", KEY_A):
            assert_error(anonymous.get("/v1/sessions", headers={"Authorization": header}), 401)
        assert anonymous.get("/v1/sessions", headers={"Authorization": f"bearer {KEY_A}"}).status_code == 200


def test_sessions_isolated_between_keys(main_server):
    with main_server.client(KEY_A) as owner, main_server.client(KEY_B) as stranger:
        session_id = create_session(owner)
        generate(owner, session_id, "Hi", 2)
        missing = assert_error(stranger.get("/v1/sessions/never-created-x"), 404)
        hidden = assert_error(stranger.get(f"/v1/sessions/{session_id}"), 404)
        assert hidden["message"] == missing["message"].replace("never-created-x", session_id)
        for method, path, body in (("POST", f"/v1/sessions/{session_id}/generate", {"prompt": "x"}),
                                   ("POST", f"/v1/sessions/{session_id}/append", {"text": "x"}),
                                   ("POST", f"/v1/sessions/{session_id}/fork", None),
                                   ("DELETE", f"/v1/sessions/{session_id}", None),
                                   ("GET", f"/v1/sessions/{session_id}/memory", None),
                                   ("POST", f"/v1/sessions/{session_id}/memory/reset", None),
                                   ("POST", "/v1/completions", {"prompt": "x", "session_id": session_id})):
            assert_error(stranger.request(method, path, json=body), 404, "session_not_found")
        assert session_id not in [item["id"] for item in stranger.get("/v1/sessions").json()["data"]]
        # The owner's session is untouched.
        assert owner.get(f"/v1/sessions/{session_id}").json()["version"] == 2


def test_request_id_echoed_or_generated(client, main_server):
    response = client.get("/v1/models", headers={"X-Request-Id": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"
    generated = client.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    rejected = client.get("/v1/models", headers={"X-Request-Id": "bad id with spaces"})
    assert rejected.headers["x-request-id"] != "bad id with spaces"

    session_id = create_session(client)
    client.post(f"/v1/sessions/{session_id}/generate", json={"prompt": "x", "max_tokens": 2},
                headers={"X-Request-Id": "trace-gen-1"})
    lines = [line for line in main_server.log_text().splitlines() if "request=trace-gen-1" in line]
    assert any(f"session={session_id}" in line and "POST" in line for line in lines), lines
    assert KEY_A not in main_server.log_text()


def test_cors_preflight(main_server):
    with httpx.Client(base_url=main_server.url) as anonymous:
        allowed = anonymous.options("/v1/sessions", headers={"Origin": "http://app.example",
                                                             "Access-Control-Request-Method": "POST"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://app.example"
        denied = anonymous.options("/v1/sessions", headers={"Origin": "http://other.example",
                                                            "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in denied.headers


def test_state_metric_counts_commits(client):
    before = metric(scrape(client), "titans_state_size_bytes_count")
    session_id = create_session(client)
    generate(client, session_id, "Hi", 2)
    after = metric(scrape(client), "titans_state_size_bytes_count")
    assert after == before + 1
