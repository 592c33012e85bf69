"""Merge sibling projections into one GEMM: q/k/v -> qkv + split, gate/up -> gate_up (+ silu_and_mul).

Linears that read the same activation are one matmul against their stacked
weights; the weights (and biases) are concatenated here, at compile time, and
the originals dropped from the module.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

LINEAR = torch.ops.aten.linear.default


def _param(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    return None if node is None else gm.get_parameter(node.target)


def _merged_param(gm: fx.GraphModule, nodes: list[fx.Node], name: str, anchor: fx.Node) -> fx.Node:
    """Register cat(params of `nodes`) next to the first one as `name`; return a get_attr for it."""
    owner_path, _, _ = nodes[0].target.rpartition(".")
    owner_path = owner_path.rpartition(".")[0]  # ...self_attn.q_proj.weight -> ...self_attn
    owner = gm.get_submodule(owner_path)
    merged = torch.cat([_param(gm, n) for n in nodes], dim=0)
    owner.register_parameter(name, nn.Parameter(merged, requires_grad=False))
    with gm.graph.inserting_before(anchor):
        return gm.graph.get_attr(f"{owner_path}.{name}")


def _drop_unused_params(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            path, _, attr = node.target.rpartition(".")
            gm.graph.erase_node(node)
            delattr(gm.get_submodule(path), attr)


def merge_linear_group(gm: fx.GraphModule, linears: list[fx.Node], name: str) -> list[fx.Node]:
    """Replace `linears` (same input) by one linear + split; return the split outputs in order."""
    x, first = linears[0].args[0], linears[0]  # in graph order: the first one is the insertion point
    weight = _merged_param(gm, [n.args[1] for n in linears], f"{name}_weight", first)
    bias = None
    if len(linears[0].args) > 2 and linears[0].args[2] is not None:
        bias = _merged_param(gm, [n.args[2] for n in linears], f"{name}_bias", first)
    sizes = [_param(gm, n.args[1]).shape[0] for n in linears]
    with gm.graph.inserting_before(first):
        merged = gm.graph.call_function(LINEAR, (x, weight, bias) if bias is not None else (x, weight))
        split = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (merged, sizes, -1))
        parts = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(linears))]
    for old, new in zip(linears, parts, strict=True):
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
    return parts


def _linear_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is LINEAR and u.args[0] is node and len(u.args) >= 2]


def merge_qkv(gm: fx.GraphModule) -> dict[str, int]:
    """Three projections of one activation, each feeding `sglc::rope` or attention: q, k, v."""
    count = 0
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        users = _linear_users(node)
        if len(users) == 3 and all(_feeds_attention(u) for u in users):
            merge_linear_group(gm, sorted(users, key=position.__getitem__), "qkv_proj")
            count += 1
    _drop_unused_params(gm)
    return {"qkv_merged": count} if count else {}


def _feeds_attention(linear: fx.Node) -> bool:
    """Does this projection reach rope / attention (through views and per-head norms)?"""
    frontier, seen = [linear], set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            target = str(u.target)
            if "sglc.rope" in target or "attention" in target:
                return True
            if "view" in target or "rms_norm" in target:
                frontier.append(u)
    return False


def merge_gate_up(gm: fx.GraphModule) -> dict[str, int]:
    """cat([linear(x, Wg), linear(x, Wu)]) -> linear(x, [Wg; Wu]): the gated MLP's input of silu_and_mul."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.aten.cat.default:
            continue
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        if (
            dim not in (-1, 1)
            or len(parts) != 2
            or not all(p.target is LINEAR and len(p.users) == 1 for p in parts)
        ):
            continue
        if parts[0].args[0] is not parts[1].args[0]:
            continue
        weight = _merged_param(gm, [p.args[1] for p in parts], "gate_up_proj_weight", parts[0])
        with gm.graph.inserting_before(node):
            merged = gm.graph.call_function(LINEAR, (parts[0].args[0], weight))
        node.replace_all_uses_with(merged)
        gm.graph.erase_node(node)
        for p in parts:
            gm.graph.erase_node(p)
        count += 1
    _drop_unused_params(gm)
    return {"gate_up_merged": count} if count else {}
