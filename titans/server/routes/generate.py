"""Native generation on a session: generate (JSON or Server-Sent Events) and append."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from titans.engine import Finished, TextDelta

from ..deps import RuntimeDep, SessionDep
from ..errors import APIError, to_api_error
from ..generation import (
    Generation,
    build_sampling,
    encode_prompt,
    normalize_stop,
    resolve_max_tokens,
    start_generation,
)
from ..schemas.native import (
    AppendBody,
    AppendResult,
    GenerateBody,
    GenerateDelta,
    GenerateResult,
    Usage,
)
from ..sse import EventStreamResponse, data_frame

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["generation"])

STREAM_DESCRIPTION = """With `stream: true` the response is `text/event-stream`: one `data:` frame per
text delta (`{"object": "generation.delta", "text", "token_ids"}`), then one frame with the
final result (the non-streaming body, whose `text` is the whole completion). A failure after
the stream started sends `{"error": {...}}` and ends the stream."""


def usage_of(finished: Finished) -> Usage:
    return Usage(prompt_tokens=finished.usage.prompt_tokens, completion_tokens=finished.usage.completion_tokens,
                 total_tokens=finished.usage.total_tokens)


def generate_result(generation: Generation, finished: Finished) -> GenerateResult:
    return GenerateResult(id=generation.request_id, session_id=generation.session_id, text=finished.text,
                          finish_reason=finished.finish_reason, usage=usage_of(finished),
                          session_tokens=finished.session_tokens, session_version=finished.session_version)


async def native_frames(generation: Generation) -> AsyncIterator[bytes]:
    try:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield data_frame(GenerateDelta(text=event.text, token_ids=event.token_ids).model_dump())
            else:
                yield data_frame(generate_result(generation, event).model_dump())
    except APIError as error:
        log.warning("stream of request %s ended with an error: %s", generation.request_id, error.message)
        yield data_frame(error.body())
    except Exception as exc:
        error = to_api_error(exc) or APIError(500, "internal server error; the server log has the details",
                                              code="internal_error")
        log.exception("stream of request %s failed", generation.request_id)
        yield data_frame(error.body())


@router.post("/{session_id}/generate", response_model=GenerateResult, description=STREAM_DESCRIPTION,
             summary="Feed a prompt into the session and generate a continuation")
async def generate(session: SessionDep, body: GenerateBody, request: Request, runtime: RuntimeDep) -> Response:
    settings = runtime.settings
    max_tokens = resolve_max_tokens(body.max_tokens, settings.default_max_tokens, runtime)
    sampling = build_sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty, seed=body.seed)
    stop = normalize_stop(body.stop)
    prompt_tokens = await encode_prompt(runtime, body.prompt)
    generation = await start_generation(runtime, session=session, prompt_tokens=prompt_tokens,
                                        max_tokens=max_tokens, sampling=sampling, stop=stop,
                                        stop_at_eos=not body.ignore_eos)
    if body.stream:
        return EventStreamResponse(native_frames(generation), keepalive_seconds=settings.keepalive_seconds,
                                   metrics=runtime.metrics, on_close=generation.abandon)
    finished = await generation.result(request.receive)
    return generate_result(generation, finished)


@router.post("/{session_id}/append", response_model=AppendResult,
             summary="Feed text into the session's memory without generating")
async def append(session: SessionDep, body: AppendBody, request: Request, runtime: RuntimeDep) -> AppendResult:
    prompt_tokens = await encode_prompt(runtime, body.text, param="text")
    generation = await start_generation(runtime, session=session, prompt_tokens=prompt_tokens, max_tokens=0,
                                        sampling=build_sampling(temperature=0.0, top_p=1.0), stop=[])
    finished = await generation.result(request.receive)
    return AppendResult(id=generation.request_id, session_id=session.id, usage=usage_of(finished),
                        session_tokens=finished.session_tokens, session_version=finished.session_version)
