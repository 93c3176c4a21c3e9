"""Incremental detokenizer: bytes of sampled tokens -> text deltas that are safe to send.

A delta never ends inside a multi-byte UTF-8 character (an incremental UTF-8 decoder
keeps the partial bytes), and never contains text that might be the start of a stop
string (a suffix of the text that is a prefix of any stop string is held back until the
next token decides it).
"""

from __future__ import annotations

import codecs

from titans.model.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded text so far, cut at a stop string once one is found
        self._sent = 0  # characters of _text already returned
        self._ids: list[int] = []  # tokens since the last returned delta
        self.stopped = False  # a stop string was found

    @property
    def text(self) -> str:
        """Text returned so far."""
        return self._text[:self._sent]

    def push(self, token_id: int) -> tuple[str, list[int]]:
        """Add one token; returns (text that is safe to send now, tokens since the last send)."""
        if self.stopped:
            raise RuntimeError("push after a stop string was found")
        self._ids.append(token_id)
        self._text += self._decoder.decode(self.tokenizer.token_bytes(token_id))

        end = self._find_stop()
        if end is not None:
            self._text = self._text[:end]
            self.stopped = True
            return self._take(end)
        return self._take(len(self._text) - self._held_back())

    def finish(self) -> tuple[str, list[int]]:
        """Flush what was held back (no more tokens will come)."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._take(len(self._text))

    def _find_stop(self) -> int | None:
        hits = [i for i in (self._text.find(s, self._sent) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest unsent suffix that is a proper prefix of a stop string."""
        unsent = len(self._text) - self._sent
        longest = max((len(s) - 1 for s in self.stop), default=0)
        for k in range(min(unsent, longest), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _take(self, end: int) -> tuple[str, list[int]]:
        if end <= self._sent:
            return "", []
        delta, self._sent = self._text[self._sent:end], end
        ids, self._ids = self._ids, []
        return delta, ids
