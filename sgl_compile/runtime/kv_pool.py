"""KV memory: per-layer K/V tensors addressed by token slot, a slot allocator, and the
request-to-token table that maps (request row, position) -> slot.

Page size is 1 (one slot per token, as in SGLang's default), so any prefix of any
request can be shared by the radix cache without page alignment.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import torch
from torch import Tensor

from sgl_compile.errors import SglcError


class KVPool:
    """k/v: [layers, slots, kv_heads, head_dim]. Slots are allocated and freed in any order.

    The host's bookkeeping of slots (here, the request-to-token rows, the radix tree's nodes) is kept in
    arrays, not lists: Python's cycle collector walks every element of every list it tracks, and the
    lists of a large pool and of 1024 requests' rows held millions of them (with the start-up objects
    freeze_gc exempts, a full collection took ~200 ms at batch 1024, the GPU waiting through it). Arrays
    are not tracked."""

    def __init__(
        self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        if num_slots < 1:
            raise SglcError(f"KV pool must hold at least one token, got {num_slots}")
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.size = num_slots
        self._free = array.array("q", range(num_slots - 1, -1, -1))  # a stack: low slots handed out first
        self._is_free = bytearray(b"\x01") * num_slots

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n free slots, or None (and nothing taken) if fewer than n are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        slots = self._free[-n:].tolist()[::-1]  # (the stack's top first)
        del self._free[-n:]
        for s in slots:
            self._is_free[s] = 0
        return slots

    def free(self, slots: Sequence[int]) -> None:
        for s in slots:
            if self._is_free[s]:
                raise RuntimeError(f"KV slot {s} freed twice")
            self._is_free[s] = 1
        self._free.extend(slots)


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """A host list on the device without waiting for the device. The list goes through array.array
    (torch.tensor(list) converts element by element: 130 us per 1024 values on the H200 machine's host,
    against ~40); on CUDA into pinned memory (the caching host allocator reuses a block once its copy
    has run; `.pin_memory()` on a pageable tensor would first ask the driver whether it is pinned) and
    then copied asynchronously."""
    host = torch.frombuffer(array.array(_ARRAY_CODES[dtype], values), dtype=dtype) if values else None
    if device.type != "cuda":
        return host.clone() if host is not None else torch.empty(0, dtype=dtype)
    pinned = torch.empty(len(values), dtype=dtype, pin_memory=True)
    if host is not None:
        pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


_ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}


class ReqToTokenPool:
    """Rows of slot ids, one row per running request, `max_context` columns.

    The device table is what attention reads; a host mirror of each row lets the scheduler hand slots
    to the radix cache without reading the device (which would wait for the step in flight).
    """

    def __init__(self, max_requests: int, max_context: int, device) -> None:
        self.table = torch.zeros((max_requests, max_context), dtype=torch.int64, device=device)
        self.device = self.table.device
        self.host: list[array.array] = [array.array("q") for _ in range(max_requests)]  # (see KVPool)
        self._free = list(range(max_requests - 1, -1, -1))

    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        if not self._free:
            return None
        row = self._free.pop()
        self.host[row] = array.array("q")
        return row

    def free(self, row: int) -> None:
        self._free.append(row)

    def write(self, row: int, start: int, slots: Sequence[int]) -> None:
        """Positions start.. of a row get these slots (start <= the row's current length)."""
        self.host[row][start : start + len(slots)] = array.array("q", slots)
        if slots:
            self.table[row, start : start + len(slots)] = to_device(slots, self.device)

    def slots(self, row: int, length: int) -> array.array:
        return self.host[row][:length]

    def write_many(self, rows: list[int], starts: list[int], slots: list[list[int]]) -> None:
        """Each row's new slots from its start, in one scatter on the device (no per-request copies)."""
        flat_rows, flat_pos, flat_slots = [], [], []
        for row, start, new in zip(rows, starts, slots, strict=True):
            self.host[row][start : start + len(new)] = array.array("q", new)
            flat_rows += [row] * len(new)
            flat_pos += range(start, start + len(new))
            flat_slots += new
        if flat_slots:
            dev = self.device
            self.table[to_device(flat_rows, dev), to_device(flat_pos, dev)] = to_device(flat_slots, dev)

    def gather(self, rows: list[int], lengths: list[int]) -> Tensor:
        """The first lengths[i] slots of each row, concatenated (the batch's kv_indices), built on the
        device: per-key row and position from the lengths, then one gather."""
        total = sum(lengths)
        if not rows or total == 0:
            return self.table.new_empty(0)
        dev = self.device
        lens = to_device(lengths, dev)
        starts = torch.cumsum(lens, 0) - lens
        seg = torch.repeat_interleave(torch.arange(len(rows), device=dev), lens, output_size=total)
        pos = torch.arange(total, device=dev) - starts[seg]
        return self.table[to_device(rows, dev)[seg], pos]
