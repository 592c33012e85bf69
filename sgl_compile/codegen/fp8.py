"""Triton per-token fp8 quantization: `sglc::quantize_fp8_per_token`.

Layout: x [..., K] with unit stride along K, viewed as rows [T, K] -> (e4m3 [..., K] contiguous,
fp32 scales [..., 1]). One program per row: amax, scale = amax / 448, q = x / scale. Division is
IEEE round-to-nearest (`div_rn`) and the e4m3 rounding is done explicitly in fp32 (round to nearest
even on the e4m3 grid, subnormals included) before an exact cast, so the result is the reference's
bit for bit on any backend: Triton's own fp32 -> e4m3 cast rounds correctly on sm89+, but the CPU
interpreter's truncates, and this costs a few integer ops per element in a memory-bound kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import autotune
from sgl_compile.ir.quant import FP8_MAX

Config = dict[str, int]

CONFIG_SPACE: dict[str, list[Config]] = {
    "quantize_fp8_per_token": [
        {"BLOCK_K": b, "num_warps": w} for b in (512, 1024, 2048, 4096, 8192, 16384) for w in (1, 2, 4, 8, 16)
    ]
}


def quantize_fp8_per_token_key(x: Tensor) -> tuple:
    """Tuning key: row length and dtype."""
    return (x.shape[-1], str(x.dtype).removeprefix("torch."))


def _heuristic(k: int) -> Config:
    block = min(16384, triton.next_power_of_2(k))
    return {"BLOCK_K": block, "num_warps": max(1, min(16, block // 512))}


@triton.jit
def round_to_e4m3(v):
    """fp32 values in [-448, 448] rounded to the nearest e4m3 value, ties to even (still fp32)."""
    # Normal e4m3 keeps 3 of fp32's 23 mantissa bits: round the dropped 20 bits to nearest even;
    # a carry into the exponent is the correct result.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # Below 2^-6 the grid is uniform (step 2^-9): adding 1.5 * 2^14 puts the value where fp32's
    # ulp is 2^-9, so the hardware's own round-to-nearest-even does the work.
    sub = (v + 24576.0) - 24576.0
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


FP8_MAX_C: tl.constexpr = tl.constexpr(FP8_MAX)


@triton.jit
def _quantize(x, scale):
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX_C), FP8_MAX_C)
    return round_to_e4m3(q)


@triton.jit
def _quantize_fp8_kernel(X, Q, Scale, k, stride_x, stride_q, ONE_PASS: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = row * stride_x, row * stride_q
    if ONE_PASS:  # the row stays in registers
        offs = tl.arange(0, BLOCK_K)
        mask = offs < k
        x = tl.load(X + x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), FP8_MAX_C)
        tl.store(Scale + row, scale)
        tl.store(Q + q_row + offs, _quantize(x, scale).to(Q.dtype.element_ty), mask=mask)
    else:
        run = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            run = tl.maximum(run, tl.abs(tl.load(X + x_row + offs, mask=offs < k, other=0.0).to(tl.float32)))
        scale = tl.math.div_rn(tl.maximum(tl.max(run, axis=0), 1e-12), FP8_MAX_C)
        tl.store(Scale + row, scale)
        for start in range(0, k, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            mask = offs < k
            x = tl.load(X + x_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(Q + q_row + offs, _quantize(x, scale).to(Q.dtype.element_ty), mask=mask)


def quantize_fp8_per_token(x: Tensor, config: Config | None = None) -> tuple[Tensor, Tensor]:
    """`sglc::quantize_fp8_per_token`: x [..., K] -> (float8_e4m3fn [..., K], fp32 scale [..., 1])."""
    k = x.shape[-1]
    if config is None:
        config = autotune.get_config(
            "quantize_fp8_per_token", quantize_fp8_per_token_key(x), lambda: _heuristic(k)
        )
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if x2.shape[0] == 0:
        return q, scale
    block = min(config["BLOCK_K"], triton.next_power_of_2(k))
    _quantize_fp8_kernel[(x2.shape[0],)](
        x2,
        q.view(-1, k),
        scale,
        k,
        x2.stride(0),
        k,
        ONE_PASS=block >= k,
        BLOCK_K=block,
        num_warps=config["num_warps"],
    )
    return q, scale
