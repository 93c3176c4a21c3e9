"""Batched sessions, split/stack, training, config validation and state byte validation."""

from __future__ import annotations

import json
import math
import random

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import yaml

from titans.model import MACConfig, MACModel, State
from titans.model.state import (
    StateCorrupt,
    StateDTypeError,
    StateError,
    StateFormatError,
    StateModelMismatch,
    StateShapeError,
    StateValueError,
)

TOLERANCE = 1e-9


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one intra-op thread, because these tensors are too small for threads to help. On a
    busy 2-core machine, two threads waiting for each other made the tiny model 7 to 15 times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def float64_model(seed: int = 0, **changes) -> MACModel:
    """Build the tiny model in float64 with init_std 0.1, so that the memory visibly moves the logits."""
    torch.manual_seed(seed)
    config = MACConfig.from_name("tiny").replace(init_std=0.1, **changes)
    model = MACModel(config).double().eval()
    model.fingerprint = "test"
    return model


# --- batched sessions at different offsets ---

# Tokens each session consumed before batching. With segment length 16 and chunk size 8, the
# in-segment offsets are 0, 5, 13 and 14 and the in-chunk offsets 0, 5, 5 and 6. The last
# session is in its second segment.
PREFIX_LENGTHS = (0, 5, 13, 30)


def prefilled_sessions(model: MACModel, seed: int = 0) -> list[State]:
    """Return one single-session state per entry of PREFIX_LENGTHS, each fed its own random prefix."""
    generator = torch.Generator().manual_seed(seed)
    states = []
    with torch.no_grad():
        for length in PREFIX_LENGTHS:
            state = model.new_state(1)
            model.feed(state, torch.randint(0, model.config.vocab_size, (1, length), generator=generator))
            states.append(state)
    return states


def feed_batched_and_alone(model: MACModel, piece_sizes: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Feed the same pieces to a stacked batch and to each session alone.

    Returns the batch's logits and the sessions' logits (concatenated) for each piece."""
    alone = prefilled_sessions(model)
    batched = State.stack([state.clone() for state in alone])
    generator = torch.Generator().manual_seed(1)
    batched_logits, alone_logits = [], []
    with torch.no_grad():
        for size in piece_sizes:
            tokens = torch.randint(0, model.config.vocab_size, (len(alone), size), generator=generator)
            logits, batched = model.feed(batched, tokens)
            batched_logits.append(logits)
            alone_logits.append(torch.cat([model.feed(state, tokens[i:i + 1])[0]
                                           for i, state in enumerate(alone)]))
    expected_consumed = [length + sum(piece_sizes) for length in PREFIX_LENGTHS]
    assert batched.consumed == expected_consumed
    assert [state.consumed[0] for state in alone] == expected_consumed
    return batched_logits, alone_logits


def test_batched_feed_multi_token():
    model = float64_model()

    batched, alone = feed_batched_and_alone(model, piece_sizes=[20, 3, 11])

    for index, (got, want) in enumerate(zip(batched, alone)):
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=lambda m, i=index: f"piece {i}: {m}")


def test_batched_feed_decode_steps():
    """20 one-token steps: every session crosses a chunk boundary at a different step."""
    model = float64_model()

    batched, alone = feed_batched_and_alone(model, piece_sizes=[1] * 20)

    for step, (got, want) in enumerate(zip(batched, alone)):
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")


# --- split and stack ---


def batched_state(model: MACModel) -> State:
    state = State.stack(prefilled_sessions(model))
    state.pending = [[1], [], [2, 3], [257]]
    return state


def test_split_stack_round_trip():
    model = float64_model()
    state = batched_state(model)

    parts = state.split()
    joined = State.stack(parts)

    assert [part.batch_size for part in parts] == [1, 1, 1, 1]
    assert [part.consumed for part in parts] == [[length] for length in PREFIX_LENGTHS]
    assert [part.pending for part in parts] == [[[1]], [[]], [[2, 3]], [[257]]]
    assert joined.consumed == state.consumed
    assert joined.pending == state.pending
    assert joined.fingerprint == state.fingerprint
    for index, (got, want) in enumerate(zip(joined.layers, state.layers)):
        got_tensors, want_tensors = got.tensors(), want.tensors()
        assert got_tensors.keys() == want_tensors.keys()
        for name in want_tensors:
            assert torch.equal(got_tensors[name], want_tensors[name]), f"layer {index} {name} changed"


def test_split_returns_copies():
    model = float64_model()
    state = batched_state(model)
    before = state.clone()

    first = state.split()[0]
    with torch.no_grad():
        model.feed(first, torch.tensor([[5] * 9]))

    for index, (got, want) in enumerate(zip(state.layers, before.layers)):
        for name, tensor in want.tensors().items():
            assert torch.equal(got.tensors()[name], tensor), f"layer {index} {name} changed"


def test_split_bytes_stack_feed():
    """Sessions stored one by one, loaded and stacked, decode like the batch they came from."""
    model = float64_model()
    state = batched_state(model)
    reloaded = State.stack([State.from_bytes(part.to_bytes(), model) for part in state.split()])
    tokens = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        want, _ = model.feed(state, tokens)
        got, _ = model.feed(reloaded, tokens)

    assert reloaded.pending == [[1], [], [2, 3], [257]]
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE)


def test_stack_rejects_other_model():
    model = float64_model()
    other = float64_model()
    other.fingerprint = "another model"

    with pytest.raises(StateModelMismatch):
        State.stack([model.new_state(1), other.new_state(1)])


# --- training ---


def training_text(size: int = 2048, seed: int = 0) -> str:
    """Return `size` bytes of words drawn at random from a short list, with spaces, commas and full stops."""
    words = ("the memory of a session keeps learning while the model reads new tokens "
             "and forgets old ones slowly").split()
    rng = random.Random(seed)
    text = ""
    while len(text) < size:
        text += rng.choice(words) + rng.choice([" ", " ", " ", ", ", ". "])
    return text[:size]


def test_tiny_overfits_2kb_string():
    """Full-batch AdamW on fixed 48-token windows (3 segments of 16) of a 2 KB string.

    The loss starts at ln(258) = 5.55 and measured 0.22 after 150 steps (seed 0). The string's
    bytes have a unigram entropy of 2.77 nats. Its random word and separator choices alone cost
    0.63 nats per byte, so a loss under 0.5 means that the model memorised this particular string.
    """
    torch.manual_seed(0)
    config = MACConfig.from_name("tiny")
    model = MACModel(config)
    data = torch.tensor(list(training_text().encode()))
    window = 3 * config.segment_len
    count = (len(data) - 1) // window
    inputs = data[:count * window].view(count, window)
    targets = data[1:count * window + 1].view(count, window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    losses = []
    for _ in range(150):
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[0] == pytest.approx(math.log(config.vocab_size), abs=0.1)
    assert all(math.isfinite(value) for value in losses)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5


# --- config validation and loading ---

INVALID_CONFIGS = {
    "chunk-not-dividing-segment": (dict(chunk_size=5), "chunk_size"),
    "dim-not-divisible-by-heads": (dict(heads=3), "heads"),
    "odd-head-dim": (dict(dim=6, heads=2), "heads"),
    "zero-chunk": (dict(chunk_size=0), "chunk_size"),
    "negative-persistent": (dict(persistent_tokens=-1), "persistent_tokens"),
    "memory-layer-out-of-range": (dict(memory_layers=(2,)), "memory_layers"),
    "zero-memory-lr": (dict(memory_max_lr=0.0), "memory_max_lr"),
    "momentum-bound-above-one": (dict(memory_max_momentum=1.5), "memory_max_momentum"),
    "zero-forget-bound": (dict(memory_max_forget=0.0), "memory_max_forget"),
}


@pytest.mark.parametrize("changes, field", INVALID_CONFIGS.values(), ids=INVALID_CONFIGS.keys())
def test_config_invalid_value(changes, field):
    with pytest.raises(ValueError) as error:
        MACConfig.from_name("tiny").replace(**changes)

    assert field in str(error.value)


def test_config_unknown_field_yaml(tmp_path):
    values = MACConfig.from_name("tiny").to_dict()
    values["colour"] = "blue"
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")

    with pytest.raises(ValueError) as error:
        MACConfig.from_yaml(path)

    assert "colour" in str(error.value)


def test_config_unknown_field_dict():
    values = MACConfig.from_name("tiny").to_dict()
    values["colour"] = "blue"

    with pytest.raises(ValueError) as error:
        MACConfig.from_dict(values)

    assert "colour" in str(error.value)


def test_config_unknown_name():
    with pytest.raises(ValueError) as error:
        MACConfig.from_name("no-such-config")

    assert "no-such-config" in str(error.value)


def custom_config() -> MACConfig:
    return MACConfig.from_name("tiny").replace(
        name="round-trip", chunk_size=4, memory_layers=(1,), memory_max_lr=0.125, output_gate=False)


def test_config_yaml_round_trip(tmp_path):
    config = custom_config()
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")

    loaded = MACConfig.from_yaml(path)

    assert loaded == config
    assert loaded.name == "round-trip"
    assert loaded.memory_layers == (1,)


def test_config_json_round_trip(tmp_path):
    config = custom_config()
    path = tmp_path / "config.json"
    path.write_text(config.to_json(), encoding="utf-8")

    loaded = MACConfig.from_json(path)

    assert loaded == config
    assert loaded.name == "round-trip"
    assert loaded.memory_layers == (1,)


# --- state bytes: every bad input raises its typed error ---


@pytest.fixture(scope="module")
def tiny_model() -> MACModel:
    torch.manual_seed(0)
    return MACModel(MACConfig.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def state_bytes(tiny_model) -> bytes:
    """Return the bytes of a float32 state after 13 tokens, with partly filled segment and chunk
    buffers and 2 tokens pending."""
    state = tiny_model.new_state(1)
    with torch.no_grad():
        tiny_model.feed(state, torch.arange(13).view(1, 13))
    state.pending = [[7, 9]]
    return state.to_bytes()


def read_header(data: bytes) -> dict[str, str]:
    """Return the safetensors metadata from the JSON header that follows the 8-byte header length."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length])["__metadata__"]


def rewrite(data: bytes, edit_tensors=None, edit_header=None) -> bytes:
    """Load a state file's tensors and header, apply the edits in place and save it again."""
    tensors = safetensors.torch.load(data)
    header = read_header(data)
    if edit_tensors is not None:
        edit_tensors(tensors)
    if edit_header is not None:
        edit_header(header)
    return safetensors.torch.save(tensors, metadata=header)


def test_state_bytes_round_trip(tiny_model, state_bytes):
    """The rewrite helper alone produces loadable bytes, so each case below fails for its edit."""
    loaded = State.from_bytes(rewrite(state_bytes), tiny_model)

    assert loaded.consumed == [13]
    assert loaded.pending == [[7, 9]]


def test_state_bytes_other_model(tiny_model):
    torch.manual_seed(1)
    other = MACModel(MACConfig.from_name("tiny")).eval()
    data = other.new_state(1).to_bytes()

    with pytest.raises(StateModelMismatch):
        State.from_bytes(data, tiny_model)


def set_header(key: str, value: str):
    def edit(header):
        header[key] = value
    return edit


def drop_header(key: str):
    def edit(header):
        del header[key]
    return edit


def replace_tensor(name: str, change):
    def edit(tensors):
        tensors[name] = change(tensors[name])
    return edit


def drop_tensor(name: str):
    def edit(tensors):
        del tensors[name]
    return edit


def add_tensor(name: str):
    def edit(tensors):
        tensors[name] = torch.zeros(2, 2)
    return edit


def with_value(value: float):
    def change(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[0] = value
        return tensor
    return change


BAD_STATE_EDITS = {
    "fingerprint": (None, set_header("fingerprint", "0" * 64), StateModelMismatch),
    "format-version": (None, set_header("format_version", "2"), StateFormatError),
    "format-name": (None, set_header("format", "something-else"), StateFormatError),
    "format-missing": (None, drop_header("format"), StateFormatError),
    "weights-extra-row": (replace_tensor("layers.0.weights.0", lambda t: torch.cat([t, t[:, :1]], dim=1)),
                          None, StateShapeError),
    "segment-buffer-short": (replace_tensor("layers.1.k_tok", lambda t: t[:, :-1].contiguous()), None, StateShapeError),
    "consumed-disagrees-with-buffers": (None, set_header("consumed", "14"), StateShapeError),
    "tensor-missing": (drop_tensor("layers.0.momentum.1"), None, StateShapeError),
    "tensor-extra": (add_tensor("layers.0.surprise"), None, StateShapeError),
    "weights-float64": (replace_tensor("layers.0.weights.0", lambda t: t.double()), None, StateDTypeError),
    "keys-float16": (replace_tensor("layers.1.k_tok", lambda t: t.half()), None, StateDTypeError),
    "weights-nan": (replace_tensor("layers.0.weights.1", with_value(math.nan)), None, StateValueError),
    "conv-inf": (replace_tensor("layers.1.conv_q", with_value(math.inf)), None, StateValueError),
    "gates-nan": (replace_tensor("layers.0.chunk_gates", with_value(math.nan)), None, StateValueError),
    "consumed-negative": (None, set_header("consumed", "-3"), StateValueError),
    "consumed-not-a-number": (None, set_header("consumed", "thirteen"), StateValueError),
    "pending-out-of-vocab": (None, set_header("pending", "[7, 258]"), StateValueError),
    "pending-not-a-list": (None, set_header("pending", '{"a": 1}'), StateValueError),
}


@pytest.mark.parametrize("edit_tensors, edit_header, error", BAD_STATE_EDITS.values(), ids=BAD_STATE_EDITS.keys())
def test_state_bytes_invalid(tiny_model, state_bytes, edit_tensors, edit_header, error):
    data = rewrite(state_bytes, edit_tensors, edit_header)

    with pytest.raises(error):
        State.from_bytes(data, tiny_model)


def test_state_bytes_without_metadata(tiny_model, state_bytes):
    data = safetensors.torch.save(safetensors.torch.load(state_bytes))

    with pytest.raises(StateFormatError):
        State.from_bytes(data, tiny_model)


@pytest.mark.parametrize("keep", [0, 7, 20, 0.5, -1], ids=["empty", "7-bytes", "20-bytes", "half", "last-byte-cut"])
def test_state_bytes_truncated(tiny_model, state_bytes, keep):
    end = int(len(state_bytes) * keep) if isinstance(keep, float) else keep
    data = state_bytes[:end]

    with pytest.raises(StateCorrupt):
        State.from_bytes(data, tiny_model)


GARBAGE = {
    "zeros": bytes(100),
    "text": b"this is not a Titans state",
    "random": random.Random(0).randbytes(4096),
    "trailing-bytes": None,  # the valid state with 3 extra bytes, built in the test
}


@pytest.mark.parametrize("name", GARBAGE.keys())
def test_state_bytes_garbage(tiny_model, state_bytes, name):
    data = GARBAGE[name] if GARBAGE[name] is not None else state_bytes + b"xyz"

    with pytest.raises(StateCorrupt):
        State.from_bytes(data, tiny_model)


def test_state_bytes_not_bytes(tiny_model):
    with pytest.raises(StateCorrupt):
        State.from_bytes("a string, not bytes", tiny_model)


def test_state_errors_are_value_errors():
    for error in (StateCorrupt, StateFormatError, StateModelMismatch, StateShapeError,
                  StateDTypeError, StateValueError):
        assert issubclass(error, StateError)
        assert issubclass(error, ValueError)


def test_to_bytes_rejects_batch(tiny_model):
    state = tiny_model.new_state(2)

    with pytest.raises(ValueError) as error:
        state.to_bytes()

    assert "split" in str(error.value)
