"""Tests of TextStream, the engine's incremental detokenizer, on byte-level and BPE tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from titans.engine.detokenizer import TextStream
from titans.model.tokenizer import Tokenizer

# The corpus sits in shared/ beside the repository (as CI lays it out).
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus() -> str:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"training text not found: {SHAKESPEARE}")
    return SHAKESPEARE.read_text(encoding="utf-8")[:20_000]


@pytest.fixture(scope="module")
def byte_tokenizer(corpus: str) -> Tokenizer:
    """Only the 256 bytes and the special tokens, so every byte of the text is one token."""
    return Tokenizer.train([corpus], 258)


@pytest.fixture(scope="module")
def bpe_tokenizer(corpus: str) -> Tokenizer:
    return Tokenizer.train([corpus], 300)


def push_all(stream: TextStream, tokens: list[int]) -> list[tuple[str, list[int]]]:
    """Push tokens until the stream stops; return the non-empty deltas."""
    deltas = []
    for token in tokens:
        text, ids = stream.push(token)
        if text:
            deltas.append((text, ids))
        if stream.stopped:
            break
    return deltas


def test_multibyte_characters_sent_whole(byte_tokenizer: Tokenizer) -> None:
    text = "naïve 😀 世界 🎭!"
    tokens = byte_tokenizer.encode(text)
    assert len(tokens) == len(text.encode("utf-8"))
    stream = TextStream(byte_tokenizer)

    results = [stream.push(token) for token in tokens]
    final = stream.finish()

    deltas = [result for result in results if result[0]]
    assert "".join(delta for delta, _ in deltas) == text
    assert final == ("", [])
    for delta, ids in deltas:
        assert "\ufffd" not in delta
        assert byte_tokenizer.decode_bytes(ids) == delta.encode("utf-8")
    # The emoji's first three bytes send nothing; the fourth sends the whole character.
    emoji_start = len("naïve ".encode("utf-8"))
    assert results[emoji_start:emoji_start + 3] == [("", [])] * 3
    assert results[emoji_start + 3] == ("😀", tokens[emoji_start:emoji_start + 4])
    assert stream.text == text


def test_stop_string_over_three_tokens(byte_tokenizer: Tokenizer) -> None:
    stream = TextStream(byte_tokenizer, stop=["END"])
    tokens = byte_tokenizer.encode("abc END def")

    results = [stream.push(token) for token in tokens[:7]]

    assert results[:4] == [("a", tokens[0:1]), ("b", tokens[1:2]), ("c", tokens[2:3]), (" ", tokens[3:4])]
    assert results[4:] == [("", []), ("", []), ("", [])]
    assert stream.stopped
    assert stream.text == "abc "
    assert stream.finish() == ("", [])
    with pytest.raises(RuntimeError):
        stream.push(tokens[7])


def test_false_stop_prefix_released(byte_tokenizer: Tokenizer) -> None:
    stream = TextStream(byte_tokenizer, stop=["END"])
    tokens = byte_tokenizer.encode("ENx")

    results = [stream.push(token) for token in tokens]

    assert results == [("", []), ("", []), ("ENx", tokens)]
    assert not stream.stopped


def test_finish_flushes_held_back_prefix(byte_tokenizer: Tokenizer) -> None:
    stream = TextStream(byte_tokenizer, stop=["END"])
    tokens = byte_tokenizer.encode("ab EN")

    deltas = push_all(stream, tokens)

    assert "".join(delta for delta, _ in deltas) == "ab "
    assert stream.finish() == ("EN", tokens[-2:])
    assert stream.text == "ab EN"


def test_finish_replaces_truncated_character(byte_tokenizer: Tokenizer) -> None:
    stream = TextStream(byte_tokenizer)
    tokens = byte_tokenizer.encode("a世")[:2]  # "a" and the first of three bytes

    assert stream.push(tokens[0]) == ("a", tokens[:1])
    assert stream.push(tokens[1]) == ("", [])
    assert stream.finish() == ("\ufffd", tokens[1:])


def test_stop_string_of_multibyte_characters(byte_tokenizer: Tokenizer) -> None:
    stream = TextStream(byte_tokenizer, stop=["世界"])
    tokens = byte_tokenizer.encode("hi 世 世界 rest")

    deltas = push_all(stream, tokens)

    assert stream.stopped
    sent = "".join(delta for delta, _ in deltas)
    assert sent == "hi 世 "
    assert stream.text == sent
    assert all("\ufffd" not in delta for delta, _ in deltas)


def test_earliest_stop_string_wins(byte_tokenizer: Tokenizer) -> None:
    stream = TextStream(byte_tokenizer, stop=["XY", "Z"])

    deltas = push_all(stream, byte_tokenizer.encode("abZXY"))

    assert "".join(delta for delta, _ in deltas) == "ab"
    assert stream.text == "ab"


def test_stop_after_partial_false_start(byte_tokenizer: Tokenizer) -> None:
    # "aaab": the held-back "aa" is not followed by "b", but its second "a" starts the match.
    stream = TextStream(byte_tokenizer, stop=["aab"])

    deltas = push_all(stream, byte_tokenizer.encode("aaab!"))

    assert stream.stopped
    assert "".join(delta for delta, _ in deltas) == "a"
    assert stream.text == "a"


def test_empty_stop_string_ignored(byte_tokenizer: Tokenizer) -> None:
    stream = TextStream(byte_tokenizer, stop=[""])
    tokens = byte_tokenizer.encode("abc")

    deltas = push_all(stream, tokens)

    assert deltas == [("a", tokens[0:1]), ("b", tokens[1:2]), ("c", tokens[2:3])]
    assert not stream.stopped


def test_stop_string_inside_one_token(bpe_tokenizer: Tokenizer) -> None:
    # A BPE token of three or more ASCII letters; the stop string starts at its second letter.
    token = next(i for i in range(bpe_tokenizer.vocab_size)
                 if len(raw := bpe_tokenizer.token_bytes(i)) >= 3 and raw.isalpha())
    word = bpe_tokenizer.token_bytes(token).decode("ascii")
    first = bpe_tokenizer.encode("x")
    stream = TextStream(bpe_tokenizer, stop=[word[1:]])

    deltas = push_all(stream, first + [token])

    assert stream.stopped
    assert "".join(delta for delta, _ in deltas) == "x" + word[0]
    assert stream.text == "x" + word[0]


def test_bpe_stream_round_trips_text(bpe_tokenizer: Tokenizer, corpus: str) -> None:
    text = corpus[5_000:6_000] + " Ünïcode: 😀 世界 — done."
    tokens = bpe_tokenizer.encode(text)
    stream = TextStream(bpe_tokenizer, stop=["<never>"])

    deltas = push_all(stream, tokens)
    final = stream.finish()

    sent = "".join(delta for delta, _ in deltas) + final[0]
    assert sent == text
    assert [i for _, ids in deltas for i in ids] + final[1] == tokens
    assert all("\ufffd" not in delta for delta, _ in deltas)
