"""A readable dump of a captured program: one line per op, parameters by name, shapes where known."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "[" + ", ".join(str(d) for d in val.shape) + f"] {str(val.dtype).removeprefix('torch.')}"
    return ""


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.target if a.op == "get_attr" else f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def _op(target: Any) -> str:
    name = getattr(target, "__name__", str(target))
    return str(target).removesuffix(".default") if isinstance(target, torch._ops.OpOverload) else name


def format_graph(gm: fx.GraphModule) -> str:
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"input  %{node.name} {_shape(node)}".rstrip())
        elif node.op == "call_function":
            args = ", ".join(_arg(a) for a in node.args)
            shape = _shape(node)
            lines.append(f"%{node.name} = {_op(node.target)}({args}){'  # ' + shape if shape else ''}")
        elif node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
    return "\n".join(lines)
