"""Neural long-term memory: a per-head MLP whose weights learn at test time.

Reading applies each head's MLP to a query. Writing is mini-batch gradient descent
on the squared error ||M_W(k) - v||^2 with momentum and forgetting, applied once per
chunk of `chunk_size` tokens with gradients taken at the chunk's start weights. The
per-token gradients are written out by hand (chain rule through the MLP), and the
momentum/forgetting recurrence is summed in closed form, so a chunk update is a few
matrix products and autograd can differentiate the training loss through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MACConfig
from .layers import ShortConv


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    """Derivative of SiLU: sigma(z) * (1 + z * (1 - sigma(z)))."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_apply(weights: list[torch.Tensor], x: torch.Tensor, residual: bool) -> torch.Tensor:
    """Apply each head's memory MLP. weights[j]: (B, H, out, in); x: (B, H, m, d)."""
    a = x
    last = len(weights) - 1
    for j, w in enumerate(weights):
        z = torch.matmul(a, w.transpose(-1, -2))  # (B, H, m, out_j)
        a = F.silu(z) if j < last else z
    return a + x if residual else a


def memory_gradient_factors(weights: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                            residual: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-token gradient factors of the loss ||M_W(k) - v||^2 summed over features.

    The gradient of token i for weight matrix j is the outer product delta_ij a_ij^T.
    Returns [(delta_j, a_j)] with delta_j: (B, H, n, out_j) and a_j: (B, H, n, in_j).
    """
    inputs, pre_acts = [], []
    a = k
    last = len(weights) - 1
    for j, w in enumerate(weights):
        inputs.append(a)
        z = torch.matmul(a, w.transpose(-1, -2))
        pre_acts.append(z)
        a = F.silu(z) if j < last else z
    out = a + k if residual else a

    factors: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(weights)  # type: ignore[list-item]
    delta = 2.0 * (out - v)  # d loss / d output, (B, H, n, d)
    for j in range(last, -1, -1):
        factors[j] = (delta, inputs[j])
        if j > 0:
            delta = torch.matmul(delta, weights[j]) * silu_grad(pre_acts[j - 1])
    return factors


def decay_products(gates: torch.Tensor) -> torch.Tensor:
    """P[..., i, t] = prod_{j=i+1..t} gates[j] for t >= i, and 0 for t < i.

    gates: (..., n) for tokens 1..n; index 0 of the result stands for the chunk start.
    Built with a masked cumulative product, never by dividing by a product that can reach 0.
    """
    n = gates.shape[-1]
    padded = F.pad(gates, (1, 0), value=1.0)  # (..., n + 1)
    idx = torch.arange(n + 1, device=gates.device)
    later = idx[None, :] > idx[:, None]  # [i, j]: j > i
    factors = torch.where(later, padded.unsqueeze(-2), torch.ones_like(padded).unsqueeze(-2))
    products = factors.cumprod(dim=-1)  # (..., n + 1, n + 1)
    return products * (idx[None, :] >= idx[:, None]).to(products.dtype)


def update_coefficients(theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor):
    """Scalar coefficients of the closed-form chunk update, per session and head.

    theta, eta, alpha: (B, H, n). With A = decay products of (1 - alpha) and E of eta:
        S_n = E[0,n] S_0 - sum_i theta_i E[i,n] g_i
        W_n = A[0,n] W_0 + (sum_t A[t,n] E[0,t]) S_0 - sum_i theta_i (sum_{t>=i} A[t,n] E[i,t]) g_i
    Returns (weight_decay, weight_from_momentum, grad_weights_for_W, momentum_decay, grad_weights_for_S).
    """
    n = theta.shape[-1]
    E = decay_products(eta)  # (B, H, n + 1, n + 1)
    A = decay_products(1.0 - alpha)
    a_to_end = A[..., :, n]  # A[t, n], (B, H, n + 1)
    weight_decay = A[..., 0, n]
    weight_from_momentum = (E[..., 0, 1:] * a_to_end[..., 1:]).sum(-1)
    grad_w = theta * torch.matmul(E[..., 1:, :], a_to_end.unsqueeze(-1)).squeeze(-1)
    momentum_decay = E[..., 0, n]
    grad_s = theta * E[..., 1:, n]
    return weight_decay, weight_from_momentum, grad_w, momentum_decay, grad_s


def chunk_update(weights: list[torch.Tensor], momentum: list[torch.Tensor], k: torch.Tensor,
                 v: torch.Tensor, theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
                 residual: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Absorb one chunk: k, v (B, H, n, d); theta, eta, alpha (B, H, n). Returns new (W, S)."""
    factors = memory_gradient_factors(weights, k, v, residual)
    w_decay, w_from_s, grad_w, s_decay, grad_s = update_coefficients(theta, eta, alpha)
    new_weights, new_momentum = [], []
    for w, s, (delta, a) in zip(weights, momentum, factors):
        # sum_i c_i delta_i a_i^T as one matrix product: (B, H, out, n) @ (B, H, n, in)
        sum_w = torch.matmul((delta * grad_w.unsqueeze(-1)).transpose(-1, -2), a)
        sum_s = torch.matmul((delta * grad_s.unsqueeze(-1)).transpose(-1, -2), a)
        new_weights.append(w_decay[..., None, None] * w + w_from_s[..., None, None] * s - sum_w)
        new_momentum.append(s_decay[..., None, None] * s - sum_s)
    return new_weights, new_momentum


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, m, dim = x.shape
    return x.view(b, m, heads, dim // heads).transpose(1, 2)  # (B, H, m, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, m, d = x.shape
    return x.transpose(1, 2).reshape(b, m, h * d)  # (B, m, D)


class NeuralMemory(nn.Module):
    """Projections, convolutions, gates and initial weights of one layer's memory."""

    def __init__(self, config: MACConfig) -> None:
        super().__init__()
        dim, self.heads, d = config.dim, config.heads, config.head_dim
        self.residual = config.memory_residual
        self.max_lr = config.memory_max_lr
        self.max_momentum = config.memory_max_momentum
        self.max_forget = config.memory_max_forget
        self.query = nn.Linear(dim, dim, bias=False)  # W^m_Q
        self.key = nn.Linear(dim, dim, bias=False)  # W^m_K
        self.value = nn.Linear(dim, dim, bias=False)  # W^m_V
        self.out = nn.Linear(dim, dim, bias=False)  # W^m_O
        self.conv_q = ShortConv(dim, config.conv_width)
        self.conv_k = ShortConv(dim, config.conv_width)
        self.conv_v = ShortConv(dim, config.conv_width)
        self.gates = nn.Linear(dim, 3 * self.heads)  # theta, eta, alpha logits per head

        # Initial memory weights W^(0), learned; shapes (H, out, in).
        hidden = config.memory_expansion * d
        widths = [d] + [hidden] * (config.memory_depth - 1) + [d]
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.randn(self.heads, widths[j + 1], widths[j]) / math.sqrt(widths[j]))
            for j in range(config.memory_depth))

    def reset_gate_biases(self) -> None:
        """Start with little forgetting (0.01), momentum 0.9 * eta_max and lr 0.1 * theta_max."""
        with torch.no_grad():
            bias = self.gates.bias.view(3, self.heads)
            bias[0].fill_(math.log(0.1 / 0.9))
            bias[1].fill_(math.log(0.9 / 0.1))
            bias[2].fill_(math.log(0.01 / 0.99))

    def read(self, u: torch.Tensor, weights: list[torch.Tensor],
             history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieve r_t for every token: u (B, m, D) -> (B, m, D), new conv history."""
        q, history = self.conv_q(self.query(u), history)
        q = F.normalize(split_heads(F.silu(q), self.heads), dim=-1)  # (B, H, m, d)
        r = memory_apply(weights, q.to(weights[0].dtype), self.residual).to(u.dtype)
        return self.out(merge_heads(r)), history

    def gate(self, y: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """Output gate sigma(M_W(norm(silu(y W^m_Q))) W^m_O), no convolution; y: (B, m, D)."""
        q = F.normalize(split_heads(F.silu(self.query(y)), self.heads), dim=-1)
        g = memory_apply(weights, q.to(weights[0].dtype), self.residual).to(y.dtype)
        return torch.sigmoid(self.out(merge_heads(g)))

    def write_inputs(self, y: torch.Tensor, history_k: torch.Tensor, history_v: torch.Tensor):
        """Keys, values and gates of each token: k, v (B, H, m, d); gates (B, H, m, 3)."""
        k, history_k = self.conv_k(self.key(y), history_k)
        v, history_v = self.conv_v(self.value(y), history_v)
        k = F.normalize(split_heads(F.silu(k), self.heads), dim=-1)
        v = split_heads(F.silu(v), self.heads)
        logits = self.gates(y).view(y.shape[0], y.shape[1], 3, self.heads).permute(0, 3, 1, 2)
        gates = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        # (B, H, m, 3): theta, eta, alpha
        gates = gates * gates.new_tensor([self.max_lr, self.max_momentum, self.max_forget])
        return k, v, gates, history_k, history_v

    def update(self, weights, momentum, k, v, gates):
        """Closed-form chunk update; gates (B, H, n, 3) hold theta, eta, alpha."""
        theta, eta, alpha = gates.unbind(-1)
        dtype = weights[0].dtype  # float32, or float64 for a float64 model
        return chunk_update(weights, momentum, k.to(dtype), v.to(dtype), theta.to(dtype),
                            eta.to(dtype), alpha.to(dtype), self.residual)
