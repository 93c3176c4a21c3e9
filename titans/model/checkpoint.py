"""Serving checkpoints: a directory with config.json, model.safetensors and tokenizer.json."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import MACConfig
from .mac import MACModel
from .tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing a file or whose files disagree."""


@dataclass
class Checkpoint:
    model: MACModel
    tokenizer: Tokenizer
    path: Path

    @property
    def config(self) -> MACConfig:
        return self.model.config

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def name(self) -> str:
        return self.path.name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    return device


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: MACModel, tokenizer: Tokenizer, out_dir: str | Path,
                    dtype: str = "float32") -> Path:
    """Write the serving format; returns the directory. The fingerprint becomes the weights' hash."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "dtype": dtype})
    (out / CONFIG_FILE).write_text(model.config.to_json() + "\n", encoding="utf-8")
    tokenizer.save(out / TOKENIZER_FILE)
    model.fingerprint = file_sha256(out / WEIGHTS_FILE)
    return out


def load_checkpoint(path: str | Path, device: str | torch.device = "auto",
                    dtype: str | None = None) -> Checkpoint:
    """Load a serving checkpoint; raises CheckpointError naming the missing or mismatched file."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (root / name).is_file():
            raise CheckpointError(f"checkpoint {root} is missing {name}")

    try:
        config = MACConfig.from_json(root / CONFIG_FILE)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"invalid {root / CONFIG_FILE}: {exc}") from None
    tokenizer = Tokenizer.from_file(root / TOKENIZER_FILE)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but {CONFIG_FILE} sets "
            f"vocab_size={config.vocab_size}")

    try:
        tensors = load_file(str(root / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {root / WEIGHTS_FILE}: {exc}") from None
    model = MACModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{WEIGHTS_FILE} tensor {key} has shape {list(value.shape)}, config expects "
                f"{list(expected[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})

    target = resolve_device(device)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        model = model.to(DTYPES[dtype])
    model = model.to(target).eval()
    model.fingerprint = file_sha256(root / WEIGHTS_FILE)
    return Checkpoint(model=model, tokenizer=tokenizer, path=root)
