"""Triton SwiGLU gate: `sglc::silu_and_mul`.

Layout: x [..., 2d] with unit stride along the last dim, viewed as rows [M, 2d] (gate columns
first, up columns second, as the merged gate/up GEMM writes them); out [..., d] contiguous.
Grid: (row, block of d). silu runs in fp32 and is rounded to x's dtype before the multiply,
the two rounding points of the reference (`silu(gate) * up` in x's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import autotune, pdl

Config = dict[str, int]

CONFIG_SPACE: dict[str, list[Config]] = {
    "silu_and_mul": [
        {"BLOCK_D": b, "num_warps": w} for b in (256, 512, 1024, 2048, 4096) for w in (1, 2, 4, 8)
    ]
}


def silu_and_mul_key(x: Tensor) -> tuple:
    """Tuning key: d (half the last dim) and dtype."""
    return (x.shape[-1] // 2, str(x.dtype).removeprefix("torch."))


def _heuristic(d: int) -> Config:
    block = min(2048, triton.next_power_of_2(d))
    return {"BLOCK_D": block, "num_warps": max(1, min(8, block // 256))}


@triton.jit
def _silu_and_mul_kernel(X, Out, d, stride_x, stride_o, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_for_producers(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < d
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + offs, (act.to(tl.float32) * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor, config: Config | None = None) -> Tensor:
    """`sglc::silu_and_mul`: silu(x[..., :d]) * x[..., d:] for x [..., 2d] -> new [..., d]."""
    d = x.shape[-1] // 2
    if config is None:
        config = autotune.get_config("silu_and_mul", silu_and_mul_key(x), lambda: _heuristic(d))
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, 2 * d)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out2 = out.view(-1, d)
    if x2.shape[0] == 0 or d == 0:
        return out
    block = min(config["BLOCK_D"], triton.next_power_of_2(d))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
        x2,
        out2,
        d,
        x2.stride(0),
        out2.stride(0),
        BLOCK_D=block,
        num_warps=config["num_warps"],
        **pdl.launch_kwargs(x2.device),
    )
    return out
