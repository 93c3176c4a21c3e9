"""Model configuration: one frozen dataclass, loaded from YAML or a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class MACConfig:
    """Shape and behaviour of a Titans MAC model (names follow the design notes)."""

    dim: int  # D, model width
    layers: int  # L, number of MAC blocks
    heads: int  # H, attention and memory heads; head width d = D / H
    vocab_size: int  # V
    segment_len: int  # C, attention window in tokens; RoPE positions run 0..C-1
    chunk_size: int  # b, memory update interval in tokens; divides segment_len
    persistent_tokens: int = 4  # N_p, learned key/value pairs per layer
    memory_depth: int = 2  # L_M, layers of each head's memory MLP
    memory_expansion: int = 2  # e, memory MLP hidden width is e * d
    memory_layers: tuple[int, ...] | None = None  # layer indices with a neural memory; None = all
    memory_max_lr: float = 1.0  # theta_max, upper bound of the data-dependent learning rate
    memory_max_momentum: float = 1.0  # eta_max, upper bound of the data-dependent momentum decay
    memory_max_forget: float = 1.0  # alpha_max, upper bound of the data-dependent forgetting gate
    memory_residual: bool = True  # M(k) = MLP(k) + k
    output_gate: bool = True  # gate the attention output with a memory read
    conv_width: int = 4  # kappa, width of the short causal convolutions
    ffn_dim: int | None = None  # SwiGLU hidden width; None = 8/3 * dim rounded up to 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.memory_layers is not None and not isinstance(self.memory_layers, tuple):
            object.__setattr__(self, "memory_layers", tuple(self.memory_layers))
        self._validate()

    def _validate(self) -> None:
        positive = ("dim", "layers", "heads", "vocab_size", "segment_len", "chunk_size",
                    "memory_depth", "memory_expansion", "conv_width")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.persistent_tokens, int) or self.persistent_tokens < 0:
            raise ValueError(f"persistent_tokens must be an integer >= 0, got {self.persistent_tokens!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={self.dim}, heads={self.heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"dim / heads must be even for rotary embeddings, got {self.dim // self.heads}")
        if self.segment_len % self.chunk_size:
            raise ValueError(
                f"chunk_size must divide segment_len, got chunk_size={self.chunk_size}, "
                f"segment_len={self.segment_len}")
        if not self.memory_max_lr > 0:
            raise ValueError(f"memory_max_lr must be > 0, got {self.memory_max_lr!r}")
        if not 0 < self.memory_max_momentum <= 1:
            raise ValueError(f"memory_max_momentum must be in (0, 1], got {self.memory_max_momentum!r}")
        if not 0 < self.memory_max_forget <= 1:
            raise ValueError(f"memory_max_forget must be in (0, 1], got {self.memory_max_forget!r}")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim must be a positive integer, got {self.ffn_dim!r}")
        for index in self.memory_layers or ():
            if not 0 <= index < self.layers:
                raise ValueError(
                    f"memory_layers entries must be in 0..{self.layers - 1}, got {index!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        return -(-(8 * self.dim // 3) // 64) * 64

    def has_memory(self, layer: int) -> bool:
        return self.memory_layers is None or layer in self.memory_layers

    # --- loading and saving ---

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MACConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MACConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must contain a mapping of field names to values")
        values.setdefault("name", path.stem)
        return cls.from_dict(values)

    @classmethod
    def from_json(cls, path: str | Path) -> "MACConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_name(cls, name: str) -> "MACConfig":
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ValueError(f"unknown config name {name!r}; available: {names}")
        return cls.from_yaml(path)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "MACConfig":
        """Load a named config ('small') or a YAML/JSON file."""
        text = str(name_or_path)
        if text.endswith(".json"):
            return cls.from_json(text)
        if text.endswith((".yaml", ".yml")) or Path(text).is_file():
            return cls.from_yaml(text)
        return cls.from_name(text)

    def replace(self, **changes: Any) -> "MACConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.memory_layers is not None:
            values["memory_layers"] = list(self.memory_layers)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
