"""Weight quantization: `aten.linear` over a parameter -> the quantized linear op, weight converted here.

Every projection inside the decoder layers is rewritten; the LM head (the linear
producing the program's output) and the embedding table stay in the model dtype,
as production engines do, because their error lands directly on the logits.
Run after the merges so q/k/v and gate/up are quantized as one matrix each.

int8 and fp8 round to nearest. int4 (16 levels a weight) loses too much that way, so when
the pass is given the tokenizer it is calibrated: the program runs once over the built-in
text of `calibration.py`, and each linear, reached in graph order, is rounded by GPTQ
(`gptq_int4`) against the Hessian of its own input, H = 2 XᵀX / T. The layers after it see the
already-quantized ones. The result is in exactly the format of `ir.quant.quantize_int4`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from sgl_compile.errors import SglcError
from sgl_compile.ir import quant
from sgl_compile.passes import calibration
from sgl_compile.passes.manager import Pass
from sgl_compile.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LINEAR = torch.ops.aten.linear.default

# Added to diag(H), relative to its mean: with a few thousand tokens H is rank-deficient for wide
# inputs and GPTQ would otherwise over-fit the calibration text. Chosen on held-out text.
GPTQ_DAMP = 0.05
GPTQ_BLOCK = 128  # columns per lazy batch of error updates
CLIP_GRID = torch.linspace(1.0, 0.7, 16).tolist()  # candidate scales, as fractions of absmax / 7

# (op, tensors replacing the weight (in op argument order), extra args before bias)
Quantized = tuple[object, dict[str, Tensor], tuple]


def _int8(w: Tensor) -> Quantized:
    q, scale = quant.quantize_int8(w)
    return torch.ops.sglc.linear_w8a16.default, {"qweight": q, "scale": scale}, ()


def _int4(w: Tensor) -> Quantized:
    q, scales = quant.quantize_int4(w, quant.INT4_GROUP_SIZE)
    return torch.ops.sglc.linear_w4a16.default, {"qweight": q, "scales": scales}, (quant.INT4_GROUP_SIZE,)


def _fp8(w: Tensor) -> Quantized:
    q, scale = quant.quantize_fp8(w)
    return torch.ops.sglc.linear_fp8.default, {"weight": q, "weight_scale": scale}, ()


# name -> weight [N, K] -> Quantized, by rounding to nearest
METHODS: dict[str, Callable[[Tensor], Quantized]] = {
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


def _int4_group_scales(w: Tensor, importance: Tensor) -> Tensor:
    """Symmetric scales [N, G] of w [N, G, group]: per group, the clipping of absmax / 7 that minimises the
    rounding error weighted by each input's importance [G, group] (its mean square activation), so
    that the columns fed the largest activations are the ones represented best."""
    amax = w.abs().amax(dim=2).clamp(min=1e-8)
    best, best_err = amax / 7, None
    for c in CLIP_GRID:
        s = (amax * (c / 7))[..., None]
        err = ((torch.round(w / s).clamp(-8, 7) * s - w).square() * importance).sum(dim=2)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s[..., 0], best), torch.where(better, err, best_err)
    return best


def gptq_int4(w: Tensor, hessian: Tensor, group_size: int = quant.INT4_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """GPTQ (Frantar et al., 2022) for symmetric int4 with per-group scales: w [N, K], H [K, K] ->
    (q int8 [N, K] in [-8, 7], scales fp32 [N, ceil(K / group_size)]), w ~= q * scales per group.

    Columns are rounded one at a time, most important input first (act-order); each rounding error is
    spread over the columns not yet rounded, in the proportions that minimise the layer's output error
    on the calibration inputs (via the Cholesky factor of H⁻¹). Act-order visits the groups out of
    order, so their scales are fixed up front from the original weights (`_int4_group_scales`).
    Runs on w's device, vectorised over the N rows; only the K columns are a Python loop.
    """
    n, k = w.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights are free, set them to 0
    h[dead, dead] = 1.0
    w = w.float().masked_fill(dead, 0.0)
    importance = h.diagonal().clone()
    scales = _int4_group_scales(
        F.pad(w, (0, pad)).view(n, groups, group_size), F.pad(importance, (0, pad)).view(groups, group_size)
    )
    h.diagonal().add_(GPTQ_DAMP * h.diagonal().mean())
    order = torch.argsort(importance, descending=True)
    h = h[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # Transposed, so that each input column is a contiguous row of N values.
    wt = w[:, order].T.contiguous()
    st = scales.repeat_interleave(group_size, dim=1)[:, :k][:, order].T.contiguous()
    inv_st = 1.0 / st
    qt = torch.empty_like(wt)
    for b0 in range(0, k, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, k)
        ub = u[b0:b1, b0:b1]
        inv_d = (1.0 / ub.diagonal()).tolist()
        err = torch.empty(b1 - b0, n, device=w.device)
        for i in range(b1 - b0):
            j, qj, ei = b0 + i, qt[b0 + i], err[i]
            torch.mul(wt[j], inv_st[j], out=qj).round_().clamp_(-8, 7)
            torch.addcmul(wt[j], qj, st[j], value=-1.0, out=ei).mul_(inv_d[i])
            wt[j + 1 : b1].addr_(ub[i, i + 1 :], ei, alpha=-1.0)
        wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1.0)  # the block's errors, onto all later columns
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    q[:, order] = qt.T.to(torch.int8)
    return q, scales


def _gptq_int4(w: Tensor, hessian: Tensor) -> Quantized:
    g = quant.INT4_GROUP_SIZE
    q, scales = gptq_int4(w, hessian, g)
    return torch.ops.sglc.linear_w4a16.default, {"qweight": quant.pack_int4(q, g), "scales": scales}, (g,)


# name -> (weight [N, K], Hessian of its input [K, K]) -> Quantized, by an error-compensating rounding
CALIBRATED: dict[str, Callable[[Tensor, Tensor], Quantized]] = {"int4": _gptq_int4}


def _bias(gm: fx.GraphModule, node: fx.Node) -> Tensor | None:
    bias = node.args[2] if len(node.args) > 2 else None
    return gm.get_parameter(bias.target) if isinstance(bias, fx.Node) else bias


def _calibrated(
    gm: fx.GraphModule, linears: list[fx.Node], method: str, tokenizer: Tokenizer
) -> tuple[dict[fx.Node, Quantized], int]:
    """Quantize the weights of `linears` with CALIBRATED[method] during one run of the calibration text."""
    batch = calibration.calibration_batch(tokenizer)
    first = gm.get_parameter(linears[0].args[1].target)
    done: dict[fx.Node, Quantized] = {}

    def replace(node: fx.Node, x: Tensor) -> Tensor:
        xf = x.reshape(-1, x.shape[-1]).float()
        hessian = (2.0 / xf.shape[0]) * (xf.T @ xf)
        done[node] = CALIBRATED[method](gm.get_parameter(node.args[1].target).detach(), hessian)
        op, tensors, extra = done[node]
        return op(x, *tensors.values(), *extra, _bias(gm, node))  # what the rewritten program computes

    calibration.run_calibration(gm, linears, replace, batch, first.device, first.dtype)
    return done, sum(map(len, batch))


def quantize(method: str, tokenizer: Tokenizer | None = None) -> Pass:
    """The pass for `method`; int4 is calibrated with GPTQ when `tokenizer` is given, else rounded to nearest."""
    check_method(method)

    def run(gm: fx.GraphModule) -> dict[str, int]:
        head = gm.graph.output_node().args[0]
        linears = [
            n for n in gm.graph.nodes if n.target is LINEAR and n is not head and n.args[1].op == "get_attr"
        ]
        if not linears:
            return {}
        done, tokens = {}, 0
        if method in CALIBRATED:
            if tokenizer is not None:
                done, tokens = _calibrated(gm, linears, method, tokenizer)
            else:
                log.warning("quantize %s: no tokenizer to calibrate with; rounding to nearest", method)
        count, before, after = 0, 0, 0
        for node in linears:
            weight_node = node.args[1]
            path, _, attr = weight_node.target.rpartition(".")
            owner = gm.get_submodule(path)
            weight = gm.get_parameter(weight_node.target)
            op, tensors, extra = done[node] if node in done else METHODS[method](weight.detach())
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
        counts = {f"linear_{method}": count, "weight_bytes_before": before, "weight_bytes_after": after}
        return counts | ({"calibration_tokens": tokens} if tokens else {})

    return run
