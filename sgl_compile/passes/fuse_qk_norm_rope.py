"""Per-head q/k RMSNorm (Qwen3) folded into `rope_store_kv`: `rope_store_kv(rms_norm(q), rms_norm(k), ...)`
-> `rope_store_kv(q, k, ..., q_norm_weight, k_norm_weight, eps)`.

Unfused, each norm reads a strided view of the QKV projection (a copy to make it contiguous, then the
norm kernel) and writes the normed heads that the rope kernel reads back; the rope kernel already loads
every head row, so it normalises them itself. The op's reference is the two norms composed with it,
so the program's values do not move. Runs after `fuse_rope_store_kv`.
"""

from __future__ import annotations

import torch
from torch import fx

RMS_NORM = torch.ops.sglc.rms_norm.default
ROPE_STORE_KV = torch.ops.sglc.rope_store_kv.default
_PLAIN_ARGS = 9  # rope_store_kv without norm weights


def _head_norm(node: object, consumer: fx.Node) -> fx.Node | None:
    """`node` when it is rms_norm(x [T, H, D], weight [D] in x's dtype) read only by `consumer`."""
    if not (isinstance(node, fx.Node) and node.target is RMS_NORM and not node.kwargs):
        return None
    if len(node.users) != 1 or next(iter(node.users)) is not consumer:
        return None
    x_val, w_val = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2])
    if x_val is None or w_val is None:
        return None
    if w_val.dim() != 1 or w_val.shape[0] != x_val.shape[-1] or w_val.dtype != x_val.dtype:
        return None
    return node


def fuse_qk_norm_rope(gm: fx.GraphModule) -> dict[str, int]:
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not ROPE_STORE_KV or node.kwargs or len(node.args) != _PLAIN_ARGS:
            continue
        q_norm, k_norm = _head_norm(node.args[0], node), _head_norm(node.args[1], node)
        if q_norm is None or k_norm is None or q_norm is k_norm or q_norm.args[2] != k_norm.args[2]:
            continue
        (q, q_weight, eps), (k, k_weight, _) = q_norm.args, k_norm.args
        node.args = (q, k, *node.args[2:], q_weight, k_weight, eps)
        gm.graph.erase_node(q_norm)
        gm.graph.erase_node(k_norm)
        count += 1
    return {"qk_norm_fused": count} if count else {}
