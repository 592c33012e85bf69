"""IR: the `sglc::` op vocabulary (and, later, graph capture and printing).

Importing this package registers the ops with torch, so `torch.ops.sglc.*` exists.
"""

from sgl_compile.ir.ops import (
    ALL_OPS,
    attention,
    embedding,
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    rope,
    silu_and_mul,
)

__all__ = [
    "ALL_OPS",
    "attention",
    "embedding",
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "rope",
    "silu_and_mul",
]
