"""OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions.

The official `openai` Python package works against it with `base_url` set to the
server's `/v1`. A request runs on the session named by the X-Session-Id header or the
`session_id` field, or on a fresh memory that is discarded when neither is given.
Streams follow OpenAI's chunk format and end with `data: [DONE]`, also after an error.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from titans.engine import Finished, TextDelta
from titans.session_store import SessionMeta

from ..chat_template import CHAT_ROLES, CHAT_STOP, render_chat
from ..deps import OwnerDep, RuntimeDep, load_owned_session
from ..errors import APIError, invalid_parameter, to_api_error
from ..generation import (
    Generation,
    build_sampling,
    check_prompt_length,
    encode_prompt,
    normalize_stop,
    resolve_max_tokens,
    start_generation,
)
from ..runtime import Runtime
from ..schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    UsageInfo,
)
from ..sse import DONE_FRAME, EventStreamResponse, data_frame

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])

# OpenAI's default max_tokens of /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# OpenAI has no finish reason for a request cut short by a server shutdown. "length" lets
# the client see that the text is incomplete.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "length"}

SessionHeader = Annotated[str | None, Header(alias="X-Session-Id", description="session to run on")]


def check_model(runtime: Runtime, model: str | None) -> None:
    if model is not None and model != runtime.model_name:
        raise APIError(404, f"model {model!r} not found; this server serves {runtime.model_name!r}",
                       code="model_not_found", param="model")


def check_unsupported(body: SamplingRequest) -> None:
    """Reject OpenAI fields whose effect this server does not implement, and stream_options without stream."""
    if body.stream_options is not None and not body.stream:
        raise invalid_parameter("stream_options", "stream_options is only allowed with stream: true")
    if body.n != 1:
        raise invalid_parameter("n", f"n must be 1, got {body.n}: one choice per request is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise invalid_parameter(name, f"{name} is not supported (got {getattr(body, name)}); "
                                          "use repetition_penalty")
    if body.logit_bias:
        raise invalid_parameter("logit_bias", "logit_bias is not supported")


async def resolve_session(runtime: Runtime, owner: str, header: str | None, field: str | None) -> SessionMeta | None:
    if header is not None and field is not None and header != field:
        raise invalid_parameter("session_id", f"the X-Session-Id header ({header!r}) and the session_id field "
                                              f"({field!r}) name different sessions")
    session_id = header if header is not None else field
    if session_id is None:
        return None
    return await load_owned_session(session_id, runtime, owner)


async def admit(runtime: Runtime, body: SamplingRequest, session: SessionMeta | None, prompt_tokens: list[int],
                max_tokens: int, extra_stop: list[str]) -> Generation:
    sampling = build_sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty, seed=body.seed)
    stop = normalize_stop(body.stop) + extra_stop
    return await start_generation(runtime, session=session, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                  sampling=sampling, stop=stop, stop_at_eos=not body.ignore_eos)


def usage_info(finished: Finished) -> UsageInfo:
    return UsageInfo(prompt_tokens=finished.usage.prompt_tokens, completion_tokens=finished.usage.completion_tokens,
                     total_tokens=finished.usage.total_tokens)


def fingerprint_of(runtime: Runtime) -> str:
    return "fp_" + runtime.checkpoint.fingerprint[:12]


async def openai_frames(generation: Generation, chunk: dict, include_usage: bool, first_deltas: list[dict],
                        to_delta, final_delta: dict) -> AsyncIterator[bytes]:
    """Yield OpenAI chunk frames: `first_deltas`, one per text delta, the finish chunk, usage, [DONE].

    `to_delta(text)` builds a choice's content for a text delta; `final_delta` is the
    content of the chunk that carries the finish reason.
    """
    def frame(choices: list[dict], usage: dict | None = None) -> bytes:
        body = {**chunk, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return data_frame(body)

    try:
        for delta in first_deltas:
            yield frame([{"index": 0, **delta, "logprobs": None, "finish_reason": None}])
        async for event in generation.events():
            if isinstance(event, TextDelta):
                if event.text:
                    yield frame([{"index": 0, **to_delta(event.text), "logprobs": None, "finish_reason": None}])
                continue
            reason = FINISH_REASONS.get(event.finish_reason, "stop")
            yield frame([{"index": 0, **final_delta, "logprobs": None, "finish_reason": reason}])
            if include_usage:
                yield frame([], usage_info(event).model_dump())
    except APIError as error:
        log.warning("stream of request %s ended with an error: %s", generation.request_id, error.message)
        yield data_frame(error.body())
    except Exception as exc:
        error = to_api_error(exc) or APIError(500, "internal server error; the server log has the details",
                                              code="internal_error")
        log.exception("stream of request %s failed", generation.request_id)
        yield data_frame(error.body())
    yield DONE_FRAME


def stream_response(runtime: Runtime, generation: Generation, frames: AsyncIterator[bytes]) -> Response:
    return EventStreamResponse(frames, keepalive_seconds=runtime.settings.keepalive_seconds,
                               metrics=runtime.metrics, on_close=generation.abandon)


@router.get("/models", response_model=ModelList, summary="List the served model")
async def list_models(runtime: RuntimeDep) -> ModelList:
    return ModelList(data=[ModelCard(id=runtime.model_name, created=int(runtime.started_at))])


@router.get("/models/{model}", response_model=ModelCard, summary="Describe the served model")
async def get_model(model: str, runtime: RuntimeDep) -> ModelCard:
    check_model(runtime, model)
    return ModelCard(id=runtime.model_name, created=int(runtime.started_at))


async def completion_prompt(runtime: Runtime, prompt: str | list) -> tuple[str, list[int]]:
    """Return the prompt's text and tokens; a list must hold one text or one list of token ids."""
    if isinstance(prompt, list):
        if not prompt:
            raise invalid_parameter("prompt", "prompt must not be an empty list")
        if all(isinstance(item, int) for item in prompt):
            tokens = list(prompt)
        elif len(prompt) == 1:
            prompt = prompt[0]
            tokens = None if isinstance(prompt, str) else list(prompt)
        else:
            raise invalid_parameter("prompt", f"prompt must hold one prompt, got {len(prompt)}: "
                                              "one choice per request is supported")
        if tokens is not None:
            vocab_size = runtime.tokenizer.vocab_size
            for index, token in enumerate(tokens):
                if not 0 <= token < vocab_size:
                    raise invalid_parameter("prompt", f"prompt token {index} must be in 0..{vocab_size - 1}, "
                                                      f"got {token}")
            check_prompt_length(runtime, tokens)
            return runtime.tokenizer.decode(tokens), tokens
    return prompt, await encode_prompt(runtime, prompt)


@router.post("/completions", response_model=CompletionResponse, summary="Complete a prompt (OpenAI-compatible)")
async def create_completion(body: CompletionRequest, request: Request, runtime: RuntimeDep, owner: OwnerDep,
                            session_header: SessionHeader = None) -> Response:
    check_model(runtime, body.model)
    check_unsupported(body)
    for name in ("suffix", "logprobs"):
        if getattr(body, name) is not None:
            raise invalid_parameter(name, f"{name} is not supported")
    if body.best_of not in (None, 1):
        raise invalid_parameter("best_of", f"best_of must be 1, got {body.best_of}")
    max_tokens = resolve_max_tokens(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, runtime)
    prompt_text, prompt_tokens = await completion_prompt(runtime, body.prompt)
    session = await resolve_session(runtime, owner, session_header, body.session_id)
    generation = await admit(runtime, body, session, prompt_tokens, max_tokens, [])

    completion_id = f"cmpl-{generation.request_id}"
    created = int(time.time())
    echo = prompt_text if body.echo else ""
    if body.stream:
        chunk = {"id": completion_id, "object": "text_completion", "created": created, "model": runtime.model_name,
                 "system_fingerprint": fingerprint_of(runtime)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = [{"text": echo}] if echo else []
        frames = openai_frames(generation, chunk, include_usage, first, lambda text: {"text": text}, {"text": ""})
        return stream_response(runtime, generation, frames)

    finished = await generation.result(request.receive)
    choice = CompletionChoice(text=echo + finished.text,
                              finish_reason=FINISH_REASONS.get(finished.finish_reason, "stop"))
    return CompletionResponse(id=completion_id, created=created, model=runtime.model_name,
                              system_fingerprint=fingerprint_of(runtime), choices=[choice],
                              usage=usage_info(finished))


def chat_messages(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    """Return (role, text) pairs; raise a 400 naming the message for an unknown role or non-text content."""
    messages = []
    for index, message in enumerate(body.messages):
        if message.role not in CHAT_ROLES:
            raise invalid_parameter(f"messages.{index}.role", f"messages[{index}].role must be one of "
                                                              f"{', '.join(CHAT_ROLES)}, got {message.role!r}")
        if isinstance(message.content, list):
            parts = []
            for part in message.content:
                if part.type != "text" or part.text is None:
                    raise invalid_parameter(f"messages.{index}.content", f"messages[{index}] has a content part "
                                            f"of type {part.type!r}; only 'text' parts are supported")
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = message.content or ""
        messages.append((message.role, content))
    return messages


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             summary="Continue a chat (OpenAI-compatible; the template is in titans.server.chat_template)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, runtime: RuntimeDep,
                                 owner: OwnerDep, session_header: SessionHeader = None) -> Response:
    check_model(runtime, body.model)
    check_unsupported(body)
    if body.logprobs or body.top_logprobs:
        raise invalid_parameter("logprobs", "logprobs are not supported")
    if body.tools:
        raise invalid_parameter("tools", "tools are not supported")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise invalid_parameter("response_format", "only response_format {'type': 'text'} is supported")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(requested, runtime.settings.default_max_tokens, runtime, param)
    messages = chat_messages(body)
    session = await resolve_session(runtime, owner, session_header, body.session_id)
    continuation = session is not None and session.tokens > 0
    prompt_tokens = await encode_prompt(runtime, render_chat(messages, continuation), param="messages")
    generation = await admit(runtime, body, session, prompt_tokens, max_tokens, [CHAT_STOP])

    completion_id = f"chatcmpl-{generation.request_id}"
    created = int(time.time())
    if body.stream:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                 "model": runtime.model_name, "system_fingerprint": fingerprint_of(runtime)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = [{"delta": {"role": "assistant", "content": ""}}]
        frames = openai_frames(generation, chunk, include_usage, first, lambda text: {"delta": {"content": text}},
                               {"delta": {}})
        return stream_response(runtime, generation, frames)

    finished = await generation.result(request.receive)
    choice = ChatChoice(message=AssistantMessage(content=finished.text),
                        finish_reason=FINISH_REASONS.get(finished.finish_reason, "stop"))
    return ChatCompletionResponse(id=completion_id, created=created, model=runtime.model_name,
                                  system_fingerprint=fingerprint_of(runtime), choices=[choice],
                                  usage=usage_info(finished))
