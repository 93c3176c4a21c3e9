"""The decode batch: running sessions' states packed into the leading rows of shared tensors.

Joining copies one session's state into the next free row; leaving moves the last row into
the freed one. Neither copies the whole batch, so sessions come and go between steps at
the cost of their own state size.
"""

from __future__ import annotations

import torch

from titans.model import MACModel, State
from titans.model.state import LayerState


class SlotBatch:
    def __init__(self, model: MACModel) -> None:
        self.model = model
        self.capacity = 0
        self.size = 0
        self._rows: State | None = None  # capacity rows; the first `size` are live

    def add(self, state: State) -> int:
        """Copy a single-session state into a free row; returns the row index."""
        if state.batch_size != 1:
            raise ValueError(f"add() takes a single-session state, got batch size {state.batch_size}")
        if self.size == self.capacity:
            self._grow(max(4, 2 * self.capacity))
        row = self.size
        self._copy_row(state, 0, self._rows, row)
        self._rows.consumed[row] = state.consumed[0]
        self._rows.pending[row] = list(state.pending[0])
        self.size += 1
        return row

    def remove(self, row: int) -> State:
        """Take a row out as its own state; the last row moves into its place."""
        if not 0 <= row < self.size:
            raise IndexError(f"row {row} is not live (size {self.size})")
        out = self.model.new_state(1, device=self.model.device)
        self._copy_row(self._rows, row, out, 0)
        out.consumed = [self._rows.consumed[row]]
        out.pending = [list(self._rows.pending[row])]
        last = self.size - 1
        if row != last:
            self._copy_row(self._rows, last, self._rows, row)
            self._rows.consumed[row] = self._rows.consumed[last]
            self._rows.pending[row] = self._rows.pending[last]
        self.size -= 1
        return out

    def view(self) -> State:
        """Return the live rows as one batched state whose tensors share storage with the batch."""
        layers = [LayerState.from_tensors({k: t[:self.size] for k, t in layer.tensors().items()})
                  for layer in self._rows.layers]
        return State(layers, self._rows.consumed[:self.size], self._rows.pending[:self.size],
                     self._rows.fingerprint)

    def sync(self, view: State) -> None:
        """Write back what `feed` replaced instead of updating in place (new tensors, counters)."""
        for backing, live in zip(self._rows.layers, view.layers):
            rows = backing.tensors()
            for name, tensor in live.tensors().items():
                target = rows[name][:self.size]
                if tensor.data_ptr() != target.data_ptr():
                    target.copy_(tensor)
        self._rows.consumed[:self.size] = view.consumed
        self._rows.pending[:self.size] = view.pending

    def _grow(self, capacity: int) -> None:
        rows = self.model.new_state(capacity, device=self.model.device)
        if self._rows is not None:
            for old, new in zip(self._rows.layers, rows.layers):
                fresh = new.tensors()
                for name, tensor in old.tensors().items():
                    fresh[name][:self.size].copy_(tensor[:self.size])
            rows.consumed[:self.size] = self._rows.consumed[:self.size]
            rows.pending[:self.size] = self._rows.pending[:self.size]
        self._rows = rows
        self.capacity = capacity

    @staticmethod
    @torch.no_grad()
    def _copy_row(src: State, src_row: int, dst: State, dst_row: int) -> None:
        for src_layer, dst_layer in zip(src.layers, dst.layers):
            targets = dst_layer.tensors()
            for name, tensor in src_layer.tensors().items():
                targets[name][dst_row].copy_(tensor[src_row])
