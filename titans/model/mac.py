"""The Titans MAC model: blocks of memory read, segment attention, gate, SwiGLU and memory write.

One code path serves both forms. `feed` walks the token stream in pieces that never
cross a memory chunk boundary of any session in the batch: every token of a piece reads
the memory weights of its chunk's start, attends to its segment so far, and the chunk's
update runs once its last token has been seen. The parallel form `model(tokens)` is
`feed` on a fresh state, one whole chunk per piece.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_tensors
from torch import nn
from torch.profiler import record_function

from .attention import SegmentAttention, write_slots
from .config import MACConfig
from .layers import RMSNorm, SwiGLU, rope_tables
from .neural_memory import NeuralMemory
from .state import LayerState, State


class MACBlock(nn.Module):
    def __init__(self, config: MACConfig, with_memory: bool) -> None:
        super().__init__()
        self.config = config
        self.norm_attn = RMSNorm(config.dim, config.norm_eps)
        self.norm_ffn = RMSNorm(config.dim, config.norm_eps)
        self.attention = SegmentAttention(config, with_memory)
        self.memory = NeuralMemory(config) if with_memory else None
        self.ffn = SwiGLU(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor, layer: LayerState, slots: torch.Tensor, chunk_slots: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        # record_function labels name the stages in `titans profile` reports.
        u = self.norm_attn(x)
        retrieved = None
        if self.memory is not None:
            with record_function("memory_read"):
                retrieved, layer.conv_q = self.memory.read(u, layer.weights, layer.conv_q)

        with record_function("attention"):
            y = self.attention(u, retrieved, layer, slots, cos, sin, visible)  # (B, m, D)

        out = y
        if self.memory is not None and self.config.output_gate:
            with record_function("memory_read"):
                out = y * self.memory.gate(y, layer.weights)
        x = x + out
        with record_function("mlp"):
            x = x + self.ffn(self.norm_ffn(x))

        if self.memory is not None:
            with record_function("memory_update"):
                k, v, gates, layer.conv_k, layer.conv_v = self.memory.write_inputs(y, layer.conv_k, layer.conv_v)
                layer.chunk_k = write_slots(layer.chunk_k, chunk_slots, k)
                layer.chunk_v = write_slots(layer.chunk_v, chunk_slots, v)
                layer.chunk_gates = write_slots(layer.chunk_gates, chunk_slots, gates)
        return x

    def absorb_chunk(self, layer: LayerState, done: list[int], batch_size: int) -> None:
        """Apply the chunk update for the sessions in `done`, whose chunk is complete."""
        if self.memory is None:
            return
        with record_function("memory_update"):
            self._absorb_chunk(layer, done, batch_size)

    def _absorb_chunk(self, layer: LayerState, done: list[int], batch_size: int) -> None:
        if len(done) == batch_size:
            layer.weights, layer.momentum = self.memory.update(
                layer.weights, layer.momentum, layer.chunk_k, layer.chunk_v, layer.chunk_gates)
            return
        index = torch.tensor(done, device=layer.chunk_k.device)
        pick = [t.index_select(0, index) for t in (layer.chunk_k, layer.chunk_v, layer.chunk_gates)]
        weights, momentum = self.memory.update(
            [w.index_select(0, index) for w in layer.weights],
            [s.index_select(0, index) for s in layer.momentum], *pick)
        recording = torch.is_grad_enabled()
        for name, new in (("weights", weights), ("momentum", momentum)):
            old = getattr(layer, name)
            if recording:
                setattr(layer, name, [o.index_copy(0, index, n) for o, n in zip(old, new)])
            else:
                for o, n in zip(old, new):
                    o.index_copy_(0, index, n)


class MACModel(nn.Module):
    def __init__(self, config: MACConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(MACBlock(config, config.has_memory(i)) for i in range(config.layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        cos, sin = rope_tables(config.head_dim, config.segment_len, config.rope_base)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self._fingerprint: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.dim() == 2 and "conv" not in name:  # embeddings and linear layers
                nn.init.normal_(param, std=std)
        # Scale residual output projections by depth, as GPT-2 does.
        for block in self.blocks:
            nn.init.normal_(block.attention.out.weight, std=std / (2 * self.config.layers) ** 0.5)
            nn.init.normal_(block.ffn.down.weight, std=std / (2 * self.config.layers) ** 0.5)
            if block.memory is not None:
                block.memory.reset_gate_biases()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the weights as safetensors; a loaded checkpoint sets it to the file's hash."""
        if self._fingerprint is None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            self._fingerprint = hashlib.sha256(save_tensors(tensors)).hexdigest()
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self._fingerprint = value

    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> State:
        """Create a fresh state for `batch_size` sessions: initial memory weights, zero momentum."""
        cfg = self.config
        device = torch.device(device) if device is not None else self.device
        dtype = self.embed.weight.dtype
        memory_dtype = torch.promote_types(dtype, torch.float32)
        shape = (batch_size, cfg.heads, cfg.segment_len, cfg.head_dim)
        layers = []
        for block in self.blocks:
            layer = LayerState(k_tok=torch.zeros(shape, dtype=dtype, device=device),
                               v_tok=torch.zeros(shape, dtype=dtype, device=device))
            if block.memory is not None:
                layer.k_ret = torch.zeros(shape, dtype=dtype, device=device)
                layer.v_ret = torch.zeros(shape, dtype=dtype, device=device)
                init = [w.detach().to(device, memory_dtype) for w in block.memory.initial_weights]
                layer.weights = [w.unsqueeze(0).repeat(batch_size, 1, 1, 1) for w in init]
                layer.momentum = [torch.zeros_like(w) for w in layer.weights]
                conv = (batch_size, cfg.conv_width - 1, cfg.dim)
                layer.conv_q, layer.conv_k, layer.conv_v = (
                    torch.zeros(conv, dtype=dtype, device=device) for _ in range(3))
                chunk = (batch_size, cfg.heads, cfg.chunk_size, cfg.head_dim)
                layer.chunk_k = torch.zeros(chunk, dtype=memory_dtype, device=device)
                layer.chunk_v = torch.zeros(chunk, dtype=memory_dtype, device=device)
                layer.chunk_gates = torch.zeros(chunk[:3] + (3,), dtype=memory_dtype, device=device)
            layers.append(layer)
        return State(layers, [0] * batch_size, fingerprint=self.fingerprint)

    def _initial_state_for_training(self, batch_size: int) -> State:
        """Like new_state, but the initial memory weights stay connected to the graph."""
        state = self.new_state(batch_size)
        for block, layer in zip(self.blocks, state.layers):
            if block.memory is not None:
                memory_dtype = layer.weights[0].dtype
                layer.weights = [w.to(memory_dtype).unsqueeze(0).expand(batch_size, -1, -1, -1)
                                 for w in block.memory.initial_weights]
        return state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Parallel form: logits (B, T, V) for tokens (B, T) from a fresh memory."""
        state = self._initial_state_for_training(tokens.shape[0]) if torch.is_grad_enabled() \
            else self.new_state(tokens.shape[0])
        logits, _ = self.feed(state, tokens)
        return logits

    def feed(self, state: State, tokens: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, State]:
        """Incremental form: feed tokens (B, n) into `state` (updated in place).

        Sessions may sit at different positions. Returns logits (B, n, V), or (B, 1, V)
        for the last token only when `last_only` is set, and the state.
        """
        if tokens.dim() != 2 or tokens.shape[0] != state.batch_size:
            raise ValueError(f"tokens must have shape (batch={state.batch_size}, n), got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        cfg = self.config
        device = self.device
        tokens = tokens.to(device)
        n = tokens.shape[1]
        outputs = []
        start = 0
        while start < n:
            in_chunk = [c % cfg.chunk_size for c in state.consumed]
            m = min(n - start, min(cfg.chunk_size - c for c in in_chunk))
            x = self._feed_piece(state, tokens[:, start:start + m], in_chunk, m)
            if not last_only or start + m == n:
                outputs.append(x if not last_only else x[:, -1:])
            start += m
        if not outputs:
            return self.embed.weight.new_zeros(state.batch_size, 0, cfg.vocab_size), state
        with record_function("output_head"):
            hidden = self.norm(torch.cat(outputs, dim=1))
            logits = F.linear(hidden, self.embed.weight)  # tied output embedding
        return logits, state

    def _feed_piece(self, state: State, tokens: torch.Tensor, in_chunk: list[int], m: int) -> torch.Tensor:
        cfg = self.config
        device = tokens.device
        offsets = torch.arange(m, device=device)
        seg_start = torch.tensor([c % cfg.segment_len for c in state.consumed], device=device)
        slots = seg_start[:, None] + offsets[None, :]  # (B, m) in-segment positions
        chunk_slots = torch.tensor(in_chunk, device=device)[:, None] + offsets[None, :]
        cos = self.rope_cos[slots].unsqueeze(1).to(self.embed.weight.dtype)  # (B, 1, m, d/2)
        sin = self.rope_sin[slots].unsqueeze(1).to(self.embed.weight.dtype)
        visible = (torch.arange(cfg.segment_len, device=device)[None, None, :] <= slots[:, :, None])
        visible = visible.unsqueeze(1)  # (B, 1, m, C)

        x = self.embed(tokens)
        for block, layer in zip(self.blocks, state.layers):
            x = block(x, layer, slots, chunk_slots, cos, sin, visible)

        done = [i for i, c in enumerate(in_chunk) if c + m == cfg.chunk_size]
        if done:
            for block, layer in zip(self.blocks, state.layers):
                block.absorb_chunk(layer, done, state.batch_size)
        state.consumed = [c + m for c in state.consumed]
        return x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
