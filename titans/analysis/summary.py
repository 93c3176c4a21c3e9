"""The printed summary of `titans analyze-memory`: per-layer statistics, surprising tokens and lines.

Surprise scales differ between layers and heads, and drift along the text as the memory
weights grow or decay. So tokens and lines are ranked by relative surprise: each layer and
head's surprise divided by its median over the surrounding BASELINE_TOKENS tokens, then
averaged over all memory layers and heads. A relative surprise of 3 means three times as
surprising as a typical token nearby.
"""

from __future__ import annotations

import numpy as np

from .memory import MemoryRecord, TokenText

BASELINE_TOKENS = 257  # window of the local median, centred on the token
MIN_LINE_TOKENS = 3  # shorter lines (speaker names, blank lines) are left out of the line ranking


def local_median(values: np.ndarray, window: int = BASELINE_TOKENS) -> np.ndarray:
    """Median over the last axis in a centred window, cut short at the ends of the text."""
    length = values.shape[-1]
    half = window // 2
    out = np.empty_like(values)
    for t in range(length):
        out[..., t] = np.median(values[..., max(0, t - half):t + half + 1], axis=-1)
    return out


def relative_surprise(record: MemoryRecord) -> np.ndarray:
    """Surprise over its local median per layer and head, averaged over layers and heads: (T,)."""
    median = local_median(record.surprise)
    median = np.where(median > 0, median, 1.0)
    return (record.surprise / median).mean(axis=(0, 1))


def token_lines(text: TokenText) -> np.ndarray:
    """Line number (from 0) of each token's first byte."""
    newlines = np.frombuffer(text.data, dtype=np.uint8) == 0x0A
    before = np.concatenate([[0], np.cumsum(newlines)])  # newlines before each byte offset
    return before[np.array(text.byte_offsets)]


def _show(fragment: str) -> str:
    return fragment.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def layer_lines(record: MemoryRecord) -> list[str]:
    lines = []
    for row, layer in enumerate(record.memory_layers):
        surprise = record.surprise[row]
        text = (f"layer {layer}: surprise mean {surprise.mean():.4g} (max {surprise.max():.4g}); "
                f"theta {record.theta[row].mean():.3g}, eta {record.eta[row].mean():.3g}, "
                f"alpha {record.alpha[row].mean():.3g} (means over heads and tokens)")
        lines.append(text)
        if record.chunk_end.size:
            before = record.loss_before[row].mean()
            after = record.loss_after[row].mean()
            change = 100.0 * (after - before) / before if before else 0.0
            lines.append(f"  memory loss per chunk {before:.4g} before the update, {after:.4g} after "
                         f"({change:+.1f}%); weight norm {record.initial_weight_norm[row].mean():.4g} at the "
                         f"start, {record.weight_norm[row, :, -1].mean():.4g} at the end (mean over heads)")
    return lines


def top_tokens(record: MemoryRecord, text: TokenText, count: int) -> list[str]:
    score = relative_surprise(record)
    order = np.argsort(-score, kind="stable")[:count]
    lines = []
    for rank, token in enumerate(order.tolist(), start=1):
        before, piece, after = text.context(token)
        lines.append(f"{rank:3d}. token {token:5d} {_show(piece)!r:>12} x{score[token]:.2f}   "
                     f"...{_show(before)}[{_show(piece)}]{_show(after)}...")
    return lines


def top_lines(record: MemoryRecord, text: TokenText, count: int) -> list[str]:
    score = relative_surprise(record)
    line_of = token_lines(text)
    source = text.data.split(b"\n")
    ranked = []
    for line in np.unique(line_of).tolist():
        members = line_of == line
        if members.sum() >= MIN_LINE_TOKENS:
            ranked.append((float(score[members].mean()), line, int(np.argmax(members))))
    ranked.sort(key=lambda item: -item[0])
    lines = []
    for rank, (value, line, first) in enumerate(ranked[:count], start=1):
        content = source[line].decode("utf-8", errors="replace").strip()
        lines.append(f"{rank:3d}. line {line + 1:4d} (from token {first}) x{value:.2f}   {content[:90]!r}")
    return lines


def format_summary(record: MemoryRecord, text: TokenText, count: int = 10) -> str:
    """Format the summary that `titans analyze-memory` prints."""
    heads = record.surprise.shape[1]
    out = [f"read {record.num_tokens} tokens ({len(text.line_breaks)} line breaks, "
           f"{len(text.speaker_turns)} speaker turns) through {len(record.memory_layers)} memory layers "
           f"x {heads} heads; {record.chunk_end.size} chunk updates of {record.chunk_size} tokens", ""]
    out += layer_lines(record)
    out += ["", f"most surprising tokens (relative surprise: surprise over the median of the "
                f"{BASELINE_TOKENS} tokens around it, averaged over layers and heads):"]
    out += top_tokens(record, text, count)
    out += ["", f"most surprising lines (mean relative surprise of lines with {MIN_LINE_TOKENS} or more tokens):"]
    out += top_lines(record, text, count)
    return "\n".join(out)
