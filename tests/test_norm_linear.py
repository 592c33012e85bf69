"""The fused norm + GEMV kernel (codegen/norm_linear.py) against the reference ops, and its pass.

On CPU the kernel runs through the Triton interpreter in fp32 and fp16 (its bf16 dot is wrong); on
CUDA bf16 too, plus the launcher's own choice between the fused kernel and the unfused ones.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile.codegen import norm_linear
from tests.test_kernels import CUDA, DEVICE, DTYPES, UNIT_ROUNDOFF, _gen, _randn, _ref

configs = st.sampled_from(
    [
        {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 2, "num_stages": 3},
        {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},  # fp32 tiles fit in smem
        {"BLOCK_N": 2, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1},  # decode's narrow blocks
        {"BLOCK_N": 1, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},  # (widened to 16 for 2+ rows)
        {"BLOCK_N": 4, "BLOCK_K": 64, "num_warps": 8, "num_stages": 1, "maxnreg": 64},  # a register cap
        {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},  # decode batches
    ]
)


def _bounds(x, residual, norm_w, eps, w, bias, activation, out):
    """Per-element bound on |kernel - reference| (both computed from the same inputs).

    The GEMM's input row: the reference rounds the normed row and its product with the norm weight
    (2u relative to the exact h), the kernel rounds x * norm weight once and scales by rstd after the
    dot (u), so the two inputs differ by up to 3u |h|; its K products are summed in other orders (K u32 of
    S = |h| @ |w|.T + |bias| each side); each side rounds the GEMM output once (u |pre| each). The
    gate multiplies two such values, silu' is below 1.1 in magnitude.
    """
    u, u32 = UNIT_ROUNDOFF[out.dtype], UNIT_ROUNDOFF[torch.float32]
    s_in = x.float().cpu() + (residual.float().cpu() if residual is not None else 0)
    h = torch.ops.sglc.rms_norm(s_in.to(x.dtype), norm_w.cpu(), eps).float()
    s = h.abs() @ w.float().abs().cpu().T + (bias.float().abs().cpu() if bias is not None else 0)
    pre = h @ w.float().cpu().T + (bias.float().cpu() if bias is not None else 0)
    bound = (2 * x.shape[-1] + 8) * u32 * s + 3 * u * s + 2 * u * pre.abs() + 1e-6
    if activation == "none":
        return bound
    n = w.shape[0] // 2
    g, up, bg, bu = pre[:, :n], pre[:, n:], bound[:, :n], bound[:, n:]
    silu = torch.nn.functional.silu(g)
    return 1.1 * bg * (up.abs() + bu) + silu.abs() * bu + 4 * u * (silu * up).abs() + 1e-6


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    m=st.sampled_from([1, 3, 16, 37]),  # 37: several row tiles
    n=st.sampled_from([16, 40, 96]),
    k=st.sampled_from([32, 72, 200]),
    dtype=st.sampled_from(DTYPES),
    residual=st.booleans(),
    has_bias=st.booleans(),
    activation=st.sampled_from(["none", "silu_and_mul"]),
    config=configs,
)
def test_fused_kernel_matches_the_reference(seed, m, n, k, dtype, residual, has_bias, activation, config):
    g = _gen(seed)
    x, r = _randn(g, m, k, dtype=dtype, scale=2), _randn(g, m, k, dtype=dtype)
    norm_w, w = _randn(g, k, dtype=dtype), _randn(g, n, k, dtype=dtype, scale=0.1)
    bias = _randn(g, n, dtype=dtype) if has_bias else None
    if residual:
        out, summed = norm_linear.add_rms_norm_linear(x, r, norm_w, 1e-6, w, bias, activation, config)
        ref_out, ref_summed = _ref(
            torch.ops.sglc.add_rms_norm_linear, x, r, norm_w, 1e-6, w, bias, activation
        )
        torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)  # one fp32 add, one rounding
    else:
        out = norm_linear.rms_norm_linear(x, norm_w, 1e-6, w, bias, activation, config)
        ref_out = _ref(torch.ops.sglc.rms_norm_linear, x, norm_w, 1e-6, w, bias, activation)
    assert out.dtype == dtype and out.shape == ref_out.shape
    err = (out.float() - ref_out.float()).abs().cpu()
    bound = _bounds(x, r if residual else None, norm_w, 1e-6, w, bias, activation, out)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def _linear_bound(x, w, bias, ref):
    """|GEMV - fp32 reference| bound: fp32 sums in any order (K u32 of S = |x| @ |w|.T + |bias|), and
    the output rounded once to x's dtype."""
    s = x.float().abs().cpu() @ w.float().abs().cpu().T + (
        bias.float().abs().cpu() if bias is not None else 0
    )
    u, u32 = UNIT_ROUNDOFF[x.dtype], UNIT_ROUNDOFF[torch.float32]
    return (x.shape[-1] + 8) * u32 * s + u * ref.abs() + 1e-6


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    m=st.sampled_from([1, 5, 16, 37]),
    n=st.sampled_from([16, 40]),
    k=st.sampled_from([32, 200]),
    dtype=st.sampled_from(DTYPES),
    has_bias=st.booleans(),
    config=configs,
)
def test_the_gemv_without_a_norm_is_a_linear(seed, m, n, k, dtype, has_bias, config):
    g = _gen(seed)
    x, w = _randn(g, m, k, dtype=dtype), _randn(g, n, k, dtype=dtype, scale=0.1)
    bias = _randn(g, n, dtype=dtype) if has_bias else None
    out = norm_linear.linear(x, w, bias, config)
    ref = torch.nn.functional.linear(
        x.float().cpu(), w.float().cpu(), bias.float().cpu() if has_bias else None
    )
    assert out.dtype == dtype and ((out.float().cpu() - ref).abs() <= _linear_bound(x, w, bias, ref)).all()


def test_leading_dims_and_bad_activation():
    g = _gen(1)
    x, norm_w, w = _randn(g, 2, 3, 64), _randn(g, 64), _randn(g, 48, 64, scale=0.1)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    out = norm_linear.rms_norm_linear(x, norm_w, 1e-6, w, None, "silu_and_mul", cfg)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(
        out, _ref(torch.ops.sglc.rms_norm_linear, x, norm_w, 1e-6, w, None, "silu_and_mul")
    )
    with pytest.raises(ValueError, match="activation"):
        norm_linear.rms_norm_linear(x, norm_w, 1e-6, w, None, "gelu", cfg)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.sglc.rms_norm_linear(x.cpu(), norm_w.cpu(), 1e-6, w.cpu(), None, "gelu")


def test_only_one_16_bit_row_on_cuda_takes_the_gemv():
    w = torch.empty(3072, 64, dtype=torch.bfloat16)
    assert not norm_linear.fusable(torch.empty(1, 64, dtype=torch.bfloat16), w)  # CPU: the reference
    if CUDA:
        dev = torch.device("cuda")
        wc = w.to(dev)
        one = torch.empty(1, 64, dtype=torch.bfloat16, device=dev)
        assert norm_linear.fusable(one, wc) and norm_linear.fusable(one[None], wc)
        assert not norm_linear.fusable(torch.empty(2, 64, dtype=torch.bfloat16, device=dev), wc)
        assert not norm_linear.fusable(one.float(), wc.float())  # fp32: cuBLAS
        assert not norm_linear.fusable(one, wc.T.contiguous().T)  # K not contiguous


def test_heuristic_keeps_every_sm_busy():
    cpu = torch.device("cpu")  # 132 SMs assumed off the GPU
    h = norm_linear._heuristic
    # plain: column blocks up to 16 wide while there are >= 4 programs an SM, K tiles up to 2048
    assert h(3072, 2048, cpu) == {"BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 8, "num_stages": 1}  # 1B qkv
    assert h(2048, 8192, cpu) == {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1}  # 1B down
    assert h(128256, 2048, cpu) == {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1}  # LM head
    assert h(100, 72, cpu) == {"BLOCK_N": 1, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
    # gated (gate and up tiles per program): >= 2 programs an SM, 8192-element tiles
    assert h(8192, 2048, cpu, gated=True) == {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1}
    assert h(14336, 4096, cpu, gated=True)["BLOCK_N"] == 32


def test_programs_bind_plain_linears_to_the_gemv_launcher():
    """`bind_cuda_kernels` points a program's aten.linear at the GEMV's launcher, which falls back to
    F.linear for what it does not serve (here: CPU tensors), bit for bit."""
    from torch import fx

    from sgl_compile.codegen import bind_cuda_kernels

    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    g.output(g.call_function(torch.ops.aten.linear.default, (x, w)))
    bound = bind_cuda_kernels(fx.GraphModule(torch.nn.Module(), g))
    assert [n.target for n in bound.graph.nodes if n.op == "call_function"] == [norm_linear.linear]
    xs, ws = _randn(_gen(2), 3, 64), _randn(_gen(3), 40, 64)
    torch.testing.assert_close(bound(xs, ws), torch.nn.functional.linear(xs, ws), rtol=0, atol=0)
    buf = torch.zeros(5, 40, device=xs.device)  # a caller's buffer (LOGITS_OUT): written in place
    assert bound(xs, ws, logits_out=buf[1:4]).data_ptr() == buf[1:].data_ptr()
    torch.testing.assert_close(buf[1:4], torch.nn.functional.linear(xs, ws), rtol=0, atol=0)
    assert not buf[0].any() and not buf[4].any()


def test_a_last_op_without_an_out_variant_is_copied_into_the_buffer():
    from torch import fx

    from sgl_compile.codegen import bind_cuda_kernels

    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0)))
    bound = bind_cuda_kernels(fx.GraphModule(torch.nn.Module(), g))
    xs = _randn(_gen(4), 3, 8)
    buf = torch.zeros(3, 8, device=xs.device)
    assert bound(xs, logits_out=buf) is buf
    torch.testing.assert_close(buf, xs * 2, rtol=0, atol=0)
    torch.testing.assert_close(bound(xs), xs * 2, rtol=0, atol=0)  # (no buffer: the op's own output)
    with pytest.raises(ValueError, match="expected"):  # a wrong buffer is refused, not resized or cast
        bound(xs, logits_out=torch.zeros(4, 8, device=xs.device))


def test_a_wrong_out_buffer_is_refused():
    """out= on a GEMM would resize a view of a larger buffer (wrong values in its rows): refused."""
    xs, ws = _randn(_gen(5), 3, 64), _randn(_gen(6), 40, 64)
    with pytest.raises(ValueError, match="expected"):
        norm_linear.linear(xs, ws, out=torch.zeros(3, 41, device=xs.device))
    with pytest.raises(ValueError, match="expected"):
        norm_linear.linear(xs, ws, out=torch.zeros(3, 40, device=xs.device, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA: the launcher's dispatch and bf16")
@pytest.mark.parametrize("m", [1, 4, 16, 17, 300])
@pytest.mark.parametrize("n,k,activation", [(3072, 2048, "none"), (16384, 2048, "silu_and_mul")])
def test_model_shapes_bf16_both_paths(m, n, k, activation):
    """The launcher's own choice at a 1B model's shapes (qkv, gate/up): the fused kernel (heuristic or
    tuned config) for one row, the unfused kernels otherwise."""
    g = _gen(0)
    dtype = torch.bfloat16
    x, r = _randn(g, m, k, dtype=dtype), _randn(g, m, k, dtype=dtype)
    norm_w, w = _randn(g, k, dtype=dtype), _randn(g, n, k, dtype=dtype, scale=0.02)
    out, summed = norm_linear.add_rms_norm_linear(x, r, norm_w, 1e-5, w, None, activation)
    ref_out, ref_summed = _ref(torch.ops.sglc.add_rms_norm_linear, x, r, norm_w, 1e-5, w, None, activation)
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)
    err = (out.float() - ref_out.float()).abs().cpu()
    bound = _bounds(x, r, norm_w, 1e-5, w, None, activation, out)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    assert DEVICE == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA: the launcher's dispatch and bf16")
@pytest.mark.parametrize("m", [1, 4, 300])
@pytest.mark.parametrize("n,k", [(2048, 2048), (2048, 8192)])
def test_plain_projection_shapes_bf16_both_paths(m, n, k):
    """o_proj and down of a 1B model through the `aten.linear` launcher: the GEMV for one row (within
    fp32 summation of the exact products), cuBLAS itself for more."""
    g = _gen(4)
    x, w = _randn(g, m, k, dtype=torch.bfloat16), _randn(g, n, k, dtype=torch.bfloat16, scale=0.02)
    out = norm_linear.linear(x, w, None)
    if m > 1:
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=0, atol=0)
        return
    ref = torch.nn.functional.linear(x.float().cpu(), w.float().cpu())
    assert ((out.float().cpu() - ref).abs() <= _linear_bound(x, w, None, ref)).all()
