"""Triton paged attention: the CUDA implementation of `sglc::paged_attention`.

The KV pool is [L, S, Hkv, D] with page size 1, so a request's keys are gathered row by row
through `kv_indices`. Two kernels, chosen by shape alone (no host sync, CUDA-graph safe):

- decode (one query per request): memory-bound, so each program owns one (request, KV head,
  split) and processes all query heads of that KV head together, padded to >= 16 rows for
  `tl.dot`; each K/V tile is read once per group. Split-K over the request's keys fills the
  GPU at small batch; a second kernel merges the splits' partial outputs by log-sum-exp.
- extend (prefill over a cached prefix): flash-attention online softmax over BLOCK_M query
  rows x BLOCK_N key tiles; key tiles below the tile's causal frontier run without masks. The
  grid is (Hq, a shape-only bound on the batch's query tiles); each program finds its (request,
  tile) from qo_indptr in-kernel, a request's heaviest tiles first.

Softmax runs in fp32 in the log2 domain (scores pre-multiplied by scale * log2(e), exp2).
Dot operands are in the cache dtype (fp32 caches use IEEE precision, not tf32), accumulation
fp32. Launch configs come from `autotune.get_config` (tuned winners, else the heuristics here).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from sgl_compile.codegen import autotune
from sgl_compile.codegen.rope import store_kv

Config = dict[str, int]
_LOG2E = 1.4426950408889634

# Candidates for a GPU tuner, per kernel (the heuristics below pick among the same knobs). Some
# do not fit shared memory at wide head_dim / fp32 (Triton raises OutOfResources): skip those.
CONFIG_SPACE: dict[str, list[Config]] = {
    "decode_attention": [
        {"BLOCK_N": bn, "num_splits": s, "num_warps": w, "num_stages": st}
        for bn in (32, 64, 128)
        for s in (1, 2, 4, 8, 16, 32)
        for w in (4, 8)
        for st in (1, 2, 3)
    ],
    "extend_attention": [
        {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        for bm in (32, 64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for st in (1, 2, 3)
    ],
}


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@cache
def _num_sms() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132  # H100: the machine we tune for; on CPU (interpreter) it only shapes the heuristic


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would cost fp32 caches ~1e-3 relative error; fp32 serving is for checking, not speed.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Decode: split-K, one program per (request, KV head, split), the group's query heads together.
# ---------------------------------------------------------------------------------------------


def decode_attention_key(
    batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple:
    """Tuning key: heads, head_dim, cache dtype and the batch's power-of-two bucket."""
    return (num_q_heads, num_kv_heads, head_dim, _dtype_name(dtype), _pow2_bucket(batch))


def decode_attention_heuristic(
    batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> Callable[[], Config]:
    def heuristic() -> Config:
        # About 2 programs per SM over (request, KV head, split), rounded down to a power of two
        # (best on the H100 from B=1 to 128). The context length is not known on the host: splits
        # past a short request's end exit at once.
        programs = batch * num_kv_heads
        splits = min(32, _pow2_floor(max(1, 2 * _num_sms() // programs)))
        # K/V tiles of 16-32 KB; wide rows (D = 256 in 16 bits) want a third stage (+25-30% on the
        # H100 sweep), fp32 rows stay at two to fit shared memory.
        row_bytes = _block_d(head_dim) * dtype.itemsize
        if row_bytes <= 256:
            block_n, stages = 128, 2
        elif row_bytes <= 512:
            block_n, stages = 64, 3 if dtype.itemsize == 2 else 2
        else:
            block_n, stages = 32, 2
        return {"BLOCK_N": block_n, "num_splits": splits, "num_warps": 4, "num_stages": stages}

    return heuristic


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    Out,
    MidO,
    MidLse,
    KvIndptr,
    KvIndices,
    sm_scale_log2,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM

    kv_start = tl.load(KvIndptr + b)
    kv_len = tl.load(KvIndptr + b + 1) - kv_start
    # Chunks are whole BLOCK_N tiles so only a request's last tile is partial.
    chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0,
    ).to(K.dtype.element_ty)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_mask = n < hi
        slot = tl.load(KvIndices + kv_start + n, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds >= 1 valid key, so m_new is finite and padded head rows stay finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0  # false for an empty split (and an empty request): output 0, lse -inf
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    out_mask = h_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=out_mask,
        )
    else:
        # Empty splits store only lse; the merge masks out their (unwritten) partials.
        if lo < hi:
            tl.store(
                MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :],
                o,
                mask=out_mask,
            )
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    MidO,
    MidLse,
    Out,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(
        MidLse + b * stride_lb + h * stride_lh + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf")
    )
    live = lse > float("-inf")
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # all splits empty: weights 0, output 0
    w = tl.where(live, tl.exp2(lse - m), 0.0)
    o = tl.load(
        MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=live[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM
    )


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    scale: float,
    config: Config | None = None,
) -> Tensor:
    """One query per request: q [B, Hq, D] over request b's slots kv_indices[kv_indptr[b]:kv_indptr[b+1]]."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if config is None:
        config = autotune.get_config(
            "decode_attention",
            decode_attention_key(batch, num_q_heads, num_kv_heads, head_dim, k_cache.dtype),
            decode_attention_heuristic(batch, num_kv_heads, head_dim, k_cache.dtype),
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = _layer_view(k_cache, layer), _layer_view(v_cache, layer)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    splits, block_d = config["num_splits"], _block_d(head_dim)
    if batch == 0:
        return out
    # Scratch sized from shapes only (graph-capturable); unused when there is a single split.
    mid_o = torch.empty((batch, num_q_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, num_q_heads, splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        q,
        k,
        v,
        out,
        mid_o,
        mid_lse,
        kv_indptr,
        kv_indices,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        NUM_SPLITS=splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=config["BLOCK_N"],
        BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(k.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if splits > 1:
        _decode_merge_kernel[(batch, num_q_heads)](
            mid_o,
            mid_lse,
            out,
            mid_o.stride(0),
            mid_o.stride(1),
            mid_o.stride(2),
            mid_lse.stride(0),
            mid_lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d,
            num_warps=4 if block_d * splits <= 4096 else 8,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Extend: flash attention, one program per (query head, request's BLOCK_M query tile); causal
# masks only on the tiles that cross the diagonal.
# ---------------------------------------------------------------------------------------------


def extend_attention_key(
    num_tokens: int, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple:
    """Tuning key: heads, head_dim, cache dtype and the bucket of mean new tokens per request."""
    per_request = _pow2_bucket(max(1, num_tokens // max(1, batch)))
    return (num_q_heads, num_kv_heads, head_dim, _dtype_name(dtype), min(per_request, 1024))


def extend_attention_heuristic(
    num_tokens: int, batch: int, head_dim: int, dtype: torch.dtype
) -> Callable[[], Config]:
    def heuristic() -> Config:
        # From a sweep on the H100 (bf16; 1-8 requests of 256-4096 new tokens, prefixes 0-8K; D 64,
        # 128, 256): the best in 7 of 11 cases, within 3% in 3, 19% off in 1. Stages matter most:
        # 3 ran up to 3x faster than 1.
        block_d, per_request = _block_d(head_dim), num_tokens // max(1, batch)
        if dtype.itemsize > 2:  # fp32 caches (checking, not speed): tiles that fit shared memory
            return {"BLOCK_M": 64, "BLOCK_N": 64 if block_d <= 128 else 32, "num_warps": 4, "num_stages": 2}
        if block_d <= 64:
            return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
        if per_request < 128:
            return {"BLOCK_M": 64, "BLOCK_N": 64 if block_d <= 128 else 32, "num_warps": 4, "num_stages": 3}
        if block_d <= 128:
            return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}

    return heuristic


@triton.jit
def _extend_tile(
    q,
    m_i,
    l_i,
    acc,
    K,
    V,
    KvIndices,
    kv_start,
    kvh,
    start,
    end_n,
    prefix,
    offs_m,
    offs_n,
    offs_d,
    sm_scale_log2,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys start:start+BLOCK_N; CAUSAL masks by position and bounds."""
    n = start + offs_n
    d_mask = offs_d < HEAD_DIM
    if CAUSAL:
        n_mask = n < end_n
        slot = tl.load(KvIndices + kv_start + n, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        slot = tl.load(KvIndices + kv_start + n).to(tl.int64)
        kv_mask = d_mask[None, :]
    k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
    if CAUSAL:
        # Query row i sits at position prefix + i; keys past end_n are masked by this for real rows.
        s = tl.where(n[None, :] <= prefix + offs_m[:, None], s, float("-inf"))
    # Key 0 is visible to every row and is in the first tile visited, so m_new stays finite.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    QoIndptr,
    KvIndptr,
    KvIndices,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    num_reqs,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(0)  # heads fastest: a GQA group's programs share K/V tiles in L2
    pid = tl.program_id(1)
    # Find this program's (request, query tile) among the batch's tiles, counted in-kernel.
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < num_reqs
    lens = tl.load(QoIndptr + offs_b + 1, mask=b_mask, other=0) - tl.load(
        QoIndptr + offs_b, mask=b_mask, other=0
    )
    tiles = tl.cdiv(lens, BLOCK_M)
    ends = tl.cumsum(tiles, 0)
    if pid >= tl.max(ends, 0):  # the grid bounds the tile count from shapes; the rest exit
        return
    b = tl.sum((ends <= pid).to(tl.int32), 0)
    mine = offs_b == b
    # Each request's last (heaviest, causal) tiles first, so long ones do not trail the grid.
    tile = tl.sum(tl.where(mine, ends, 0), 0) - 1 - pid
    q_start = tl.load(QoIndptr + b)
    n_q = tl.load(QoIndptr + b + 1) - q_start
    kv_start = tl.load(KvIndptr + b)
    n_kv = tl.load(KvIndptr + b + 1) - kv_start
    prefix = n_kv - n_q
    kvh = h // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qo_mask = (offs_m < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qo_mask, other=0)
    q = q.to(K.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys [0, prefix + tile*BLOCK_M] are visible to every row of the tile: whole tiles there need no mask.
    full_end = (prefix + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    end_n = prefix + tl.minimum((tile + 1) * BLOCK_M, n_q)
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _extend_tile(
            q, m_i, l_i, acc, K, V, KvIndices, kv_start, kvh, start, end_n, prefix, offs_m, offs_n, offs_d,
            sm_scale_log2, stride_ks, stride_kh, stride_vs, stride_vh, HEAD_DIM, False, DOT_PRECISION,
        )  # fmt: skip
    for start in range(full_end, end_n, BLOCK_N):
        m_i, l_i, acc = _extend_tile(
            q, m_i, l_i, acc, K, V, KvIndices, kv_start, kvh, start, end_n, prefix, offs_m, offs_n, offs_d,
            sm_scale_log2, stride_ks, stride_kh, stride_vs, stride_vh, HEAD_DIM, True, DOT_PRECISION,
        )  # fmt: skip

    o = acc / l_i[:, None]
    tl.store(
        Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(Out.dtype.element_ty),
        mask=qo_mask,
    )


def extend_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    qo_indptr: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    scale: float,
    config: Config | None = None,
) -> Tensor:
    """Ragged causal attention: q [T, Hq, D], request b's queries are the last of its KV slots.

    Rows of q beyond qo_indptr[-1] (padding) are left unwritten.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    batch, num_kv_heads = qo_indptr.shape[0] - 1, k_cache.shape[2]
    if config is None:
        config = autotune.get_config(
            "extend_attention",
            extend_attention_key(num_tokens, batch, num_q_heads, num_kv_heads, head_dim, k_cache.dtype),
            extend_attention_heuristic(num_tokens, batch, head_dim, k_cache.dtype),
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = _layer_view(k_cache, layer), _layer_view(v_cache, layer)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_m = config["BLOCK_M"]
    if batch == 0 or num_tokens == 0:
        return out
    # sum_b cdiv(n_b, BLOCK_M) <= cdiv(T, BLOCK_M) + B - 1: a bound on the tiles from shapes alone.
    _extend_kernel[(num_q_heads, triton.cdiv(num_tokens, block_m) + batch - 1)](
        q,
        k,
        v,
        out,
        qo_indptr,
        kv_indptr,
        kv_indices,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        batch,
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_D=_block_d(head_dim),
        BLOCK_B=triton.next_power_of_2(batch),
        DOT_PRECISION=_dot_precision(k.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out


def _layer_view(cache: Tensor, layer: int) -> Tensor:
    """[S, Hkv, D] view of one layer (no copy); the kernels assume a unit stride on D."""
    view = cache[layer]
    assert view.stride(-1) == 1, "KV cache must be contiguous in head_dim"
    return view


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
) -> Tensor:
    """`sglc::paged_attention` on CUDA: store the new k/v, then decode or extend by shape."""
    if k is not None and v is not None:
        store_kv(k, v, k_cache, v_cache, layer, slot_mapping)
    # Every scheduled request has >= 1 query, so as many rows as requests means one query each.
    if q.shape[0] == qo_indptr.shape[0] - 1:
        return decode_attention(q, k_cache, v_cache, layer, kv_indptr, kv_indices, scale)
    return extend_attention(q, k_cache, v_cache, layer, qo_indptr, kv_indptr, kv_indices, scale)
