"""Attention lowering: abstract causal `sglc::attention` -> `sglc::paged_attention` over the KV pool.

The lowered program gains the runtime's inputs: the stacked KV caches and the
batch metadata (slot mapping, ragged query / KV index pointers). Layer ids are
the order of attention nodes in the graph.
"""

from __future__ import annotations

import torch
from torch import fx

from sgl_compile.ir.capture import add_input

BATCH_INPUTS = ("k_cache", "v_cache", "slot_mapping", "qo_indptr", "kv_indptr", "kv_indices")


def lower_attention(gm: fx.GraphModule) -> dict[str, int]:
    attention = [n for n in gm.graph.nodes if n.target is torch.ops.sglc.attention.default]
    if not attention:
        return {}
    inputs = {}
    for name in BATCH_INPUTS:  # added in order: each after the previous
        inputs[name] = add_input(gm, name)
    for layer, node in enumerate(attention):
        q, k, v, scale = node.args
        with gm.graph.inserting_before(node):
            lowered = gm.graph.call_function(
                torch.ops.sglc.paged_attention.default,
                (q, k, v, inputs["k_cache"], inputs["v_cache"], layer, inputs["slot_mapping"],
                 inputs["qo_indptr"], inputs["kv_indptr"], inputs["kv_indices"], scale),
            )  # fmt: skip
        lowered.meta.update(node.meta)
        node.replace_all_uses_with(lowered)
        gm.graph.erase_node(node)
    return {"paged_attention": len(attention)}
