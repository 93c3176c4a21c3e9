"""OpenAI-compatible API through the official `openai` package and raw SSE, against a real server."""

from __future__ import annotations

import openai
import pytest
from httpx_sse import connect_sse

from server_fixtures import (  # noqa: F401  (fixtures are registered by import)
    KEY_A,
    KEY_B,
    LONG_GENERATION,
    assert_error,
    create_session,
    greedy_tokens,
    main_server,
    reference,
    tiny_checkpoint,
)
from titans.server.chat_template import CHAT_STOP, render_chat

PROMPT = "KING HENRY:\nOnce more unto the breach, dear friends"
MODEL = "tiny-checkpoint"


@pytest.fixture
def oai(main_server):
    with openai.OpenAI(base_url=main_server.url + "/v1", api_key=KEY_A, max_retries=0) as client:
        yield client


@pytest.fixture
def client(main_server):
    with main_server.client(KEY_A) as client:
        yield client


def test_models(oai):
    models = oai.models.list().data
    assert [model.id for model in models] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_completion(oai, reference):
    completion = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
    tokens = reference.tokenizer.encode(PROMPT)
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1
    assert completion.choices[0].text == reference.tokenizer.decode(greedy_tokens(reference, tokens, 10))
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == len(tokens)
    assert completion.usage.completion_tokens == 10
    assert completion.usage.total_tokens == len(tokens) + 10
    assert completion.model == MODEL


def test_completion_default_max_tokens_is_16(oai):
    completion = oai.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16


def test_completion_stream_matches_non_stream(oai):
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}))
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    assert all(chunk.usage is None for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1


def test_completion_stream_include_usage(oai):
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completion_seed_and_stop(oai):
    runs = [oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1.0, top_p=0.95, seed=7,
                                   extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]
    stop = runs[0][5:8]
    stopped = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1.0, top_p=0.95, seed=7,
                                     stop=[stop], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == runs[0][:runs[0].index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completion_token_prompt_and_echo(oai, reference):
    tokens = reference.tokenizer.encode(PROMPT)
    by_text = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    by_tokens = oai.completions.create(model=MODEL, prompt=tokens, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_tokens.choices[0].text == by_text.choices[0].text
    echoed = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + by_text.choices[0].text


def test_chat_completion_uses_template(oai, client, reference):
    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who goes there?"}]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    rendered = render_chat([(m["role"], m["content"]) for m in messages])
    assert rendered == "system: Speak verse.\nuser: Who goes there?\nassistant:"
    tokens = reference.tokenizer.encode(rendered)
    assert chat.usage.prompt_tokens == len(tokens)

    # Same as a plain completion of the rendered prompt with the chat stop string.
    plain = oai.completions.create(model=MODEL, prompt=rendered, max_tokens=10, temperature=0, stop=[CHAT_STOP],
                                   extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_stream(oai):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Good "}, {"type": "text", "text": "morrow"}]}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:-1])
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == whole.choices[0].message.content
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finish[-1] == "length"
    assert all(reason is None for reason in finish[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_on_session_by_header_and_field(oai, client, reference):
    tokenizer = reference.tokenizer
    session_id = create_session(client)
    turn_1 = [{"role": "user", "content": "Hail!"}]
    turn_2 = [{"role": "user", "content": "Speak again."}]
    first = oai.chat.completions.create(model=MODEL, messages=turn_1, max_tokens=6, temperature=0,
                                        extra_headers={"X-Session-Id": session_id},
                                        extra_body={"ignore_eos": True})
    second = oai.chat.completions.create(model=MODEL, messages=turn_2, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True, "session_id": session_id})

    history = tokenizer.encode(render_chat([("user", "Hail!")]))
    history += greedy_tokens(reference, history, 6)
    history += tokenizer.encode(render_chat([("user", "Speak again.")], continuation=True))
    assert second.choices[0].message.content == tokenizer.decode(greedy_tokens(reference, history, 6))
    assert first.usage.completion_tokens == 6
    assert client.get(f"/v1/sessions/{session_id}").json()["tokens"] == len(history) + 6


def test_request_without_session_discards_memory(oai):
    runs = [oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_openai_errors(oai, main_server):
    cases = [
        (dict(n=2), "n"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(logprobs=2), "logprobs"),
        (dict(temperature=3), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=25000), "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ]
    for options, param in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as raised:
                oai.completions.create(model=MODEL, prompt=PROMPT, stream=stream, **options)
            assert raised.value.body["param"] == param, (options, raised.value.body)

    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=MODEL, prompt=PROMPT, stream_options={"include_usage": True})
    assert raised.value.body["param"] == "stream_options"

    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=MODEL, prompt=["one", "two"])
    assert raised.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=MODEL, prompt=[5, 300])
    assert "0..299" in raised.value.body["message"]

    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model="gpt-4", prompt=PROMPT)
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model=MODEL, prompt=PROMPT, extra_headers={"X-Session-Id": "no-such-session"})
    assert raised.value.body["code"] == "session_not_found"

    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[])

    with pytest.raises(openai.AuthenticationError):
        with openai.OpenAI(base_url=main_server.url + "/v1", api_key="wrong", max_retries=0) as stranger:
            stranger.models.list()


def test_session_header_and_field_must_agree(client):
    first = create_session(client)
    second = create_session(client)
    response = client.post("/v1/completions", json={"prompt": "x", "session_id": second},
                           headers={"X-Session-Id": first})
    assert_error(response, 400, param="session_id")


def test_other_key_cannot_use_session(main_server):
    with main_server.client(KEY_A) as owner:
        session_id = create_session(owner)
    with openai.OpenAI(base_url=main_server.url + "/v1", api_key=KEY_B, max_retries=0) as stranger:
        with pytest.raises(openai.NotFoundError):
            stranger.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                             extra_headers={"X-Session-Id": session_id})


def test_raw_sse_framing(client):
    """Frames parsed by httpx-sse are JSON chunks and then [DONE], with headers that disable buffering."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with connect_sse(client, "POST", "/v1/completions", json=body) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["x-accel-buffering"] == "no"
        events = list(source.iter_sse())
    assert events[-1].data == "[DONE]"
    assert all(event.event == "message" for event in events)
    payloads = [event.json() for event in events[:-1]]
    assert [payload["choices"][0]["finish_reason"] for payload in payloads[:-1]][-1] == "length"
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["completion_tokens"] == 4
    assert all("usage" in payload for payload in payloads)


def test_stream_error_before_start_is_plain_json(client):
    response = client.post("/v1/chat/completions", json={"model": MODEL, "stream": True, "n": 3,
                                                          "messages": [{"role": "user", "content": "x"}]})
    assert response.headers["content-type"] == "application/json"
    assert_error(response, 400, "invalid_parameter", "n")


def test_busy_session_in_openai_stream(main_server):
    with main_server.client() as client, main_server.client() as other:
        session_id = create_session(client)
        body = {"prompt": "x", "max_tokens": LONG_GENERATION, "ignore_eos": True, "stream": True,
                "session_id": session_id}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(lines)
            busy = other.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "stream": True},
                              headers={"X-Session-Id": session_id})
            assert_error(busy, 409, "session_busy")
            assert busy.headers["retry-after"] == "1"
            assert next(lines) is not None


def test_docs_served(client):
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in ("/v1/sessions", "/v1/sessions/{session_id}/generate", "/v1/completions", "/v1/chat/completions",
                 "/v1/sessions/{session_id}/memory", "/v1/tokenize", "/readyz"):
        assert path in paths, path
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
