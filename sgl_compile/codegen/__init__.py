"""Codegen: Triton kernels implementing the `sglc::` ops on CUDA, and their tuned launch configs.

Each kernel module exposes launchers with the op's signature; `register_cuda_kernels`
installs them as the ops' CUDA implementations, so a lowered program runs them
without naming them. The op bodies in `ir/` stay the references (and the CPU path).
"""

from __future__ import annotations

from functools import cache


@cache
def cuda_kernels() -> dict:
    """{op overload: its CUDA launcher} (same signature as the op)."""
    import torch

    from sgl_compile.codegen import activation, attention, fp8, norm, norm_linear, quant_gemm, rope

    ops = {
        torch.ops.sglc.rms_norm: norm.rms_norm,
        torch.ops.sglc.fused_add_rms_norm: norm.fused_add_rms_norm,
        torch.ops.sglc.silu_and_mul: activation.silu_and_mul,
        torch.ops.sglc.rms_norm_linear: norm_linear.rms_norm_linear,
        torch.ops.sglc.add_rms_norm_linear: norm_linear.add_rms_norm_linear,
        torch.ops.sglc.rope: rope.rope,
        torch.ops.sglc.rope_store_kv: rope.rope_store_kv,
        torch.ops.sglc.paged_attention: attention.paged_attention,
        torch.ops.sglc.quantize_fp8_per_token: fp8.quantize_fp8_per_token,
        torch.ops.sglc.linear_w8a16: quant_gemm.linear_w8a16,
        torch.ops.sglc.linear_w4a16: quant_gemm.linear_w4a16,
        torch.ops.sglc.linear_fp8: quant_gemm.linear_fp8,
    }
    return {op.default: launcher for op, launcher in ops.items()}


@cache
def register_cuda_kernels() -> None:
    import torch

    for op, launcher in cuda_kernels().items():
        torch.library.register_kernel(op._name, "cuda", launcher)


# The bound program's optional input: a buffer its logits are written into (rows x vocab, the program's
# dtype). Decode graphs of every batch size share one, where each would otherwise keep its own.
LOGITS_OUT = "logits_out"


def _into(x, out):
    """The program's output copied into `out` where given (a last op without an out variant)."""
    if out is None:
        return x
    from sgl_compile.codegen.norm_linear import check_out

    check_out(out, x.shape, x.dtype)
    return out.copy_(x)


def bind_cuda_kernels(gm, overrides: dict | None = None):
    """A copy of the program whose `sglc::` op nodes call their CUDA launchers directly (or the
    launcher `overrides` names for an op: another backend's, e.g. flashinfer's attention), and which
    takes an optional LOGITS_OUT buffer for its output.

    Plain projections (`aten.linear`) get the GEMV's launcher, which serves batch-1 decode and hands
    everything else to cuBLAS. Same graph, same weights (shared); what goes is the dispatcher's
    per-call cost (schema checks, the Python custom-op path: ~0.1 ms a call, measured), which CUDA
    graphs hide in decode but every eager step (prefill, mixed batches) pays hundreds of times.
    """
    import copy

    import torch
    from torch import fx

    from sgl_compile.codegen import norm_linear

    # aten.linear is rebound here only, never registered: a CUDA kernel registered for aten::linear
    # would reroute every linear in the process (cuBLAS included, which the GEMV falls back to).
    graph_only = {torch.ops.aten.linear.default: norm_linear.linear}
    kernels = {**cuda_kernels(), **graph_only, **(overrides or {})}
    bound = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = bound.graph
    for node in graph.nodes:
        if node.op == "call_function" and node.target in kernels:
            node.target = kernels[node.target]
    with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
        out = graph.placeholder(LOGITS_OUT, default_value=None)
    output = graph.output_node()
    (logits,) = output.args
    if logits.op == "call_function" and logits.target in (norm_linear.rms_norm_linear, norm_linear.linear):
        logits.kwargs = {**logits.kwargs, "out": out}  # the LM head's GEMM writes the buffer itself
    else:
        with graph.inserting_before(output):
            output.args = (graph.call_function(_into, (logits, out)),)
    bound.recompile()
    return bound
