"""Bodies of the native session API: sessions, generation, append, tokenizer utilities."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024
MAX_SEED = 2**63 - 1  # the largest signed 64-bit integer, which torch.Generator.manual_seed accepts


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ValueError(f"at most {MAX_METADATA_ENTRIES} entries are allowed, got {len(metadata)}")
    for key, value in metadata.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY_CHARS:
            raise ValueError(f"key {key[:40]!r} must have 1 to {MAX_METADATA_KEY_CHARS} characters")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"value of {key!r} must have at most {MAX_METADATA_VALUE_CHARS} characters, "
                             f"got {len(value)}")
    return metadata


# --- sessions ---


class SessionCreate(StrictBody):
    id: str | None = Field(None, description="session id to use (1-128 characters from A-Z, a-z, 0-9, _ and -); "
                                             "a random id when omitted")
    metadata: dict[str, str] = Field(default_factory=dict, description="free-form string labels")

    _check_metadata = field_validator("metadata")(check_metadata)


class SessionFork(StrictBody):
    id: str | None = Field(None, description="id of the new session; a random id when omitted")
    metadata: dict[str, str] | None = Field(None, description="labels of the new session; the source's when omitted")

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else check_metadata(value)


class SessionInfo(BaseModel):
    id: str
    object: Literal["session"] = "session"
    model: str = Field(description="served model id, or 'unknown' for a session stored by another model")
    model_fingerprint: str = Field(description="SHA-256 of the weights the session's memory belongs to")
    created_at: float = Field(description="unix time in seconds")
    updated_at: float = Field(description="unix time in seconds of the last change")
    tokens: int = Field(description="tokens the session's memory has absorbed")
    state_bytes: int = Field(description="size of the stored state; 0 while the memory is fresh")
    version: int = Field(description="incremented by every change of the state")
    metadata: dict[str, str]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


# --- generation ---


class SamplingFields(StrictBody):
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False,
                               description="softmax temperature, at most 100; 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling probability mass; 1 disables it")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens; 0 disables it")
    min_p: float = Field(0.0, ge=0, le=1, description="drop tokens below min_p times the top probability")
    repetition_penalty: float = Field(1.0, gt=0, description="penalty on tokens already seen; 1 disables it")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed that makes sampling reproducible")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the generation; the "
                                                           "text returned excludes them")
    ignore_eos: bool = Field(False, description="keep generating after the end-of-text token")


class GenerateBody(SamplingFields):
    prompt: str = Field(description="text fed into the session before generating; may be empty to continue "
                                    "a session that has absorbed tokens")
    max_tokens: int | None = Field(None, ge=1, description="maximum tokens to generate (default: the server's "
                                                           "default_max_tokens)")
    stream: bool = Field(False, description="stream text deltas as Server-Sent Events")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens fed from the prompt, plus the token left pending by the "
                                           "session's previous request")
    completion_tokens: int
    total_tokens: int


class GenerateResult(BaseModel):
    id: str = Field(description="request id")
    object: Literal["generation"] = "generation"
    session_id: str
    text: str
    finish_reason: str = Field(description="'stop' (end-of-text token or stop string), 'length' (max_tokens) "
                                           "or 'cancelled' (server shutdown)")
    usage: Usage
    session_tokens: int = Field(description="tokens the session's memory has absorbed after this request")
    session_version: int | None


class GenerateDelta(BaseModel):
    object: Literal["generation.delta"] = "generation.delta"
    text: str
    token_ids: list[int]


class AppendBody(StrictBody):
    text: str = Field(min_length=1, description="text to feed into the session's memory")


class AppendResult(BaseModel):
    id: str = Field(description="request id")
    object: Literal["append"] = "append"
    session_id: str
    usage: Usage
    session_tokens: int
    session_version: int | None


# --- tokenizer ---


class TokenizeBody(StrictBody):
    text: str


class TokenizeResult(BaseModel):
    tokens: list[int]
    count: int


class DetokenizeBody(StrictBody):
    tokens: list[int]


class DetokenizeResult(BaseModel):
    text: str
