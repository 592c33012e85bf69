"""Triton rotary embedding and KV-pool writes: `sglc::rope`, `sglc::rope_store_kv` and `store_kv`.

Layouts: q [T, Hq, D], k / v [T, Hkv, D] (any token and head strides, unit stride along D, so the
views a fused QKV projection splits into are read in place); KV pool [L, S, Hkv, D]; `positions`
and `slot_mapping` [T] integers; `cos_sin_cache` [max_pos, D] fp32 with cos in its first D/2
columns and sin in the last D/2 (NeoX layout: the two halves of the head dim are the pairs).

One program per (token, block of heads). Negative slots are padding (CUDA-graph buckets) and are
skipped by masking inside the kernel, so nothing here syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import autotune, pdl
from sgl_compile.ir.ops import check_qk_norm_weights

Config = dict[str, int]

# Candidates for a GPU tuner; BLOCK_H is heads per program (clamped to the head count).
CONFIG_SPACE: dict[str, list[Config]] = {
    name: [{"BLOCK_H": bh, "num_warps": w} for bh in (1, 2, 4, 8, 16, 32) for w in (1, 2, 4, 8)]
    for name in ("store_kv", "rope", "rope_store_kv")
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def store_kv_key(k: Tensor, v: Tensor, k_cache: Tensor) -> tuple:
    """Tuning key: KV heads, head dim, source and cache dtypes."""
    return (k.shape[1], k.shape[2], _dtype_name(k.dtype), _dtype_name(k_cache.dtype))


def rope_key(q: Tensor, k: Tensor) -> tuple:
    """Tuning key (rope and rope_store_kv): query and KV heads, head dim, dtype."""
    return (q.shape[1], k.shape[1], q.shape[2], _dtype_name(q.dtype))


def _heads_heuristic(num_heads: int, block_d: int) -> Config:
    # ~2K elements per program: enough loads in flight per warp without spilling; decode
    # batches still spread over many programs because T x head-blocks grows with the heads.
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d))
    elems = block_h * block_d
    return {"BLOCK_H": block_h, "num_warps": 1 if elems <= 256 else 2 if elems <= 1024 else 4}


def _block_h(config: Config, num_heads: int) -> int:
    return max(1, min(config["BLOCK_H"], triton.next_power_of_2(num_heads)))


# ---------------------------------------------------------------------------------------------
# store_kv
# ---------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KC,
    VC,
    Slots,
    num_heads,
    head_dim,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(Slots + t).to(tl.int64)
    # Padding rows (slot < 0) load and store nothing: no head is in range for them.
    heads = tl.where(slot >= 0, num_heads, 0)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < head_dim)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = KC + slot * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VC + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VC.dtype.element_ty), mask=mask)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    slot_mapping: Tensor,
    config: Config | None = None,
) -> None:
    """k / v [T, Hkv, D] into k_cache[layer] / v_cache[layer] ([L, S, Hkv, D]) at `slot_mapping` [T].

    Negative slots are skipped in the kernel; values are cast to the cache dtype.
    """
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    if config is None:
        config = autotune.get_config(
            "store_kv", store_kv_key(k, v, k_cache), lambda: _heads_heuristic(num_heads, block_d)
        )
    k, v = _unit_last(k), _unit_last(v)
    kc, vc = k_cache[layer], v_cache[layer]
    assert kc.stride(-1) == 1 and vc.stride(-1) == 1, "KV pool must be contiguous along the head dim"
    block_h = _block_h(config, num_heads)
    _store_kv_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        k,
        v,
        kc,
        vc,
        slot_mapping,
        num_heads,
        head_dim,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kc.stride(0),
        kc.stride(1),
        vc.stride(0),
        vc.stride(1),
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=config["num_warps"],
        **pdl.launch_kwargs(k.device),
    )


# ---------------------------------------------------------------------------------------------
# rope / rope_store_kv: programs [0, q_blocks) rotate q heads, the rest rotate k heads (and, when
# storing, copy v heads), all reading the token's cos / sin row once. With HAS_NORM (rope_store_kv
# only) each q / k head row is first RMS-normalised with its [D] weight (Qwen3's q/k norm).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _normed(x, w, rstd, out_ty):
    """`sglc::rms_norm`'s rounding (as `norm._scaled_tile`): the normalised row rounded to the input
    dtype, times the weight rounded again (the fp32 product of 16-bit floats is exact), back in fp32."""
    return ((x * rstd).to(out_ty).to(tl.float32) * w).to(out_ty).to(tl.float32)


@triton.jit
def _rotate(Src, W, t, stride_t, stride_h, offs_h, offs_d, mask, cos, sin, half, eps, HAS_NORM: tl.constexpr):
    """Rotated halves (in Src's dtype) of the [BLOCK_H, D/2] pairs of token t, each head row first
    RMS-normalised with weight W [D] when HAS_NORM."""
    ptr = Src + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    out_ty = Src.dtype.element_ty
    if HAS_NORM:
        # The row's sum of squares spans both halves; masked lanes load 0 and add nothing.
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half)
        rstd = tl.math.rsqrt(mean_sq + eps)[:, None]
        mask_d = offs_d < half
        w1 = tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + half + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        x1, x2 = _normed(x1, w1, rstd, out_ty), _normed(x2, w2, rstd, out_ty)
    return (x1 * cos - x2 * sin).to(out_ty), (x2 * cos + x1 * sin).to(out_ty)


@triton.jit
def _rope_kernel(
    Q,
    K,
    V,
    Positions,
    CosSin,
    QOut,
    KOut,
    KC,
    VC,
    Slots,
    QW,
    KW,
    num_q_heads,
    num_kv_heads,
    half,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    STORE_CACHE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < half
    pos = tl.load(Positions + t).to(tl.int64)
    cos = tl.load(CosSin + pos * stride_cos + offs_d, mask=mask_d)[None, :]
    sin = tl.load(CosSin + pos * stride_cos + half + offs_d, mask=mask_d)[None, :]
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    if hb < q_blocks:
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < num_q_heads) & mask_d[None, :]
        o1, o2 = _rotate(Q, QW, t, stride_qt, stride_qh, offs_h, offs_d, mask, cos, sin, half, eps, HAS_NORM)
        out = QOut + t * stride_qot + offs_h[:, None] * stride_qoh + offs_d[None, :]
        tl.store(out, o1, mask=mask)
        tl.store(out + half, o2, mask=mask)
    else:
        offs_h = (hb - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < num_kv_heads) & mask_d[None, :]
        o1, o2 = _rotate(K, KW, t, stride_kt, stride_kh, offs_h, offs_d, mask, cos, sin, half, eps, HAS_NORM)
        if STORE_CACHE:
            slot = tl.load(Slots + t).to(tl.int64)
            heads = tl.where(slot >= 0, num_kv_heads, 0)  # padding rows write nothing
            mask = (offs_h[:, None] < heads) & mask_d[None, :]
            kc = KC + slot * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
            tl.store(kc, o1.to(KC.dtype.element_ty), mask=mask)
            tl.store(kc + half, o2.to(KC.dtype.element_ty), mask=mask)
            v_src = V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
            vc = VC + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
            tl.store(vc, tl.load(v_src, mask=mask).to(VC.dtype.element_ty), mask=mask)
            tl.store(vc + half, tl.load(v_src + half, mask=mask).to(VC.dtype.element_ty), mask=mask)
        else:
            out = KOut + t * stride_kot + offs_h[:, None] * stride_koh + offs_d[None, :]
            tl.store(out, o1, mask=mask)
            tl.store(out + half, o2, mask=mask)


def _launch_rope(
    kernel_name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_out: Tensor | None,
    k_cache: Tensor | None,
    v_cache: Tensor | None,
    slot_mapping: Tensor | None,
    config: Config | None,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    norm_eps: float = 0.0,
) -> Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, half = k.shape[1], head_dim // 2
    assert head_dim % 2 == 0 and cos_sin_cache.shape[-1] == head_dim
    check_qk_norm_weights(q_norm_weight, k_norm_weight)
    has_norm = q_norm_weight is not None
    if has_norm:
        for x, w in ((q, q_norm_weight), (k, k_norm_weight)):
            assert w.shape == (head_dim,) and w.dtype == x.dtype, "norm weight must be [D] in q/k's dtype"
        q_norm_weight, k_norm_weight = q_norm_weight.contiguous(), k_norm_weight.contiguous()
    block_half = triton.next_power_of_2(half)
    if config is None:
        config = autotune.get_config(
            kernel_name, rope_key(q, k), lambda: _heads_heuristic(max(num_q_heads, num_kv_heads), block_half)
        )
    q, k = _unit_last(q), _unit_last(k)
    cos_sin_cache = _unit_last(cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    store = k_cache is not None
    if store:
        v = _unit_last(v)
        kc, vc = k_cache, v_cache
        assert kc.stride(-1) == 1 and vc.stride(-1) == 1, "KV pool must be contiguous along the head dim"
    else:  # placeholders for the pointer arguments the STORE_CACHE=False branch never reads
        v, kc, vc, slot_mapping = k, k_out, k_out, positions
    block_h = _block_h(config, max(num_q_heads, num_kv_heads))
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_kv_heads, block_h))
    ko = k_out if k_out is not None else q_out
    qw, kw = (q_norm_weight, k_norm_weight) if has_norm else (q, k)  # never read without HAS_NORM
    _rope_kernel[grid](
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        q_out,
        ko,
        kc,
        vc,
        slot_mapping,
        qw,
        kw,
        num_q_heads,
        num_kv_heads,
        half,
        norm_eps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        ko.stride(0),
        ko.stride(1),
        kc.stride(0),
        kc.stride(1),
        vc.stride(0),
        vc.stride(1),
        STORE_CACHE=store,
        HAS_NORM=has_norm,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=config["num_warps"],
        **pdl.launch_kwargs(q.device),
    )
    return q_out


def rope(
    q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, config: Config | None = None
) -> tuple[Tensor, Tensor]:
    """`sglc::rope`: (rotated q [T, Hq, D], rotated k [T, Hkv, D]), new contiguous tensors."""
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_out = _launch_rope("rope", q, k, None, positions, cos_sin_cache, k_out, None, None, None, config)
    return q_out, k_out


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
    config: Config | None = None,
) -> Tensor:
    """`sglc::rope_store_kv`: rotated q; rotated k and v go to the pool at `slot_mapping` (< 0 skipped).

    With norm weights ([D], q/k's dtype) each q / k head is RMS-normalised before the rotation.
    k is rounded to its own dtype before the cast to the cache dtype, as the reference does.
    """
    kc, vc = k_cache[layer], v_cache[layer]
    return _launch_rope(
        "rope_store_kv", q, k, v, positions, cos_sin_cache, None, kc, vc, slot_mapping, config,
        q_norm_weight, k_norm_weight, norm_eps,
    )  # fmt: skip


rope_store_kv_key = rope_key


def store_new_kv(
    q: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    positions: Tensor | None,
    cos_sin_cache: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    slot_mapping: Tensor,
) -> Tensor:
    """An attention launcher's first step: the step's new keys and values into the pool, rotated with
    q first where `positions` is given (unrotated q and k); returns q as attention reads it."""
    if positions is not None:
        assert k is not None and v is not None and cos_sin_cache is not None
        return rope_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, layer, slot_mapping)
    if k is not None and v is not None:
        store_kv(k, v, k_cache, v_cache, layer, slot_mapping)
    return q
