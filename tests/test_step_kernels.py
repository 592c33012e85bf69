"""The runtime's step kernels (codegen/argmax.py, codegen/decode_inputs.py) against torch.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile.codegen import argmax as argmax_kernel
from sgl_compile.codegen.decode_inputs import decode_inputs, decode_inputs_reference
from sgl_compile.runtime.kv_pool import ReqToTokenPool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    cols=st.integers(1, 3 * argmax_kernel.BLOCK_V + 5),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    special=st.sampled_from(["none", "nan", "inf", "-inf row"]),
)
def test_argmax_matches_torch(seed, rows, cols, dtype, ties, special) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct values: the max repeats, often across chunks
        x = x.round()
    pick = torch.randint(0, cols, (rows, 2), generator=g)
    if special == "nan":
        x[0, pick[0, 0]] = float("nan")
        x[0, pick[0, 1]] = float("nan")
    elif special == "inf":
        x[0, pick[0, 0]] = float("inf")
        x[-1, pick[-1, 1]] = float("nan")
    elif special == "-inf row":
        x[0] = float("-inf")
    x = x.to(dtype)
    expected = x.argmax(dim=-1)
    assert torch.equal(argmax_kernel.argmax(x.to(DEVICE)).cpu(), expected)


def test_argmax_reads_strided_rows_and_empty() -> None:
    x = torch.randn(3, 5000)
    view = x[:, :4097]  # row stride 5000, unit column stride
    assert torch.equal(argmax_kernel.argmax(view.to(DEVICE)).cpu(), view.argmax(-1))
    assert argmax_kernel.argmax(torch.empty(0, 10, device=DEVICE)).shape == (0,)


def _decode_case(seed: int, n: int, pad: int, columns: int):
    """A table with n live rows (random lengths and slots), a future buffer, and the meta of one decode
    step: tokens (some pending: -1 - future row), KV lengths after the step, new slots, rows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 10_000, (n + 3, columns), generator=g)
    future = torch.randint(0, 50_000, (3 * (n + 3) + 1,), generator=g)
    rows = torch.randperm(n + 3, generator=g)[:n]
    kv_len = torch.randint(1, columns + 1, (n,), generator=g)
    token = torch.randint(0, 50_000, (n,), generator=g)
    pending = torch.rand(n, generator=g) < 0.5
    token = torch.where(pending, -1 - torch.randint(0, future.shape[0], (n,), generator=g), token)
    slots = torch.randint(10_000, 20_000, (n,), generator=g)
    meta = torch.stack([token, kv_len, slots, rows])
    bs = n + pad
    outputs = [torch.full((bs,), 7), torch.full((bs,), 7), torch.full((bs,), 7), torch.full((bs + 1,), 7),
               torch.full((int(kv_len.sum()) + pad + 5,), 7)]  # fmt: skip
    return meta, table, future, outputs


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9), pad=st.integers(0, 4), columns=st.integers(1, 2100)
)
def test_decode_inputs_kernel_matches_reference(seed, n, pad, columns) -> None:
    _check_decode_inputs(seed, n, pad, columns)


@pytest.mark.parametrize("n,pad", [(256, 0), (300, 5)])
def test_decode_inputs_wide_batches(n, pad) -> None:
    """A batch filling the 256-wide scan, and one past it (the next width)."""
    _check_decode_inputs(n, n, pad, 40)


def _check_decode_inputs(seed: int, n: int, pad: int, columns: int) -> None:
    """The kernel's table and outputs equal the reference's on one case."""
    meta, table, future, outputs = _decode_case(seed, n, pad, columns)
    ref_table, ref_out = table.clone(), [o.clone() for o in outputs]
    decode_inputs_reference(meta, ref_table, future, *ref_out)
    dev = [t.to(DEVICE) for t in (meta, table, future, *outputs)]
    decode_inputs(*dev)
    assert torch.equal(dev[1].cpu(), ref_table)
    for got, want in zip(dev[3:], ref_out, strict=True):
        assert torch.equal(got.cpu(), want)


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels: CUDA")
def test_decode_inputs_compiles_once_for_every_batch_to_256() -> None:
    """A shrinking batch (an offline run's requests finishing) must not compile a kernel per size."""
    from sgl_compile.codegen.builds import record_builds

    def run(n: int) -> None:
        meta, table, future, outputs = _decode_case(n, n, 1, 40)
        decode_inputs(*[t.to(DEVICE) for t in (meta, table, future, *outputs)])

    run(5)
    with record_builds() as builds:
        for n in (1, 2, 16, 17, 64, 200, 256):
            run(n)
    assert builds.kernels == []


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), pad=st.integers(0, 3))
def test_decode_inputs_reference_is_the_op_by_op_build(seed, n, pad) -> None:
    """What the runner built for decode before (table scatter, then gather; the future buffer read for
    pending tokens), plus the padding rows' fixed values."""
    meta, table, future, outputs = _decode_case(seed, n, pad, 40)
    pool = ReqToTokenPool(table.shape[0], table.shape[1], "cpu")
    pool.table.copy_(table)
    token, kv_len, slots, rows = (m.tolist() for m in meta)
    pool.write_many(rows, [k - 1 for k in kv_len], [[s] for s in slots])
    keys = pool.gather(rows, kv_len)
    decode_inputs_reference(meta, table, future, *outputs)
    input_ids, positions, slot_mapping, kv_indptr, kv_indices = outputs
    assert torch.equal(table, pool.table)
    assert input_ids[:n].tolist() == [future[-1 - t].item() if t < 0 else t for t in token]
    assert input_ids[n:].tolist() == [0] * pad and positions[n:].tolist() == [0] * pad
    assert positions[:n].tolist() == [k - 1 for k in kv_len]
    assert slot_mapping.tolist() == slots + [-1] * pad
    total = sum(kv_len)
    ends = torch.tensor(kv_len).cumsum(0).tolist()
    assert kv_indptr.tolist() == [0, *ends, *range(total + 1, total + pad + 1)]
    assert torch.equal(kv_indices[:total], keys) and kv_indices[total : total + pad].tolist() == [0] * pad
    # Decode attention with rope inside stores request b's new key at slot_mapping[b] and reads it back
    # as the last of b's keys: the two must name the same slot.
    assert [kv_indices[e - 1].item() for e in ends] == slots
