"""RoPE + KV-cache write in one op: `rope` feeding `paged_attention` -> `rope_store_kv` + cache-only attention.

Unfused, rotated k is written to memory by rope and read back by the attention's
cache write; fused, k and v go from the projection output straight into the pool.
Runs after `lower_attention`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

ROPE = torch.ops.sglc.rope.default
PAGED = torch.ops.sglc.paged_attention.default


def _rope_outputs(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(rope, q_rot, k_rot) when `node` is paged_attention(q_rot, k_rot, ...) of one rope, used nowhere else."""
    q_rot, k_rot = node.args[0], node.args[1]
    if not all(isinstance(n, fx.Node) and n.target is operator.getitem for n in (q_rot, k_rot)):
        return None
    rope = q_rot.args[0]
    if rope.target is not ROPE or k_rot.args[0] is not rope or (q_rot.args[1], k_rot.args[1]) != (0, 1):
        return None
    if len(q_rot.users) != 1 or len(k_rot.users) != 1:
        return None
    return rope, q_rot, k_rot


def fuse_rope_store_kv(gm: fx.GraphModule) -> dict[str, int]:
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not PAGED or node.args[1] is None or (found := _rope_outputs(node)) is None:
            continue
        rope, q_rot, k_rot = found
        q, k, positions, cos_sin = rope.args
        _, _, v, k_cache, v_cache, layer, slot_mapping, *rest = node.args
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(
                torch.ops.sglc.rope_store_kv.default,
                (q, k, v, positions, cos_sin, k_cache, v_cache, layer, slot_mapping),
            )
        fused.meta.update(q_rot.meta)
        node.args = (fused, None, None, k_cache, v_cache, layer, slot_mapping, *rest)
        for dead in (q_rot, k_rot, rope):
            gm.graph.erase_node(dead)
        count += 1
    return {"rope_store_kv": count} if count else {}
