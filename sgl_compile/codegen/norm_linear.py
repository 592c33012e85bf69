"""Triton fused GEMV for a few rows: `sglc::rms_norm_linear` and `sglc::add_rms_norm_linear`.

Layouts: x (and residual) [..., K] with unit stride along K, viewed as rows [M, K]; norm weight [K];
weight row-major [N, K] (nn.Linear's); bias [N] or None; out [..., N] (silu_and_mul: [..., N / 2],
gate rows first, up rows second, as the merged gate/up weight is stacked).

Decode steps of a few tokens (M <= MAX_FUSED_ROWS): one kernel per op. Each program owns BLOCK_N
output columns of every row and walks K twice: first the sum of squares of each row of x (+ residual;
a few KiB that stay in L1/L2), then the normed rows times its BLOCK_N weight rows. Every program
recomputes the norm instead of reading it from another kernel: M x K extra FLOPs against a GEMV that
streams N x K weight bytes. Program 0 writes the residual sum. With silu_and_mul each program also
owns the matching up rows and applies the gate before storing. Rounding points are the reference's:
the residual sum, the normed row and its product with the norm weight in x's dtype, the GEMM output
in x's dtype, then silu rounded before the multiply.

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
from sgl_compile.codegen import autotune, norm
from sgl_compile.ir.ops import check_norm_linear_activation

Config = dict[str, int]

MAX_FUSED_ROWS = 16  # one BLOCK_M = 16 tile, the smallest `tl.dot` takes

CONFIG_SPACE: dict[str, list[Config]] = {
    "norm_linear": [
        {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
        for bn in (16, 32, 64, 128)
        for bk in (128, 256, 512)
        for w in (4, 8)
        for st in (3, 4)
    ]
}


def norm_linear_key(x: Tensor, weight: Tensor, activation: str, has_residual: bool) -> tuple:
    """Tuning key: N, K, gated or not, residual or not, x dtype, power-of-two bucket of M."""
    m = x.numel() // max(1, x.shape[-1])
    bucket = 1 << max(0, m - 1).bit_length()
    dtype = str(x.dtype).removeprefix("torch.")
    return (weight.shape[0], weight.shape[1], activation, int(has_residual), dtype, bucket)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _heuristic(n_out: int, k: int, device: torch.device) -> Config:
    # The widest column block that still gives every SM two programs: fewer, longer weight streams.
    sms, bn = _sm_count(device), 16
    while bn < 128 and triton.cdiv(n_out, bn * 2) >= 2 * sms:
        bn *= 2
    return {"BLOCK_N": bn, "BLOCK_K": min(256, triton.next_power_of_2(k)), "num_warps": 4, "num_stages": 4}


@triton.jit
def _summed(X, R, offs_m, offs_k, mask, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr):
    x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    return x


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
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = X.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Pass 1: each row's sum of squares (program 0 also stores the residual sum).
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        x = _summed(X, R, offs_m, offs_k, mask, stride_xm, stride_rm, HAS_RESIDUAL).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
        if HAS_RESIDUAL:  # noqa: SIM102 - HAS_RESIDUAL is a compile-time branch, pid a run-time one
            if pid == 0:
                tl.store(S + offs_m[:, None] * stride_sm + offs_k[None, :], x.to(dtype), mask=mask)
    rstd = tl.math.rsqrt(squares / K + eps)
    # Pass 2: normed rows times this program's weight rows (and their up rows when gated).
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        x = _summed(X, R, offs_m, offs_k, mask, stride_xm, stride_rm, HAS_RESIDUAL).to(tl.float32)
        nw = tl.load(NW + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        h = ((x * rstd[:, None]).to(dtype).to(tl.float32) * nw[None, :]).to(dtype)
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(h, tl.trans(w), input_precision=PRECISION)
        if SILU_MUL:
            w_up = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up += tl.dot(h, tl.trans(w_up), input_precision=PRECISION)
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


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fusable(x: Tensor, weight: Tensor) -> bool:
    """Whether the fused kernel serves this call (else the unfused kernels do)."""
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
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    config: Config | None,
) -> tuple[Tensor, Tensor | None]:
    n, k = weight.shape
    gated = activation == "silu_and_mul"
    n_out = n // 2 if gated else n
    if config is None:
        key = norm_linear_key(x, weight, activation, residual is not None)
        config = autotune.get_config("norm_linear", key, lambda: _heuristic(n_out, k, x.device))
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n_out)
    summed = torch.empty_like(x) if residual is not None else None
    s2 = summed.view(-1, k) if summed is not None else x2
    block_k = min(config["BLOCK_K"], triton.next_power_of_2(k))
    _norm_gemv_kernel[(triton.cdiv(n_out, config["BLOCK_N"]),)](
        x2,
        r2,
        norm_weight,
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
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        SILU_MUL=gated,
        BLOCK_M=MAX_FUSED_ROWS,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out, summed


def _linear_activation(h: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    out = F.linear(h, weight, bias)
    return act_kernels.silu_and_mul(out) if activation == "silu_and_mul" else out


def rms_norm_linear(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    config: Config | None = None,
) -> Tensor:
    """`sglc::rms_norm_linear`: activation(linear(rms_norm(x), weight, bias))."""
    check_norm_linear_activation(activation)
    if fusable(x, weight) or config is not None:
        return _fused(x, None, norm_weight, eps, weight, bias, activation, config)[0]
    return _linear_activation(norm.rms_norm(x, norm_weight, eps), weight, bias, activation)


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
