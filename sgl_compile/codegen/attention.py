"""Triton paged attention: the CUDA implementation of `sglc::paged_attention`.

The KV pool is [L, S, Hkv, D] with page size 1, so a request's keys are gathered row by row
through `kv_indices`. Two kernels, chosen by shape alone (no host sync, CUDA-graph safe):

- decode (one query per request): memory-bound, so each program owns one (request, KV head,
  split) and processes all query heads of that KV head together, padded to >= 16 rows for
  `tl.dot`; each K/V tile is read once per group. Split-K over the request's keys fills the
  GPU at small batch; the last split of a (request, KV head) to finish merges the partial
  outputs by log-sum-exp (a range short enough for one split is written directly), so a
  decode step's attention is one kernel (a separate merge kernel would add its launch and ramp,
  ~2.6 us a layer at batch 1 on the H100).
- cascade decode (groups of requests sharing a prefix, named by the runtime): a third kernel
  reads each group's shared keys once for all its members' queries (MEMBERS requests x the
  GROUP query heads of one KV head per program, as rows of one `tl.dot`) and writes partials
  next to the decode kernel's, which then covers only each request's own keys; a merge kernel
  combines both. The shared keys' reads drop from one per request to one per MEMBERS requests.
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

from sgl_compile.codegen import autotune, pdl
from sgl_compile.codegen.rope import store_new_kv

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
    "shared_prefix_attention": [
        {"BLOCK_N": bn, "MEMBERS": m, "num_splits": s, "num_warps": w, "num_stages": st}
        for bn in (32, 64, 128)
        for m in (4, 8, 16)
        for s in (1, 2, 4, 8, 16)
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
def _online_softmax_tile(
    q,
    m_i,
    l_i,
    acc,
    K,
    V,
    slot,
    kvh,
    kv_mask,
    visible,
    offs_d,
    sm_scale_log2,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    MASK_SCORES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold one tile of keys (their `slot`s; `kv_mask` on the K/V loads) into the running max m_i, sum
    l_i and output acc of q's rows; with MASK_SCORES, scores where not `visible` are dropped. Callers
    make sure each row sees a key in its first tile (the running max stays finite)."""
    k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
    if MASK_SCORES:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _split_chunk(length, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per split: whole BLOCK_N tiles, so only the range's last tile is partial."""
    return tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _split_range(first, end, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split `split`'s keys lo:hi of the range first:end (empty past the range's end)."""
    chunk = _split_chunk(end - first, NUM_SPLITS, BLOCK_N)
    lo = first + split * chunk
    return lo, tl.minimum(lo + chunk, end)


@triton.jit
def _first_slots(KvIndices, kv_start, lo, hi, BLOCK_N: tl.constexpr):
    """The slots of a range's first tile of keys. Nothing in a launch writes kv_indices, so callers
    load them early, with q: the tile's keys then wait for one round trip, not two."""
    n = lo + tl.arange(0, BLOCK_N)
    return tl.load(KvIndices + kv_start + n, mask=n < hi, other=0).to(tl.int64)


@triton.jit
def _attend_split(
    q,
    K,
    V,
    KvIndices,
    kv_start,
    kvh,
    lo,
    hi,
    slot0,
    sm_scale_log2,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """q [ROWS, BLOCK_D] over the keys lo:hi of kv_indices[kv_start:] (one KV head; `slot0` their first
    tile's slots, `_first_slots`): the normalized output, its log2-sum-exp (-inf when empty) and
    whether the range holds any key."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_mask = n < hi
        later = n >= lo + BLOCK_N  # (the first tile's slots are slot0: its load issues nothing)
        slot = tl.load(KvIndices + kv_start + n, mask=n_mask & later, other=0).to(tl.int64)
        slot = tl.where(later, slot, slot0)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # Every tile holds >= 1 valid key, so the running max is finite and padded rows stay finite.
        m_i, l_i, acc = _online_softmax_tile(
            q, m_i, l_i, acc, K, V, slot, kvh, kv_mask, n_mask[None, :], offs_d, sm_scale_log2,
            stride_ks, stride_kh, stride_vs, stride_vh, True, DOT_PRECISION,
        )  # fmt: skip
    nonempty = l_i > 0  # false for an empty split (and an empty range): output 0, lse -inf
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    return o, lse, lo < hi


@triton.jit
def _rope_factors(cos_sin, cols, HEAD_DIM: tl.constexpr):
    """Factors for `_rotate` from the position's row `cos_sin` of the cache (cos in its first D/2
    columns, sin in the last) at the element columns `cols` (the shape, and so the register layout,
    of the rows they rotate: a broadcast from another layout goes through shared memory, which waits
    for the load first): cos for every element, sin signed for its half."""
    half = HEAD_DIM // 2
    lower = cols < half
    idx = tl.where(lower, cols, cols - half)
    d_mask = cols < HEAD_DIM
    cos = tl.load(cos_sin + idx, mask=d_mask, other=0.0)
    sin = tl.load(cos_sin + half + idx, mask=d_mask, other=0.0)
    return cos, tl.where(lower, -sin, sin)  # x1 cos - x2 sin | x2 cos + x1 sin


@triton.jit
def _load_pair(ptrs, offs_d, mask, HEAD_DIM: tl.constexpr):
    """The rows at `ptrs` ([rows, BLOCK_D] pointers, element offs_d of each) and their rotation
    partners (NeoX: elements d and d + D/2 are a pair), in fp32: `_rotate`'s inputs."""
    half = HEAD_DIM // 2
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(ptrs + tl.where(offs_d < half, half, -half)[None, :], mask=mask, other=0.0)
    return x, partner.to(tl.float32)


@triton.jit
def _rotate(x, partner, cos, sin):
    """A `_load_pair` rotated as `sglc::rope` does, by `_rope_factors`, in fp32."""
    return x * cos + partner * sin


@triton.jit
def _store_new_kv(
    k,
    v,
    K,
    V,
    slot,
    kvh,
    cols,
    mask,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
):
    """A request's new key (rotated) and value for KV head kvh into the pool at `slot` (padding rows:
    < 0, nothing): the elements at columns `cols` where `mask` holds. Visible to the whole program
    when it returns."""
    mask = mask & (cols < tl.where(slot >= 0, HEAD_DIM, 0))  # (the padding gate)
    tl.store(K + slot * stride_ks + kvh * stride_kh + cols, k.to(K.dtype.element_ty), mask=mask)
    tl.store(V + slot * stride_vs + kvh * stride_vh + cols, v.to(V.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # a CTA barrier orders its threads' global stores before their later loads


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
    SharedLen,
    Counters,
    KNew,
    VNew,
    Positions,
    CosSin,
    Slots,
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
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    stride_cos,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SKIP_SHARED: tl.constexpr,  # cascade: keys below SharedLen[b] are the shared-prefix kernel's
    FUSED_MERGE: tl.constexpr,  # no other partials: the splits merge themselves (else the merge kernel)
    ROPE: tl.constexpr,  # q and the new key arrive unrotated; the new key and value are stored here
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    out_mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]

    kv_start = tl.load(KvIndptr + b)
    kv_len = tl.load(KvIndptr + b + 1) - kv_start
    first = 0
    if SKIP_SHARED:
        first = tl.load(SharedLen + b).to(tl.int32)
    if ROPE:  # (scalars the later addresses need: in the indptr's round trip)
        position = tl.load(Positions + b).to(tl.int64)
        new_slot = tl.load(Slots + b).to(tl.int64)
    # With FUSED_MERGE, splits holding keys (`active`) work: one writes the output itself; several write
    # partials, and the last of them to finish (an arrival counter per request and KV head) merges
    # them; the others exit at once. Without it every split writes partials for the merge kernel.
    active = NUM_SPLITS
    direct = False
    if FUSED_MERGE:
        active = tl.cdiv(kv_len, tl.maximum(_split_chunk(kv_len, NUM_SPLITS, BLOCK_N), 1))
        direct = active <= 1
    if split < tl.maximum(active, 1):
        # Every load below waits on the indptr's round trip only, so they share the next one: the
        # split's first slots, q and, with ROPE, the rope factors and the new key and value. Only the
        # keys wait for the new one's store. (At batch 1 the kernel is a chain of dependent round trips,
        # `benchmarks/decode_chain.py` counts them; an earlier change dropping one made an H100's 1B
        # step 0.6% faster: docs/benchmarks.md, ninth session.)
        lo, hi = _split_range(first, kv_len, split, NUM_SPLITS, BLOCK_N)
        slot0 = _first_slots(KvIndices, kv_start, lo, hi, BLOCK_N)
        q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        if ROPE:
            # The request's new token is its last key: the split whose range holds it rotates and stores
            # it (and its value) before reading its keys; no other split reads that slot, and the
            # others' loads of it are masked off (they issue nothing). Its rows are held as q's first
            # row, so that one register layout serves q, the key and the factors: a broadcast from
            # another layout goes through shared memory, which waits for the load before the next
            # ones issue. (Loads first, in this order, so that no use of one comes before the last.)
            stores = (lo <= kv_len - 1) & (kv_len - 1 < hi)
            cols = offs_d[None, :] + 0 * offs_h[:, None]
            new_mask = (offs_h[:, None] < tl.where(stores, 1, 0)) & (cols < HEAD_DIM)
            k_x, k_partner = _load_pair(
                KNew + b * stride_knb + kvh * stride_knh + cols, offs_d, new_mask, HEAD_DIM
            )
            v_new = tl.load(VNew + b * stride_vnb + kvh * stride_vnh + cols, mask=new_mask)
            q_x, q_partner = _load_pair(q_ptrs, offs_d, out_mask, HEAD_DIM)
            cos, sin = _rope_factors(CosSin + position * stride_cos, cols, HEAD_DIM)
            q = _rotate(q_x, q_partner, cos, sin).to(Q.dtype.element_ty)
            # (rounded to the key's own dtype first, as the reference's rope does)
            k_new = _rotate(k_x, k_partner, cos, sin).to(KNew.dtype.element_ty)
            if stores:
                _store_new_kv(
                    k_new, v_new, K, V, new_slot, kvh, cols, new_mask, stride_ks, stride_kh, stride_vs, stride_vh,
                    HEAD_DIM,
                )  # fmt: skip
        else:
            q = tl.load(q_ptrs, mask=out_mask, other=0)
        q = q.to(K.dtype.element_ty)
        o, lse, any_keys = _attend_split(
            q, K, V, KvIndices, kv_start, kvh, lo, hi, slot0, sm_scale_log2, stride_ks, stride_kh,
            stride_vs, stride_vh, BLOCK_H, BLOCK_N, BLOCK_D, HEAD_DIM, DOT_PRECISION,
        )  # fmt: skip
        if direct:
            tl.store(
                Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                o.to(Out.dtype.element_ty),
                mask=out_mask,
            )
        else:
            # Empty splits store only lse; the merge kernel masks out their (unwritten) partials.
            if any_keys:
                tl.store(
                    MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :],
                    o,
                    mask=out_mask,
                )
            tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)
            if FUSED_MERGE:
                tl.debug_barrier()  # every thread's partial is written before the arrival is counted
                counter = Counters + b * tl.num_programs(1) + kvh
                if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == active - 1:
                    tl.store(counter, 0)  # the next launch (stream-ordered after this one) counts from 0
                    _merge_group(
                        MidO, MidLse, Out, b, kvh, active, stride_mb, stride_mh, stride_ms, stride_lb,
                        stride_lh, stride_ob, stride_oh, GROUP, HEAD_DIM, BLOCK_G, BLOCK_S, BLOCK_D,
                    )  # fmt: skip


@triton.jit
def _merge_group(
    MidO,
    MidLse,
    Out,
    b,
    kvh,
    active,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Out[b, the GROUP heads of kvh] from the first `active` splits' partials (all non-empty), weighted
    by their log2-sum-exp: [GROUP, splits, D] at once (ptxas issues most of them after lse's max,
    which waits for lse: a second round trip, `benchmarks/decode_chain.py`); .cg reads them from L2,
    where the other programs' writes are."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    gs_mask = (offs_g < GROUP)[:, None] & (offs_s < active)[None, :]
    lse = tl.load(
        MidLse + b * stride_lb + heads[:, None] * stride_lh + offs_s[None, :],
        mask=gs_mask,
        other=float("-inf"),
        cache_modifier=".cg",
    )
    m = tl.max(lse, 1)
    w = tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)[:, None])  # masked splits: 0
    o = tl.load(
        MidO + b * stride_mb + heads[:, None, None] * stride_mh + offs_s[None, :, None] * stride_ms
        + offs_d[None, None, :],
        mask=gs_mask[:, :, None] & (offs_d < HEAD_DIM)[None, None, :],
        other=0.0,
        cache_modifier=".cg",
    )  # fmt: skip
    denom = tl.sum(w, 1)
    out = tl.sum(w[:, :, None] * o, 1) / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(
        Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=(offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :],
    )


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
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
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
    cascade_indptr: Tensor | None = None,
    shared_len: Tensor | None = None,
    shared_config: Config | None = None,
    new_kv: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """One query per request: q [B, Hq, D] over request b's slots kv_indices[kv_indptr[b]:kv_indptr[b+1]].

    With `cascade_indptr` / `shared_len` (see `sglc::paged_attention`), each group's shared keys are
    read once by the shared-prefix kernel and the decode kernel covers the rest.
    With `new_kv` = (k [B, Hkv, D], v, positions, cos_sin_cache, slot_mapping), q and k are unrotated:
    the kernel rotates q, and rotates and stores each request's new key (the last of its slots, at
    slot_mapping[b]) and value itself (not with cascade groups: the shared-prefix kernel reads q too)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    cascade = cascade_indptr is not None and cascade_indptr.numel() > 0
    if new_kv is not None:
        assert not cascade, "cascade decode takes rotated q (rope_store_kv first)"
        assert head_dim % 2 == 0 and new_kv[3].shape[-1] == head_dim and new_kv[3].stride(-1) == 1
    if config is None:
        config = autotune.get_config(
            "decode_attention",
            decode_attention_key(batch, num_q_heads, num_kv_heads, head_dim, k_cache.dtype),
            decode_attention_heuristic(batch, num_kv_heads, head_dim, k_cache.dtype),
        )
    if cascade and shared_config is None:
        shared_config = autotune.get_config(
            "shared_prefix_attention",
            shared_prefix_key(batch, num_q_heads, num_kv_heads, head_dim, k_cache.dtype),
            shared_prefix_heuristic(batch, num_kv_heads, group, head_dim, k_cache.dtype),
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = _layer_view(k_cache, layer), _layer_view(v_cache, layer)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    splits, block_d = config["num_splits"], _block_d(head_dim)
    if batch == 0:
        return out
    # Scratch sized from shapes only (graph-capturable); unused when there is a single split and no
    # shared-prefix partials.
    parts = splits + (shared_config["num_splits"] if cascade else 0)
    mid_o = torch.empty((batch, num_q_heads, parts, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, num_q_heads, parts), dtype=torch.float32, device=q.device)
    shared_len = shared_len if cascade else kv_indptr  # (unread without cascade)
    # The in-kernel merge holds [group, splits, D] fp32 partials in registers: up to 128 a thread on
    # 4 warps (the 8B's 4 x 32 x 128 at batch 1); wider (a GQA group of 5-8 at D 128) would spill, and
    # a kernel's register count covers its split-K loop too, so those merge in the merge kernel.
    block_g, block_s = triton.next_power_of_2(group), triton.next_power_of_2(splits)
    fused = not cascade and block_g * block_s * block_d <= 16384
    counters = _arrival_counters(q.device, batch * num_kv_heads) if splits > 1 and fused else kv_indptr
    # (placeholders where there is no new key to store: the ROPE=False kernel never reads them)
    k_new, v_new, positions, cos_sin, slots = new_kv or (q, q, kv_indptr, mid_o, kv_indptr)
    k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_new, v_new))
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        q,
        k,
        v,
        out,
        mid_o,
        mid_lse,
        kv_indptr,
        kv_indices,
        shared_len,
        counters,
        k_new,
        v_new,
        positions,
        cos_sin,
        slots,
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
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        cos_sin.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        NUM_SPLITS=splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=config["BLOCK_N"],
        BLOCK_D=block_d,
        BLOCK_G=block_g,
        BLOCK_S=block_s,
        DOT_PRECISION=_dot_precision(k.dtype),
        SKIP_SHARED=cascade,
        FUSED_MERGE=fused,
        ROPE=new_kv is not None,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **pdl.launch_kwargs(q.device),
    )
    if cascade:
        _shared_prefix(q, k, v, mid_o, mid_lse, kv_indptr, kv_indices, cascade_indptr, shared_len, scale,
                       splits, shared_config)  # fmt: skip
    if not fused:
        _merge(mid_o, mid_lse, out)
    return out


# Per (request, KV head): how many of its splits have written their partials. Zero between launches
# (the merging program resets its own), so one buffer per device serves every layer and step, as
# long as decode attention launches run one at a time on a device (one stream, as the runtime's); it is
# created by an eager call (the runtime runs each batch size eagerly before capturing its graph), and
# a grown-out buffer is kept alive for the graphs that captured it.
_COUNTERS: dict[torch.device, Tensor] = {}
_RETIRED_COUNTERS: list[Tensor] = []


def _arrival_counters(device: torch.device, n: int) -> Tensor:
    """>= n zeroed counters on `device` (a tensor's device: CUDA ones carry their index)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode attention: run this batch size eagerly before capturing it in a graph")
        if buf is not None:
            _RETIRED_COUNTERS.append(buf)
        buf = _COUNTERS[device] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return buf


def _merge(mid_o: Tensor, mid_lse: Tensor, out: Tensor) -> None:
    batch, num_q_heads, parts, head_dim = mid_o.shape
    block_d = _block_d(head_dim)
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
        NUM_SPLITS=parts,
        BLOCK_S=triton.next_power_of_2(parts),
        BLOCK_D=block_d,
        num_warps=4 if block_d * parts <= 4096 else 8,
        **pdl.launch_kwargs(out.device),
    )


# ---------------------------------------------------------------------------------------------
# Cascade: a group's shared prefix read once for MEMBERS requests x GROUP heads per program.
# ---------------------------------------------------------------------------------------------


def shared_prefix_key(
    batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple:
    return (num_q_heads, num_kv_heads, head_dim, _dtype_name(dtype), _pow2_bucket(batch))


def shared_prefix_heuristic(
    batch: int, num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype
) -> Callable[[], Config]:
    def heuristic() -> Config:
        # Rows of one dot: MEMBERS requests x the KV head's query heads (padded to a power of two),
        # 64 rows. The groups are not known on the host: assume the batch is one group and split its
        # shared keys for about 2 programs per SM. On the H200 (`benchmarks/attention_kernels.py
        # cascade --sweep`, 256 requests, 2048 shared keys) this was the best of 32 configs for 16
        # groups of 16; 8 splits, 4 per SM, ran 30% slower.
        members = max(1, 64 // triton.next_power_of_2(group))
        programs = triton.cdiv(batch, members) * num_kv_heads
        splits = min(16, _pow2_floor(max(1, 2 * _num_sms() // programs)))
        if splits == 1 and _block_d(head_dim) * dtype.itemsize <= 128:
            # Enough programs that each walks a whole prefix: longer tiles, a third stage in flight. At
            # 1024 requests (64 groups x 16, 2048 shared keys, D 64) on the H100: 121.8 us a layer
            # against 198.8 with BLOCK_N 64 on 2 stages, the best of 72 configs (docs/benchmarks.md).
            return {"BLOCK_N": 128, "MEMBERS": members, "num_splits": 1, "num_warps": 4, "num_stages": 3}
        return {"BLOCK_N": 64, "MEMBERS": members, "num_splits": splits, "num_warps": 4, "num_stages": 2}

    return heuristic


@triton.jit
def _shared_prefix_kernel(
    Q,
    K,
    V,
    MidO,
    MidLse,
    KvIndptr,
    KvIndices,
    CascadeIndptr,
    SharedLen,
    sm_scale_log2,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    num_reqs,
    SPLIT_BASE: tl.constexpr,  # this kernel's partials follow the decode kernel's
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,  # MEMBERS * BLOCK_H
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # The groups' tiles of MEMBERS requests, counted in-kernel (the grid is fixed per batch size, for
    # graph replay); this program takes tiles pid, pid + P, ... so any grouping fits the grid.
    offs_g = tl.arange(0, BLOCK_B)
    g_mask = offs_g < num_reqs
    starts = tl.load(CascadeIndptr + offs_g, mask=g_mask, other=0)
    sizes = tl.load(CascadeIndptr + offs_g + 1, mask=g_mask, other=0) - starts
    tiles = tl.cdiv(sizes, MEMBERS)
    ends = tl.cumsum(tiles, 0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for t in range(tl.program_id(0), tl.max(ends, 0), tl.num_programs(0)):
        g = tl.sum((ends <= t).to(tl.int32), 0)
        mine = offs_g == g
        g_start = tl.sum(tl.where(mine, starts, 0), 0)
        g_end = g_start + tl.sum(tl.where(mine, sizes, 0), 0)
        first = g_start + (t - tl.sum(tl.where(mine, ends - tiles, 0), 0)) * MEMBERS
        reqs = first + offs_m // BLOCK_H
        heads = kvh * GROUP + offs_m % BLOCK_H
        # (BLOCK_M >= 16 rows: those past MEMBERS requests are masked)
        row_mask = (reqs < g_end) & (offs_m % BLOCK_H < GROUP) & (offs_m // BLOCK_H < MEMBERS)
        out_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        shared = tl.load(SharedLen + g_start)
        kv_start = tl.load(KvIndptr + g_start)  # the shared slots: the group's first request's first ones
        q = tl.load(
            Q + reqs[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=out_mask,
            other=0,
        ).to(K.dtype.element_ty)
        lo, hi = _split_range(0, shared, split, NUM_SPLITS, BLOCK_N)
        o, lse, any_keys = _attend_split(
            q, K, V, KvIndices, kv_start, kvh, lo, hi, _first_slots(KvIndices, kv_start, lo, hi, BLOCK_N),
            sm_scale_log2, stride_ks, stride_kh, stride_vs, stride_vh, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM,
            DOT_PRECISION,
        )  # fmt: skip
        if any_keys:  # (a split past the shared keys, or a group sharing none, stores only lse)
            tl.store(
                MidO + reqs[:, None] * stride_mb + heads[:, None] * stride_mh + (SPLIT_BASE + split) * stride_ms
                + offs_d[None, :],
                o,
                mask=out_mask,
            )  # fmt: skip
        tl.store(MidLse + reqs * stride_lb + heads * stride_lh + SPLIT_BASE + split, lse, mask=row_mask)


def _shared_prefix(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mid_o: Tensor,
    mid_lse: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    cascade_indptr: Tensor,
    shared_len: Tensor,
    scale: float,
    split_base: int,
    config: Config,
) -> None:
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    block_h = triton.next_power_of_2(group)
    members = config["MEMBERS"]
    # Programs per (KV head, split): room for twice the fewest tiles (the batch as one group) in one
    # pass; more tiles (many small groups) loop.
    grid = (min(batch, 2 * triton.cdiv(batch, members)), num_kv_heads, config["num_splits"])
    _shared_prefix_kernel[grid](
        q,
        k,
        v,
        mid_o,
        mid_lse,
        kv_indptr,
        kv_indices,
        cascade_indptr,
        shared_len,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        batch,
        SPLIT_BASE=split_base,
        GROUP=group,
        HEAD_DIM=head_dim,
        NUM_SPLITS=config["num_splits"],
        MEMBERS=members,
        BLOCK_H=block_h,
        BLOCK_M=max(16, members * block_h),
        BLOCK_N=config["BLOCK_N"],
        BLOCK_D=_block_d(head_dim),
        BLOCK_B=triton.next_power_of_2(batch),
        DOT_PRECISION=_dot_precision(k.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **pdl.launch_kwargs(q.device),
    )


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
    # Query row i sits at position prefix + i; keys past end_n are masked by this for real rows. Key 0
    # is visible to every row and is in the first tile visited, so the running max stays finite.
    return _online_softmax_tile(
        q, m_i, l_i, acc, K, V, slot, kvh, kv_mask, n[None, :] <= prefix + offs_m[:, None], offs_d, sm_scale_log2,
        stride_ks, stride_kh, stride_vs, stride_vh, CAUSAL, DOT_PRECISION,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_reqs"])
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
    PDL: tl.constexpr,
):
    pdl.wait_for_producers(PDL)
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
        BLOCK_B=_extend_block_b(batch),
        DOT_PRECISION=_dot_precision(k.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **pdl.launch_kwargs(q.device),
    )
    return out


def _extend_block_b(batch: int) -> int:
    """The width of the extend kernel's in-kernel tile count. Each value (and each specialisation of
    num_reqs, hence do_not_specialize) is a kernel compiled when first seen, so in the middle of serving:
    one width up to 256 requests; a cold cache had cost the qwen3 offline run 18.1k vs 23.2k tok/s."""
    return max(256, triton.next_power_of_2(batch))


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
    cascade_indptr: Tensor | None = None,
    shared_len: Tensor | None = None,
    positions: Tensor | None = None,
    cos_sin_cache: Tensor | None = None,
) -> Tensor:
    """`sglc::paged_attention` on CUDA: store the new k/v, then decode (cascaded when the batch names
    shared-prefix groups) or extend, by shape. With `positions`, plain decode rotates q and the new
    keys inside its kernel; extend and cascade decode run `rope_store_kv` first."""
    # Every scheduled request has >= 1 query, so as many rows as requests means one query each.
    decode = q.shape[0] == qo_indptr.shape[0] - 1
    cascade = cascade_indptr is not None and cascade_indptr.numel() > 0
    new_kv = None
    if positions is not None and decode and not cascade:
        assert k is not None and v is not None and cos_sin_cache is not None
        new_kv = (k, v, positions, cos_sin_cache, slot_mapping)
    else:
        q = store_new_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, layer, slot_mapping)
    if decode:
        return decode_attention(
            q, k_cache, v_cache, layer, kv_indptr, kv_indices, scale,
            cascade_indptr=cascade_indptr, shared_len=shared_len, new_kv=new_kv,
        )  # fmt: skip
    return extend_attention(q, k_cache, v_cache, layer, qo_indptr, kv_indptr, kv_indices, scale)
