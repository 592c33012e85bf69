"""Each op's reference implementation against an independent formula (numpy, float64, loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile import ir
from sgl_compile.ir import quant

SETTINGS = settings(max_examples=25, deadline=None)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _rms_formula(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


@SETTINGS
@given(t=st.integers(1, 9), h=st.integers(1, 64), eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 99))
def test_rms_norm(t: int, h: int, eps: float, seed: int) -> None:
    x, w = _randn(seed, t, h) * 3, _randn(seed + 1, h)
    got = ir.rms_norm(x, w, eps)
    np.testing.assert_allclose(_np(got), _rms_formula(_np(x), _np(w), eps), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(t=st.integers(1, 9), h=st.integers(1, 64), seed=st.integers(0, 99))
def test_fused_add_rms_norm(t: int, h: int, seed: int) -> None:
    x, r, w = _randn(seed, t, h), _randn(seed + 1, t, h), _randn(seed + 2, h)
    out, summed = ir.fused_add_rms_norm(x, r, w, 1e-6)
    s = _np(x) + _np(r)
    np.testing.assert_allclose(_np(summed), s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(out), _rms_formula(s, _np(w), 1e-6), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    t=st.integers(1, 7),
    hq=st.integers(1, 4),
    hkv=st.integers(1, 3),
    half=st.integers(1, 8),
    theta=st.sampled_from([10000.0, 1e6]),
    seed=st.integers(0, 99),
)
def test_rope_is_complex_rotation(t: int, hq: int, hkv: int, half: int, theta: float, seed: int) -> None:
    d = 2 * half
    q, k = _randn(seed, t, hq, d), _randn(seed + 1, t, hkv, d)
    positions = torch.randint(0, 50, (t,), generator=torch.Generator().manual_seed(seed))
    inv_freq = theta ** (-np.arange(half) * 2.0 / d)
    angles = np.arange(50)[:, None] * inv_freq[None]
    cache = torch.tensor(np.concatenate([np.cos(angles), np.sin(angles)], -1), dtype=torch.float32)
    got_q, got_k = ir.rope(q, k, positions, cache)
    # Pair (x[i], x[i + D/2]) as a complex number and multiply by e^{i * pos * freq_i}.
    rot = np.exp(1j * positions.numpy()[:, None, None] * inv_freq[None, None])
    for x, got in ((q, got_q), (k, got_k)):
        z = (_np(x[..., :half]) + 1j * _np(x[..., half:])) * rot
        np.testing.assert_allclose(_np(got), np.concatenate([z.real, z.imag], -1), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(t=st.integers(1, 9), d=st.integers(1, 40), seed=st.integers(0, 99))
def test_silu_and_mul(t: int, d: int, seed: int) -> None:
    x = _randn(seed, t, 2 * d) * 4
    a, b = _np(x[:, :d]), _np(x[:, d:])
    np.testing.assert_allclose(_np(ir.silu_and_mul(x)), a / (1 + np.exp(-a)) * b, rtol=1e-5, atol=1e-5)


def _attention_loops(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    t, hq, _ = q.shape
    group = hq // k.shape[1]
    out = np.zeros_like(q)
    for i in range(t):
        for h in range(hq):
            s = np.array([q[i, h] @ k[j, h // group] * scale for j in range(i + 1)])
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = sum(p[j] * v[j, h // group] for j in range(i + 1))
    return out


@SETTINGS
@given(
    t=st.integers(1, 12),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    d=st.integers(1, 16),
    seed=st.integers(0, 99),
)
def test_attention_causal_gqa(t: int, hkv: int, group: int, d: int, seed: int) -> None:
    q, k, v = _randn(seed, t, hkv * group, d), _randn(seed + 1, t, hkv, d), _randn(seed + 2, t, hkv, d)
    scale = d**-0.5
    expected = _attention_loops(_np(q), _np(k), _np(v), scale)
    np.testing.assert_allclose(_np(ir.attention(q, k, v, scale)), expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(v=st.integers(1, 30), h=st.integers(1, 16), ids=st.lists(st.integers(0, 29), min_size=1, max_size=10))
def test_embedding(v: int, h: int, ids: list[int]) -> None:
    ids = [i % v for i in ids]
    w = _randn(v * h, v, h)
    got = ir.embedding(torch.tensor(ids), w)
    assert torch.equal(got, torch.stack([w[i] for i in ids]))


def _sample_args() -> dict[str, tuple]:
    x, w = _randn(0, 4, 8), _randn(1, 8)
    q, k = _randn(2, 4, 4, 8), _randn(3, 4, 2, 8)
    cache = torch.cat([torch.ones(16, 4), torch.zeros(16, 4)], -1)
    return {
        "rms_norm": (x, w, 1e-6),
        "fused_add_rms_norm": (x, _randn(4, 4, 8), w, 1e-6),
        "rope": (q, k, torch.arange(4), cache),
        "silu_and_mul": (x,),
        "attention": (q, k, k, 0.35),
        "embedding": (torch.tensor([0, 3, 1]), x),
        "paged_attention": (
            q, k, k, torch.zeros(2, 10, 2, 8), torch.zeros(2, 10, 2, 8), 1, torch.tensor([5, 6, 7, -1]),
            torch.tensor([0, 1, 3]), torch.tensor([0, 3, 5]), torch.tensor([1, 2, 5, 0, 6]), 0.35,
        ),
        "rope_store_kv": (
            q, k, k, torch.arange(4), cache, torch.zeros(2, 10, 2, 8), torch.zeros(2, 10, 2, 8), 1,
            torch.tensor([5, 6, 7, -1]),
        ),
        "linear_w8a16": (x, *quant.quantize_int8(_randn(5, 6, 8)), None),
        "linear_w4a16": (x, *quant.quantize_int4(_randn(5, 6, 8), 4), 4, _randn(6, 6)),
        "linear_fp8": (x, *quant.quantize_fp8(_randn(5, 6, 8)), None, True),
        "quantize_fp8_per_token": (x,),
        "rms_norm_linear": (x, w, 1e-6, _randn(6, 12, 8), _randn(7, 12), "silu_and_mul"),
        "add_rms_norm_linear": (x, _randn(4, 4, 8), w, 1e-6, _randn(6, 12, 8), None, "none"),
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(ir.ALL_OPS | ir.QUANT_OPS))
def test_opcheck(name: str) -> None:
    """Schema, fake (meta) implementation and dispatch of every op agree with the real one."""
    op = (ir.ALL_OPS | ir.QUANT_OPS)[name]
    # The schema check compares tensors with arithmetic that CPU torch lacks for float8; fp8 ops get
    # the fake-tensor check only.
    fp8 = name in ("linear_fp8", "quantize_fp8_per_token")
    utils = ("test_faketensor",) if fp8 else ("test_schema", "test_faketensor")
    torch.library.opcheck(op, _sample_args()[name], test_utils=utils)


def test_norm_linear_ops_are_the_ops_they_fuse() -> None:
    x, r, w = _randn(0, 5, 8), _randn(1, 5, 8), _randn(2, 8)
    proj, bias = _randn(3, 12, 8), _randn(4, 12)
    normed, summed = ir.fused_add_rms_norm(x, r, w, 1e-6)
    out, got_summed = ir.add_rms_norm_linear(x, r, w, 1e-6, proj, bias, "silu_and_mul")
    assert torch.equal(got_summed, summed)
    assert torch.equal(out, ir.silu_and_mul(torch.nn.functional.linear(normed, proj, bias)))
    plain = ir.rms_norm_linear(x, w, 1e-6, proj, None, "none")
    assert torch.equal(plain, torch.nn.functional.linear(ir.rms_norm(x, w, 1e-6), proj))


def test_rope_store_kv_is_rope_then_the_cache_write() -> None:
    q, k, v = _randn(0, 5, 4, 8), _randn(1, 5, 2, 8), _randn(2, 5, 2, 8)
    positions, slots = torch.tensor([3, 0, 7, 1, 2]), torch.tensor([9, -1, 4, 0, 6])
    cos_sin = _randn(3, 16, 8)
    caches = [torch.zeros(2, 12, 2, 8) for _ in range(4)]
    q_rot = ir.rope_store_kv(q, k, v, positions, cos_sin, caches[0], caches[1], 1, slots)
    want_q, want_k = ir.rope(q, k, positions, cos_sin)
    ir.store_kv(want_k, v, caches[2], caches[3], 1, slots)
    assert (
        torch.equal(q_rot, want_q) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    )
    assert caches[0][0].abs().sum() == 0 and caches[0][1, 9].equal(want_k[0])


def test_paged_attention_given_positions_is_rope_store_kv_then_the_attention() -> None:
    """Bit for bit (the fused program's values must not move); one of the two rope arguments is refused."""
    q, k, v = _randn(0, 4, 4, 8), _randn(1, 4, 2, 8), _randn(2, 4, 2, 8)
    positions, slots, cos_sin = torch.tensor([3, 0, 7, 1]), torch.tensor([5, 6, 7, -1]), _randn(3, 16, 8)
    batch = (torch.tensor([0, 1, 3]), torch.tensor([0, 3, 5]), torch.tensor([1, 2, 5, 0, 6]), 0.35)
    caches = [_randn(4 + i, 2, 10, 2, 8) for i in range(2)]
    caches += [c.clone() for c in caches]
    got = ir.paged_attention(q, k, v, caches[0], caches[1], 1, slots, *batch, None, None, positions, cos_sin)
    q_rot = ir.rope_store_kv(q, k, v, positions, cos_sin, caches[2], caches[3], 1, slots)
    want = ir.paged_attention(q_rot, None, None, caches[2], caches[3], 1, slots, *batch)
    assert torch.equal(got[:3], want[:3])  # (row 3 is padding, left unwritten)
    assert all(torch.equal(a, b) for a, b in zip(caches[:2], caches[2:], strict=True))
    with pytest.raises(ValueError, match="both positions and cos_sin_cache"):
        ir.paged_attention(q, k, v, caches[0], caches[1], 1, slots, *batch, None, None, positions, None)
    torch.library.opcheck(
        ir.paged_attention,
        (q, k, v, caches[0], caches[1], 1, slots, *batch, None, None, positions, cos_sin),
        test_utils=("test_schema", "test_faketensor"),  # (the padding row's output is unwritten memory)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_kv_with_norm_weights_is_the_norms_then_rope_store_kv(dtype: torch.dtype) -> None:
    """Bit for bit: the fused program must compute what the unfused one (rms_norm on q and k) did."""
    qkv = _randn(0, 5, 8 * 8).to(dtype)
    q, k, v = (t.view(5, -1, 8) for t in qkv.split([32, 16, 16], dim=-1))  # strided, as the model's
    qw, kw = (_randn(s, 8).to(dtype) for s in (1, 2))
    positions, slots = torch.tensor([3, 0, 7, 1, 2]), torch.tensor([9, -1, 4, 0, 6])
    cos_sin = _randn(3, 16, 8)
    caches = [torch.zeros(2, 12, 2, 8, dtype=dtype) for _ in range(4)]
    args = (q, k, v, positions, cos_sin, caches[0], caches[1], 1, slots)
    q_rot = ir.rope_store_kv(*args, qw, kw, 1e-6)
    normed = (ir.rms_norm(q, qw, 1e-6), ir.rms_norm(k, kw, 1e-6))
    want_q = ir.rope_store_kv(*normed, v, positions, cos_sin, caches[2], caches[3], 1, slots)
    assert (
        torch.equal(q_rot, want_q) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    )
    torch.library.opcheck(
        ir.rope_store_kv, (*args, qw, kw, 1e-6), test_utils=("test_schema", "test_faketensor")
    )
    with pytest.raises(ValueError, match="both"):
        ir.rope_store_kv(*args, qw, None, 1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_quantized_weights_round_trip_within_one_step(fmt: str) -> None:
    """Dequantized weights are within half a quantization step of the originals (fp8: 1/16 relative)."""
    w = _randn(0, 16, 300) * 0.05
    if fmt == "int8":
        q, s = quant.quantize_int8(w)
        err, bound = (quant.dequantize_int8(q, s) - w).abs(), s[:, None] / 2 + 1e-7
    elif fmt == "int4":
        q, s = quant.quantize_int4(w, 128)
        err = (quant.dequantize_int4(q, s, 128, 300) - w).abs()
        bound = s.repeat_interleave(128, dim=1)[:, :300] / 2 + 1e-7
    else:
        q, s = quant.quantize_fp8(w)
        err, bound = (q.float() * s[:, None] - w).abs(), w.abs() / 16 + s[:, None] * 2**-9
    assert (err <= bound).all()


def test_bf16_reference_runs_in_fp32_internally() -> None:
    x = _randn(0, 3, 64).bfloat16() * 100
    w = torch.ones(64, dtype=torch.bfloat16)
    got = ir.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    expected = _rms_formula(_np(x), np.ones(64), 1e-6)
    np.testing.assert_allclose(_np(got), expected, rtol=8e-3, atol=8e-3)


@SETTINGS
@given(
    lens=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 5)), min_size=1, max_size=4),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    seed=st.integers(0, 99),
)
def test_paged_attention_equals_full_attention_per_request(lens, hkv: int, group: int, seed: int) -> None:
    """A ragged batch of (cached prefix, new tokens) requests over scattered slots gives, for the new
    tokens, exactly the rows causal attention over each whole sequence gives; the cache gets the new k/v."""
    d, layers = 8, 2
    total = sum(p + n for p, n in lens)
    slots = torch.randperm(total + 5, generator=torch.Generator().manual_seed(seed))[:total]
    k_cache, v_cache = torch.zeros(layers, total + 5, hkv, d), torch.zeros(layers, total + 5, hkv, d)
    qs, ks, vs, slot_map, kv_idx, expected = [], [], [], [], [], []
    qo, kvp, used = [0], [0], 0
    for b, (prefix, new) in enumerate(lens):
        q = _randn(seed + 10 * b, prefix + new, hkv * group, d)
        k, v = (
            _randn(seed + 10 * b + 1, prefix + new, hkv, d),
            _randn(seed + 10 * b + 2, prefix + new, hkv, d),
        )
        mine = slots[used : used + prefix + new]
        used += prefix + new
        k_cache[1, mine[:prefix]], v_cache[1, mine[:prefix]] = k[:prefix], v[:prefix]  # the cached prefix
        expected.append(_attention_loops(_np(q), _np(k), _np(v), d**-0.5)[prefix:])
        qs.append(q[prefix:]), ks.append(k[prefix:]), vs.append(v[prefix:])
        slot_map.append(mine[prefix:]), kv_idx.append(mine)
        qo.append(qo[-1] + new), kvp.append(kvp[-1] + prefix + new)
    out = ir.paged_attention(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, 1, torch.cat(slot_map),
        torch.tensor(qo), torch.tensor(kvp), torch.cat(kv_idx), d**-0.5,
    )  # fmt: skip
    np.testing.assert_allclose(_np(out), np.concatenate(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache[1, torch.cat(slot_map)], torch.cat(ks))
    assert not k_cache[0].any()  # other layers untouched
