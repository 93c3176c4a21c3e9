"""Server settings: one pydantic-settings class read from `TITANS_*` environment variables.

`titans serve` builds one flag per field (`--max-batch-size` for `max_batch_size`), and a
flag given on the command line overrides the environment variable.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from titans.cli import DEFAULT_CHECKPOINT

MIB = 2**20

CommaSeparated = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every setting of the HTTP server, with its default."""

    model_config = SettingsConfigDict(env_prefix="TITANS_", extra="forbid", frozen=True)

    # --- network and model ---
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free port)")
    workers: int = Field(1, ge=1, description="worker processes; more than 1 needs a Redis or SQLite store")
    checkpoint: str = Field(DEFAULT_CHECKPOINT, description="serving checkpoint directory")
    device: str = Field("auto", description="auto, cpu or cuda (auto picks CUDA when present)")
    model_name: str = Field("", description="model id reported by /v1/models; empty means the "
                                             "checkpoint's directory name")

    # --- session store ---
    store_url: str = Field("memory://", description="session store: memory://, sqlite:///path.db, "
                                                     "redis://host:port/db, rediss:// (TLS) or unix:///socket")
    store_prefix: str = Field("titans", description="key prefix in Redis, so deployments can share one Redis")
    session_ttl_seconds: float = Field(86400.0, gt=0, description="idle time in seconds after which a "
                                                                  "session expires")
    max_state_bytes: int = Field(64 * MIB, gt=0, description="maximum size in bytes of one stored session state")
    max_sessions_per_owner: int = Field(1000, gt=0, description="maximum sessions per API key")
    memory_store_budget_bytes: int = Field(2**30, gt=0, description="bytes the memory store keeps before it "
                                                                    "evicts the least recently used sessions")
    store_timeout_seconds: float = Field(5.0, gt=0, description="timeout in seconds of one store operation")

    # --- access ---
    api_keys: CommaSeparated = Field(default_factory=list, repr=False,
                                     description="comma-separated API keys; when set, every route except "
                                                 "/healthz and /readyz needs 'Authorization: Bearer KEY'")
    cors_origins: CommaSeparated = Field(default_factory=list, description="comma-separated origins allowed by "
                                                                           "CORS, or * for any; empty allows none")

    # --- request limits ---
    max_prompt_tokens: int = Field(65536, gt=0, description="maximum tokens in one prompt or append")
    max_max_tokens: int = Field(4096, gt=0, description="maximum value of max_tokens in a request")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens of a native or chat request that omits "
                                                           "it (/v1/completions defaults to 16, as OpenAI does)")
    max_body_bytes: int = Field(4 * MIB, gt=0, description="maximum request body size in bytes")
    max_state_upload_bytes: int = Field(64 * MIB, gt=0, description="maximum body size in bytes of a memory "
                                                                     "import (PUT /v1/sessions/{id}/memory)")
    request_timeout_seconds: float = Field(600.0, gt=0, description="maximum time in seconds of one "
                                                                    "generation, queueing included")

    # --- engine ---
    max_batch_size: int = Field(32, ge=1, description="sessions decoded together in one forward pass")
    max_queued_requests: int = Field(64, ge=1, description="requests waiting for a batch slot before new ones "
                                                           "get 429")
    prefill_chunk_tokens: int = Field(256, ge=1, description="prompt tokens prefilled per engine step, shared "
                                                             "by all prompts being prefilled")
    lease_ttl_seconds: float = Field(30.0, gt=0, description="lifetime in seconds of a session lease, renewed "
                                                             "while a request runs")
    retry_after_seconds: float = Field(1.0, gt=0, description="Retry-After value in seconds sent with 409 and "
                                                              "429 responses")

    # --- process ---
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="time in seconds that running requests get "
                                                                  "to finish after SIGTERM")
    keepalive_seconds: float = Field(15.0, gt=0, description="interval in seconds of SSE keep-alive comments "
                                                             "while no token arrives")
    log_level: str = Field("info", description="logging level: debug, info, warning or error")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"must be debug, info, warning, error or critical, got {value!r}")
        return value.lower()

    @field_validator("store_url")
    @classmethod
    def _check_store_scheme(cls, value: str) -> str:
        from titans.session_store import ACCEPTED_SCHEMES

        if value and not value.lower().startswith(ACCEPTED_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(ACCEPTED_SCHEMES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> "Settings":
        if self.workers > 1 and self.store_url.lower().startswith("memory://"):
            raise ValueError(f"workers={self.workers} needs a shared session store: with memory:// every "
                             "worker would keep its own sessions; use a Redis or SQLite store_url")
        if self.default_max_tokens > self.max_max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                             f"max_max_tokens ({self.max_max_tokens})")
        return self


def settings_to_environment(settings: Settings) -> dict[str, str]:
    """Return `TITANS_*` variables that recreate `settings` in another process (a uvicorn worker)."""
    environment = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, list):
            value = ",".join(value)
        environment[f"TITANS_{name.upper()}"] = str(value)
    return environment
