"""RoPE into the attention: `paged_attention(rope_store_kv(q, k, v, positions, cos_sin, ...), None, None, ...)`
-> `paged_attention(q, k, v, ..., positions=positions, cos_sin_cache=cos_sin)`.

A batch-1 decode step spends a kernel a layer on rotating one token's q and k and storing its k
and v (2.3 us of a 57.7 us layer on the H100, docs/benchmarks.md); the decode attention kernel
loads q anyway and can rotate it and store the new key itself. Prefill and cascade decode keep
the separate kernel (the attention op runs it first). rope_store_kv with Qwen3's q/k norm weights
stays as it is. The op's reference rotates first, so the program's values do not move.
Runs after `fuse_qk_norm_rope`.
"""

from __future__ import annotations

import torch
from torch import fx

PAGED = torch.ops.sglc.paged_attention.default
ROPE_STORE_KV = torch.ops.sglc.rope_store_kv.default
_PLAIN_ROPE_ARGS = 9  # rope_store_kv without norm weights
_CACHE_ONLY_ARGS = 13  # paged_attention up to shared_len, without rope arguments


def fuse_rope_attention(gm: fx.GraphModule) -> dict[str, int]:
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not PAGED or node.kwargs or len(node.args) > _CACHE_ONLY_ARGS:
            continue
        rope = node.args[0]
        if not isinstance(rope, fx.Node) or rope.target is not ROPE_STORE_KV or rope.kwargs:
            continue
        if len(rope.args) != _PLAIN_ROPE_ARGS or len(rope.users) != 1 or node.args[1:3] != (None, None):
            continue
        q, k, v, positions, cos_sin, k_cache, v_cache, layer, slot_mapping = rope.args
        if tuple(node.args[3:7]) != (k_cache, v_cache, layer, slot_mapping):
            continue
        # cascade_indptr and shared_len, None where the node leaves them to their defaults
        rest = list(node.args[7:]) + [None] * (_CACHE_ONLY_ARGS - len(node.args))
        node.args = (q, k, v, *node.args[3:7], *rest, positions, cos_sin)
        gm.graph.erase_node(rope)
        count += 1
    return {"rope_attention": count} if count else {}
