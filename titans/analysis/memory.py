"""Record what each neural memory does while the model reads a text (`titans analyze-memory`).

The text is fed into a fresh batch-1 state one memory chunk at a time. Before each chunk the
memory weights W^(c) are copied. After it, the state's chunk buffers still hold the chunk's
write inputs (k, v, theta, eta, alpha), and the weights are W^(c+1) when the chunk was
complete. From these the recorder computes, per memory layer and head:

- per token: the surprise ||grad_W l(W^(c); k_t, v_t)||, the Frobenius norm of the gradient of
  the memory loss l = ||M_W(k_t) - v_t||^2 at the chunk's start weights, with the gradients
  of all the memory MLP's weight matrices taken together; and the gates theta (learning
  rate), eta (momentum decay) and alpha (forgetting);
- per completed chunk: the memory loss before the update (at W^(c)) and after it (at
  W^(c+1)), each the mean over the chunk's tokens. Also the Frobenius norms of the weights
  and of the momentum after the update, with all MLP matrices of the head together.

A trailing partial chunk has per-token values but no per-chunk values, because the model
only updates the memory when a chunk is complete.

memory.json has this shape (T tokens, N = T // chunk_size completed chunks, L_m memory
layers, H heads):

    format, version          "titans-memory-analysis", 1
    checkpoint, fingerprint  checkpoint directory and SHA-256 of its weights
    text_file                path of the text that was read
    config                   chunk_size, segment_len, heads, memory_depth
    memory_layers            [L_m] model layer index of each row of the arrays below
    axes                     the axis names of the arrays, as listed here
    tokens.ids               [T] token ids
    tokens.text              [T] text of each token (bytes decoded as UTF-8, invalid bytes replaced)
    tokens.byte_offsets      [T] offset of each token's first byte in the UTF-8 text
    markers.line_breaks      token indices that contain a newline
    markers.speaker_turns    [{"token": index, "name": "ROMEO"}] for lines such as "ROMEO:"
    per_token.surprise       [L_m][H][T]
    per_token.theta|eta|alpha  [L_m][H][T]
    per_chunk.end_token      [N] exclusive end token index of each chunk
    per_chunk.loss_before|loss_after|weight_norm|momentum_norm  [L_m][H][N]
    initial.weight_norm      [L_m][H] weight norm of W^(0), before any update
"""

from __future__ import annotations

import bisect
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from titans.model.mac import MACModel
from titans.model.neural_memory import memory_apply, memory_gradient_factors
from titans.model.tokenizer import Tokenizer

FORMAT = "titans-memory-analysis"
FORMAT_VERSION = 1
AXES = {
    "per_token": ["memory_layer", "head", "token"],
    "per_chunk": ["memory_layer", "head", "chunk"],
    "initial": ["memory_layer", "head"],
}

# A speaker line: at most 40 characters, starts with a letter, and its only ':' ends it.
SPEAKER_LINE = re.compile(r"[A-Za-z][^:]{0,38}:")


@dataclass
class MemoryRecord:
    """Memory statistics of one text, as float32 arrays with the axes in AXES."""

    memory_layers: list[int]
    chunk_size: int
    surprise: np.ndarray  # (L_m, H, T)
    theta: np.ndarray  # (L_m, H, T)
    eta: np.ndarray  # (L_m, H, T)
    alpha: np.ndarray  # (L_m, H, T)
    chunk_end: np.ndarray  # (N,) exclusive end token index of each completed chunk
    loss_before: np.ndarray  # (L_m, H, N)
    loss_after: np.ndarray  # (L_m, H, N)
    weight_norm: np.ndarray  # (L_m, H, N)
    momentum_norm: np.ndarray  # (L_m, H, N)
    initial_weight_norm: np.ndarray  # (L_m, H)

    @property
    def num_tokens(self) -> int:
        return self.surprise.shape[-1]


@dataclass
class TokenText:
    """The text of each token, and where the text's line breaks and speaker turns fall."""

    ids: list[int]
    text: list[str]
    byte_offsets: list[int]
    data: bytes  # UTF-8 bytes of the tokens read, in order
    line_breaks: list[int]  # token indices
    speaker_turns: list[tuple[int, str]]  # (token index, speaker name)

    def context(self, token: int, width: int = 40) -> tuple[str, str, str]:
        """Return the text before the token (up to `width` bytes), the token, and the text after."""
        start = self.byte_offsets[token]
        end = self.byte_offsets[token + 1] if token + 1 < len(self.ids) else len(self.data)
        before = self.data[max(0, start - width):start].decode("utf-8", errors="replace")
        after = self.data[end:end + width].decode("utf-8", errors="replace")
        return before, self.text[token], after


def memory_layer_indices(model: MACModel) -> list[int]:
    return [i for i, block in enumerate(model.blocks) if block.memory is not None]


def _weight_norm(weights: list[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm per head of all MLP matrices together: (1, H, out, in) list -> (H,)."""
    squares = sum(w.float().square().sum(dim=(-1, -2)) for w in weights)
    return squares.sqrt()[0]


def _memory_loss(weights: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, residual: bool) -> torch.Tensor:
    """Mean over tokens of ||M_W(k) - v||^2 per head: k, v (1, H, n, d) -> (H,)."""
    return (memory_apply(weights, k, residual) - v).square().sum(-1).mean(-1)[0]


@torch.inference_mode()
def record_memory(model: MACModel, token_ids: list[int],
                  progress: Callable[[int], None] | None = None) -> MemoryRecord:
    """Feed `token_ids` into a fresh state chunk by chunk and record the memory statistics.

    `progress`, when given, is called with the number of tokens fed after each chunk.
    Raises ValueError for a model without memory layers or a text shorter than one chunk.
    """
    layers = memory_layer_indices(model)
    if not layers:
        raise ValueError("the checkpoint's model has no memory layers (memory_layers is empty); "
                         "there is nothing to analyse")
    chunk = model.config.chunk_size
    if len(token_ids) < chunk:
        raise ValueError(f"the text has {len(token_ids)} tokens but the analysis needs at least one "
                         f"memory chunk ({chunk} tokens); use a longer text")

    state = model.new_state(1)
    initial = [_weight_norm(state.layers[i].weights) for i in layers]
    per_token: dict[str, list[list[torch.Tensor]]] = {
        name: [[] for _ in layers] for name in ("surprise", "theta", "eta", "alpha")}
    per_chunk: dict[str, list[list[torch.Tensor]]] = {
        name: [[] for _ in layers] for name in ("loss_before", "loss_after", "weight_norm", "momentum_norm")}
    chunk_end: list[int] = []

    for start in range(0, len(token_ids), chunk):
        piece = token_ids[start:start + chunk]
        n = len(piece)
        weights_before = [[w.clone() for w in state.layers[i].weights] for i in layers]
        model.feed(state, torch.tensor([piece], device=model.device), last_only=True)
        complete = n == chunk
        if complete:
            chunk_end.append(start + n)

        for row, index in enumerate(layers):
            layer = state.layers[index]
            residual = model.blocks[index].memory.residual
            start_weights = weights_before[row]
            dtype = start_weights[0].dtype
            k = layer.chunk_k[:, :, :n].to(dtype)
            v = layer.chunk_v[:, :, :n].to(dtype)
            gates = layer.chunk_gates[0, :, :n]  # (H, n, 3)

            # The gradient of token t for matrix j is the outer product delta_j a_j^T, whose
            # Frobenius norm is ||delta_j|| * ||a_j||. The squares add up over the matrices.
            factors = memory_gradient_factors(start_weights, k, v, residual)
            squared = sum(delta.square().sum(-1) * a.square().sum(-1) for delta, a in factors)
            per_token["surprise"][row].append(squared.sqrt()[0])
            for position, name in enumerate(("theta", "eta", "alpha")):
                per_token[name][row].append(gates[..., position])

            if complete:
                per_chunk["loss_before"][row].append(_memory_loss(start_weights, k, v, residual))
                per_chunk["loss_after"][row].append(_memory_loss(layer.weights, k, v, residual))
                per_chunk["weight_norm"][row].append(_weight_norm(layer.weights))
                per_chunk["momentum_norm"][row].append(_weight_norm(layer.momentum))
        if progress is not None:
            progress(n)

    def stack_tokens(name: str) -> np.ndarray:
        return torch.stack([torch.cat(parts, dim=-1) for parts in per_token[name]]).float().cpu().numpy()

    def stack_chunks(name: str) -> np.ndarray:
        return torch.stack([torch.stack(parts, dim=-1) for parts in per_chunk[name]]).float().cpu().numpy()

    return MemoryRecord(
        memory_layers=layers,
        chunk_size=chunk,
        surprise=stack_tokens("surprise"),
        theta=stack_tokens("theta"),
        eta=stack_tokens("eta"),
        alpha=stack_tokens("alpha"),
        chunk_end=np.array(chunk_end, dtype=np.int64),
        loss_before=stack_chunks("loss_before"),
        loss_after=stack_chunks("loss_after"),
        weight_norm=stack_chunks("weight_norm"),
        momentum_norm=stack_chunks("momentum_norm"),
        initial_weight_norm=torch.stack(initial).float().cpu().numpy(),
    )


def mark_text(tokenizer: Tokenizer, token_ids: list[int]) -> TokenText:
    """Decode each token and find the tokens where lines and speaker turns begin.

    A speaker turn is a line such as "ROMEO:" or "First Citizen:": at most 40 characters,
    starting with a letter, whose only ':' is its last character.
    """
    pieces = [tokenizer.token_bytes(t) for t in token_ids]
    offsets, position = [], 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    data = b"".join(pieces)

    def token_at(byte: int) -> int:
        return bisect.bisect_right(offsets, byte) - 1

    line_breaks: list[int] = []
    for byte, value in enumerate(data):
        if value == 0x0A:
            token = token_at(byte)
            if not line_breaks or line_breaks[-1] != token:
                line_breaks.append(token)

    speaker_turns: list[tuple[int, str]] = []
    line_start = 0
    for line in data.split(b"\n"):
        text = line.decode("utf-8", errors="replace").strip()
        if SPEAKER_LINE.fullmatch(text):
            speaker_turns.append((token_at(line_start), text[:-1]))
        line_start += len(line) + 1

    texts = [piece.decode("utf-8", errors="replace") for piece in pieces]
    return TokenText(list(token_ids), texts, offsets, data, line_breaks, speaker_turns)


def _rounded(array: np.ndarray) -> list:
    """Nested lists of floats rounded to 6 significant digits, which keeps memory.json small."""
    if array.ndim == 0:
        return float(f"{float(array):.6g}")
    if array.ndim == 1:
        return [float(f"{x:.6g}") for x in array.tolist()]
    return [_rounded(part) for part in array]


def analysis_dict(record: MemoryRecord, text: TokenText, *, checkpoint: str, fingerprint: str,
                  text_file: str, config: dict) -> dict:
    """Build the memory.json document (the shape is in the module docstring)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "checkpoint": checkpoint,
        "fingerprint": fingerprint,
        "text_file": text_file,
        "config": config,
        "memory_layers": record.memory_layers,
        "axes": AXES,
        "tokens": {"ids": text.ids, "text": text.text, "byte_offsets": text.byte_offsets},
        "markers": {
            "line_breaks": text.line_breaks,
            "speaker_turns": [{"token": token, "name": name} for token, name in text.speaker_turns],
        },
        "per_token": {name: _rounded(getattr(record, name)) for name in ("surprise", "theta", "eta", "alpha")},
        "per_chunk": {
            "end_token": record.chunk_end.tolist(),
            **{name: _rounded(getattr(record, name))
               for name in ("loss_before", "loss_after", "weight_norm", "momentum_norm")},
        },
        "initial": {"weight_norm": _rounded(record.initial_weight_norm)},
    }


def write_json(document: dict, path: Path) -> None:
    path.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(record: MemoryRecord, text: TokenText, out_dir: Path) -> list[Path]:
    """Write tokens.csv (a row per token, memory layer and head) and chunks.csv (a row per chunk,
    memory layer and head); returns the paths."""
    tokens_path = out_dir / "tokens.csv"
    with tokens_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["token", "token_id", "text", "layer", "head", "surprise", "theta", "eta", "alpha"])
        for row, layer in enumerate(record.memory_layers):
            for head in range(record.surprise.shape[1]):
                for t in range(record.num_tokens):
                    writer.writerow([t, text.ids[t], text.text[t], layer, head,
                                     f"{record.surprise[row, head, t]:.6g}", f"{record.theta[row, head, t]:.6g}",
                                     f"{record.eta[row, head, t]:.6g}", f"{record.alpha[row, head, t]:.6g}"])

    chunks_path = out_dir / "chunks.csv"
    with chunks_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["chunk", "start_token", "end_token", "layer", "head", "loss_before", "loss_after",
                         "weight_norm", "momentum_norm"])
        for row, layer in enumerate(record.memory_layers):
            for head in range(record.surprise.shape[1]):
                for c, end in enumerate(record.chunk_end.tolist()):
                    writer.writerow([c, end - record.chunk_size, end, layer, head,
                                     f"{record.loss_before[row, head, c]:.6g}",
                                     f"{record.loss_after[row, head, c]:.6g}",
                                     f"{record.weight_norm[row, head, c]:.6g}",
                                     f"{record.momentum_norm[row, head, c]:.6g}"])
    return [tokens_path, chunks_path]
