"""Data preparation: text files -> tokenizer.json + train.bin / val.bin token files + summary.json."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from titans.model.tokenizer import Tokenizer, iter_text_files

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


class DataError(ValueError):
    """Input that cannot be turned into training data."""


def _read_corpus(inputs: list[str]) -> tuple[bytes, list[dict]]:
    sources, parts = [], []
    for path in iter_text_files(inputs):
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
        sources.append({"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        parts.append(data)
    corpus = b"".join(parts)
    if not corpus.strip():
        raise DataError(f"the corpus is empty: {', '.join(inputs)} contain no text")
    return corpus, sources


def _split_point(corpus: bytes, val_fraction: float) -> int:
    """Start of the validation split: the last `val_fraction` of the bytes, moved forward to a
    UTF-8 character boundary."""
    cut = int(len(corpus) * (1.0 - val_fraction))
    while cut < len(corpus) and (corpus[cut] & 0xC0) == 0x80:
        cut += 1
    return cut


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def prepare(inputs: list[str], out_dir: str | Path, tokenizer_path: str | None = None,
            vocab_size: int = 2048, val_fraction: float = 0.1) -> dict:
    """Tokenise the inputs; train a tokenizer on the training split first when none is given."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    corpus, sources = _read_corpus(inputs)
    cut = _split_point(corpus, val_fraction)
    train_text = corpus[:cut].decode("utf-8")
    val_text = corpus[cut:].decode("utf-8")
    if not train_text or not val_text:
        raise DataError(f"the corpus ({len(corpus)} bytes) is too small to split into train and validation")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    else:
        log.info("training a byte-level BPE tokenizer with %d tokens", vocab_size)
        tokenizer = Tokenizer.train([train_text], vocab_size)
    tokenizer.save(out / "tokenizer.json")

    dtype = token_dtype(tokenizer.vocab_size)
    counts = {}
    for split, text in (("train", train_text), ("val", val_text)):
        ids = np.asarray(tokenizer.encode(text), dtype=dtype)
        ids.tofile(out / f"{split}.bin")
        counts[split] = len(ids)

    summary = {
        "sources": sources,
        "bytes": len(corpus),
        "train_bytes": len(corpus[:cut]),
        "val_bytes": len(corpus[cut:]),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "vocab_size": tokenizer.vocab_size,
        "token_dtype": dtype.name,
        "val_fraction": val_fraction,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


@dataclass
class TokenData:
    """Memory-mapped train and validation token files of a prepared data directory."""

    root: Path
    summary: dict
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer

    @classmethod
    def open(cls, root: str | Path) -> "TokenData":
        root = Path(root)
        for name in (SUMMARY_FILE, "train.bin", "val.bin", "tokenizer.json"):
            if not (root / name).is_file():
                raise DataError(f"data directory {root} is missing {name}; run `titans prepare` first")
        summary = json.loads((root / SUMMARY_FILE).read_text(encoding="utf-8"))
        dtype = np.dtype(summary["token_dtype"])
        train = np.memmap(root / "train.bin", dtype=dtype, mode="r")
        val = np.memmap(root / "val.bin", dtype=dtype, mode="r")
        return cls(root, summary, train, val, Tokenizer.from_file(root / "tokenizer.json"))

    def batch(self, split: str, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """Random windows of length + 1 tokens (inputs plus the next-token targets)."""
        tokens = self.train if split == "train" else self.val
        if len(tokens) <= length + 1:
            raise DataError(f"the {split} split has {len(tokens)} tokens, fewer than one sequence of {length + 1}")
        starts = torch.randint(0, len(tokens) - length - 1, (batch_size,), generator=generator)
        rows = [torch.from_numpy(tokens[s:s + length + 1].astype(np.int64)) for s in starts.tolist()]
        return torch.stack(rows)

    def windows(self, split: str, length: int, limit: int | None = None) -> torch.Tensor:
        """Consecutive non-overlapping windows of length + 1 tokens covering the split."""
        tokens = self.train if split == "train" else self.val
        count = (len(tokens) - 1) // length
        if limit is not None:
            count = min(count, limit)
        if count == 0:
            raise DataError(f"the {split} split has {len(tokens)} tokens, fewer than one window of {length + 1}")
        rows = [torch.from_numpy(tokens[i * length:i * length + length + 1].astype(np.int64))
                for i in range(count)]
        return torch.stack(rows)
