"""Triton weight-quantized GEMMs: `sglc::linear_w8a16`, `sglc::linear_w4a16`, `sglc::linear_fp8`.

Layouts (see `ir/quant.py`): x [..., K] (unit stride along K), viewed as [M, K]; weights row-major
[N, K] (int8, fp8) or [N, Kp / 2] packed int4 bytes (low nibble = even k); scales fp32 [N] per
channel or [N, Kp / group] per group; bias [N] or None; out [..., N] in x's dtype.

One kernel, `_qgemm_kernel`, serves all formats: each program owns a BLOCK_M x BLOCK_N output tile
(grouped along M for L2 reuse) and one of SPLIT_K slices of K. Weight tiles are loaded in their
stored type and converted in registers to the dot dtype (x's dtype; int8 and e4m3 values are exact
in fp16/bf16/fp32, int4 nibbles too), so HBM traffic is the quantized bytes. Accumulation is fp32;
per-channel (and per-token activation) scales are applied once to the accumulator, per-group int4
scales once per K tile when BLOCK_K divides the group (else to the weight tile elementwise).

Decode (M <= 16) is memory-bound: BLOCK_M = 16 (the smallest `tl.dot` tile) and split-K so the
grid covers the SMs even when N / BLOCK_N is small. Splits write fp32 partials to a scratch buffer
that a second kernel sums (deterministic, unlike atomics) before the same epilogue.

fp8 with activation quantization uses `torch._scaled_mm` (cuBLAS/CUTLASS row-wise scaling) on
sm89+ when its constraints hold; otherwise the same Triton kernel reads the quantized
activations and applies both scales, which is exactly what the reference computes.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import autotune
from sgl_compile.codegen.fp8 import quantize_fp8_per_token

Config = dict[str, int]


def _cfg(bm: int, bn: int, bk: int, split: int, group_m: int, warps: int, stages: int) -> Config:
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "SPLIT_K": split,
        "GROUP_M": group_m,
        "num_warps": warps,
        "num_stages": stages,
    }


_GEMM_SPACE: list[Config] = [
    # decode (M <= 16): one M tile, split-K to fill the GPU
    *(
        _cfg(16, bn, bk, split, 1, 4, st)
        for bn in (32, 64, 128)
        for bk in (64, 128, 256)
        for split in (1, 2, 4, 8, 16)
        for st in (2, 3, 4)
    ),
    # larger M: bigger tiles, split only when the tiles underfill the GPU
    *(
        _cfg(bm, bn, bk, split, 8, w, st)
        for bm in (32, 64, 128)
        for bn in (64, 128, 256)
        for bk in (32, 64, 128)
        for split in (1, 4)
        for w, st in ((4, 3), (4, 4), (8, 3))
    ),
]
CONFIG_SPACE: dict[str, list[Config]] = {
    name: _GEMM_SPACE for name in ("linear_w8a16", "linear_w4a16", "linear_fp8")
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _m_bucket(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def linear_w8a16_key(x: Tensor, qweight: Tensor) -> tuple:
    """Tuning key: N, K, x dtype, power-of-two bucket of M."""
    return (qweight.shape[0], x.shape[-1], _dtype_name(x.dtype), _m_bucket(x.numel() // max(1, x.shape[-1])))


def linear_w4a16_key(x: Tensor, qweight: Tensor, group_size: int) -> tuple:
    """Tuning key: N, K, group size, x dtype, power-of-two bucket of M."""
    n, k, dtype, bucket = linear_w8a16_key(x, qweight)
    return (n, k, group_size, dtype, bucket)


def linear_fp8_key(x: Tensor, weight: Tensor, quantize_activations: bool) -> tuple:
    """Tuning key of the Triton path: N, K, x dtype, whether activations are fp8, bucket of M."""
    n, k, dtype, bucket = linear_w8a16_key(x, weight)
    return (n, k, dtype, int(quantize_activations), bucket)


@cache
def _device_facts(device: torch.device) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability); on CPU (interpreter) the H100 the heuristics are tuned for."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, (props.major, props.minor)
    return 132, (9, 0)


def _heuristic(m: int, n: int, k: int, device: torch.device, max_block_k: int = 256) -> Config:
    if m <= 16:  # decode: memory-bound, the smallest dot tile along M
        bm, bn, bk, group_m, warps, stages = 16, 64, 128, 1, 4, 4
    elif m <= 64:
        bm, bn, bk, group_m, warps, stages = (32 if m <= 32 else 64), 128, 128, 8, 4, 4
    else:
        bm, bn, bk, group_m, warps, stages = 128, 128, 64, 8, 8, 3
    bk = min(bk, max_block_k)
    # Split K while the output tiles alone leave SMs idle, keeping >= 8 K tiles per split.
    tiles, k_tiles, sms = (
        triton.cdiv(m, bm) * triton.cdiv(n, bn),
        triton.cdiv(k, bk),
        _device_facts(device)[0],
    )
    split = 1
    while split < 16 and tiles * split < sms and k_tiles >= 16 * split:
        split *= 2
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "SPLIT_K": split,
        "GROUP_M": group_m,
        "num_warps": warps,
        "num_stages": stages,
    }


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    WScale,
    XScale,
    Bias,
    Out,
    stride_om,
    CHANNEL_SCALE: tl.constexpr,
    HAS_X_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    if CHANNEL_SCALE:
        acc = acc * tl.load(WScale + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_X_SCALE:
        acc = acc * tl.load(XScale + offs_m, mask=mask_m, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _qgemm_kernel(
    X,
    W,
    WScale,
    XScale,
    Bias,
    Out,
    Partial,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    HAS_X_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles sweep the N tiles together, so weight tiles stay in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_n)) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    dot_ty = Out.dtype.element_ty
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]: weight rows are output channels

    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    k_lo = tl.program_id(1) * per_split * BLOCK_K
    k_hi = min(K, k_lo + per_split * BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(dot_ty)
        if INT4:
            # Byte j of the tile holds k = 2j (low nibble) and 2j + 1 (high): load the packed bytes
            # contiguously along K and interleave the nibbles back into k order in registers.
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(
                w_rows + offs_b[None, :], mask=mask_n[:, None] & (offs_b < (K + 1) // 2)[None, :], other=0
            )
            packed = packed.to(tl.int32)
            nibbles = tl.interleave(packed & 0xF, packed >> 4) - 8  # [BLOCK_N, BLOCK_K], in [-8, 7]
            if SCALE_PER_TILE:  # the tile lies inside one group: scale the partial product
                s = tl.load(WScale + offs_n * stride_sn + k0 // GROUP, mask=mask_n, other=0.0)
                acc += tl.dot(x, tl.trans(nibbles.to(dot_ty)), input_precision=PRECISION) * s[None, :]
            else:
                s_ptr = WScale + offs_n[:, None] * stride_sn + (offs_k // GROUP)[None, :]
                s = tl.load(s_ptr, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                w = (nibbles.to(tl.float32) * s).to(dot_ty)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(dot_ty)), acc, input_precision=PRECISION)

    if SPLIT_K == 1:
        _epilogue(
            acc,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            WScale,
            XScale,
            Bias,
            Out,
            stride_om,
            not INT4,
            HAS_X_SCALE,
            HAS_BIAS,
        )
    else:
        part = Partial + (tl.program_id(1) * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(
    Partial,
    WScale,
    XScale,
    Bias,
    Out,
    M,
    N,
    stride_om,
    CHANNEL_SCALE: tl.constexpr,
    HAS_X_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) + tl.arange(0, 1)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        part = Partial + (s * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        acc += tl.load(part, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    _epilogue(
        acc,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        WScale,
        XScale,
        Bias,
        Out,
        stride_om,
        CHANNEL_SCALE,
        HAS_X_SCALE,
        HAS_BIAS,
    )


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _gemm(
    x2: Tensor,
    out_dtype: torch.dtype,
    weight: Tensor,
    w_scale: Tensor,
    x_scale: Tensor | None,
    bias: Tensor | None,
    k: int,
    config: Config,
    group: int = 0,
) -> Tensor:
    """out [M, N] = epilogue(x2 [M, K] @ dequant(weight).T): the shared launcher of every format."""
    m, n = x2.shape[0], weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    assert weight.stride(-1) == 1, "quantized weights must be contiguous along K"
    bm, bn, bk, split = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["SPLIT_K"]
    split = max(1, min(split, triton.cdiv(k, bk)))  # every split gets at least one K tile
    int4 = group > 0
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else out
    bias_arg = bias if bias is not None else w_scale  # any pointer: HAS_BIAS=False never reads it
    x_scale_arg = x_scale if x_scale is not None else w_scale
    flags = dict(HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _qgemm_kernel[grid](
        x2,
        weight,
        w_scale,
        x_scale_arg,
        bias_arg,
        out,
        partial,
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        w_scale.stride(0),
        out.stride(0),
        INT4=int4,
        GROUP=max(group, 1),
        SCALE_PER_TILE=int4 and group % bk == 0,
        PRECISION="ieee" if out_dtype == torch.float32 else "tf32",
        SPLIT_K=split,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **flags,
    )
    if split > 1:
        block_n = min(1024, triton.next_power_of_2(n))
        _splitk_reduce_kernel[(m, triton.cdiv(n, block_n))](
            partial,
            w_scale,
            x_scale_arg,
            bias_arg,
            out,
            m,
            n,
            out.stride(0),
            CHANNEL_SCALE=not int4,
            SPLIT_K=split,
            BLOCK_N=block_n,
            num_warps=4,
            **flags,
        )
    return out


def linear_w8a16(
    x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None, config: Config | None = None
) -> Tensor:
    """`sglc::linear_w8a16`: x [..., K] @ (int8 [N, K] * scale [N]).T + bias -> [..., N] in x's dtype."""
    x2, (n, k) = _rows(x), qweight.shape
    if config is None:
        config = autotune.get_config(
            "linear_w8a16", linear_w8a16_key(x, qweight), lambda: _heuristic(x2.shape[0], n, k, x.device)
        )
    return _gemm(x2, x.dtype, qweight, scale, None, bias, k, config).view(*x.shape[:-1], n)


def linear_w4a16(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    group_size: int,
    bias: Tensor | None,
    config: Config | None = None,
) -> Tensor:
    """`sglc::linear_w4a16`: x [..., K] @ packed int4 [N, Kp / 2] with scales [N, Kp / group] -> [..., N].

    BLOCK_K is capped at the group size when the group is a power of two >= 16, so each K tile
    takes one scale per channel (applied to the tile's partial product).
    """
    x2, n, k = _rows(x), qweight.shape[0], x.shape[-1]
    aligned = group_size >= 16 and group_size & (group_size - 1) == 0
    if config is None:
        config = autotune.get_config(
            "linear_w4a16",
            linear_w4a16_key(x, qweight, group_size),
            lambda: _heuristic(x2.shape[0], n, k, x.device, max_block_k=group_size if aligned else 256),
        )
    return _gemm(x2, x.dtype, qweight, scales, None, bias, k, config, group=group_size).view(*x.shape[:-1], n)


def _use_scaled_mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # Row-wise scaled fp8 GEMM: sm89+, bf16 output (the only one every torch version's row-wise
    # path accepts), K and N multiples of 16, row-major A and column-major B (weight.t()).
    return (
        x.is_cuda
        and _device_facts(x.device)[1] >= (8, 9)
        and x.dtype == torch.bfloat16
        and x.shape[-1] % 16 == 0
        and weight.shape[0] % 16 == 0
        and weight.is_contiguous()
        and (bias is None or bias.dtype == torch.bfloat16)
    )


def linear_fp8(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    quantize_activations: bool,
    config: Config | None = None,
) -> Tensor:
    """`sglc::linear_fp8`: x [..., K] @ (e4m3 [N, K] * weight_scale [N]).T + bias -> [..., N].

    With `quantize_activations`, x is first quantized per token (fp8 kernel here), then multiplied
    by `torch._scaled_mm` where supported, else by the Triton kernel with both scales.
    """
    x2, (n, k) = _rows(x), weight.shape
    out_shape = (*x.shape[:-1], n)
    x_scale = None
    if quantize_activations:
        x2, x_scale = quantize_fp8_per_token(x2)
        if _use_scaled_mm(x, weight, bias) and x2.shape[0] > 0:
            scale_b = weight_scale.view(1, -1)
            out = torch._scaled_mm(
                x2, weight.t(), scale_a=x_scale, scale_b=scale_b, bias=bias, out_dtype=x.dtype
            )
            return out.view(out_shape)
    if config is None:
        config = autotune.get_config(
            "linear_fp8",
            linear_fp8_key(x, weight, quantize_activations),
            lambda: _heuristic(x2.shape[0], n, k, x.device),
        )
    return _gemm(x2, x.dtype, weight, weight_scale, x_scale, bias, k, config).view(out_shape)
