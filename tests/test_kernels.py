"""Triton kernels of codegen/ (norm, activation, rope, fp8, quant_gemm) against the reference ops.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1) in fp32
and fp16 only: the interpreter's bf16 `tl.dot` is wrong and its fp32 -> bf16 cast does not round
to nearest even. On CUDA the same tests also run bf16, and the `cuda`-marked tests cover
`torch._scaled_mm` and model-sized GEMMs. References always run on CPU copies of the inputs,
so they stay the op bodies even after the Triton kernels are registered for CUDA.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile.codegen import activation, fp8, norm, quant_gemm, rope
from sgl_compile.ir import ops, quant

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if CUDA else [])]
dtypes = st.sampled_from(DTYPES)
cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter's bf16 dot and casts are wrong)")

# Elementwise / row-reduction tolerances. fp32: the kernels compute the reference's formula in
# fp32 but may sum in another order, contract into FMAs and use the GPU's approximate rsqrt /
# exp, a few ulp (~1e-7 relative); 1e-5 leaves room. 16-bit: the reference has two rounding
# points (e.g. normalised row, then the weight product); an fp32 difference of a few ulp can flip
# the first by one ulp, and the second rounds again, so two ulp: 2 * 2^-10 (fp16), 2 * 2^-7
# (bf16). atol covers results in the subnormal range.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _ref(op, *args):
    """The reference op on CPU copies; results come back on DEVICE."""
    out = op(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    if isinstance(out, tuple):
        return tuple(o.to(DEVICE) for o in out)
    return out.to(DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# rms_norm / fused_add_rms_norm
# ---------------------------------------------------------------------------------------------

norm_configs = st.sampled_from([None, {"BLOCK_H": 128, "num_warps": 4}, {"BLOCK_H": 64, "num_warps": 2}])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    lead=st.sampled_from([(1,), (5,), (2, 3)]),
    hidden=st.sampled_from([7, 64, 100, 576, 896, 2048]),
    dtype=dtypes,
    eps=st.sampled_from([1e-6, 1e-5]),
    config=norm_configs,
)
def test_rms_norm(seed, lead, hidden, dtype, eps, config):
    g = _gen(seed)
    x, r = _randn(g, *lead, hidden, dtype=dtype, scale=3), _randn(g, *lead, hidden, dtype=dtype)
    w = _randn(g, hidden, dtype=dtype)
    _close(norm.rms_norm(x, w, eps, config=config), _ref(torch.ops.sglc.rms_norm, x, w, eps), dtype)
    out, summed = norm.fused_add_rms_norm(x, r, w, eps, config=config)
    ref_out, ref_summed = _ref(torch.ops.sglc.fused_add_rms_norm, x, r, w, eps)
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)  # one fp32 add, one rounding
    _close(out, ref_out, dtype)


def test_rms_norm_reads_strided_rows():
    g = _gen(0)
    x = _randn(g, 4, 200)[:, :96]  # row stride 200, unit stride along H
    w = _randn(g, 96)
    _close(norm.rms_norm(x, w, 1e-6), _ref(torch.ops.sglc.rms_norm, x, w, 1e-6), torch.float32)


# ---------------------------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    lead=st.sampled_from([(1,), (6,), (2, 3)]),
    d=st.sampled_from([5, 64, 96, 300]),
    dtype=dtypes,
    config=st.sampled_from([None, {"BLOCK_D": 64, "num_warps": 2}]),
)
def test_silu_and_mul(seed, lead, d, dtype, config):
    x = _randn(_gen(seed), *lead, 2 * d, dtype=dtype, scale=4)
    _close(activation.silu_and_mul(x, config=config), _ref(torch.ops.sglc.silu_and_mul, x), dtype)


# ---------------------------------------------------------------------------------------------
# store_kv / rope / rope_store_kv
# ---------------------------------------------------------------------------------------------

LAYERS = 3
heads = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 4, 7]))  # (Hkv, Hq // Hkv)
head_dims = st.sampled_from([8, 24, 64])  # 24: D/2 = 12 is not a power of two
rope_configs = st.sampled_from([None, {"BLOCK_H": 2, "num_warps": 1}])


def _qkv(g: torch.Generator, tokens: int, hkv: int, group: int, d: int, dtype: torch.dtype):
    """q/k/v as the strided views of one fused QKV projection, as the model produces them."""
    hq = hkv * group
    qkv = _randn(g, tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)


def _slots(g: torch.Generator, tokens: int, pad: int, num_slots: int) -> torch.Tensor:
    """Distinct slots for the real tokens, then `pad` padding rows (slot -1), shuffled together."""
    slots = torch.randperm(num_slots, generator=g)[: tokens - pad]
    slots = torch.cat([slots, torch.full((pad,), -1)])
    return slots[torch.randperm(tokens, generator=g)].to(DEVICE)


def _caches(g: torch.Generator, num_slots: int, hkv: int, d: int, dtype: torch.dtype):
    return _randn(g, LAYERS, num_slots, hkv, d, dtype=dtype), _randn(
        g, LAYERS, num_slots, hkv, d, dtype=dtype
    )


def _cos_sin(g: torch.Generator, max_pos: int, d: int) -> torch.Tensor:
    angles = torch.rand(max_pos, d // 2, generator=g) * 6.3
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEVICE)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    tokens=st.integers(1, 9),
    pad=st.integers(0, 3),
    heads=heads,
    head_dim=head_dims,
    dtype=dtypes,
    cache_dtype=st.sampled_from([None, torch.float16]),
    layer=st.integers(0, LAYERS - 1),
    config=st.sampled_from([None, {"BLOCK_H": 1, "num_warps": 1}]),
)
def test_store_kv(seed, tokens, pad, heads, head_dim, dtype, cache_dtype, layer, config):
    g = _gen(seed)
    pad, num_slots = min(pad, tokens), tokens + 5
    _, k, v = _qkv(g, tokens, heads[0], 1, head_dim, dtype)
    k_cache, v_cache = _caches(g, num_slots, heads[0], head_dim, cache_dtype or dtype)
    slots = _slots(g, tokens, pad, num_slots)
    ref_k, ref_v = k_cache.cpu(), v_cache.cpu()
    ops.store_kv(k.cpu(), v.cpu(), ref_k, ref_v, layer, slots.cpu())
    rope.store_kv(k, v, k_cache, v_cache, layer, slots, config=config)
    # A copy (and cast) only: bit-exact, untouched slots and layers included.
    torch.testing.assert_close(k_cache.cpu(), ref_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache.cpu(), ref_v, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    tokens=st.integers(1, 9),
    heads=heads,
    head_dim=head_dims,
    dtype=dtypes,
    config=rope_configs,
)
def test_rope(seed, tokens, heads, head_dim, dtype, config):
    g = _gen(seed)
    q, k, _ = _qkv(g, tokens, heads[0], heads[1], head_dim, dtype)
    positions, cos_sin = torch.randint(0, 32, (tokens,), generator=g).to(DEVICE), _cos_sin(g, 32, head_dim)
    q_rot, k_rot = rope.rope(q, k, positions, cos_sin, config=config)
    ref_q, ref_k = _ref(torch.ops.sglc.rope, q, k, positions, cos_sin)
    _close(q_rot, ref_q, dtype)
    _close(k_rot, ref_k, dtype)


def _assert_untouched_outside(
    cache: torch.Tensor, ref: torch.Tensor, layer: int, slots: torch.Tensor
) -> None:
    """Every entry but layer `layer`'s written slots (>= 0) equals the reference bit for bit."""
    written = torch.zeros(cache.shape[1], dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    other = torch.ones(cache.shape[:2], dtype=torch.bool)
    other[layer] = ~written
    torch.testing.assert_close(cache.cpu()[other], ref[other], rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    tokens=st.integers(1, 9),
    pad=st.integers(0, 3),
    heads=heads,
    head_dim=head_dims,
    dtype=dtypes,
    layer=st.integers(0, LAYERS - 1),
    config=rope_configs,
)
def test_rope_store_kv(seed, tokens, pad, heads, head_dim, dtype, layer, config):
    g = _gen(seed)
    pad, num_slots = min(pad, tokens), tokens + 5
    q, k, v = _qkv(g, tokens, heads[0], heads[1], head_dim, dtype)
    positions, cos_sin = torch.randint(0, 32, (tokens,), generator=g).to(DEVICE), _cos_sin(g, 32, head_dim)
    k_cache, v_cache = _caches(g, num_slots, heads[0], head_dim, dtype)
    slots = _slots(g, tokens, pad, num_slots)
    ref_k, ref_v = k_cache.cpu(), v_cache.cpu()
    ref_q = ops.rope_store_kv(
        q.cpu(), k.cpu(), v.cpu(), positions.cpu(), cos_sin.cpu(), ref_k, ref_v, layer, slots.cpu()
    )
    q_rot = rope.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, layer, slots, config=config)
    _close(q_rot, ref_q.to(DEVICE), dtype)
    _close(k_cache.cpu(), ref_k, dtype)  # rotated keys within rounding, everything else untouched
    torch.testing.assert_close(v_cache.cpu(), ref_v, rtol=0, atol=0)
    _assert_untouched_outside(k_cache, ref_k, layer, slots)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    tokens=st.integers(1, 9),
    pad=st.integers(0, 3),
    heads=heads,
    head_dim=st.sampled_from([24, 64, 128]),
    dtype=dtypes,
    layer=st.integers(0, LAYERS - 1),
    config=rope_configs,
)
def test_rope_store_kv_with_qk_norm(seed, tokens, pad, heads, head_dim, dtype, layer, config):
    """HAS_NORM: each q / k head RMS-normalised (Qwen3) before the rotation, read from the strided
    views of the QKV projection as in the real graph."""
    g = _gen(seed)
    pad, num_slots = min(pad, tokens), tokens + 5
    q, k, v = _qkv(g, tokens, heads[0], heads[1], head_dim, dtype)
    # Rows far from unit RMS, so a missing or wrong norm shows; in place, so q and k stay strided views.
    q.mul_(3)
    k.mul_(0.5)
    weights = [(torch.rand(head_dim, generator=g) + 0.5).to(dtype).to(DEVICE) for _ in range(2)]
    positions, cos_sin = torch.randint(0, 32, (tokens,), generator=g).to(DEVICE), _cos_sin(g, 32, head_dim)
    k_cache, v_cache = _caches(g, num_slots, heads[0], head_dim, dtype)
    slots = _slots(g, tokens, pad, num_slots)
    ref_k, ref_v = k_cache.cpu(), v_cache.cpu()
    ref_q = ops.rope_store_kv(
        q.cpu(), k.cpu(), v.cpu(), positions.cpu(), cos_sin.cpu(), ref_k, ref_v, layer, slots.cpu(),
        *(w.cpu() for w in weights), 1e-6,
    )  # fmt: skip
    q_rot = rope.rope_store_kv(
        q, k, v, positions, cos_sin, k_cache, v_cache, layer, slots, *weights, 1e-6, config=config
    )
    # 16-bit: a few-ulp fp32 difference in rstd may flip the rounded normed value, then its product
    # with the weight, by an ulp each; the rotation mixes two such values, so up to ~4 ulp of the
    # pair's magnitude (plus its own rounding) lands on outputs that may cancel to near zero.
    tol = dict(rtol=TOL[dtype]["rtol"], atol=10 * UNIT_ROUNDOFF[dtype] * ref_q.abs().max().item())
    torch.testing.assert_close(q_rot.cpu(), ref_q, **tol)
    torch.testing.assert_close(k_cache.cpu(), ref_k, **tol)
    torch.testing.assert_close(v_cache.cpu(), ref_v, rtol=0, atol=0)
    _assert_untouched_outside(k_cache, ref_k, layer, slots)


def test_rope_store_kv_norm_weights_come_in_pairs():
    q, k, v = _qkv(_gen(0), 2, 1, 1, 8, torch.float32)
    k_cache, v_cache = _caches(_gen(1), 4, 1, 8, torch.float32)
    args = (
        q,
        k,
        v,
        torch.zeros(2, dtype=torch.long, device=DEVICE),
        _cos_sin(_gen(2), 4, 8),
        k_cache,
        v_cache,
    )
    with pytest.raises(ValueError, match="both"):
        rope.rope_store_kv(*args, 0, torch.arange(2, device=DEVICE), torch.ones(8, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# quantize_fp8_per_token
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_e4m3_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, fp8.round_to_e4m3(tl.load(X + offs, mask=offs < n)), mask=offs < n)


def test_round_to_e4m3_matches_torch_cast():
    """Every e4m3 value, every midpoint (ties) and its fp32 neighbours, and random values."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[~grid.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.full_like(mids, 1e9), torch.full_like(mids, -1e9)
    g = _gen(0)
    wide = (torch.randn(4096, generator=g) * torch.exp(torch.randn(4096, generator=g) * 4)).clamp(-448, 448)
    x = torch.cat([grid, mids, mids.nextafter(up), mids.nextafter(down), wide]).to(DEVICE)
    y = torch.empty_like(x)
    _round_e4m3_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    torch.testing.assert_close(y.cpu(), x.cpu().to(torch.float8_e4m3fn).float(), rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    tokens=st.integers(1, 6),
    k=st.sampled_from([16, 100, 256, 333]),
    dtype=dtypes,
    zero_row=st.booleans(),
    config=st.sampled_from([None, {"BLOCK_K": 64, "num_warps": 2}]),
)
def test_quantize_fp8_per_token(seed, tokens, k, dtype, zero_row, config):
    g = _gen(seed)
    # Rows spanning many binades, so values land in e4m3's subnormal range too.
    x = (torch.randn(tokens, k, generator=g) * torch.exp(torch.randn(tokens, 1, generator=g) * 3)).to(dtype)
    if zero_row:
        x[0] = 0
    x = x.to(DEVICE)
    q, scale = fp8.quantize_fp8_per_token(x, config=config)
    ref_q, ref_scale = _ref(torch.ops.sglc.quantize_fp8_per_token, x)
    # Exact: IEEE division and explicit round-to-nearest-even make the kernel bit-identical.
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (tokens, 1)
    torch.testing.assert_close(q.float(), ref_q.float(), rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Quantized GEMMs
# ---------------------------------------------------------------------------------------------


def _assert_gemm_close(y, y_ref, x, w, bias, extra_rounding: bool) -> None:
    """|y - y_ref| within a rounding-error bound of y = x @ w.T + bias computed two ways.

    S = |x| @ |w|.T + |bias| bounds every partial sum. Both sides accumulate K products in fp32
    in different orders (<= K u32 S each) and scale differently (a few u32 S); each rounds once
    to the output dtype (half an ulp each, <= 2 u_out |y_ref| together, u_out = unit roundoff).
    `extra_rounding`: the kernel rounds something bounded by S to the output dtype once more
    (int4 weights dequantized elementwise when BLOCK_K does not divide the group; `_scaled_mm`,
    which may round the product before adding the bias): u_out S more.
    """
    dtype, k = y_ref.dtype, x.shape[-1]
    u_out, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    s = x.float().abs().cpu() @ w.float().abs().T.cpu()
    if bias is not None:
        s += bias.float().abs().cpu()
    bound = (2 * k + 8) * u32 * s + 2 * u_out * y_ref.float().abs().cpu() + 1e-6
    if extra_rounding:
        bound += u_out * s
    assert y.dtype == dtype and y.shape == y_ref.shape
    err = (y.float().cpu() - y_ref.float().cpu()).abs()
    assert (err <= bound).all(), (
        f"max excess {(err - bound).max().item():.3g}, max err {err.max().item():.3g}"
    )


# Small explicit tiles make tiny shapes cross BLOCK_N / BLOCK_K / split boundaries; None takes
# the launcher's heuristic (BLOCK_M 16 and split-K for M <= 16).
gemm_configs = st.sampled_from(
    [
        None,
        {
            "BLOCK_M": 16,
            "BLOCK_N": 32,
            "BLOCK_K": 32,
            "SPLIT_K": 3,
            "GROUP_M": 1,
            "num_warps": 4,
            "num_stages": 2,
        },
        {
            "BLOCK_M": 32,
            "BLOCK_N": 16,
            "BLOCK_K": 64,
            "SPLIT_K": 1,
            "GROUP_M": 2,
            "num_warps": 4,
            "num_stages": 2,
        },
    ]
)
ms = st.sampled_from([1, 3, 16, 37])
ns = st.sampled_from([16, 40, 96])
ks = st.sampled_from([32, 72, 200])


def _gemm_inputs(seed: int, m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool):
    g = _gen(seed)
    x, w = _randn(g, m, k, dtype=dtype), torch.randn(n, k, generator=g) * 0.1
    bias = _randn(g, n, dtype=dtype) if has_bias else None
    return x, w, bias


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31), m=ms, n=ns, k=ks, dtype=dtypes, has_bias=st.booleans(), config=gemm_configs
)
def test_linear_w8a16(seed, m, n, k, dtype, has_bias, config):
    x, w, bias = _gemm_inputs(seed, m, n, k, dtype, has_bias)
    qweight, scale = (t.to(DEVICE) for t in quant.quantize_int8(w))
    y = quant_gemm.linear_w8a16(x, qweight, scale, bias, config=config)
    y_ref = _ref(torch.ops.sglc.linear_w8a16, x, qweight, scale, bias)
    _assert_gemm_close(y, y_ref, x, quant.dequantize_int8(qweight, scale), bias, extra_rounding=False)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    m=ms,
    n=ns,
    k=st.sampled_from([64, 100, 200, 300]),  # 100, 200, 300: not multiples of 128 (packed weight padded)
    group=st.sampled_from([32, 64, 128]),
    dtype=dtypes,
    has_bias=st.booleans(),
    config=gemm_configs,
)
def test_linear_w4a16(seed, m, n, k, group, dtype, has_bias, config):
    x, w, bias = _gemm_inputs(seed, m, n, k, dtype, has_bias)
    qweight, scales = (t.to(DEVICE) for t in quant.quantize_int4(w, group))
    y = quant_gemm.linear_w4a16(x, qweight, scales, group, bias, config=config)
    y_ref = _ref(torch.ops.sglc.linear_w4a16, x, qweight, scales, group, bias)
    per_tile = config is None or group % config["BLOCK_K"] == 0
    w_deq = quant.dequantize_int4(qweight, scales, group, k)
    _assert_gemm_close(y, y_ref, x, w_deq, bias, extra_rounding=not per_tile)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    m=ms,
    n=ns,
    k=ks,
    dtype=dtypes,
    has_bias=st.booleans(),
    quantize_activations=st.booleans(),
    config=gemm_configs,
)
def test_linear_fp8(seed, m, n, k, dtype, has_bias, quantize_activations, config):
    x, w, bias = _gemm_inputs(seed, m, n, k, dtype, has_bias)
    weight, weight_scale = (t.to(DEVICE) for t in quant.quantize_fp8(w))
    y = quant_gemm.linear_fp8(x, weight, weight_scale, bias, quantize_activations, config=config)
    y_ref = _ref(torch.ops.sglc.linear_fp8, x, weight, weight_scale, bias, quantize_activations)
    x_eff = x
    if quantize_activations:  # the bound is about the GEMM the reference does: on quantized x
        xq, xs = _ref(torch.ops.sglc.quantize_fp8_per_token, x)
        x_eff = xq.float() * xs
    w_deq = weight.float() * weight_scale[:, None]
    scaled_mm = quantize_activations and quant_gemm._use_scaled_mm(x, weight, bias)
    _assert_gemm_close(y, y_ref, x_eff, w_deq, bias, extra_rounding=scaled_mm)


def test_gemm_leading_dims_and_empty():
    g = _gen(1)
    x, w = _randn(g, 2, 3, 64), torch.randn(24, 64, generator=g)
    qweight, scale = (t.to(DEVICE) for t in quant.quantize_int8(w))
    y = quant_gemm.linear_w8a16(x, qweight, scale, None)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, _ref(torch.ops.sglc.linear_w8a16, x, qweight, scale, None))
    assert quant_gemm.linear_w8a16(x[:0], qweight, scale, None).shape == (0, 3, 24)


def test_gemm_heuristic_splits_k_only_when_tiles_underfill():
    cpu = torch.device("cpu")  # heuristics assume an H100's 132 SMs off the GPU
    assert quant_gemm._heuristic(1, 4096, 4096, cpu)["SPLIT_K"] == 4  # 64 N tiles: 4 splits of 8 K tiles
    assert quant_gemm._heuristic(4096, 4096, 4096, cpu)["SPLIT_K"] == 1
    assert quant_gemm._heuristic(1, 4096, 512, cpu)["SPLIT_K"] == 1  # too few K tiles to split
    # The heuristic's own split (2 here) through the interpreter, scratch buffer and reduction.
    x, w, bias = _gemm_inputs(3, 1, 16, 2048, torch.float32, True)
    assert quant_gemm._heuristic(1, 16, 2048, cpu)["SPLIT_K"] == 2
    qweight, scale = (t.to(DEVICE) for t in quant.quantize_int8(w))
    y_ref = _ref(torch.ops.sglc.linear_w8a16, x, qweight, scale, bias)
    y = quant_gemm.linear_w8a16(x, qweight, scale, bias)
    _assert_gemm_close(y, y_ref, x, quant.dequantize_int8(qweight, scale), bias, extra_rounding=False)


def test_config_space_and_keys():
    """Every module lists tuner candidates per kernel; keys are hashable shape facts."""
    for module in (norm, activation, rope, fp8, quant_gemm):
        assert module.CONFIG_SPACE and all(module.CONFIG_SPACE.values())
    x = torch.empty(5, 64, dtype=torch.float16)
    assert quant_gemm.linear_w8a16_key(x, torch.empty(32, 64, dtype=torch.int8)) == (32, 64, "float16", 8)
    assert hash(quant_gemm.linear_w4a16_key(x, torch.empty(32, 32, dtype=torch.uint8), 64))


# ---------------------------------------------------------------------------------------------
# CUDA only: the _scaled_mm path and model-sized shapes in bf16.
# ---------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("m", [1, 16, 200])
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_fp8_scaled_mm(m, has_bias):
    x, w, bias = _gemm_inputs(0, m, 512, 1024, torch.bfloat16, has_bias)
    weight, weight_scale = (t.to(DEVICE) for t in quant.quantize_fp8(w))
    assert quant_gemm._use_scaled_mm(x, weight, bias) == (torch.cuda.get_device_capability() >= (8, 9))
    y = quant_gemm.linear_fp8(x, weight, weight_scale, bias, True)
    y_ref = _ref(torch.ops.sglc.linear_fp8, x, weight, weight_scale, bias, True)
    xq, xs = _ref(torch.ops.sglc.quantize_fp8_per_token, x)
    _assert_gemm_close(y, y_ref, xq.float() * xs, weight.float() * weight_scale[:, None], bias, True)


@cuda
@pytest.mark.parametrize("m", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("n,k", [(4096, 4096), (896, 4864)])
def test_quant_gemms_model_shapes_bf16(m, n, k):
    x, w, bias = _gemm_inputs(0, m, n, k, torch.bfloat16, True)
    qweight, scale = (t.to(DEVICE) for t in quant.quantize_int8(w))
    y_ref = _ref(torch.ops.sglc.linear_w8a16, x, qweight, scale, bias)
    w_deq = quant.dequantize_int8(qweight, scale)
    _assert_gemm_close(quant_gemm.linear_w8a16(x, qweight, scale, bias), y_ref, x, w_deq, bias, False)
    q4, s4 = (t.to(DEVICE) for t in quant.quantize_int4(w))
    y_ref = _ref(torch.ops.sglc.linear_w4a16, x, q4, s4, 128, bias)
    w_deq = quant.dequantize_int4(q4, s4, 128, k)
    _assert_gemm_close(quant_gemm.linear_w4a16(x, q4, s4, 128, bias), y_ref, x, w_deq, bias, False)
    wf, ws = (t.to(DEVICE) for t in quant.quantize_fp8(w))
    y_ref = _ref(torch.ops.sglc.linear_fp8, x, wf, ws, bias, False)
    w_deq = wf.float() * ws[:, None]
    _assert_gemm_close(quant_gemm.linear_fp8(x, wf, ws, bias, False), y_ref, x, w_deq, bias, False)


def test_bound_program_calls_the_kernels_and_matches() -> None:
    """codegen.bind_cuda_kernels: every sglc op with a CUDA kernel is called directly, same logits (on CPU
    the kernels run through the interpreter); given a buffer (decode graphs share one), the LM head
    writes its rows there."""
    from sgl_compile.codegen import bind_cuda_kernels, cuda_kernels
    from sgl_compile.driver import compile_model
    from sgl_compile.ir.capture import input_names
    from sgl_compile.passes.lower_attention import prefill_inputs

    compiled = compile_model(model="dummy:smollm2-135m", device=DEVICE)
    bound = bind_cuda_kernels(compiled.program)
    targets = [n.target for n in bound.graph.nodes if n.op == "call_function"]
    assert not any(t in cuda_kernels() for t in targets)
    launchers = set(cuda_kernels().values())
    # per layer: the fused norm + qkv and norm + gate/up GEMVs, and the attention (which rotates q and k)
    assert sum(t in launchers for t in targets) >= 3 * compiled.config.num_layers
    c = compiled.config
    inputs = prefill_inputs(
        [[5, 6, 7], [8, 9]], (c.num_layers, c.num_kv_heads, c.head_dim), compiled.dtype, DEVICE
    )
    inputs = {n: inputs[n] for n in input_names(compiled.program)}
    expected = compiled.program(**inputs)
    torch.testing.assert_close(bound(**inputs), expected, rtol=1e-4, atol=1e-4)
    rows = expected.shape[0]
    buf = torch.full((rows + 3, expected.shape[1]), float("nan"), dtype=compiled.dtype, device=DEVICE)
    assert bound(**inputs, logits_out=buf[:rows]).data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf[:rows], expected, rtol=1e-4, atol=1e-4)
    assert buf[rows:].isnan().all()
