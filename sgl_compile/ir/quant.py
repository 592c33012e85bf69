"""Quantized linears: weight formats, their (de)quantizers, and the `sglc::` ops that consume them.

Formats (all symmetric, no zero points):
- int8: `qweight` int8 [N, K], `scale` fp32 [N]; w = qweight * scale[:, None].
- int4: `qweight` uint8 [N, Kp // 2] with Kp = K rounded up to the group size; element k of a row
  is the low nibble of byte k // 2 when k is even, the high nibble when odd, stored as q + 8 for q
  in [-8, 7]; `scales` fp32 [N, Kp // group_size]; w[n, k] = (nibble - 8) * scales[n, k // group_size].
  Padding columns (k >= K) hold zeros.
- fp8: `weight` float8_e4m3fn [N, K], `weight_scale` fp32 [N]; w = weight * weight_scale[:, None].
  Activations may be quantized per token to e4m3 with scale amax / 448 (`quantize_fp8_per_token`).

The op bodies are the references: dequantize, then an ordinary linear in fp32, cast to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_GROUP_SIZE = 128


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: Tensor, scale: Tensor) -> Tensor:
    return qweight.float() * scale[:, None]


def quantize_int4(w: Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    wf = F.pad(w.float(), (0, kp - k)).view(n, kp // group_size, group_size)
    scales = wf.abs().amax(dim=2).clamp(min=1e-8) / 7.0
    return pack_int4(torch.round(wf / scales[..., None]).clamp(-8, 7).view(n, kp), group_size), scales


def pack_int4(q: Tensor, group_size: int = INT4_GROUP_SIZE) -> Tensor:
    """Signed q [N, K] in [-8, 7] -> packed uint8 [N, Kp // 2] (padding columns hold 0)."""
    kp = -(-q.shape[1] // group_size) * group_size
    u = (F.pad(q.to(torch.int16), (0, kp - q.shape[1])) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(qweight: Tensor) -> Tensor:
    """Packed uint8 [N, Kp // 2] -> signed values in [-8, 7] as int8 [N, Kp]."""
    low, high = qweight & 0xF, qweight >> 4
    return torch.stack([low, high], dim=-1).view(qweight.shape[0], -1).to(torch.int8) - 8


def dequantize_int4(qweight: Tensor, scales: Tensor, group_size: int, k: int) -> Tensor:
    w = unpack_int4(qweight).float().view(qweight.shape[0], -1, group_size) * scales[..., None]
    return w.view(qweight.shape[0], -1)[:, :k]


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _finish(y: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    return (y if bias is None else y + bias.float()).to(dtype)


@torch.library.custom_op("sglc::linear_w8a16", mutates_args=())
def linear_w8a16(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] @ int8 weight [N, K] with per-channel scales -> [..., N] in x's dtype."""
    return _finish(x.float() @ dequantize_int8(qweight, scale).T, bias, x.dtype)


@linear_w8a16.register_fake
def _(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("sglc::linear_w4a16", mutates_args=())
def linear_w4a16(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    """x [..., K] @ packed int4 weight (see module doc) with per-group scales -> [..., N]."""
    w = dequantize_int4(qweight, scales, group_size, x.shape[-1])
    return _finish(x.float() @ w.T, bias, x.dtype)


@linear_w4a16.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("sglc::quantize_fp8_per_token", mutates_args=())
def quantize_fp8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (e4m3 [T, K], fp32 scales [T, 1]) with x ~= q * scale; scale = amax(row) / 448."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@quantize_fp8_per_token.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


@torch.library.custom_op("sglc::linear_fp8", mutates_args=())
def linear_fp8(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, quantize_activations: bool
) -> Tensor:
    """x [T, K] @ e4m3 weight [N, K] with per-channel scales -> [T, N] in x's dtype.

    With `quantize_activations`, x is first rounded to e4m3 per token (what the Hopper
    `_scaled_mm` path computes); without, the weight alone is quantized.
    """
    xf = x.float()
    if quantize_activations:
        xq, xs = quantize_fp8_per_token(x)
        xf = xq.float() * xs
    return _finish(xf @ (weight.float() * weight_scale[:, None]).T, bias, x.dtype)


@linear_fp8.register_fake
def _(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, quantize_activations: bool
) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


QUANT_OPS = {
    "linear_w8a16": linear_w8a16,
    "linear_w4a16": linear_w4a16,
    "quantize_fp8_per_token": quantize_fp8_per_token,
    "linear_fp8": linear_fp8,
}
