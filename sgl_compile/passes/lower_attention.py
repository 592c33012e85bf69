"""Attention lowering: abstract causal `sglc::attention` -> `sglc::paged_attention` over the KV pool.

The lowered program gains the runtime's inputs: the stacked KV caches and the
batch metadata (slot mapping, ragged query / KV index pointers, and the groups
of decode requests sharing a prefix, empty when the runtime forms none). Layer
ids are the order of attention nodes in the graph.
"""

from __future__ import annotations

import torch
from torch import fx

from sgl_compile.ir.capture import add_input

BATCH_INPUTS = (
    "k_cache", "v_cache", "slot_mapping", "qo_indptr", "kv_indptr", "kv_indices", "cascade_indptr", "shared_len",
)  # fmt: skip


def prefill_inputs(
    batch: list[list[int]],
    kv_shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device | str,
    all_logits: bool = False,
) -> dict[str, torch.Tensor]:
    """Every input a program may take (by placeholder name) for one prefill of `batch`, each sequence from
    position 0 into a fresh KV pool of (layers, kv_heads, head_dim) holding exactly these tokens.
    Logits for every position with `all_logits`, else for each sequence's last."""
    lengths = [len(ids) for ids in batch]
    total = sum(lengths)
    indptr = torch.tensor([0, *lengths], device=device).cumsum(0)
    cache = torch.zeros(kv_shape[0], total, *kv_shape[1:], dtype=dtype, device=device)
    slots = torch.arange(total, device=device)
    return {
        "input_ids": torch.tensor([t for ids in batch for t in ids], device=device),
        "positions": torch.cat([torch.arange(n, device=device) for n in lengths]),
        "logits_indices": slots if all_logits else indptr[1:] - 1,
        "k_cache": cache, "v_cache": cache.clone(), "slot_mapping": slots,
        "qo_indptr": indptr, "kv_indptr": indptr, "kv_indices": slots,
        "cascade_indptr": slots[:0], "shared_len": slots[:0],
    }  # fmt: skip


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
                 inputs["qo_indptr"], inputs["kv_indptr"], inputs["kv_indices"], scale,
                 inputs["cascade_indptr"], inputs["shared_len"]),
            )  # fmt: skip
        lowered.meta.update(node.meta)
        node.replace_all_uses_with(lowered)
        gm.graph.erase_node(node)
    return {"paged_attention": len(attention)}
