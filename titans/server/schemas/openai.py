"""Bodies of the OpenAI-compatible API: models, completions and chat completions.

Requests accept OpenAI's fields; unknown fields are ignored, as OpenAI clients send
optional ones freely. Fields this server cannot honour (n > 1, logprobs, penalties, tools)
are rejected with 400 by the routes. Extensions: `session_id` (or the X-Session-Id
header) picks a session, and `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`
work as in the native API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .native import MAX_SEED


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class SamplingRequest(OpenAIBody):
    model: str | None = Field(None, description="served model id (see /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="maximum tokens to generate")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, description="must be 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, description="must be 0; use repetition_penalty")
    frequency_penalty: float = Field(0.0, description="must be 0; use repetition_penalty")
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions of this server.
    session_id: str | None = Field(None, description="session to run on (or the X-Session-Id header); a fresh "
                                                     "memory that is discarded when omitted")
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, or token ids; a list must hold one prompt")
    echo: bool = Field(False, description="prepend the prompt to the returned text")
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class TextPart(OpenAIBody):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBody):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="maximum tokens to generate (preferred "
                                                                      "over max_tokens)")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "titans"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
