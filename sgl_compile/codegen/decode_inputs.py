"""A decode step's program inputs, built on the device from one packed copy of its host state.

Built op by op, a decode step's inputs cost ~20 small kernels and ~10 host-to-device copies (each
list its own pinned staging copy; the table's scatter and gather a handful of index kernels each):
at batch 1 that was ~80 us of device time and ~0.5 ms of host time a step, against a ~1 ms forward.
Here the host packs what it knows, per request, into one int64 tensor `meta` [4, n]:

    token      the input token, or -1 - i for a draw still in flight (row i of the future buffer)
    kv_len     the request's KV length after this step (its new token's position + 1)
    slot       the KV slot of the new token
    row        the request's row of the request-to-token table

and one kernel (a program per batch row) resolves the token, writes the slot into the table, and
fills input_ids, positions, slot_mapping, kv_indptr and kv_indices. Rows n..bs of the outputs are
CUDA-graph padding: slot -1 (no KV write), one key each (slot 0) after the real keys.

`decode_inputs_reference` is the same in torch ops: the runtime's CPU path and the kernel's test
oracle. (The launcher always runs the kernel, on CPU tensors through the Triton interpreter.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import pdl

BLOCK_KEYS = 1024  # table entries one loop iteration copies


def _block_b(n: int) -> int:
    """The width of the kernel's scan over the batch's lengths: one width up to 256 requests (then a
    power of two). Each width, and each specialisation of n_real (1, a multiple of 16, other: hence
    do_not_specialize), is a kernel compiled when first seen, and an offline run's batch shrinks
    through every size as requests finish: with a width per power of two that was ~14 compiles in
    the middle of serving. A 256-wide scan is 2 KB of loads a program."""
    return max(256, triton.next_power_of_2(n))


@triton.jit(do_not_specialize=["n_real"])
def _decode_inputs_kernel(
    Meta,
    n_real,
    Table,
    stride_table,
    Future,
    InputIds,
    Positions,
    SlotMapping,
    KvIndptr,
    KvIndices,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_B)
    lens = tl.load(Meta + n_real + offs, mask=offs < n_real, other=0)
    total = tl.sum(lens, axis=0)
    before = tl.sum(tl.where(offs < b, lens, 0), axis=0)  # this row's first key in kv_indices
    if b == 0:
        tl.store(KvIndptr, 0)
    if b < n_real:
        token = tl.load(Meta + b)
        kv_len = tl.load(Meta + n_real + b)
        slot = tl.load(Meta + 2 * n_real + b)
        row = tl.load(Meta + 3 * n_real + b)
        drawn = tl.load(Future + tl.maximum(-1 - token, 0))
        tl.store(InputIds + b, tl.where(token < 0, drawn, token))
        tl.store(Positions + b, kv_len - 1)
        tl.store(SlotMapping + b, slot)
        tl.store(KvIndptr + b + 1, before + kv_len)
        table_row = Table + row * stride_table
        tl.store(table_row + kv_len - 1, slot)
        # The new key comes from `slot`, not from the table entry just stored: other threads of this
        # program may read that entry before the store is visible to them.
        for start in range(0, kv_len, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            keys = tl.load(table_row + k, mask=k < kv_len - 1, other=0)
            keys = tl.where(k == kv_len - 1, slot, keys)
            tl.store(KvIndices + before + k, keys, mask=k < kv_len)
    else:
        pad = b - n_real
        tl.store(InputIds + b, 0)
        tl.store(Positions + b, 0)
        tl.store(SlotMapping + b, -1)
        tl.store(KvIndptr + b + 1, total + pad + 1)
        tl.store(KvIndices + total + pad, 0)


def decode_inputs(
    meta: Tensor,
    table: Tensor,
    future: Tensor,
    input_ids: Tensor,
    positions: Tensor,
    slot_mapping: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
) -> None:
    """Fill the first bs = len(input_ids) rows of the outputs (and kv_indptr[: bs + 1], kv_indices up
    to the batch's keys plus one per padding row) from `meta` [4, n], n <= bs; write the new slots
    into `table`. Every tensor int64, on one device; nothing is read back."""
    n, bs = meta.shape[1], input_ids.shape[0]
    assert table.stride(1) == 1 and meta.is_contiguous()
    _decode_inputs_kernel[(bs,)](
        meta, n, table, table.stride(0), future, input_ids, positions, slot_mapping, kv_indptr, kv_indices,
        BLOCK_B=_block_b(n), BLOCK_K=BLOCK_KEYS, num_warps=4, **pdl.launch_kwargs(meta.device),
    )  # fmt: skip


def decode_inputs_reference(
    meta: Tensor,
    table: Tensor,
    future: Tensor,
    input_ids: Tensor,
    positions: Tensor,
    slot_mapping: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
) -> None:
    n, bs = meta.shape[1], input_ids.shape[0]
    token, kv_len, slot, row = meta
    table[row, kv_len - 1] = slot
    input_ids[:n] = torch.where(token < 0, future[(-1 - token).clamp(min=0)], token)
    positions[:n] = kv_len - 1
    slot_mapping[:n] = slot
    input_ids[n:bs] = 0
    positions[n:bs] = 0
    slot_mapping[n:bs] = -1
    ends = torch.cumsum(kv_len, 0)
    total = int(ends[-1]) if n else 0
    kv_indptr[0] = 0
    kv_indptr[1 : n + 1] = ends
    kv_indptr[n + 1 : bs + 1] = total + torch.arange(1, bs - n + 1, device=meta.device)
    seg = torch.repeat_interleave(torch.arange(n, device=meta.device), kv_len, output_size=total)
    pos = torch.arange(total, device=meta.device) - (ends - kv_len)[seg]
    kv_indices[:total] = table[row[seg], pos]
    kv_indices[total : total + bs - n] = 0
