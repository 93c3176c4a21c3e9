"""Small building blocks: RMSNorm, SwiGLU, short causal convolution, rotary embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * scale * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over the token stream.

    It runs across segment and request boundaries, so the caller passes the last
    `width - 1` inputs of the stream (zeros for a new session) and gets the new ones back.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.width = width
        weight = torch.randn(channels, width) * 0.1
        weight[:, -1] += 1.0  # start close to the identity: the newest input passes through
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, m, C); history: (B, width - 1, C)
        m = x.shape[1]
        full = torch.cat([history.to(x.dtype), x], dim=1)  # (B, width - 1 + m, C)
        out = F.conv1d(full.transpose(1, 2), self.weight.unsqueeze(1), groups=self.weight.shape[0])
        new_history = full[:, full.shape[1] - (self.width - 1):]
        return out.transpose(1, 2)[:, :m], new_history  # (B, m, C), (B, width - 1, C)


def rope_tables(head_dim: int, positions: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables of shape (positions, head_dim / 2) in float64."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, m, d); cos, sin: (B, 1, m, d / 2), already gathered at each token's position
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2)
