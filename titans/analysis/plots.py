"""PNG plots of a memory analysis: surprise, gates, weight norms and memory loss over the text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .memory import MemoryRecord, TokenText

MAX_SPEAKER_LABELS = 60  # more names than this would overlap, so only the lines are drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _width(tokens: int) -> float:
    """Figure width in inches: about 100 tokens per inch, between 10 and 30 inches."""
    return float(min(30.0, max(10.0, tokens / 100)))


def _scale_y(ax, values: np.ndarray) -> None:
    """Use a log scale when positive values span more than two decades (a decaying memory does)."""
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() > 100 * values.min():
        ax.set_yscale("log")


def _mark_text(ax, text: TokenText, labels: bool) -> None:
    """Draw speaker turns as dashed lines (named on the top axis) and line breaks as ticks along the bottom."""
    for token, _ in text.speaker_turns:
        ax.axvline(token, color="tab:red", linestyle="--", linewidth=0.6, alpha=0.5)
    if text.line_breaks:
        ax.plot(text.line_breaks, np.zeros(len(text.line_breaks)), linestyle="none", marker="|",
                markersize=6, color="0.5", transform=ax.get_xaxis_transform(), clip_on=False)
    if labels and 0 < len(text.speaker_turns) <= MAX_SPEAKER_LABELS:
        for token, name in text.speaker_turns:
            ax.text(token, 1.01, name, transform=ax.get_xaxis_transform(), rotation=60, fontsize=7,
                    color="tab:red", ha="left", va="bottom")


def plot_surprise(record: MemoryRecord, text: TokenText, path: Path) -> None:
    plt = _pyplot()
    rows = len(record.memory_layers)
    fig, axes = plt.subplots(rows, 1, figsize=(_width(record.num_tokens), 2.6 * rows + 1.2),
                             sharex=True, squeeze=False)
    x = np.arange(record.num_tokens)
    for row, layer in enumerate(record.memory_layers):
        ax = axes[row, 0]
        _mark_text(ax, text, labels=row == 0)
        for head in range(record.surprise.shape[1]):
            ax.plot(x, record.surprise[row, head], linewidth=0.7, label=f"head {head}")
        _scale_y(ax, record.surprise[row])
        ax.set_ylabel(f"layer {layer}\nsurprise ||grad||")
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("token (grey ticks: line breaks; red dashed lines: speaker turns)")
    fig.suptitle("Surprise: norm of the memory-loss gradient at each chunk's start weights", y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_gates(record: MemoryRecord, text: TokenText, path: Path) -> None:
    plt = _pyplot()
    rows = len(record.memory_layers)
    names = (("theta", "theta (learning rate)"), ("eta", "eta (momentum decay)"), ("alpha", "alpha (forgetting)"))
    fig, axes = plt.subplots(rows, 3, figsize=(_width(record.num_tokens), 2.4 * rows + 1.0),
                             sharex=True, squeeze=False)
    x = np.arange(record.num_tokens)
    for row, layer in enumerate(record.memory_layers):
        for column, (name, title) in enumerate(names):
            ax = axes[row, column]
            _mark_text(ax, text, labels=False)
            values = getattr(record, name)[row]
            for head in range(values.shape[0]):
                ax.plot(x, values[head], linewidth=0.7, label=f"head {head}")
            ax.set_title(f"layer {layer}: {title}", fontsize=9)
        axes[row, 0].legend(loc="upper right", fontsize=7)
    for column in range(3):
        axes[-1, column].set_xlabel("token")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_weight_norms(record: MemoryRecord, path: Path) -> None:
    """Weight and momentum norms after each chunk update, starting from W^(0) at token 0."""
    plt = _pyplot()
    rows = len(record.memory_layers)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.6 * rows + 0.6), sharex=True, squeeze=False)
    x = np.concatenate([[0], record.chunk_end])
    for row, layer in enumerate(record.memory_layers):
        for head in range(record.weight_norm.shape[1]):
            weights = np.concatenate([[record.initial_weight_norm[row, head]], record.weight_norm[row, head]])
            momentum = np.concatenate([[0.0], record.momentum_norm[row, head]])
            axes[row, 0].plot(x, weights, linewidth=0.9, label=f"head {head}")
            axes[row, 1].plot(x, momentum, linewidth=0.9, label=f"head {head}")
        _scale_y(axes[row, 0], np.concatenate([record.initial_weight_norm[row], record.weight_norm[row].ravel()]))
        _scale_y(axes[row, 1], record.momentum_norm[row])
        axes[row, 0].set_title(f"layer {layer}: memory weight norm", fontsize=9)
        axes[row, 1].set_title(f"layer {layer}: momentum norm", fontsize=9)
        axes[row, 0].legend(loc="best", fontsize=7)
    for column in range(2):
        axes[-1, column].set_xlabel("token (after each chunk update)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_memory_loss(record: MemoryRecord, path: Path) -> None:
    """Memory loss of each chunk's tokens before (solid) and after (dashed) the chunk's update."""
    plt = _pyplot()
    rows = len(record.memory_layers)
    fig, axes = plt.subplots(rows, 1, figsize=(12, 2.6 * rows + 0.6), sharex=True, squeeze=False)
    for row, layer in enumerate(record.memory_layers):
        ax = axes[row, 0]
        for head in range(record.loss_before.shape[1]):
            line, = ax.plot(record.chunk_end, record.loss_before[row, head], linewidth=0.9,
                            label=f"head {head} before")
            ax.plot(record.chunk_end, record.loss_after[row, head], linewidth=0.9, linestyle="--",
                    color=line.get_color(), label=f"head {head} after")
        _scale_y(ax, np.concatenate([record.loss_before[row].ravel(), record.loss_after[row].ravel()]))
        ax.set_ylabel(f"layer {layer}\nmemory loss")
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("token at the end of the chunk")
    fig.suptitle("Memory loss ||M(k) - v||^2 of each chunk's tokens, before and after its update", y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_plots(record: MemoryRecord, text: TokenText, out_dir: Path) -> list[Path]:
    """Write surprise.png, gates.png, weight_norm.png and memory_loss.png, and return their paths."""
    paths = [out_dir / name for name in ("surprise.png", "gates.png", "weight_norm.png", "memory_loss.png")]
    plot_surprise(record, text, paths[0])
    plot_gates(record, text, paths[1])
    plot_weight_norms(record, paths[2])
    plot_memory_loss(record, paths[3])
    return paths
