"""IR: the `sglc::` op vocabulary, graph capture and printing.

Importing this package registers the ops with torch, so `torch.ops.sglc.*` exists.
"""

from sgl_compile.ir.ops import (
    ALL_OPS,
    add_rms_norm_linear,
    attention,
    embedding,
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    rms_norm_linear,
    rope,
    rope_store_kv,
    silu_and_mul,
    store_kv,
)
from sgl_compile.ir.quant import (
    QUANT_OPS,
    linear_fp8,
    linear_w4a16,
    linear_w8a16,
    quantize_fp8_per_token,
)

__all__ = [
    "ALL_OPS",
    "add_rms_norm_linear",
    "QUANT_OPS",
    "attention",
    "embedding",
    "fused_add_rms_norm",
    "linear_fp8",
    "linear_w4a16",
    "linear_w8a16",
    "paged_attention",
    "quantize_fp8_per_token",
    "rms_norm",
    "rms_norm_linear",
    "rope",
    "rope_store_kv",
    "silu_and_mul",
    "store_kv",
]
