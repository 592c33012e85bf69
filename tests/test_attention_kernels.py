"""Triton paged attention (codegen/attention.py) against the reference `sglc::paged_attention`.

Runs on CPU tensors through the Triton interpreter (conftest sets TRITON_INTERPRET=1), in fp32
and fp16 only: the interpreter's bf16 `tl.dot` is wrong. Small explicit block sizes make the
ragged batches cross BLOCK_M / BLOCK_N / split boundaries at small sizes.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile.codegen import attention
from sgl_compile.ir import ops

LAYERS, LAYER = 2, 1

# Tolerances. fp32: both sides accumulate in fp32 (IEEE dots) over <= a few hundred keys of O(1)
# scores and values, so they differ only by summation order, ~1e-6. fp16: the reference rounds
# only its output to fp16 (half-ulp 4.9e-4 at |o| < 1, 9.8e-4 below 2); the kernel additionally
# rounds softmax weights p (<= 1) to fp16 before the P@V dot, a relative 4.9e-4 per weight, which
# sums to <= 4.9e-4 * max|v| (~4, randn) in the worst case; so 3e-3 absolute bounds both.
# bf16 (GPU only): 8 bits of mantissa, so the same two roundings at 2^-9 relative: 2e-2 bounds both.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _batch(
    seed: int,
    prefix_lens: list[int],
    new_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    pad_tokens: int = 0,
    empty_requests: int = 0,
    device: str = "cpu",
) -> dict:
    """A ragged batch over randomly permuted slots of a cache full of stale values.

    `pad_tokens` extra rows of q (past qo_indptr[-1]) carry slot -1; `empty_requests` extra decode
    requests of one query each with slot -1 and no keys (CUDA-graph padding).
    """
    g = torch.Generator().manual_seed(seed)
    kv_lens = [p + n for p, n in zip(prefix_lens, new_lens, strict=True)]
    num_slots = sum(kv_lens) + 7  # spare slots hold stale data no request may read
    shape = (LAYERS, num_slots, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    perm = torch.randperm(num_slots, generator=g)
    kv_indices, slots, off = [], [], 0
    for kv_len, n in zip(kv_lens, new_lens, strict=True):
        own = perm[off : off + kv_len]
        kv_indices.append(own)
        slots.append(own[kv_len - n :])
        off += kv_len
    new_lens = new_lens + [1] * empty_requests
    kv_lens = kv_lens + [0] * empty_requests
    num_tokens = sum(new_lens) + pad_tokens
    slot_mapping = torch.cat(slots + [torch.full((empty_requests + pad_tokens,), -1)])
    num_q_heads = num_kv_heads * group
    batch = dict(
        q=torch.randn(num_tokens, num_q_heads, head_dim, generator=g).to(dtype),
        k=torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype),
        v=torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        layer=LAYER,
        slot_mapping=slot_mapping,
        qo_indptr=torch.tensor([0, *new_lens]).cumsum(0),
        kv_indptr=torch.tensor([0, *kv_lens]).cumsum(0),
        kv_indices=torch.cat(kv_indices),
        scale=head_dim**-0.5,
    )
    return {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in batch.items()}


def _with_rope(batch: dict, seed: int, max_pos: int = 97) -> dict:
    """The batch with q and k unrotated (`paged_attention` rotates them): positions, a cos/sin cache,
    and q / k / v as the strided views of one fused QKV projection that the program passes."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = batch["q"], batch["k"], batch["v"]
    tokens, head_dim = q.shape[0], q.shape[-1]
    qkv = torch.cat([x.reshape(tokens, -1) for x in (q, k, v)], dim=1)
    q, k, v = (x.view(tokens, -1, head_dim) for x in qkv.split([q[0].numel(), k[0].numel(), v[0].numel()], 1))
    angles = torch.rand(max_pos, head_dim // 2, generator=g) * 6.3
    return dict(
        batch, q=q, k=k, v=v,
        positions=torch.randint(0, max_pos, (tokens,), generator=g).to(q.device),
        cos_sin_cache=torch.cat([angles.cos(), angles.sin()], dim=1).to(q.device),
    )  # fmt: skip


def _run_forced(args: dict, configs: dict[str, dict] | None):
    """attention.paged_attention(**args) with the attention kernels' launch configs forced to
    `configs[kernel]` (other kernels, e.g. store_kv, and configs None: their own choice)."""
    if configs is None:
        return attention.paged_attention(**args)
    get_config = attention.autotune.get_config

    def forced(kernel: str, key: tuple, heuristic):
        return configs[kernel] if kernel in configs else get_config(kernel, key, heuristic)

    with mock.patch.object(attention.autotune, "get_config", forced):
        return attention.paged_attention(**args)


def _check(batch: dict, config: dict | None, store_new: bool = True) -> None:
    """paged_attention with `config` forced (None: the heuristic) vs the reference on cache copies.
    A batch `_with_rope` checks the rotated keys the kernels store as well."""
    args = dict(batch)
    if (
        not store_new and "positions" not in args
    ):  # k = v = None: the cache already holds the new tokens (rope_store_kv wrote them)
        ops.store_kv(args["k"], args["v"], args["k_cache"], args["v_cache"], LAYER, args["slot_mapping"])
        args["k"] = args["v"] = None
    # The reference runs on CPU copies (on CUDA the op may already dispatch to these kernels).
    ref_args = {name: x.cpu().clone() if isinstance(x, torch.Tensor) else x for name, x in args.items()}
    expected = ops.paged_attention(**ref_args)
    out = _run_forced(args, None if config is None else dict.fromkeys(attention.CONFIG_SPACE, config))
    rows = int(args["qo_indptr"][-1])  # rows past it are padding tokens, left unwritten
    assert out.dtype == args["q"].dtype and out.shape == args["q"].shape
    torch.testing.assert_close(out[:rows].cpu(), expected[:rows], **TOL[args["q"].dtype])
    assert torch.equal(args["v_cache"].cpu(), ref_args["v_cache"])
    if "positions" in args and args["q"].is_cuda:
        # A rotated key is two products and a sum, which the GPU contracts into an FMA: one rounding
        # fewer than the reference, so an ulp of the key's dtype apart at most.
        torch.testing.assert_close(args["k_cache"].cpu(), ref_args["k_cache"])
    else:
        assert torch.equal(args["k_cache"].cpu(), ref_args["k_cache"])


heads = st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 3, 4]))  # (Hkv, Hq // Hkv)
head_dims = st.sampled_from([16, 32, 64, 48])
dtypes = st.sampled_from([torch.float32, torch.float16])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    reqs=st.lists(st.tuples(st.integers(0, 70), st.integers(1, 40)), min_size=1, max_size=4),
    heads=heads,
    head_dim=head_dims,
    dtype=dtypes,
    pad_tokens=st.integers(0, 3),
    store_new=st.sampled_from(["no", "yes", "rope"]),
    block_m=st.sampled_from([16, 32]),
    block_n=st.sampled_from([16, 32]),
)
def test_extend_matches_reference(
    seed, reqs, heads, head_dim, dtype, pad_tokens, store_new, block_m, block_n
):
    prefix_lens, new_lens = map(list, zip(*reqs, strict=True))
    if pad_tokens == 0 and all(n == 1 for n in new_lens):
        new_lens[0] = 2  # keep it an extend batch (the decode dispatch has its own test)
    batch = _batch(seed, prefix_lens, new_lens, *heads, head_dim, dtype, pad_tokens=pad_tokens)
    if store_new == "rope":  # rotated by rope_store_kv before the extend kernel
        batch = _with_rope(batch, seed)
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    _check(batch, config, store_new != "no")


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    prefix_lens=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    empty_requests=st.integers(0, 2),
    heads=heads,
    head_dim=head_dims,
    dtype=dtypes,
    store_new=st.sampled_from(["no", "yes", "rope"]),
    num_splits=st.sampled_from([1, 2, 3, 4, 8]),
    block_n=st.sampled_from([16, 32]),
)
def test_decode_matches_reference(
    seed, prefix_lens, empty_requests, heads, head_dim, dtype, store_new, num_splits, block_n
):
    """store_new "rope": the split holding each request's new key rotates and stores it (padding
    requests, slot -1, store nothing) and every split rotates its q."""
    new_lens = [1] * len(prefix_lens)
    batch = _batch(seed, prefix_lens, new_lens, *heads, head_dim, dtype, empty_requests=empty_requests)
    if store_new == "rope":
        batch = _with_rope(batch, seed)
    config = {
        "BLOCK_N": block_n,
        "num_splits": num_splits,
        "num_warps": 4,
        "num_stages": 1,
    }
    _check(batch, config, store_new != "no")


def test_decode_splits_merge_in_kernel_and_reset_their_counters():
    """Several splits per request merge themselves (the last to arrive); each merging program zeroes
    its arrival counter, so a second launch (as the next layer's, or a graph replay) merges again."""
    batch = _batch(3, [200, 90, 0], [1, 1, 1], 2, 4, 32, torch.float32, empty_requests=1)
    config = {"BLOCK_N": 16, "num_splits": 8, "num_warps": 4, "num_stages": 1}
    for _ in range(2):
        _check(batch, config, store_new=False)
        counters = attention._COUNTERS[batch["q"].device]
        assert not counters.any()
    # The batch covers both paths: 201 keys in chunks of 32 and 91 in chunks of 16 are 7 and 6 active
    # splits, merged in-kernel; the padding request, with no keys, is written directly by split 0.
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    assert [cdiv(n, cdiv(cdiv(n, 8), 16) * 16) for n in (201, 91)] == [7, 6]


def test_decode_rotates_and_stores_the_new_key_in_its_own_split():
    """Unrotated q and k in decode: one kernel (no rope_store_kv launch). The new key is stored by the
    split whose range holds the request's last slot, the only one that reads it (the interpreter runs
    programs one by one, so only this check, not the output, would see another split store it)."""
    import triton.language as tl

    # 4 splits of 16-key tiles: 16, 17, 33, 49 and 1 keys put the last key in splits 0, 1, 2, 3, 0.
    prefixes, owners = [15, 16, 32, 48, 0], [0, 1, 2, 3, 0]
    batch = _with_rope(_batch(6, prefixes, [1] * 5, 2, 2, 32, torch.float32, empty_requests=1), 6)
    stores, store = [], attention._store_new_kv
    request_of = {int(s): b for b, s in enumerate(batch["slot_mapping"])}

    def spy(*args):  # (k, v, K, V, slot, kvh, ...)
        slot, kvh, split = (int(x.handle.data.item()) for x in (args[4], args[5], tl.program_id(2)))
        stores.append((request_of[slot], kvh, split))
        return store.fn(*args)

    with (
        mock.patch.object(attention, "store_new_kv", side_effect=AssertionError("launched")),
        mock.patch.object(attention, "_store_new_kv", spy),
    ):
        _check(batch, {"BLOCK_N": 16, "num_splits": 4, "num_warps": 4, "num_stages": 1})
    assert sorted(stores) == [(b, h, owners[b]) for b in range(5) for h in range(2)]


@pytest.mark.parametrize("rope", [False, True])
def test_decode_wide_groups_merge_in_the_merge_kernel(rope):
    """A GQA group of 8 at D 128 over 32 splits would hold 8 x 32 x 128 fp32 partials in registers:
    those splits write partials for the merge kernel instead (counters untouched); with rope, the
    owner split stores the new key as well."""
    batch = _batch(4, [300, 40], [1, 1], 1, 8, 128, torch.float32)
    if rope:
        batch = _with_rope(batch, 4)
    attention._COUNTERS.clear()
    _check(batch, {"BLOCK_N": 16, "num_splits": 32, "num_warps": 4, "num_stages": 1}, store_new=rope)
    assert batch["q"].device not in attention._COUNTERS


def test_decode_new_key_in_a_later_tile_of_its_split():
    """One split per request, 16-key tiles: the new key (the last of 48, 71 and 16 keys) is in the
    split's third, fifth and first tile; the split stores it before its first tile's keys load, and
    later tiles load their slots in the loop (the first tile's come preloaded)."""
    batch = _with_rope(_batch(7, [47, 70, 15], [1, 1, 1], 2, 2, 32, torch.float32, empty_requests=1), 7)
    _check(batch, {"BLOCK_N": 16, "num_splits": 1, "num_warps": 4, "num_stages": 1})
    _check(batch, {"BLOCK_N": 16, "num_splits": 2, "num_warps": 4, "num_stages": 1})


@pytest.mark.parametrize("config", [None, {"BLOCK_N": 64, "num_splits": 7, "num_warps": 4, "num_stages": 2}])
def test_decode_long_context(config):
    """Thousands of keys per request over several splits; config None takes the heuristic (many splits)."""
    batch = _batch(1, [3000, 1200], [1, 1], 2, 2, 64, torch.float16, empty_requests=1)
    _check(batch, config)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
def test_extend_tile_boundaries(block_m, block_n):
    """Prefixes one short of, at, and past tile edges: the unmasked/causal split must be exact."""
    prefix_lens = [14, 15, 16, 30, 31, 33, 0, 47]
    new_lens = [20, 17, 33, 3, 34, 1, 32, 18]
    batch = _batch(4, prefix_lens, new_lens, 1, 2, 16, torch.float32)
    _check(batch, {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1})


def test_extend_long_prefix_and_heuristic():
    """A long cached prefix plus a chunk, with the heuristic's (large) blocks and a non-power-of-2 head_dim."""
    batch = _batch(2, [700, 0], [90, 33], 2, 3, 48, torch.float32)
    _check(batch, None)


def test_direct_launchers_non_contiguous_q():
    """The launchers take q as a strided view (e.g. a split of a fused qkv projection)."""
    b = _batch(3, [20, 5], [1, 1], 2, 2, 32, torch.float32)
    ops.store_kv(b["k"], b["v"], b["k_cache"], b["v_cache"], LAYER, b["slot_mapping"])
    qkv = torch.cat([b["q"], b["k"], b["v"]], dim=1)  # [T, Hq + 2 Hkv, D]
    q = qkv[:, : b["q"].shape[1]]
    expected = ops.paged_attention(**dict(b, k=None, v=None))
    cache_args = (b["k_cache"], b["v_cache"], LAYER)
    cfg = {"BLOCK_N": 16, "num_splits": 2, "num_warps": 4, "num_stages": 1}
    out = attention.decode_attention(q, *cache_args, b["kv_indptr"], b["kv_indices"], b["scale"], cfg)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    idx = (b["qo_indptr"], b["kv_indptr"], b["kv_indices"])
    out = attention.extend_attention(q, *cache_args, *idx, b["scale"], cfg)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def _cascade_batch(
    seed: int,
    groups: list[tuple[int, list[int]]],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype,
    device: str = "cpu",
    num_slots: int | None = None,
) -> dict:
    """Decode requests in groups: group g's members share its first `shared` slots, then have `own` keys
    of their own (>= 1: the new token, last). cascade_indptr is padded with empty groups to B + 1."""
    g = torch.Generator().manual_seed(seed)
    num_slots = num_slots or sum(shared + sum(owns) for shared, owns in groups) + 5
    perm = torch.randperm(num_slots, generator=g)
    kv_indices, kv_lens, shared_len, slots, indptr, off = [], [], [], [], [0], 0
    for shared, owns in groups:
        head, off = perm[off : off + shared], off + shared
        for own in owns:
            mine, off = perm[off : off + own], off + own
            kv_indices.append(torch.cat([head, mine]))
            kv_lens.append(shared + own)
            shared_len.append(shared)
            slots.append(mine[-1:])
        indptr.append(indptr[-1] + len(owns))
    batch = len(kv_lens)
    shape = (LAYERS, num_slots, num_kv_heads, head_dim)
    num_q_heads = num_kv_heads * group
    cascade = dict(
        q=torch.randn(batch, num_q_heads, head_dim, generator=g).to(dtype),
        k=torch.randn(batch, num_kv_heads, head_dim, generator=g).to(dtype),
        v=torch.randn(batch, num_kv_heads, head_dim, generator=g).to(dtype),
        k_cache=torch.randn(shape, generator=g).to(dtype),
        v_cache=torch.randn(shape, generator=g).to(dtype),
        layer=LAYER,
        slot_mapping=torch.cat(slots),
        qo_indptr=torch.arange(batch + 1),
        kv_indptr=torch.tensor([0, *kv_lens]).cumsum(0),
        kv_indices=torch.cat(kv_indices),
        scale=head_dim**-0.5,
        cascade_indptr=torch.tensor(indptr + [batch] * (batch + 1 - len(indptr))),
        shared_len=torch.tensor(shared_len),
    )
    return {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in cascade.items()}


def _check_cascade(batch: dict, configs: dict[str, dict] | None) -> None:
    """The cascaded kernels vs the reference on the same batch (which also checks the groups' claim),
    and vs the plain decode kernel (on its own copy of the caches); the caches each path wrote too."""
    ref = {name: x.cpu().clone() if isinstance(x, torch.Tensor) else x for name, x in batch.items()}
    expected = ops.paged_attention(**ref)
    caches = {name: batch[name].clone() for name in ("k_cache", "v_cache")}
    plain = attention.paged_attention(**dict(batch, cascade_indptr=None, shared_len=None, **caches))
    out = _run_forced(batch, configs)
    tol = TOL[batch["q"].dtype]
    torch.testing.assert_close(out.cpu(), expected, **tol)
    torch.testing.assert_close(out, plain, **tol)
    for written in (batch, caches):
        for name in ("k_cache", "v_cache"):
            if batch["q"].is_cuda:  # a rotated key may be an FMA's rounding apart
                torch.testing.assert_close(written[name].cpu(), ref[name])
            else:
                assert torch.equal(written[name], ref[name]), name


cascade_groups = st.lists(
    st.tuples(st.integers(0, 70), st.lists(st.integers(1, 30), min_size=1, max_size=5)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=cascade_groups,
    heads=heads,
    head_dim=head_dims,
    dtype=dtypes,
    splits=st.sampled_from([1, 2, 3]),
    shared_splits=st.sampled_from([1, 2, 3]),
    members=st.sampled_from([1, 2, 4]),
    block_n=st.sampled_from([16, 32]),
)
def test_cascade_decode_matches_reference(
    seed, groups, heads, head_dim, dtype, splits, shared_splits, members, block_n
):
    """Groups of 1-5 requests sharing 0-70 keys (tile and split edges crossed; MEMBERS smaller than a
    group, so one group spans several programs), then 1-30 keys of their own."""
    batch = _cascade_batch(seed, groups, *heads, head_dim, dtype)
    configs = {
        "decode_attention": {"BLOCK_N": block_n, "num_splits": splits, "num_warps": 4, "num_stages": 1},
        "shared_prefix_attention": {"BLOCK_N": block_n, "MEMBERS": members, "num_splits": shared_splits,
                                    "num_warps": 4, "num_stages": 1},
    }  # fmt: skip
    _check_cascade(batch, configs)


def test_cascade_decode_rotates_before_its_kernels():
    """Cascade groups with unrotated q and k: rope_store_kv first (the shared-prefix kernel reads q too);
    the same batch without groups rotates inside the decode kernel. Both match the reference."""
    batch = _with_rope(_cascade_batch(7, [(40, [3, 1, 17]), (0, [5])], 2, 2, 32, torch.float32), 7)
    configs = {
        "decode_attention": {"BLOCK_N": 16, "num_splits": 2, "num_warps": 4, "num_stages": 1},
        "shared_prefix_attention": {"BLOCK_N": 16, "MEMBERS": 2, "num_splits": 2, "num_warps": 4,
                                    "num_stages": 1},
    }  # fmt: skip
    _check_cascade(batch, configs)


def test_cascade_decode_heuristic_and_long_prefix():
    """The heuristic's configs over a 700-key prefix shared by 12 requests and a singleton group."""
    _check_cascade(
        _cascade_batch(5, [(700, [3, 1, 9, 2, 5, 1, 1, 4, 2, 8, 1, 6]), (0, [40])], 2, 4, 64, torch.float16),
        None,
    )


def test_cascade_whole_prefix_per_program():
    """The heuristic's config for large batches of 16-bit D <= 64 rows (one split, 128-key tiles, three
    stages): two groups of 16 over prefixes of 300 and 129 keys (a partial last tile), one alone."""
    h = attention.shared_prefix_heuristic(1024, 8, 4, 64, torch.bfloat16)()
    assert h == {"BLOCK_N": 128, "MEMBERS": 16, "num_splits": 1, "num_warps": 4, "num_stages": 3}
    groups = [(300, [1 + i % 5 for i in range(16)]), (129, [2] * 16), (0, [7])]
    _check_cascade(_cascade_batch(9, groups, 2, 4, 64, torch.float16), {"shared_prefix_attention": h})


def test_cascade_programs_loop_over_more_tiles_than_the_grid_holds():
    """Seven groups (four of them singletons) in a batch of 10 with MEMBERS 4: 7 tiles for 6 programs."""
    groups = [(30, [3]), (0, [2]), (25, [1, 4]), (0, [5]), (40, [2]), (10, [1, 1]), (0, [3])]
    configs = {
        "decode_attention": {"BLOCK_N": 16, "num_splits": 2, "num_warps": 4, "num_stages": 1},
        "shared_prefix_attention": {
            "BLOCK_N": 16,
            "MEMBERS": 4,
            "num_splits": 2,
            "num_warps": 4,
            "num_stages": 1,
        },
    }
    _check_cascade(_cascade_batch(8, groups, 2, 4, 32, torch.float32), configs)


def test_reference_refuses_groups_that_do_not_share_their_prefix():
    batch = _cascade_batch(6, [(20, [2, 3])], 1, 2, 16, torch.float32)
    batch["kv_indices"][batch["kv_indptr"][1] + 4] += 0  # (no change: accepted)
    ops.paged_attention(**{n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in batch.items()})
    swapped = batch["kv_indices"].clone()
    start = int(batch["kv_indptr"][1])
    swapped[start], swapped[start + 1] = batch["kv_indices"][start + 1], batch["kv_indices"][start]
    with pytest.raises(ValueError, match="request 1 does not share the first 20 KV slots"):
        ops.paged_attention(**dict(batch, kv_indices=swapped))
    with pytest.raises(ValueError, match="does not cover"):
        ops.paged_attention(**dict(batch, cascade_indptr=torch.tensor([0, 1, 1])))


def test_keys_and_config_space():
    assert attention.decode_attention_key(5, 32, 8, 128, torch.bfloat16) == (32, 8, 128, "bfloat16", 8)
    assert attention.extend_attention_key(4096, 2, 32, 8, 128, torch.float16)[-1] == 1024
    for name, space in attention.CONFIG_SPACE.items():
        assert space and all(c["num_warps"] in (4, 8) for c in space), name
    h = attention.decode_attention_heuristic(1, 8, 128, torch.bfloat16)()
    assert h["num_splits"] > 1 and h["BLOCK_N"] >= 16
    assert attention.decode_attention_heuristic(256, 8, 128, torch.bfloat16)()["num_splits"] == 1
    # shared prefix: 2 splits where 256 requests leave room (H200 sweep), one where 1024 fill the
    # machine, with longer tiles only where three stages of them fit (D 64 in 16 bits)
    shared = attention.shared_prefix_heuristic
    assert shared(256, 8, 4, 64, torch.bfloat16)() == {
        "BLOCK_N": 64, "MEMBERS": 16, "num_splits": 2, "num_warps": 4, "num_stages": 2
    }  # fmt: skip
    assert shared(1024, 8, 4, 64, torch.bfloat16)()["BLOCK_N"] == 128
    assert shared(1024, 8, 4, 128, torch.bfloat16)()["BLOCK_N"] == 64
    assert shared(1024, 8, 4, 64, torch.float32)()["BLOCK_N"] == 64


def test_attention_backends_refused_where_they_cannot_run():
    from sgl_compile.driver import CompileOptions, validate
    from sgl_compile.errors import SglcError

    for backend in ("triton", "flashinfer"):
        with pytest.raises(SglcError, match="runs on CUDA"):
            validate(CompileOptions(device="cpu", dtype="bfloat16", attention_backend=backend))
    with pytest.raises(SglcError, match="float16 / bfloat16"):
        validate(CompileOptions(dtype="float32", device="cuda", attention_backend="flashinfer"))
    with pytest.raises(SglcError, match="CPU reference"):
        validate(CompileOptions(device="cuda", attention_backend="torch"))
    with pytest.raises(SglcError, match="unknown attention backend"):
        validate(CompileOptions(attention_backend="flash"))


# ---- GPU only (CI has none; results are recorded with the benchmarks): bf16, real configs, graphs ----

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the interpreter's bf16 dot is wrong)"
)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [((8, 4), 128), ((2, 7), 64), ((1, 8), 256), ((2, 3), 80)])
def test_gpu_heuristic_configs(dtype, heads, head_dim):
    """The heuristics' (compiled) configs on the GPU: long decode contexts and chunked extends."""
    for seed, (prefix_lens, new_lens) in enumerate(
        [([4000, 17, 900, 0], [1, 1, 1, 1]), ([1000, 0, 37], [300, 129, 1]), ([0], [2100])]
    ):
        _check(_batch(seed, prefix_lens, new_lens, *heads, head_dim, dtype, device="cuda"), None)


def _check_graph_replay(first: dict, second: dict) -> None:
    """Capture paged_attention on `first`, copy `second` (same shapes) into its inputs, replay: the
    output must be the reference's on `second` (no host data in the launches)."""
    expected = ops.paged_attention(
        **{n: x.cpu() if isinstance(x, torch.Tensor) else x for n, x in second.items()}
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attention.paged_attention(**first)  # compile and tune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.paged_attention(**first)
    for name, x in second.items():
        if isinstance(x, torch.Tensor):
            first[name].copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu(), expected, **TOL[torch.bfloat16])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("decode", [True, False])
def test_gpu_cuda_graph_replay(decode):
    """Captured once, replayed over another batch of the same shapes: no host data in the launches."""
    if decode:
        shapes = ([100, 50, 7], [1, 1, 1]), ([30, 120, 7], [1, 1, 1])
    else:
        shapes = ([60, 10], [20, 30]), ([0, 70], [40, 10])
    first, second = (
        _batch(s, p, n, 2, 4, 128, torch.bfloat16, device="cuda") for s, (p, n) in enumerate(shapes)
    )
    _check_graph_replay(first, second)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_decode_rotates_and_stores_the_new_key(dtype):
    """The compiled kernel's in-kernel rope and store (a CTA barrier orders the store before the split's
    loads): heuristic configs, then a captured graph replayed on other requests."""
    for seed, prefix_lens in enumerate([[4000, 17, 900, 0], [31, 127, 128, 129, 2000]]):
        batch = _batch(
            seed, prefix_lens, [1] * len(prefix_lens), 8, 4, 128, dtype, empty_requests=1, device="cuda"
        )
        _check(_with_rope(batch, seed, max_pos=4096), None)
    first, second = (
        _with_rope(_batch(s, p, [1, 1, 1], 2, 4, 128, torch.bfloat16, device="cuda"), s)
        for s, p in enumerate(([100, 50, 7], [30, 120, 7]))
    )
    _check_graph_replay(first, second)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cascade_decode(dtype):
    """The heuristics' configs: 64 requests in 4 groups over 2048 shared keys, GQA 4, and a graph
    captured on one grouping replayed on another of the same shapes."""
    groups = [(2048, [1 + (7 * i) % 130 for i in range(16)]) for _ in range(4)]
    _check_cascade(_cascade_batch(0, groups, 8, 4, 64, dtype, device="cuda"), None)
    owns = [n for _, o in groups for n in o][::-1]
    other = [(2048, owns[:40]), (2048, owns[40:])]  # the same batch and key count, grouped 40 + 24
    slots = 4 * 2048 + sum(owns) + 5
    first = _cascade_batch(1, groups, 8, 4, 64, torch.bfloat16, device="cuda", num_slots=slots)
    second = _cascade_batch(2, other, 8, 4, 64, torch.bfloat16, device="cuda", num_slots=slots)
    assert first["kv_indices"].shape == second["kv_indices"].shape
    _check_graph_replay(first, second)
