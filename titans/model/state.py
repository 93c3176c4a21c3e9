"""The state a session carries between requests, and its byte format.

In memory a `State` holds a batch of sessions in fixed-size buffers, so sessions at
different positions decode together. On the wire a state holds one session: a
safetensors file whose metadata is a small JSON header, with the segment and chunk
buffers cut to the positions filled so far. Loading never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

if TYPE_CHECKING:
    from .mac import MACModel

STATE_FORMAT = "titans-mac-state"
STATE_FORMAT_VERSION = 1


class StateError(ValueError):
    """Bytes that cannot become a state of this model."""


class StateCorrupt(StateError):
    """Truncated or unparsable bytes."""


class StateFormatError(StateError):
    """Not a state file, or a format version this code does not read."""


class StateModelMismatch(StateError):
    """A state written by another model (fingerprint differs)."""


class StateShapeError(StateError):
    """A missing, extra or wrongly shaped tensor."""


class StateDTypeError(StateError):
    """A tensor with an unexpected dtype."""


class StateValueError(StateError):
    """Non-finite values, or header values out of range."""


@dataclass
class LayerState:
    """One layer's part of a batched state. Buffers are (B, H, slots, d) unless noted."""

    k_tok: torch.Tensor  # token keys of the current segment, after RoPE, (B, H, C, d)
    v_tok: torch.Tensor
    k_ret: torch.Tensor | None = None  # retrieved-memory keys of the current segment, after RoPE
    v_ret: torch.Tensor | None = None
    weights: list[torch.Tensor] | None = None  # memory weights W^(c) per MLP layer, (B, H, out, in)
    momentum: list[torch.Tensor] | None = None  # momentum S, same shapes
    conv_q: torch.Tensor | None = None  # last conv_width - 1 conv inputs, (B, conv_width - 1, D)
    conv_k: torch.Tensor | None = None
    conv_v: torch.Tensor | None = None
    chunk_k: torch.Tensor | None = None  # write inputs of the current chunk, (B, H, b, d)
    chunk_v: torch.Tensor | None = None
    chunk_gates: torch.Tensor | None = None  # theta, eta, alpha, (B, H, b, 3)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors (memory weights flattened to weights.j / momentum.j)."""
        out: dict[str, torch.Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                out.update({f"{f.name}.{j}": t for j, t in enumerate(value)})
            elif value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LayerState":
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name in tensors:
                values[f.name] = tensors[f.name]
            else:
                listed = sorted((int(k.split(".")[1]), t) for k, t in tensors.items()
                                if k.startswith(f.name + "."))
                if listed:
                    values[f.name] = [t for _, t in listed]
        return cls(**values)  # type: ignore[arg-type]


# Buffers whose filled length is the in-segment offset, and those filled to the in-chunk offset.
SEGMENT_BUFFERS = ("k_tok", "v_tok", "k_ret", "v_ret")
CHUNK_BUFFERS = ("chunk_k", "chunk_v", "chunk_gates")


@dataclass
class State:
    """A batch of session states for one model; `feed` updates it in place."""

    layers: list[LayerState]
    consumed: list[int]  # tokens fed so far, per session
    pending: list[list[int]] = field(default_factory=list)  # sampled tokens not fed yet, per session
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.pending:
            self.pending = [[] for _ in self.consumed]

    @property
    def batch_size(self) -> int:
        return len(self.consumed)

    def _map(self, fn) -> list[LayerState]:
        return [LayerState.from_tensors({k: fn(t) for k, t in layer.tensors().items()})
                for layer in self.layers]

    def clone(self) -> "State":
        return State(self._map(lambda t: t.clone()), list(self.consumed),
                     [list(p) for p in self.pending], self.fingerprint)

    def to(self, device: torch.device | str) -> "State":
        return State(self._map(lambda t: t.to(device)), list(self.consumed),
                     [list(p) for p in self.pending], self.fingerprint)

    def split(self) -> list["State"]:
        """Split into one state per session, each with batch size 1 (copies, not views)."""
        return [
            State(self._map(lambda t, i=i: t[i:i + 1].clone()), [self.consumed[i]],
                  [list(self.pending[i])], self.fingerprint)
            for i in range(self.batch_size)
        ]

    @staticmethod
    def stack(states: list["State"]) -> "State":
        """Join states of one model (any batch sizes) into one batch."""
        if not states:
            raise ValueError("stack needs at least one state")
        fingerprints = {s.fingerprint for s in states}
        if len(fingerprints) > 1:
            raise StateModelMismatch(f"cannot stack states of different models: {sorted(fingerprints)}")
        names = [layer.tensors().keys() for layer in states[0].layers]
        layers = []
        for index, keys in enumerate(names):
            parts = [s.layers[index].tensors() for s in states]
            layers.append(LayerState.from_tensors({k: torch.cat([p[k] for p in parts]) for k in keys}))
        consumed = [c for s in states for c in s.consumed]
        pending = [list(p) for s in states for p in s.pending]
        return State(layers, consumed, pending, states[0].fingerprint)

    # --- bytes ---

    def to_bytes(self) -> bytes:
        """Serialise a single-session state (batch size 1)."""
        if self.batch_size != 1:
            raise ValueError(f"to_bytes serialises one session; split() a batch of {self.batch_size} first")
        consumed = self.consumed[0]
        tensors: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            seg_len = consumed % layer.k_tok.shape[2]
            chunk_len = consumed % layer.chunk_k.shape[2] if layer.chunk_k is not None else 0
            for name, tensor in layer.tensors().items():
                t = tensor[0]
                if name in SEGMENT_BUFFERS:
                    t = t[:, :seg_len]
                elif name in CHUNK_BUFFERS:
                    t = t[:, :chunk_len]
                tensors[f"layers.{index}.{name}"] = t.detach().to("cpu").contiguous()
        header = {
            "format": STATE_FORMAT,
            "format_version": str(STATE_FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "consumed": str(consumed),
            "pending": json.dumps(self.pending[0]),
        }
        return save_tensors(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes, model: "MACModel") -> "State":
        """Parse and validate one session's state for `model`; raises a StateError subclass."""
        header, tensors = _parse(data)
        if header.get("format") != STATE_FORMAT:
            raise StateFormatError(f"not a Titans MAC state file (format {header.get('format')!r})")
        if header.get("format_version") != str(STATE_FORMAT_VERSION):
            raise StateFormatError(
                f"state format version {header.get('format_version')!r} is not supported; "
                f"this server reads version {STATE_FORMAT_VERSION}")
        if header.get("fingerprint") != model.fingerprint:
            raise StateModelMismatch(
                f"state belongs to model {str(header.get('fingerprint'))[:16]!r}, "
                f"not the loaded model {model.fingerprint[:16]!r}")
        consumed, pending = _parse_counters(header, model.config.vocab_size)

        fresh = model.new_state(1, device="cpu")
        expected: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(fresh.layers):
            for name, tensor in layer.tensors().items():
                expected[f"layers.{index}.{name}"] = tensor
        _check_names(set(tensors), set(expected))

        seg_len = consumed % model.config.segment_len
        chunk_len = consumed % model.config.chunk_size
        for key, template in expected.items():
            name = key.split(".", 2)[2]
            shape = list(template.shape[1:])
            if name.split(".")[0] in SEGMENT_BUFFERS:
                shape[1] = seg_len
            elif name.split(".")[0] in CHUNK_BUFFERS:
                shape[1] = chunk_len
            tensor = tensors[key]
            if tensor.dtype != template.dtype:
                raise StateDTypeError(f"tensor {key} has dtype {tensor.dtype}, expected {template.dtype}")
            if list(tensor.shape) != shape:
                raise StateShapeError(f"tensor {key} has shape {list(tensor.shape)}, expected {shape}")
            if not torch.isfinite(tensor).all():
                raise StateValueError(f"tensor {key} contains NaN or infinite values")
            target = template[0]
            if name.split(".")[0] in SEGMENT_BUFFERS + CHUNK_BUFFERS:
                target[:, :shape[1]] = tensor
            else:
                target.copy_(tensor)

        fresh.consumed = [consumed]
        fresh.pending = [pending]
        device = next(model.parameters()).device
        return fresh.to(device) if device.type != "cpu" else fresh


def _parse(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateCorrupt(f"state data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise StateCorrupt(f"state data is truncated: {len(data)} bytes")
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StateCorrupt(f"state data is truncated or corrupt: {exc}") from None
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise StateCorrupt("state header is not valid JSON") from None
    return header, tensors


def _parse_counters(header: dict[str, str], vocab_size: int) -> tuple[int, list[int]]:
    try:
        consumed = int(header.get("consumed", ""))
        pending = json.loads(header.get("pending", "[]"))
    except ValueError:
        raise StateValueError("state header fields 'consumed' and 'pending' must be numbers") from None
    if consumed < 0:
        raise StateValueError(f"state header 'consumed' must be >= 0, got {consumed}")
    if not isinstance(pending, list) or not all(
            isinstance(t, int) and 0 <= t < vocab_size for t in pending):
        raise StateValueError(f"state header 'pending' must be a list of token ids below {vocab_size}")
    return consumed, pending


def _check_names(found: set[str], expected: set[str]) -> None:
    missing = sorted(expected - found)
    if missing:
        raise StateShapeError(f"state is missing tensors {missing[:5]} ({len(missing)} in all)")
    extra = sorted(found - expected)
    if extra:
        raise StateShapeError(f"state has unexpected tensors {extra[:5]} ({len(extra)} in all)")
