"""Weight quantization: `aten.linear` over a parameter -> the quantized linear op, weight converted here.

Every projection inside the decoder layers is rewritten; the LM head (the linear
producing the program's output) and the embedding table stay in the model dtype,
as production engines do, because their error lands directly on the logits.
Run after the merges so q/k/v and gate/up are quantized as one matrix each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx

from sgl_compile.errors import SglcError
from sgl_compile.ir import quant
from sgl_compile.passes.manager import Pass

LINEAR = torch.ops.aten.linear.default


def _int8(w: Tensor) -> tuple[object, dict[str, Tensor], tuple]:
    q, scale = quant.quantize_int8(w)
    return torch.ops.sglc.linear_w8a16.default, {"qweight": q, "scale": scale}, ()


def _int4(w: Tensor) -> tuple[object, dict[str, Tensor], tuple]:
    q, scales = quant.quantize_int4(w, quant.INT4_GROUP_SIZE)
    return torch.ops.sglc.linear_w4a16.default, {"qweight": q, "scales": scales}, (quant.INT4_GROUP_SIZE,)


def _fp8(w: Tensor) -> tuple[object, dict[str, Tensor], tuple]:
    q, scale = quant.quantize_fp8(w)
    return torch.ops.sglc.linear_fp8.default, {"weight": q, "weight_scale": scale}, ()


# name -> weight [N, K] -> (op, tensors replacing the weight (in op argument order), extra args before bias)
METHODS: dict[str, Callable[[Tensor], tuple[object, dict[str, Tensor], tuple]]] = {
    "int8": _int8,
    "int4": _int4,
    "fp8": _fp8,
}


def check_method(name: str | None) -> None:
    if name is not None and name not in METHODS:
        raise SglcError(f"unknown quantization {name!r}; valid: {', '.join(METHODS)}")


def fp8_activations_supported(device: torch.device) -> bool:
    """Dynamic per-token activation quantization needs fp8 tensor cores (Ada / Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize(method: str) -> Pass:
    check_method(method)

    def run(gm: fx.GraphModule) -> dict[str, int]:
        head = gm.graph.output_node().args[0]
        count, before, after = 0, 0, 0
        for node in list(gm.graph.nodes):
            if node.target is not LINEAR or node is head or node.args[1].op != "get_attr":
                continue
            weight_node = node.args[1]
            path, _, attr = weight_node.target.rpartition(".")
            owner = gm.get_submodule(path)
            weight = gm.get_parameter(weight_node.target)
            op, tensors, extra = METHODS[method](weight.detach())
            args = [node.args[0]]
            with gm.graph.inserting_before(node):
                for suffix, tensor in tensors.items():
                    name = f"{attr}_{suffix}"
                    owner.register_buffer(name, tensor)
                    args.append(gm.graph.get_attr(f"{path}.{name}"))
            bias = node.args[2] if len(node.args) > 2 else None
            args += [*extra, bias]
            if method == "fp8":
                args.append(fp8_activations_supported(weight.device))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(op, tuple(args))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            if not weight_node.users:
                gm.graph.erase_node(weight_node)
                delattr(owner, attr)
            before += weight.nbytes
            after += sum(t.nbytes for t in tensors.values())
            count += 1
        if not count:
            return {}
        return {f"linear_{method}": count, "weight_bytes_before": before, "weight_bytes_after": after}

    return run
