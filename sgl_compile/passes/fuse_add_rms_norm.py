"""Residual add + RMSNorm -> `sglc::fused_add_rms_norm`: one pass over the hidden state instead of two.

Pattern: `s = add(x, r)` feeding `rms_norm(s, w, eps)`. The norm's users take the
fused op's first output; every other user of `s` (the residual stream) its second.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

ADD = torch.ops.aten.add.Tensor
RMS_NORM = torch.ops.sglc.rms_norm.default
FUSED = torch.ops.sglc.fused_add_rms_norm.default


def fuse_add_rms_norm(gm: fx.GraphModule) -> dict[str, int]:
    count = 0
    for norm in list(gm.graph.nodes):
        if norm.target is not RMS_NORM:
            continue
        summed = norm.args[0]
        if not (isinstance(summed, fx.Node) and summed.target is ADD and len(summed.args) == 2):
            continue
        x, residual = summed.args
        if not all(isinstance(a, fx.Node) for a in (x, residual)) or summed.kwargs:
            continue
        with gm.graph.inserting_before(summed):
            fused = gm.graph.call_function(FUSED, (x, residual, *norm.args[1:]))
            out = gm.graph.call_function(operator.getitem, (fused, 0))
            new_residual = gm.graph.call_function(operator.getitem, (fused, 1))
        norm.replace_all_uses_with(out)
        gm.graph.erase_node(norm)
        summed.replace_all_uses_with(new_residual)
        gm.graph.erase_node(summed)
        count += 1
    return {"fused_add_rms_norm": count} if count else {}
