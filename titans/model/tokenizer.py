"""Byte-level BPE tokenizer (the `tokenizers` library), saved as tokenizer.json.

Every UTF-8 string round-trips exactly: the base vocabulary is the 256 bytes. `token_bytes`
gives the raw bytes of each token so that a stream can be decoded incrementally without
ever emitting half of a multi-byte character.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|pad|>"]


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-to-printable-character table that byte-level BPE uses (GPT-2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    def __init__(self, inner: HFTokenizer) -> None:
        # Text that spells a special token ("<|endoftext|>") is encoded as ordinary bytes, so any
        # string round-trips. The library does not save this setting in tokenizer.json.
        inner.encode_special_tokens = True
        self.inner = inner
        self.vocab_size = inner.get_vocab_size()
        eos = inner.token_to_id(END_OF_TEXT)
        if eos is None:
            raise ValueError(f"tokenizer has no {END_OF_TEXT!r} token")
        self.eos_id = eos
        decoder = _byte_decoder()
        self.special_ids = {inner.token_to_id(t) for t in SPECIAL_TOKENS if inner.token_to_id(t) is not None}
        table: list[bytes] = [b""] * self.vocab_size
        for token, index in inner.get_vocab().items():
            if index in self.special_ids:
                continue
            try:
                table[index] = bytes(decoder[ch] for ch in token)
            except KeyError:
                raise ValueError(f"tokenizer token {token!r} is not byte-level BPE") from None
        self._bytes = table

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"cannot read tokenizer {path}: {exc}") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train a byte-level BPE with `vocab_size` entries (256 bytes + 2 special tokens at least)."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size must be at least {minimum}, got {vocab_size}")
        inner = HFTokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=ByteLevel.alphabet(), show_progress=False)
        inner.train_from_iterator(texts, trainer=trainer)
        return cls(inner)

    def save(self, path: str | Path) -> None:
        self.inner.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; special tokens have none."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id must be in 0..{self.vocab_size - 1}, got {token_id}")
        return self._bytes[token_id]


def iter_text_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly, and every file under a named directory, in sorted order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"input not found: {path}")
