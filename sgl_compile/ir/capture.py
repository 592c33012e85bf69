"""Capture: a model's forward(input_ids, positions) -> a flat torch.fx GraphModule over `sglc::` ops.

torch.export traces with the token count symbolic, so one graph serves every
batch size. Its module takes pytree-structured inputs and checks guards; passes
need a plain positional signature they can extend (the attention lowering adds
KV-cache and batch-metadata inputs), so we flatten the calling convention.
"""

from __future__ import annotations

import torch
from torch import fx, nn


def capture(model: nn.Module, max_tokens: int, example_tokens: int = 8) -> fx.GraphModule:
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
    device = next(model.parameters()).device
    example = (
        torch.zeros(example_tokens, dtype=torch.long, device=device),
        torch.arange(example_tokens, device=device),
    )
    with torch.no_grad():
        exported = torch.export.export(model, example, dynamic_shapes=({0: tokens}, {0: tokens}))
    gm = exported.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph._codegen = fx.graph.CodeGen()  # positional inputs, one output
    output = gm.graph.output_node()
    (values,) = output.args
    output.args = (values[0],) if isinstance(values, (tuple, list)) and len(values) == 1 else (values,)
    gm.graph.eliminate_dead_code()
    # A plain GraphModule over the same graph and tensors, without export's hooks, closures and tracer
    # (which would keep it from being pickled into an artifact and re-traced when loaded).
    gm.graph._tracer_cls, gm.graph._tracer_extras = None, {}
    return fx.GraphModule(gm, gm.graph, class_name="Program")


def add_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """A new placeholder after the existing ones (placeholders must lead the graph)."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        return gm.graph.placeholder(name)


def input_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]
