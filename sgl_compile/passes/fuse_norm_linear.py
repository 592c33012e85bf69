"""RMSNorm + the projection reading it (+ the SwiGLU gate after it) -> one `sglc::` op.

Patterns (x's norm output used by exactly one `aten.linear` over a weight parameter):
- `rms_norm(x)` -> linear                      => `rms_norm_linear` (the final norm and the LM head)
- `fused_add_rms_norm(x, r)[0]` -> linear      => `add_rms_norm_linear`, whose second output replaces
  the residual stream `[1]`
- either, when the linear's only user is `silu_and_mul`, takes the gate too (activation "silu_and_mul").

Why: in a decode step of a few tokens every op is a kernel launch over a handful of rows, and the norm
and the gate are separate launches (and round trips of the activations) around a memory-bound GEMV.
One op lets the CUDA launcher run them as one kernel when the rows are few; with many rows it runs
the same kernels as before (norm, cuBLAS, gate), so prefill is unchanged. The op bodies are those
ops composed, so the program's values do not move.

Runs after quantization: a quantized projection is no longer an `aten.linear` and is left alone.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

LINEAR = torch.ops.aten.linear.default
RMS_NORM = torch.ops.sglc.rms_norm.default
FUSED_ADD_RMS_NORM = torch.ops.sglc.fused_add_rms_norm.default
SILU_AND_MUL = torch.ops.sglc.silu_and_mul.default
RMS_NORM_LINEAR = torch.ops.sglc.rms_norm_linear.default
ADD_RMS_NORM_LINEAR = torch.ops.sglc.add_rms_norm_linear.default


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _projection(normed: fx.Node) -> fx.Node | None:
    """The single `linear(normed, weight parameter[, bias])` reading `normed`, if that is its only use."""
    linear = _only_user(normed)
    if linear is None or linear.target is not LINEAR or linear.kwargs or linear.args[0] is not normed:
        return None
    weight = linear.args[1]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    return linear


def _comes_after(node: fx.Node, anchor: fx.Node) -> bool:
    cursor = anchor.next
    while cursor.op != "root":
        if cursor is node:
            return True
        cursor = cursor.next
    return False


def _getitems(node: fx.Node) -> dict[int, fx.Node] | None:
    items = {}
    for user in node.users:
        if user.target is not operator.getitem:
            return None
        items[user.args[1]] = user
    return items


def fuse_norm_linear(gm: fx.GraphModule) -> dict[str, int]:
    counts = {"rms_norm_linear": 0, "add_rms_norm_linear": 0, "silu_and_mul_fused": 0}
    for norm in list(gm.graph.nodes):
        if norm.kwargs:
            continue
        if norm.target is RMS_NORM:
            normed, summed = norm, None
        elif norm.target is FUSED_ADD_RMS_NORM:
            items = _getitems(norm)
            if items is None or 0 not in items or len(items) != len(norm.users):
                continue
            normed, summed = items[0], items.get(1)
        else:
            continue
        linear = _projection(normed)
        if linear is None:
            continue
        weight, bias = linear.args[1], linear.args[2] if len(linear.args) > 2 else None
        gate = _only_user(linear)
        fuse_gate = gate is not None and gate.target is SILU_AND_MUL and not gate.kwargs
        last = gate if fuse_gate else linear
        activation = "silu_and_mul" if fuse_gate else "none"
        x, norm_weight, eps = norm.args[0], norm.args[-2], norm.args[-1]
        # At the norm, so every user of the residual stream comes after; the weight's get_attr (placed
        # next to the linear) moves up with it.
        with gm.graph.inserting_before(norm):
            if norm.target is RMS_NORM:
                fused = out = gm.graph.call_function(
                    RMS_NORM_LINEAR, (x, norm_weight, eps, weight, bias, activation)
                )
            else:
                fused = gm.graph.call_function(
                    ADD_RMS_NORM_LINEAR, (x, norm.args[1], norm_weight, eps, weight, bias, activation)
                )
                out = gm.graph.call_function(operator.getitem, (fused, 0))
                if summed is not None:
                    summed.replace_all_uses_with(gm.graph.call_function(operator.getitem, (fused, 1)))
        for param in (weight, bias):
            if isinstance(param, fx.Node) and _comes_after(param, fused):
                fused.prepend(param)
        last.replace_all_uses_with(out)
        for dead in ([gate] if fuse_gate else []) + [linear, *{normed, summed} - {None, norm}, norm]:
            gm.graph.erase_node(dead)
        counts["rms_norm_linear" if norm.target is RMS_NORM else "add_rms_norm_linear"] += 1
        counts["silu_and_mul_fused"] += fuse_gate
    return {k: v for k, v in counts.items() if v}
