"""Triton GEMV for a few rows: `sglc::rms_norm_linear`, `sglc::add_rms_norm_linear` and, without the
norm, a program's plain `aten.linear`.

Layouts: x (and residual) [..., K] with unit stride along K, viewed as rows [M, K]; norm weight [K];
weight row-major [N, K] (nn.Linear's); bias [N] or None; out [..., N] (silu_and_mul: [..., N / 2],
gate rows first, up rows second, as the merged gate/up weight is stacked).

Batch-1 decode steps (`fusable`; a passed config forces it at any row count): one kernel per op. Each
program owns BLOCK_N output columns of every row (of one BLOCK_M-row tile where there are more rows:
a second grid axis) and walks K once: it accumulates each row's sum of squares of x (+ residual) and
the dot products of x * norm weight with its BLOCK_N weight rows, and scales those by the row's rstd
at the end (rstd is one scalar per row, so it factors out of the dot product). So the weight stream
starts at the first instruction, with no norm pass before it; every program recomputes the norm's
sum (M x K FLOPs against N x K weight bytes streamed). The first program of each row tile writes its
residual sums. With silu_and_mul each program also owns the matching up rows and applies the gate
before storing. One row (batch-1 decode) multiplies in fp32 on CUDA cores; more take an MMA tile of
>= 16 rows (the config's BLOCK_M, else 16), its input x * norm weight rounded to x's dtype. Against
the reference (normed row rounded, times the norm weight rounded) that moves where the GEMM input is
rounded: one rounding of x * w instead of two, then the fp32 rstd, so the result may differ by about
one more rounding of the GEMM input. The residual sum, the GEMM output in x's dtype and silu rounded
before the multiply are the reference's.

More rows, fp32 (whose reference GEMM is an IEEE fp32 matmul), or anything else: the unfused kernels
(the Triton norm, cuBLAS, the Triton gate), so prefill runs exactly what it ran before the fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import activation as act_kernels
from sgl_compile.codegen import autotune, norm, pdl
from sgl_compile.ir.ops import check_norm_linear_activation

Config = dict[str, int]

# Where the GEMV measured at least as fast as the kernels it replaces (docs/benchmarks.md, H200):
# one row (batch-1 decode), every projection of the 1B-8B shapes once its column blocks were narrow
# enough to give each SM several programs; 2-16 rows through the 16-row MMA tile ran 3-5x slower
# than cuBLAS.
MAX_FUSED_ROWS = 1

# Narrow column blocks and long K tiles: at decode's one row a weight tile is all the work there is, so
# more programs (and each with more K in one load) keep more bytes in flight per SM.
CONFIG_SPACE: dict[str, list[Config]] = {
    "norm_linear": [
        {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
        for bn in (1, 2, 4, 8, 16, 32)
        for bk in (512, 1024, 2048, 4096)
        for w in (4, 8)
        for st in (1, 3)
    ]
}


def norm_linear_key(
    x: Tensor, weight: Tensor, activation: str, has_residual: bool, has_norm: bool = True
) -> tuple:
    """Tuning key: N, K, gated or not, residual or not, norm or not, x dtype, power-of-two bucket of M."""
    m = x.numel() // max(1, x.shape[-1])
    bucket = 1 << max(0, m - 1).bit_length()
    dtype = str(x.dtype).removeprefix("torch.")
    return (weight.shape[0], weight.shape[1], activation, int(has_residual), int(has_norm), dtype, bucket)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _heuristic(n_out: int, k: int, device: torch.device, gated: bool = False) -> Config:
    """One row's whole weight is the work, so the grid must keep enough bytes in flight per SM.
    Plain: the widest column block (up to 16) that still gives every SM four programs, K in tiles of
    up to 2048, eight warps once a tile has 8192 elements (about 32 per thread); where even 16-wide
    blocks leave programs to spare (LM heads), 16 x 512 tiles on 4 warps (122 vs 163 us at 16 x 2048).
    Gated (two weight tiles a program): the widest block that gives every SM two programs,
    8192-element tiles."""
    sms = _sm_count(device)
    if gated:
        bn = 16
        while bn < 128 and triton.cdiv(n_out, bn * 2) >= 2 * sms:
            bn *= 2
        bk, warps = min(8192 // bn, triton.next_power_of_2(k)), 4
    else:
        bn = 1
        while bn < 16 and triton.cdiv(n_out, bn * 2) >= 4 * sms:
            bn *= 2
        bk = min(512 if bn == 16 else 2048, triton.next_power_of_2(k))
        warps = 8 if bn < 16 and bn * bk >= 8192 else 4
    return {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": 1}


@triton.jit
def _summed(X, R, offs_m, offs_k, mask, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr):
    x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    return x


@triton.jit
def _row_dot(h, w, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """h [BLOCK_M, BLOCK_K] times w [BLOCK_N, BLOCK_K] transposed, in fp32. One row (batch-1 decode)
    is a broadcast multiply and a row sum on CUDA cores; more take the MMA's 16-row tile."""
    if BLOCK_M == 1:
        out = tl.sum(w.to(tl.float32) * h.to(tl.float32), axis=1)[None, :]
    else:  # not an early return: Triton compiles the statements after a constexpr `if` too
        out = tl.dot(h, tl.trans(w), input_precision=PRECISION)
    return out


@triton.jit
def _norm_gemv_kernel(
    X,
    R,
    NW,
    W,
    B,
    Out,
    S,
    M,
    N,
    K,
    stride_xm,
    stride_rm,
    stride_wn,
    stride_om,
    stride_sm,
    eps,
    HAS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    # The next kernel may launch only once every program has stored: released at the start instead,
    # its programs took SM slots beside this one's and the 8B's batch-1 step ran 9% slower (H100).
    pdl.wait_only(PDL)
    pid = tl.program_id(0)
    dtype = X.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M > 1:  # rows past one tile: the grid's second axis takes the next tiles
        offs_m += tl.program_id(1) * BLOCK_M
    mask_m = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One walk over K: rstd is a per-row scalar, so it scales the finished dot products instead of
    # the inputs and the weight stream starts at once (program 0 also stores the residual sum).
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        xs = _summed(X, R, offs_m, offs_k, mask, stride_xm, stride_rm, HAS_RESIDUAL)
        if HAS_RESIDUAL:  # noqa: SIM102 - HAS_RESIDUAL is a compile-time branch, pid a run-time one
            if pid == 0:
                tl.store(S + offs_m[:, None] * stride_sm + offs_k[None, :], xs, mask=mask)
        x = xs.to(tl.float32)
        if HAS_NORM:
            squares += tl.sum(x * x, axis=1)
            h = x * tl.load(NW + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        else:
            h = x
        if BLOCK_M > 1:
            h = h.to(dtype)  # the MMA's input type
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask, other=0.0)
        acc += _row_dot(h, w, BLOCK_M, PRECISION)
        if SILU_MUL:
            w_up = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up += _row_dot(h, w_up, BLOCK_M, PRECISION)
    if HAS_NORM:
        rstd = tl.math.rsqrt(squares / K + eps)
        acc *= rstd[:, None]
        acc_up *= rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(B + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if SILU_MUL:
        gate = y.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        y = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])
    pdl.release_dependents(PDL)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fusable(x: Tensor, weight: Tensor) -> bool:
    """Whether the GEMV serves this call (else the unfused kernels do)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.stride(-1) == 1
        and 0 < rows <= MAX_FUSED_ROWS
    )


def _fused(
    x: Tensor,
    residual: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    config: Config | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    n, k = weight.shape
    gated = activation == "silu_and_mul"
    n_out = n // 2 if gated else n
    if config is None:
        key = norm_linear_key(x, weight, activation, residual is not None, norm_weight is not None)
        config = autotune.get_config("norm_linear", key, lambda: _heuristic(n_out, k, x.device, gated))
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    if out is None:
        out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    else:
        check_out(out, (*x.shape[:-1], n_out), x.dtype)
    out2 = out.view(-1, n_out)
    summed = torch.empty_like(x) if residual is not None else None
    s2 = summed.view(-1, k) if summed is not None else x2
    # 16: the smallest tile `tl.dot` takes; a config may name a larger one (decode batches)
    block_m = 1 if x2.shape[0] == 1 else max(16, config.get("BLOCK_M", 16))
    block_n, block_k = config["BLOCK_N"], min(config["BLOCK_K"], triton.next_power_of_2(k))
    if block_m > 1:  # a one-row config forced onto more rows: the MMA's minimum tile
        block_n, block_k = max(16, block_n), max(16, block_k)
    _norm_gemv_kernel[(triton.cdiv(n_out, block_n), triton.cdiv(x2.shape[0], block_m))](
        x2,
        r2,
        norm_weight if norm_weight is not None else weight,
        weight,
        bias if bias is not None else weight,
        out2,
        s2,
        x2.shape[0],
        n_out,
        k,
        x2.stride(0),
        r2.stride(0),
        weight.stride(0),
        out2.stride(0),
        s2.stride(0),
        eps,
        HAS_NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        SILU_MUL=gated,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        # A register cap for ptxas, where a config names one: without it ptxas fits 8-warp tiles in
        # 32-40 registers by loading their weight rows one after another (docs/benchmarks.md, tenth
        # session); a cap of 64 lets it issue them together. Unmeasured, so no heuristic names one.
        **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}),
        **pdl.launch_kwargs(x.device),
    )
    return out, summed


def _linear_activation(
    h: Tensor, weight: Tensor, bias: Tensor | None, activation: str, out: Tensor | None = None
) -> Tensor:
    if out is not None and activation == "none":  # cuBLAS's GEMM as F.linear runs it, into `out`
        check_out(out, (*h.shape[:-1], weight.shape[0]), h.dtype)
        h2, out2 = h.reshape(-1, h.shape[-1]), out.view(-1, out.shape[-1])
        if bias is None:
            torch.mm(h2, weight.t(), out=out2)
        else:
            torch.addmm(bias, h2, weight.t(), out=out2)
        return out
    y = F.linear(h, weight, bias)
    y = act_kernels.silu_and_mul(y) if activation == "silu_and_mul" else y
    if out is None:
        return y
    check_out(out, y.shape, y.dtype)
    return out.copy_(y)


def check_out(out: Tensor, shape: tuple | torch.Size, dtype: torch.dtype) -> None:
    """A caller's output buffer must be the result exactly: out= would resize a wrong one (a view of a
    larger buffer keeps its rows, wrong values) and copy_ would broadcast or cast."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: expected {tuple(shape)} {dtype}")


def rms_norm_linear(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    config: Config | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """`sglc::rms_norm_linear`: activation(linear(rms_norm(x), weight, bias)); into `out` (contiguous,
    the result's shape and x's dtype) where given: a program's LM head writing a caller's buffer."""
    check_norm_linear_activation(activation)
    if fusable(x, weight) or config is not None:
        return _fused(x, None, norm_weight, eps, weight, bias, activation, config, out)[0]
    return _linear_activation(norm.rms_norm(x, norm_weight, eps), weight, bias, activation, out)


def add_rms_norm_linear(
    x: Tensor,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    config: Config | None = None,
) -> tuple[Tensor, Tensor]:
    """`sglc::add_rms_norm_linear`: (activation(linear(rms_norm(x + residual), ...)), x + residual)."""
    check_norm_linear_activation(activation)
    if fusable(x, weight) or config is not None:
        out, summed = _fused(x, residual, norm_weight, eps, weight, bias, activation, config)
        assert summed is not None
        return out, summed
    normed, summed = norm.fused_add_rms_norm(x, residual, norm_weight, eps)
    return _linear_activation(normed, weight, bias, activation), summed


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    config: Config | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """`aten.linear` in a program on CUDA (bound by `codegen.bind_cuda_kernels`): the same GEMV without
    a norm where it serves (`fusable`; a passed config forces it), else cuBLAS; into `out` where given."""
    if fusable(x, weight) or config is not None:
        return _fused(x, None, None, 0.0, weight, bias, "none", config, out)[0]
    return _linear_activation(x, weight, bias, "none", out)
