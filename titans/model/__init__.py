"""Titans MAC model core: config, model, session state, checkpoints, tokenizer, sampling."""

from .config import MACConfig
from .mac import MACModel
from .state import (
    LayerState,
    State,
    StateCorrupt,
    StateDTypeError,
    StateError,
    StateFormatError,
    StateModelMismatch,
    StateShapeError,
    StateValueError,
)

__all__ = [
    "MACConfig", "MACModel", "State", "LayerState", "StateError", "StateCorrupt",
    "StateFormatError", "StateModelMismatch", "StateShapeError", "StateDTypeError",
    "StateValueError",
]
