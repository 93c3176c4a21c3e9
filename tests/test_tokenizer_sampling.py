"""Tokenizer, sampler, serving checkpoint and single-session generation loop.

The tokenizers are trained here on a short English text, so these tests need no files
outside their temporary directories.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from titans.model import MACConfig, MACModel
from titans.model.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from titans.model.generate import generate_tokens
from titans.model.sampling import Sampler, SamplingParams
from titans.model.tokenizer import END_OF_TEXT, Tokenizer

TRAINING_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
) * 20

ROUND_TRIP_TEXTS = {
    "empty": "",
    "ascii": "Hello, world!",
    "emoji": "party \U0001F389 wave \U0001F44B\U0001F3FD family \U0001F468\u200D\U0001F469\u200D\U0001F467",
    "cjk": "\u4e16\u754c\u4f60\u597d \u3053\u3093\u306b\u3061\u306f \uc548\ub155\ud558\uc138\uc694",
    "combining_marks": "e\u0301 a\u0308\u0304 \u1e9b\u0323 Z\u0351\u036b\u0343",
    "control_chars": "\x00\x01\x07\x08\x1b[31m\x7f\x85\u2028\u2029",
    "whitespace_run": " " * 300 + "\t" * 40 + "\n" * 50 + "\r\n" * 10,
    "bom_and_zero_width": "\ufeffstart\u200b\u200c\u200dend",
    "max_code_point": "\U0010ffff\U0001d11e",
    "rtl": "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "special_token_text": f"a{END_OF_TEXT}b<|pad|>c",
}


@pytest.fixture(scope="module")
def tokenizer_300() -> Tokenizer:
    return Tokenizer.train([TRAINING_TEXT], 300)


@pytest.fixture(scope="module")
def tokenizer_258() -> Tokenizer:
    return Tokenizer.train([TRAINING_TEXT], 258)


@pytest.fixture(scope="module")
def tiny_model() -> MACModel:
    torch.manual_seed(0)
    return MACModel(MACConfig.from_name("tiny")).eval()


# --- tokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [300, 258])
def test_tokenizer_trains_requested_size(vocab_size):
    tokenizer = Tokenizer.train([TRAINING_TEXT], vocab_size)

    assert tokenizer.vocab_size == vocab_size
    assert tokenizer.eos_id == tokenizer.inner.token_to_id(END_OF_TEXT)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
@pytest.mark.parametrize("size", [300, 258])
def test_tokenizer_round_trip(name, size, tokenizer_300, tokenizer_258):
    tokenizer = tokenizer_300 if size == 300 else tokenizer_258
    text = ROUND_TRIP_TEXTS[name]

    ids = tokenizer.encode(text)

    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert all(i not in tokenizer.special_ids for i in ids)


def test_byte_tokenizer_one_token_per_byte(tokenizer_258):
    text = ROUND_TRIP_TEXTS["emoji"] + ROUND_TRIP_TEXTS["cjk"]

    ids = tokenizer_258.encode(text)

    assert len(ids) == len(text.encode("utf-8"))


def test_trained_merges_shorten_text(tokenizer_300, tokenizer_258):
    assert len(tokenizer_300.encode(TRAINING_TEXT)) < len(tokenizer_258.encode(TRAINING_TEXT))


def test_tokenizer_save_load_round_trip(tmp_path, tokenizer_300):
    path = tmp_path / "tokenizer.json"
    tokenizer_300.save(path)

    loaded = Tokenizer.from_file(path)
    text = ROUND_TRIP_TEXTS["special_token_text"] + ROUND_TRIP_TEXTS["emoji"]

    assert loaded.vocab_size == tokenizer_300.vocab_size
    assert loaded.encode(TRAINING_TEXT) == tokenizer_300.encode(TRAINING_TEXT)
    assert loaded.decode(loaded.encode(text)) == text


def test_special_tokens_have_no_bytes(tokenizer_300):
    for token_id in tokenizer_300.special_ids:
        assert tokenizer_300.token_bytes(token_id) == b""


@pytest.mark.parametrize("token_id", [-1, 300, 10**6])
def test_token_bytes_rejects_out_of_range(tokenizer_300, token_id):
    with pytest.raises(ValueError, match="token id"):
        tokenizer_300.token_bytes(token_id)


@pytest.mark.parametrize("vocab_size", [0, 256, 257])
def test_tokenizer_train_rejects_small_vocab(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        Tokenizer.train([TRAINING_TEXT], vocab_size)


def test_tokenizer_from_missing_file(tmp_path):
    path = tmp_path / "absent" / "tokenizer.json"

    with pytest.raises(FileNotFoundError, match="tokenizer file not found") as raised:
        Tokenizer.from_file(path)

    assert str(path) in str(raised.value)


def test_tokenizer_from_garbage_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"\x00\xff not json {")

    with pytest.raises(ValueError, match="cannot read tokenizer") as raised:
        Tokenizer.from_file(path)

    assert str(path) in str(raised.value)


def test_tokenizer_without_end_of_text(tmp_path):
    path = tmp_path / "tokenizer.json"
    HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))

    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer.from_file(path)


# --- sampler --------------------------------------------------------------------------------


def _random_logits(seed: int, size: int = 300) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=generator) * 2.0


def _draw(params: SamplingParams, logits: torch.Tensor, count: int, history=None) -> list[int]:
    """Draw `count` tokens from one sampler, so its generator advances between draws."""
    sampler = Sampler(params)
    return [sampler(logits, history) for _ in range(count)]


def test_greedy_is_argmax():
    for seed in range(5):
        logits = _random_logits(seed)

        token = Sampler(SamplingParams(temperature=0.0))(logits)

        assert token == int(torch.argmax(logits))


def test_top_k_one_equals_greedy():
    for seed in range(5):
        logits = _random_logits(seed)

        tokens = _draw(SamplingParams(temperature=1.5, top_k=1, seed=seed), logits, 20)

        assert tokens == [int(torch.argmax(logits))] * 20


def test_same_seed_same_sequence():
    logits = _random_logits(1)
    params = SamplingParams(temperature=1.0, seed=1234)

    assert _draw(params, logits, 50) == _draw(params, logits, 50)


def test_different_seeds_differ():
    logits = _random_logits(1)

    first = _draw(SamplingParams(temperature=1.0, seed=1), logits, 50)
    second = _draw(SamplingParams(temperature=1.0, seed=2), logits, 50)

    assert first != second


def test_unseeded_sampler_varies():
    logits = _random_logits(1)

    first = _draw(SamplingParams(temperature=1.0), logits, 50)
    second = _draw(SamplingParams(temperature=1.0), logits, 50)

    assert first != second


def test_tiny_top_p_keeps_top_token():
    logits = _random_logits(2)

    tokens = _draw(SamplingParams(temperature=1.0, top_p=1e-6, seed=3), logits, 200)

    assert set(tokens) == {int(torch.argmax(logits))}


def test_top_p_keeps_smallest_prefix():
    # With probabilities 0.5, 0.3, 0.15 and 0.05, top_p=0.7 needs the first two tokens to reach 0.7.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    tokens = _draw(SamplingParams(temperature=1.0, top_p=0.7, seed=4), logits, 2000)

    assert set(tokens) == {0, 1}


def test_top_k_limits_candidates():
    logits = _random_logits(5)
    top_two = set(torch.topk(logits, 2).indices.tolist())

    tokens = _draw(SamplingParams(temperature=5.0, top_k=2, seed=5), logits, 500)

    assert set(tokens) == top_two


def test_min_p_filters_unlikely_tokens():
    # With probabilities 0.5, 0.3, 0.15 and 0.05, min_p=0.2 drops tokens below 0.2 * 0.5 = 0.1.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    filtered = _draw(SamplingParams(temperature=1.0, min_p=0.2, seed=6), logits, 2000)
    unfiltered = _draw(SamplingParams(temperature=1.0, seed=6), logits, 2000)

    assert set(filtered) == {0, 1, 2}
    assert 3 in unfiltered


def test_repetition_penalty_positive_logit():
    logits = torch.tensor([2.0, 1.5, -1.0, -1.2])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)

    assert Sampler(params)(logits, history=[]) == 0
    assert Sampler(params)(logits, history=[0]) == 1


def test_repetition_penalty_negative_logit():
    # A negative logit is multiplied by the penalty, which also makes the token less likely.
    logits = torch.tensor([-1.0, -1.5, -3.0])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)

    assert Sampler(params)(logits, history=[]) == 0
    assert Sampler(params)(logits, history=[0]) == 1


def test_repetition_penalty_lowers_frequency():
    # With logits 1 and 1 and penalty 2, token 0's logit becomes 0.5, so p = sigmoid(-0.5) ~ 0.38.
    logits = torch.tensor([1.0, 1.0])

    penalised = _draw(SamplingParams(temperature=1.0, repetition_penalty=2.0, seed=7), logits, 4000, [0])
    plain = _draw(SamplingParams(temperature=1.0, seed=7), logits, 4000, [0])

    assert penalised.count(0) / 4000 == pytest.approx(1 / (1 + math.exp(0.5)), abs=0.03)
    assert plain.count(0) / 4000 == pytest.approx(0.5, abs=0.03)


def test_sampler_leaves_logits_unchanged():
    logits = torch.tensor([2.0, 1.5, -1.0])
    before = logits.clone()

    Sampler(SamplingParams(temperature=0.7, repetition_penalty=1.5, seed=1))(logits, history=[0, 2])

    assert torch.equal(logits, before)


INVALID_SAMPLING = [
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": float("nan")}),
    ("top_k", {"top_k": -1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": float("nan")}),
    ("min_p", {"min_p": -0.01}),
    ("min_p", {"min_p": 1.5}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("repetition_penalty", {"repetition_penalty": float("nan")}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID_SAMPLING)
def test_sampling_params_reject_invalid(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# --- serving checkpoint ---------------------------------------------------------------------


@pytest.fixture
def checkpoint_dir(tmp_path, tiny_model, tokenizer_258) -> Path:
    return save_checkpoint(tiny_model, tokenizer_258, tmp_path / "checkpoint")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_FILE
    values = json.loads(path.read_text(encoding="utf-8"))
    values.update(changes)
    path.write_text(json.dumps(values), encoding="utf-8")


def test_checkpoint_round_trip(checkpoint_dir, tiny_model):
    loaded = load_checkpoint(checkpoint_dir, "cpu")
    tokens = torch.tensor([[5, 70, 80, 90, 100, 33, 2, 257] * 5])

    assert loaded.config == tiny_model.config
    assert loaded.tokenizer.vocab_size == 258
    assert loaded.path == checkpoint_dir
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), tiny_model(tokens))


def test_checkpoint_fingerprint_is_weights_sha256(checkpoint_dir, tiny_model):
    expected = hashlib.sha256((checkpoint_dir / WEIGHTS_FILE).read_bytes()).hexdigest()

    loaded = load_checkpoint(checkpoint_dir, "cpu")

    assert loaded.fingerprint == expected
    assert tiny_model.fingerprint == expected


def test_checkpoint_bfloat16_weights(tmp_path, tiny_model, tokenizer_258):
    from safetensors import safe_open

    directory = save_checkpoint(tiny_model, tokenizer_258, tmp_path / "bf16", dtype="bfloat16")
    loaded = load_checkpoint(directory, "cpu")

    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}
    assert dtypes == {torch.bfloat16}
    embed = tiny_model.state_dict()["embed.weight"]
    assert torch.equal(loaded.model.state_dict()["embed.weight"], embed.to(torch.bfloat16).float())


def test_checkpoint_rejects_unknown_dtype(tmp_path, tiny_model, tokenizer_258):
    with pytest.raises(ValueError, match="dtype"):
        save_checkpoint(tiny_model, tokenizer_258, tmp_path / "bad", dtype="int8")


def test_checkpoint_missing_directory(tmp_path):
    path = tmp_path / "absent"

    with pytest.raises(CheckpointError, match="not found") as raised:
        load_checkpoint(path, "cpu")

    assert str(path) in str(raised.value)


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])
def test_checkpoint_missing_file(checkpoint_dir, name):
    (checkpoint_dir / name).unlink()

    with pytest.raises(CheckpointError, match="missing") as raised:
        load_checkpoint(checkpoint_dir, "cpu")

    assert name in str(raised.value)


def test_checkpoint_tokenizer_vocab_mismatch(tmp_path, tiny_model, tokenizer_300):
    directory = save_checkpoint(tiny_model, tokenizer_300, tmp_path / "mismatch")

    with pytest.raises(CheckpointError, match="vocab_size") as raised:
        load_checkpoint(directory, "cpu")

    assert TOKENIZER_FILE in str(raised.value)
    assert "300" in str(raised.value)
    assert "258" in str(raised.value)


def test_checkpoint_weight_shape_mismatch(checkpoint_dir):
    _edit_config(checkpoint_dir, persistent_tokens=6)

    with pytest.raises(CheckpointError, match="shape") as raised:
        load_checkpoint(checkpoint_dir, "cpu")

    assert WEIGHTS_FILE in str(raised.value)


def test_checkpoint_weight_names_mismatch(checkpoint_dir):
    _edit_config(checkpoint_dir, memory_layers=[0])

    with pytest.raises(CheckpointError, match="unexpected") as raised:
        load_checkpoint(checkpoint_dir, "cpu")

    assert WEIGHTS_FILE in str(raised.value)


def test_checkpoint_invalid_config(checkpoint_dir):
    _edit_config(checkpoint_dir, chunk_size=5)

    with pytest.raises(CheckpointError, match="chunk_size") as raised:
        load_checkpoint(checkpoint_dir, "cpu")

    assert CONFIG_FILE in str(raised.value)


def test_checkpoint_corrupt_weights(checkpoint_dir):
    (checkpoint_dir / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    with pytest.raises(CheckpointError, match="cannot read") as raised:
        load_checkpoint(checkpoint_dir, "cpu")

    assert WEIGHTS_FILE in str(raised.value)


# --- generation loop ------------------------------------------------------------------------

PROMPT = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
GREEDY = SamplingParams(temperature=0.0)


def test_generate_leaves_last_token_pending(tiny_model):
    state = tiny_model.new_state(1)

    tokens = list(generate_tokens(tiny_model, PROMPT, 5, GREEDY, state))

    assert len(tokens) == 5
    assert state.pending == [[tokens[-1]]]
    assert state.consumed == [len(PROMPT) + 4]


def test_generate_continues_from_pending(tiny_model):
    whole = list(generate_tokens(tiny_model, PROMPT, 8, GREEDY))
    state = tiny_model.new_state(1)

    first = list(generate_tokens(tiny_model, PROMPT, 4, GREEDY, state))
    second = list(generate_tokens(tiny_model, [], 4, GREEDY, state))

    assert first + second == whole
    assert state.pending == [[whole[-1]]]


def test_generate_early_stop_keeps_pending(tiny_model):
    state = tiny_model.new_state(1)

    for token in generate_tokens(tiny_model, PROMPT, 10, GREEDY, state):
        break

    assert state.pending == [[token]]
    assert state.consumed == [len(PROMPT)]


def test_generate_stops_at_stop_token(tiny_model):
    whole = list(generate_tokens(tiny_model, PROMPT, 8, GREEDY))
    stop = whole[3]
    expected = whole[:whole.index(stop)]

    tokens = list(generate_tokens(tiny_model, PROMPT, 8, SamplingParams(temperature=0.0, stop_token_ids=(stop,))))

    assert tokens == expected


def test_generate_seeded_is_reproducible(tiny_model):
    params = SamplingParams(temperature=1.0, seed=11)

    first = list(generate_tokens(tiny_model, PROMPT, 12, params))
    second = list(generate_tokens(tiny_model, PROMPT, 12, params))

    assert first == second


def test_generate_needs_prompt(tiny_model):
    with pytest.raises(ValueError, match="at least one prompt token"):
        list(generate_tokens(tiny_model, [], 3, GREEDY))
