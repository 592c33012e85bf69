"""The op vocabulary of the IR: `sglc::` custom ops.

Each op is registered with `torch.library.custom_op`. The function body is the
reference implementation: plain torch, runs on any device, and *defines* what
the op means. Kernels (Triton, flashinfer, ...) are later registered for CUDA
with `op.register_kernel("cuda")` and are tested against these bodies. Each op
also has a fake implementation so graphs can be captured with symbolic shapes.

Ops never mutate their inputs and never return an alias of one (custom_op's
contract); the in-place forms belong to the lowered program, not the IR.

Reductions and softmax run in float32 whatever the activation dtype, and the
result is cast back, as every production kernel does.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("sglc::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; normalised in fp32, scaled in x.dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("sglc::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add of a pre-norm block and the next norm."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


@fused_add_rms_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # NeoX / HF layout: the two halves of the head dim form the (real, imag) pairs.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@torch.library.custom_op("sglc::rope", mutates_args=())
def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [T, Hq, D] and k [T, Hkv, D] at `positions` [T].

    `cos_sin_cache` [max_pos, D] (fp32) holds cos(pos * inv_freq) in its first D/2
    columns and sin in the last D/2; rotation is computed in fp32.
    """
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@rope.register_fake
def _(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("sglc::silu_and_mul", mutates_args=())
def silu_and_mul(x: Tensor) -> Tensor:
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d]: the SwiGLU gate of a gated MLP."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@silu_and_mul.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


NORM_LINEAR_ACTIVATIONS = ("none", "silu_and_mul")


def check_norm_linear_activation(activation: str) -> None:
    if activation not in NORM_LINEAR_ACTIVATIONS:
        raise ValueError(f"activation must be one of {NORM_LINEAR_ACTIVATIONS}, not {activation!r}")


def _linear_activation(h: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    check_norm_linear_activation(activation)
    out = torch.nn.functional.linear(h, weight, bias)
    return silu_and_mul(out) if activation == "silu_and_mul" else out


@torch.library.custom_op("sglc::rms_norm_linear", mutates_args=())
def rms_norm_linear(
    x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    """activation(linear(rms_norm(x), weight, bias)): a norm and the projection that reads it (the final
    norm and the LM head); activation "none" or "silu_and_mul" (the gated MLP's gate_up projection)."""
    return _linear_activation(rms_norm(x, norm_weight, eps), weight, bias, activation)


def _norm_linear_shape(x: Tensor, weight: Tensor, activation: str) -> list[int]:
    n = weight.shape[0] // 2 if activation == "silu_and_mul" else weight.shape[0]
    return [*x.shape[:-1], n]


@rms_norm_linear.register_fake
def _(x, norm_weight, eps, weight, bias, activation) -> Tensor:
    return x.new_empty(_norm_linear_shape(x, weight, activation))


@torch.library.custom_op("sglc::add_rms_norm_linear", mutates_args=())
def add_rms_norm_linear(
    x: Tensor,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """(activation(linear(rms_norm(x + residual), weight, bias)), x + residual): a pre-norm block's
    residual add, its norm and the projection that reads the normed rows, as one op."""
    normed, summed = fused_add_rms_norm(x, residual, norm_weight, eps)
    return _linear_activation(normed, weight, bias, activation), summed


@add_rms_norm_linear.register_fake
def _(x, residual, norm_weight, eps, weight, bias, activation) -> tuple[Tensor, Tensor]:
    return x.new_empty(_norm_linear_shape(x, weight, activation)), torch.empty_like(x)


@torch.library.custom_op("sglc::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal self-attention over one sequence: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    Grouped-query: query head h reads kv head h // (Hq // Hkv). Scores and softmax in fp32.
    The attention-lowering pass replaces this op with the runtime's paged attention.
    """
    return _attend_prefix(q, k, v, scale).contiguous()


@attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("sglc::embedding", mutates_args=())
def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Rows of `weight` [V, H] selected by token `ids` [T] -> [T, H]."""
    return weight.index_select(0, ids)


@embedding.register_fake
def _(ids: Tensor, weight: Tensor) -> Tensor:
    return weight.new_empty(ids.shape[0], weight.shape[1])


def check_qk_norm_weights(q_norm_weight: Tensor | None, k_norm_weight: Tensor | None) -> None:
    """rope_store_kv's q/k norm weights come both or neither."""
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rope_store_kv: give both q_norm_weight and k_norm_weight, or neither")


@torch.library.custom_op("sglc::rope_store_kv", mutates_args=("k_cache", "v_cache"))
def rope_store_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    slot_mapping: Tensor,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    norm_eps: float = 0.0,
) -> Tensor:
    """`rope` of q and k, with rotated k and v written straight into the KV pool; returns rotated q.

    The write is `paged_attention`'s (same slots, negative = padding), so the attention that
    follows is called with k = v = None. One pass over q/k/v instead of three. With norm weights
    (both or neither), q and k are first `rms_norm`ed per head (Qwen3's q/k norm, [D] weights).
    """
    check_qk_norm_weights(q_norm_weight, k_norm_weight)
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, norm_eps), rms_norm(k, k_norm_weight, norm_eps)
    q_rot, k_rot = rope(q, k, positions, cos_sin_cache)
    store_kv(k_rot, v, k_cache, v_cache, layer, slot_mapping)
    return q_rot


@rope_store_kv.register_fake
def _(
    q, k, v, positions, cos_sin_cache, k_cache, v_cache, layer, slot_mapping,
    q_norm_weight=None, k_norm_weight=None, norm_eps=0.0,
) -> Tensor:  # fmt: skip
    return torch.empty_like(q)


def store_kv(
    k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, slot_mapping: Tensor
) -> None:
    """k/v [T, Hkv, D] into k_cache[layer] / v_cache[layer] at `slot_mapping` (negative slots skipped)."""
    valid = slot_mapping >= 0
    k_cache[layer, slot_mapping[valid]] = k[valid].to(k_cache.dtype)
    v_cache[layer, slot_mapping[valid]] = v[valid].to(v_cache.dtype)


@torch.library.custom_op("sglc::paged_attention", mutates_args=("k_cache", "v_cache"))
def paged_attention(
    q: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    slot_mapping: Tensor,
    qo_indptr: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    scale: float,
    cascade_indptr: Tensor | None = None,
    shared_len: Tensor | None = None,
    positions: Tensor | None = None,
    cos_sin_cache: Tensor | None = None,
) -> Tensor:
    """Causal attention of a ragged batch over a paged KV cache; what `attention` is lowered to.

    First writes the new k/v [T, Hkv, D] into `k_cache[layer]` / `v_cache[layer]` ([L, S, Hkv, D])
    at `slot_mapping` [T] (negative slots are padding and are skipped). Request b owns query rows
    `qo_indptr[b]:qo_indptr[b+1]` and KV slots `kv_indices[kv_indptr[b]:kv_indptr[b+1]]` in
    position order, its new tokens last, so query i of n attends to the first (n_kv - n + i + 1).
    k = v = None when `rope_store_kv` already wrote them.

    A decode batch may name groups of requests that share a prefix (cascade attention): requests
    `cascade_indptr[g]:cascade_indptr[g+1]` (consecutive; [B + 1], trailing groups empty) have the
    same first `shared_len[b]` [B] KV slots, so a kernel may read them once for the whole group. The
    result is the same; empty tensors (or None) name no groups. This reference checks the claim.

    With `positions` [T] and `cos_sin_cache` (both or neither, as `rope` takes them), q and k are the
    projections before the rotary embedding: the op rotates both first, so that a decode kernel can
    rotate and store the new key itself instead of a kernel before it doing so.
    """
    if (positions is None) != (cos_sin_cache is None):
        raise ValueError("paged_attention: give both positions and cos_sin_cache, or neither")
    if positions is not None:
        if k is None or v is None:
            raise ValueError("paged_attention: rotating q and k needs the new k and v")
        q, k = rope(q, k, positions, cos_sin_cache)
    if k is not None and v is not None:
        store_kv(k, v, k_cache, v_cache, layer, slot_mapping)
    if cascade_indptr is not None and cascade_indptr.numel() > 0:
        _check_cascade(cascade_indptr, shared_len, kv_indptr, kv_indices)
    out = torch.empty_like(q)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        if qo[b + 1] == qo[b]:
            continue
        slots = kv_indices[kvp[b] : kvp[b + 1]]
        out[qo[b] : qo[b + 1]] = _attend_prefix(
            q[qo[b] : qo[b + 1]], k_cache[layer, slots], v_cache[layer, slots], scale
        )
    return out


def _attend_prefix(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [n, Hq, D] are the last n of the m positions in k/v [m, Hkv, D]; causal, GQA, fp32 softmax."""
    n, m, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    visible = torch.arange(m, device=q.device)[None, :] <= torch.arange(m - n, m, device=q.device)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def _check_cascade(cascade_indptr: Tensor, shared_len: Tensor, kv_indptr: Tensor, kv_indices: Tensor) -> None:
    groups, shared, kvp = cascade_indptr.tolist(), shared_len.tolist(), kv_indptr.tolist()
    if groups[0] != 0 or groups != sorted(groups) or groups[-1] != len(kvp) - 1:
        raise ValueError(f"cascade_indptr {groups} does not cover the batch's {len(kvp) - 1} requests")
    for first, end in zip(groups, groups[1:], strict=False):
        n = shared[first] if end > first else 0
        head = kv_indices[kvp[first] : kvp[first] + n]
        for b in range(first, end):
            if (
                shared[b] != n
                or n > kvp[b + 1] - kvp[b] - 1
                or not torch.equal(kv_indices[kvp[b] : kvp[b] + n], head)
            ):
                raise ValueError(f"request {b} does not share the first {n} KV slots of its group")


@paged_attention.register_fake
def _(
    q, k, v, k_cache, v_cache, layer, slot_mapping, qo_indptr, kv_indptr, kv_indices, scale,
    cascade_indptr=None, shared_len=None, positions=None, cos_sin_cache=None,
) -> Tensor:  # fmt: skip
    return torch.empty_like(q)


ALL_OPS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "rope": rope,
    "silu_and_mul": silu_and_mul,
    "attention": attention,
    "embedding": embedding,
    "paged_attention": paged_attention,
    "rope_store_kv": rope_store_kv,
    "rms_norm_linear": rms_norm_linear,
    "add_rms_norm_linear": add_rms_norm_linear,
}
