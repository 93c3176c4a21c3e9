"""Evaluation: validation loss in nats per token and bits per byte, and the memory ablation.

The ablation feeds the same windows segment by segment and resets every layer's neural
memory (weights to their initial values, momentum to zero) at each segment start. The
gap between its loss and the normal loss is what the long-term memory contributes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from titans.model import MACModel
from titans.model.tokenizer import Tokenizer


def target_bytes(tokenizer: Tokenizer, targets: torch.Tensor) -> torch.Tensor:
    """Byte length of each target token (special tokens count 0)."""
    lengths = torch.tensor([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)])
    return lengths[targets]


def reset_memory(model: MACModel, state) -> None:
    """Set every session's memory weights to the initial ones and momentum to zero."""
    for block, layer in zip(model.blocks, state.layers):
        if block.memory is None:
            continue
        for current, initial in zip(layer.weights, block.memory.initial_weights):
            current.copy_(initial.detach().to(current.dtype).expand_as(current))
        for momentum in layer.momentum:
            momentum.zero_()


@torch.no_grad()
def token_losses(model: MACModel, windows: torch.Tensor, batch_size: int = 8,
                 reset_each_segment: bool = False) -> torch.Tensor:
    """Per-position losses (N, T) in nats for windows (N, T + 1)."""
    segment = model.config.segment_len
    out = []
    for start in range(0, windows.shape[0], batch_size):
        rows = windows[start:start + batch_size].to(model.device)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        if not reset_each_segment:
            logits = model(inputs)
        else:
            state = model.new_state(rows.shape[0])
            pieces = []
            for s in range(0, inputs.shape[1], segment):
                if s > 0:
                    reset_memory(model, state)
                logits_piece, state = model.feed(state, inputs[:, s:s + segment])
                pieces.append(logits_piece)
            logits = torch.cat(pieces, dim=1)
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        out.append(loss.cpu())
    return torch.cat(out)


def summarize(losses: torch.Tensor, nbytes: torch.Tensor, segment_len: int) -> dict:
    total = losses.sum().item()
    n_bytes = nbytes.sum().item()
    per_segment = losses.view(losses.shape[0], -1, segment_len).mean(dim=(0, 2)) \
        if losses.shape[1] % segment_len == 0 else losses.mean(0)
    return {
        "loss_per_token": total / losses.numel(),
        "perplexity": math.exp(total / losses.numel()),
        "nats_per_byte": total / max(n_bytes, 1),
        "bits_per_byte": total / max(n_bytes, 1) / math.log(2),
        "tokens": losses.numel(),
        "bytes": int(n_bytes),
        "loss_by_segment": [round(v, 5) for v in per_segment.tolist()],
    }


def evaluate(model: MACModel, tokenizer: Tokenizer, windows: torch.Tensor, batch_size: int = 8,
             ablation: bool = True) -> dict:
    """Loss, perplexity and bits per byte; with `ablation`, the same with memory reset per segment."""
    model.eval()
    nbytes = target_bytes(tokenizer, windows[:, 1:])
    segment = model.config.segment_len
    carried = token_losses(model, windows, batch_size)
    result = {"memory_carried": summarize(carried, nbytes, segment),
              "loss_by_position": [round(v, 5) for v in carried.mean(0).tolist()]}
    if ablation:
        reset = token_losses(model, windows, batch_size, reset_each_segment=True)
        result["memory_reset"] = summarize(reset, nbytes, segment)
        result["loss_by_position_reset"] = [round(v, 5) for v in reset.mean(0).tolist()]
        result["memory_gain_nats_per_byte"] = (
            result["memory_reset"]["nats_per_byte"] - result["memory_carried"]["nats_per_byte"])
    return result


def plot_eval(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(result["loss_by_position"], label="memory carried", linewidth=1)
    if "loss_by_position_reset" in result:
        ax.plot(result["loss_by_position_reset"], label="memory reset each segment", linewidth=1, alpha=0.8)
    ax.set_xlabel("position in window (tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss by position across segments")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
