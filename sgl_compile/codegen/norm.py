"""Triton RMSNorm kernels: `sglc::rms_norm` and `sglc::fused_add_rms_norm`.

Layout: x (and residual) [..., H] with unit stride along H, viewed as rows [T, H]; weight [H].
One program per row. When BLOCK_H covers H the row stays in registers (one read, one write);
otherwise two passes over the row (sum of squares, then scale), the second re-reading the
rounded sum the first pass stored. Rounding points follow the reference exactly: the sum is
rounded to x's dtype, the normalised row is rounded to x's dtype before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import autotune, pdl

Config = dict[str, int]

# Candidates for a GPU tuner (BLOCK_H is clamped to next_power_of_2(H); below H means two passes).
CONFIG_SPACE: dict[str, list[Config]] = {
    name: [{"BLOCK_H": b, "num_warps": w} for b in (1024, 2048, 4096, 8192, 16384) for w in (1, 2, 4, 8, 16)]
    for name in ("rms_norm", "fused_add_rms_norm")
}


def rms_norm_key(x: Tensor) -> tuple:
    """Tuning key (both kernels): hidden size and dtype."""
    return (x.shape[-1], str(x.dtype).removeprefix("torch."))


def _heuristic(hidden: int) -> Config:
    block = triton.next_power_of_2(hidden)
    return {"BLOCK_H": min(block, 16384), "num_warps": max(1, min(16, block // 512))}


@triton.jit
def _summed_tile(X, R, S, x_row, r_row, s_row, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual, rounded to x's dtype and stored to S) as fp32."""
    x = tl.load(X + x_row + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + r_row + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + s_row + offs, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _scaled_tile(x, W, Out, o_row, offs, mask, rstd):
    w = tl.load(W + offs, mask=mask, other=0.0)
    normed = (x * rstd).to(Out.dtype.element_ty)
    # fp32 product of two 16-bit floats is exact, so one rounding matches a native 16-bit multiply.
    tl.store(
        Out + o_row + offs, (normed.to(tl.float32) * w.to(tl.float32)).to(Out.dtype.element_ty), mask=mask
    )


@triton.jit
def _rms_norm_kernel(
    X,
    R,
    W,
    Out,
    S,
    hidden,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row, o_row, s_row = row * stride_x, row * stride_r, row * stride_o, row * stride_s
    if ONE_PASS:
        offs = tl.arange(0, BLOCK_H)
        mask = offs < hidden
        x = _summed_tile(X, R, S, x_row, r_row, s_row, offs, mask, HAS_RESIDUAL)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        _scaled_tile(x, W, Out, o_row, offs, mask, rstd)
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, hidden, BLOCK_H):
            offs = start + tl.arange(0, BLOCK_H)
            x = _summed_tile(X, R, S, x_row, r_row, s_row, offs, offs < hidden, HAS_RESIDUAL)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / hidden + eps)
        # Second pass re-reads the (rounded) sum this program stored, or x itself.
        if HAS_RESIDUAL:
            src, src_row = S, s_row
        else:
            src, src_row = X, x_row
        for start in range(0, hidden, BLOCK_H):
            offs = start + tl.arange(0, BLOCK_H)
            mask = offs < hidden
            x = tl.load(src + src_row + offs, mask=mask, other=0.0).to(tl.float32)
            _scaled_tile(x, W, Out, o_row, offs, mask, rstd)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(
    kernel_name: str, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, config: Config | None
) -> tuple[Tensor, Tensor | None]:
    hidden = x.shape[-1]
    if config is None:
        config = autotune.get_config(kernel_name, rms_norm_key(x), lambda: _heuristic(hidden))
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    has_res = residual is not None
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if has_res else None
    r2 = _rows(residual) if has_res else x2
    s2 = summed.view(-1, hidden) if has_res else out2
    if x2.shape[0] == 0:
        return out, summed
    block = min(config["BLOCK_H"], triton.next_power_of_2(hidden))
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight.contiguous(),
        out2,
        s2,
        hidden,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        s2.stride(0),
        eps,
        HAS_RESIDUAL=has_res,
        ONE_PASS=block >= hidden,
        BLOCK_H=block,
        num_warps=config["num_warps"],
        **pdl.launch_kwargs(x2.device),
    )
    return out, summed


def rms_norm(x: Tensor, weight: Tensor, eps: float, config: Config | None = None) -> Tensor:
    """`sglc::rms_norm` of x [..., H] with weight [H] -> new tensor shaped and typed like x."""
    return _launch("rms_norm", x, None, weight, eps, config)[0]


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, config: Config | None = None
) -> tuple[Tensor, Tensor]:
    """`sglc::fused_add_rms_norm`: (rms_norm(x + residual), x + residual), both new tensors like x."""
    out, summed = _launch("fused_add_rms_norm", x, residual, weight, eps, config)
    assert summed is not None
    return out, summed


fused_add_rms_norm_key = rms_norm_key
