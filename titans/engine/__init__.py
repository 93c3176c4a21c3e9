"""Generation engine: continuous batching of many sessions over one model, with streaming text."""

from .engine import Engine, RequestStream
from .scheduler import EngineObserver
from .types import (
    EngineBusySession,
    EngineConfig,
    EngineError,
    EngineStopped,
    Finished,
    GenerateRequest,
    GenerationFailed,
    QueueFull,
    TextDelta,
    Usage,
)

__all__ = [
    "Engine", "RequestStream", "EngineObserver", "EngineConfig", "GenerateRequest", "TextDelta",
    "Finished", "Usage", "EngineError", "EngineBusySession", "EngineStopped", "GenerationFailed",
    "QueueFull",
]
