"""MAC attention: persistent, retrieved-memory and token entries inside one segment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MACConfig
from .layers import RMSNorm, apply_rope
from .neural_memory import merge_heads, split_heads


def write_slots(buffer: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write values (B, H, m, X) into buffer (B, H, S, X) at per-session slots (B, m).

    In place during inference; out of place when autograd records the graph, because an
    in-place write would invalidate tensors an earlier piece already used.
    """
    b, h, m, x = values.shape
    index = slots[:, None, :, None].expand(b, h, m, x)
    values = values.to(buffer.dtype)
    if torch.is_grad_enabled() and (buffer.requires_grad or values.requires_grad):
        return buffer.scatter(2, index, values)
    return buffer.scatter_(2, index, values)


class SegmentAttention(nn.Module):
    """Softmax attention of each token over the layer's persistent entries and the
    retrieved and token entries of earlier positions in its own segment."""

    def __init__(self, config: MACConfig, with_memory: bool) -> None:
        super().__init__()
        dim, self.heads, d = config.dim, config.heads, config.head_dim
        self.with_memory = with_memory
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # W_Q, W_K, W_V
        self.out = nn.Linear(dim, dim, bias=False)  # W_O
        n_p = config.persistent_tokens
        self.persistent_k = nn.Parameter(torch.randn(self.heads, n_p, d) * config.init_std)
        self.persistent_v = nn.Parameter(torch.randn(self.heads, n_p, d) * config.init_std)
        self.retrieved_norm = RMSNorm(dim, config.norm_eps) if with_memory else None

    def forward(self, u: torch.Tensor, retrieved: torch.Tensor | None, layer, slots: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """u: (B, m, D) normed input; retrieved: (B, m, D) or None; slots: (B, m) in-segment
        positions; cos/sin: (B, 1, m, d/2); visible: (B, 1, m, C) True where a slot is <= the
        query's position. Writes this piece's keys/values into `layer` and returns (B, m, D)."""
        b = u.shape[0]
        q, k, v = self.qkv(u).chunk(3, dim=-1)
        q = apply_rope(split_heads(q, self.heads), cos, sin)  # (B, H, m, d)
        layer.k_tok = write_slots(layer.k_tok, slots, apply_rope(split_heads(k, self.heads), cos, sin))
        layer.v_tok = write_slots(layer.v_tok, slots, split_heads(v, self.heads))
        keys = [self.persistent_k.expand(b, -1, -1, -1).to(q.dtype)]
        values = [self.persistent_v.expand(b, -1, -1, -1).to(q.dtype)]
        masks = [visible.new_ones(*visible.shape[:3], self.persistent_k.shape[1])]

        if self.with_memory:
            dim = u.shape[-1]  # K_r, V_r use the token projections W_K, W_V
            k_r, v_r = F.linear(self.retrieved_norm(retrieved), self.qkv.weight[dim:]).chunk(2, dim=-1)
            layer.k_ret = write_slots(layer.k_ret, slots, apply_rope(split_heads(k_r, self.heads), cos, sin))
            layer.v_ret = write_slots(layer.v_ret, slots, split_heads(v_r, self.heads))
            keys.append(layer.k_ret)
            values.append(layer.v_ret)
            masks.append(visible)

        keys.append(layer.k_tok)
        values.append(layer.v_tok)
        masks.append(visible)
        y = F.scaled_dot_product_attention(
            q, torch.cat(keys, dim=2).to(q.dtype), torch.cat(values, dim=2).to(q.dtype),
            attn_mask=torch.cat(masks, dim=-1))  # (B, H, m, d)
        return self.out(merge_heads(y))
