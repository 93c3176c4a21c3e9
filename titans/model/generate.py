"""A plain single-session generation loop (the engine batches many; this one is for the CLI and tests)."""

from __future__ import annotations

from typing import Iterator

import torch

from .mac import MACModel
from .sampling import Sampler, SamplingParams
from .state import State


@torch.inference_mode()
def generate_tokens(model: MACModel, prompt: list[int], max_tokens: int,
                    params: SamplingParams = SamplingParams(temperature=0.0),
                    state: State | None = None) -> Iterator[int]:
    """Feed `prompt` into `state` (a fresh one if None) and yield up to `max_tokens` sampled ids.

    Stops early at a token in `params.stop_token_ids` (not yielded). Each yielded token is
    fed before the next is sampled, except the last, which stays in `state.pending` and is
    fed at the start of the state's next use.
    """
    if state is None:
        state = model.new_state(1)
    sampler = Sampler(params)
    prompt = list(state.pending[0]) + list(prompt)
    state.pending[0] = []
    if not prompt:
        raise ValueError("generation needs at least one prompt token")
    history = list(prompt)
    logits, _ = model.feed(state, torch.tensor([prompt]), last_only=True)
    for step in range(max_tokens):
        token = sampler(logits[0, -1], history)
        if token in params.stop_token_ids:
            return
        history.append(token)
        state.pending[0] = [token]  # absorbed by the next feed, even if the caller stops here
        yield token
        if step + 1 == max_tokens:
            return
        state.pending[0] = []
        logits, _ = model.feed(state, torch.tensor([[token]]), last_only=True)
