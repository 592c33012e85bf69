"""KV memory: per-layer K/V tensors addressed by token slot, a slot allocator, and the
request-to-token table that maps (request row, position) -> slot.

Page size is 1 (one slot per token, as in SGLang's default), so any prefix of any
request can be shared by the radix cache without page alignment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sgl_compile.errors import SglcError


class KVPool:
    """k/v: [layers, slots, kv_heads, head_dim]. Slots are allocated and freed in any order."""

    def __init__(
        self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        if num_slots < 1:
            raise SglcError(f"KV pool must hold at least one token, got {num_slots}")
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.size = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() hands out low slots first
        self._is_free = [True] * num_slots

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n free slots, or None (and nothing taken) if fewer than n are free."""
        if n > len(self._free):
            return None
        slots = [self._free.pop() for _ in range(n)]
        for s in slots:
            self._is_free[s] = False
        return slots

    def free(self, slots: list[int]) -> None:
        for s in slots:
            if self._is_free[s]:
                raise RuntimeError(f"KV slot {s} freed twice")
            self._is_free[s] = True
        self._free.extend(slots)


class ReqToTokenPool:
    """Rows of slot ids, one row per running request, `max_context` columns."""

    def __init__(self, max_requests: int, max_context: int, device) -> None:
        self.table = torch.zeros((max_requests, max_context), dtype=torch.int64, device=device)
        self._free = list(range(max_requests - 1, -1, -1))

    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        self._free.append(row)

    def write(self, row: int, start: int, slots: list[int]) -> None:
        self.table[row, start : start + len(slots)] = torch.tensor(slots, dtype=torch.int64)

    def slots(self, row: int, length: int) -> Tensor:
        return self.table[row, :length]

    def write_many(self, rows: Tensor, positions: Tensor, slots: Tensor) -> None:
        """table[rows[i], positions[i]] = slots[i], in one scatter (no per-request copies)."""
        self.table[rows, positions] = slots

    def gather(self, rows: list[int], lengths: list[int]) -> Tensor:
        """The first lengths[i] slots of each row, concatenated (the batch's kv_indices)."""
        if not rows:
            return self.table.new_empty(0)
        return torch.cat([self.table[row, :n] for row, n in zip(rows, lengths, strict=True)])
