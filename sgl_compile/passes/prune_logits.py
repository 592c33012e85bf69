"""Compute the final norm and LM head only for the rows whose logits are wanted.

A prefill of n tokens needs one row of logits (the last), not n x vocab. The
program gains a `logits_indices` input; rows are selected before the final
RMSNorm (a per-row op), so neither the norm nor the LM head sees the others.
"""

from __future__ import annotations

import torch
from torch import fx

from sgl_compile.ir.capture import add_input


def prune_logits(gm: fx.GraphModule) -> dict[str, int]:
    head = gm.graph.output_node().args[0]
    if not (isinstance(head, fx.Node) and head.target is torch.ops.aten.linear.default):
        return {}
    indices = add_input(gm, "logits_indices")
    hidden = head.args[0]
    target = hidden if hidden.target is torch.ops.sglc.rms_norm.default else head
    source = target.args[0]
    with gm.graph.inserting_before(target):
        selected = gm.graph.call_function(torch.ops.aten.index_select.default, (source, 0, indices))
    target.replace_input_with(source, selected)
    return {"logits_pruned": 1}
