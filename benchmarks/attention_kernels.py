"""Triton paged attention on the GPU: decode bandwidth and extend TFLOP/s, heuristic config vs a sweep.

    python benchmarks/attention_kernels.py [decode|extend|cascade|all] [--sweep] [--flashinfer] [--scenario NAME]
        [--save-tuned DIR]

Llama-3.1-8B head shape (32 q / 8 kv heads, D 128), bf16, slots randomly permuted (a paged pool).
Decode is memory-bound: KV bytes read over time, against the 3011 GB/s copy ceiling.
Cascade: bar 4's decode batch (Llama-3.2-1B heads, D 64; 256 requests in groups sharing a 2048-key
prefix, 128-384 keys of their own; also the grouping the run formed, and 1024 requests): plain decode
vs cascade, each kernel's time, and (--sweep) configs. Each timed call reads the next of 4 layers, as
the model's layers follow each other, so a call does not find the previous one's keys in L2.
--flashinfer: flashinfer 0.6.13 on the same batches (decode on CUDA cores and on tensor cores; the
host time of its per-step plan separately).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import time

import torch
import triton
import triton.testing as tt

from sgl_compile.codegen import attention as A

HQ, HKV, D, DT = 32, 8, 128, torch.bfloat16
DEV = "cuda"


def seconds(fn) -> float:
    torch.cuda.synchronize()  # do_bench_cudagraph runs fn on a side stream: inputs must be ready
    return tt.do_bench_cudagraph(fn, rep=50) * 1e-3


def pool(num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(1, num_slots, HKV, D, device=DEV, dtype=DT)
    return k, torch.randn_like(k)


def best(run, configs: list[dict]) -> tuple[float, dict]:
    timed = []
    for c in configs:
        try:
            timed.append((seconds(lambda c=c: run(c)), c))
        except Exception as e:  # noqa: BLE001 - some candidates exceed shared memory; skip them
            print("skipped", c, repr(e)[:120])
    return min(timed, key=lambda r: r[0])


def flashinfer_times(q, kc, vc, qo: list[int], kvp: list[int], kvi, decode: bool) -> str:
    """flashinfer on one batch: the kernel time (per variant) and the plan's host time."""
    from sgl_compile.codegen.flashinfer_attention import FlashinferAttention

    parts = []
    qo_d, kvp_d = torch.tensor(qo, device=DEV), torch.tensor(kvp, device=DEV)  # read for their shapes
    for tc in (False, True) if decode else (None,):
        fa = FlashinferAttention(q.shape[1], kc.shape[2], q.shape[2], q.dtype, q.device, tensor_cores=tc)
        fa.plan(qo, kvp, kvi)  # JIT-builds on first use
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fa.plan(qo, kvp, kvi)
        plan_us = (time.perf_counter() - start) / 10 * 1e6
        t = seconds(
            lambda fa=fa: fa.paged_attention(
                q, None, None, kc, vc, 0, None, qo_d, kvp_d, kvi, q.shape[2] ** -0.5
            )
        )
        name = "" if tc is None else ("tensor cores " if tc else "cuda cores ")
        parts.append(f"{name}{t * 1e6:.1f} us (plan {plan_us:.0f} us host)")
    return "flashinfer " + ", ".join(parts)


# (batch-1 contexts of bar 1's run, 33-288 keys, first: there the kernel's latency is the cost)
DECODE_SHAPES = [(1, 64), (1, 160), (1, 300), (1, 1024), (1, 4096), (1, 8192), (8, 2048), (32, 1024), (32, 4096),
                 (128, 2048)]  # fmt: skip


def decode(
    sweep: bool, flashinfer: bool = False, shapes: list[tuple[int, int]] = DECODE_SHAPES, rope: bool = False
) -> list[str]:
    """Decode batches of `shapes` (batch, keys each). With `rope`, the kernel also rotates q and
    rotates and stores each request's new key and value (its last slot), as the models without a
    q/k norm run it."""
    rows = []
    for b, ctx in shapes:
        kc, vc = pool(b * ctx + 16)
        kv_indices = torch.randperm(b * ctx, device=DEV)
        kv_indptr = torch.arange(b + 1, device=DEV) * ctx
        q = torch.randn(b, HQ, D, device=DEV, dtype=DT)
        nbytes = 2 * b * ctx * HKV * D * DT.itemsize
        new_kv = None
        if rope:
            cos_sin = torch.randn(ctx, D, device=DEV)
            positions = torch.full((b,), ctx - 1, device=DEV)
            k_new, v_new = (torch.randn(b, HKV, D, device=DEV, dtype=DT) for _ in range(2))
            new_kv = (k_new, v_new, positions, cos_sin, kv_indices[kv_indptr[1:] - 1])

        def run(c, q=q, kc=kc, vc=vc, kv_indptr=kv_indptr, kv_indices=kv_indices, new_kv=new_kv):
            return A.decode_attention(q, kc, vc, 0, kv_indptr, kv_indices, D**-0.5, c, new_kv=new_kv)

        heur = A.decode_attention_heuristic(b, HKV, D, DT)()
        t = seconds(lambda h=heur: run(h))
        row = f"decode B={b:4d} ctx={ctx:5d} {t * 1e6:8.1f} us {nbytes / t / 1e9:6.0f} GB/s ({heur})"
        if sweep:
            splits = sorted({1, 2, 4, 16, heur["num_splits"]})
            space = [{"BLOCK_N": bn, "num_splits": s, "num_warps": w, "num_stages": st}
                     for bn, s, w, st in itertools.product((32, 64, 128), splits, (4, 8), (1, 2, 3))]  # fmt: skip
            tb, cb = best(run, space)
            row += f" | best {nbytes / tb / 1e9:6.0f} GB/s ({cb})"
        if flashinfer:
            row += " | " + flashinfer_times(
                q, kc, vc, list(range(b + 1)), kv_indptr.tolist(), kv_indices, True
            )
        rows.append(row)
        print(row, flush=True)
    return rows


def extend(sweep: bool, flashinfer: bool = False) -> list[str]:
    rows = []
    for prefix, new, nreq in [(0, 4096, 1), (2048, 512, 4), (0, 1024, 8), (8192, 256, 2)]:
        ctx = prefix + new
        kc, vc = pool(nreq * ctx + 16)
        kv_indices = torch.randperm(nreq * ctx, device=DEV)
        kv_indptr = torch.arange(nreq + 1, device=DEV) * ctx
        qo_indptr = torch.arange(nreq + 1, device=DEV) * new
        q = torch.randn(nreq * new, HQ, D, device=DEV, dtype=DT)
        flops = nreq * 4 * HQ * D * (new * prefix + new * (new + 1) / 2)

        def run(c, q=q, kc=kc, vc=vc, qo=qo_indptr, kvp=kv_indptr, kvi=kv_indices):
            return A.extend_attention(q, kc, vc, 0, qo, kvp, kvi, D**-0.5, c)

        heur = A.extend_attention_heuristic(nreq * new, nreq, D, DT)()
        t = seconds(lambda h=heur: run(h))
        row = f"extend {nreq} x ({prefix} cached + {new} new) {t * 1e6:8.1f} us {flops / t / 1e12:6.1f} TF/s ({heur})"
        if sweep:
            space = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                     for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))]  # fmt: skip
            tb, cb = best(run, space)
            row += f" | best {flops / tb / 1e12:6.1f} TF/s ({cb})"
        if prefix == 0:  # torch SDPA (flash) on contiguous tensors, for scale
            qs = q.view(nreq, new, HQ, D).transpose(1, 2)
            ks = torch.randn(nreq, HKV, ctx, D, device=DEV, dtype=DT)
            sdpa = seconds(lambda qs=qs, ks=ks: torch.nn.functional.scaled_dot_product_attention(
                qs, ks, ks, is_causal=True, enable_gqa=True))  # fmt: skip
            row += f" | sdpa {flops / sdpa / 1e12:6.1f} TF/s"
        if flashinfer:
            row += " | " + flashinfer_times(
                q, kc, vc, qo_indptr.tolist(), kv_indptr.tolist(), kv_indices, False
            )
        rows.append(row)
        print(row, flush=True)
    return rows


CASCADE_LAYERS = 4  # the pool's layers: each timed call reads the next, so its KV is not in L2


def _cascade_batch(groups: list[tuple[int, int]], hkv: int, d: int, rng: random.Random) -> dict:
    """groups: (shared keys, members); a member holds the shared keys then 128-384 of its own. A group
    sharing none is one request whose whole row is its own (a singleton in the scheduler's terms)."""
    rows, shared_len, sizes, next_slot = [], [], [], 0
    for shared, members in groups:
        prefix = list(range(next_slot, next_slot + shared))
        next_slot += shared
        for _ in range(members):
            own = rng.randint(128, 384) + (2048 if shared == 0 else 0)
            rows.append(prefix + list(range(next_slot, next_slot + own)))
            next_slot += own
            shared_len.append(shared)
        sizes.append(members)
    perm = torch.randperm(next_slot, device=DEV)  # a paged pool: the slots are scattered
    b = len(rows)
    kc = torch.randn(CASCADE_LAYERS, next_slot, hkv, d, device=DEV, dtype=DT)
    return {
        "kc": kc, "vc": torch.randn_like(kc), "q": torch.randn(b, 32, d, device=DEV, dtype=DT),
        "kv_indices": perm[torch.tensor([s for r in rows for s in r], device=DEV)],
        "kv_indptr": torch.tensor([0] + list(itertools.accumulate(len(r) for r in rows)), device=DEV),
        "cascade_indptr": torch.tensor(([0] + list(itertools.accumulate(sizes)) + [b] * b)[: b + 1], device=DEV),
        "shared_len": torch.tensor(shared_len, device=DEV),
        "read_all": sum(len(r) for r in rows), "read_unique": next_slot,
    }  # fmt: skip


def _kernel_times(fn) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    times = {e.key: e.device_time_total / e.count for e in prof.key_averages() if e.key.startswith("_")}
    return ", ".join(f"{k} {v:.1f} us" for k, v in sorted(times.items()))


# The decode batches of bar 4's workload (64 groups x 16 prompts sharing 2048 tokens): what the
# scheduler forms at its decode step 600 (`python -m benchmarks.schedule_replay
# --show-steps 600`: 13 full groups, 6 partial ones, 1 alone; 256 requests), and the batch it holds
# with --max-running-requests 1024.
STEP_600 = [(2048, 16)] * 13 + [(2048, n) for n in (15, 9, 8, 7, 5, 3)] + [(0, 1)]


def cascade(
    sweep: bool, flashinfer: bool = False, only: str | None = None, save_tuned: str | None = None
) -> list[str]:
    hkv, d = 8, 64  # llama-3.2-1b
    rng = random.Random(0)
    scenarios = {
        "16 groups x 16": [(2048, 16)] * 16,
        "64 groups x 4": [(2048, 4)] * 64,
        "16 x 15 + 16 alone": [(2048, 15)] * 16 + [(0, 1)] * 16,
        "step 600 of the run (19 groups + 1 alone)": STEP_600,
        "64 groups x 16 (1024 requests)": [(2048, 16)] * 64,
    }
    scenarios = {name: groups for name, groups in scenarios.items() if only is None or only in name}
    if save_tuned and (not sweep or len(scenarios) != 1):  # (batches of one size bucket share entries)
        raise SystemExit("--save-tuned needs --sweep and a --scenario naming one batch")
    rows = []
    winners: dict[str, dict] = {}  # the sweep's, by tuning-cache entry
    for name, groups in scenarios.items():
        x = _cascade_batch(groups, hkv, d, rng)
        per_key = 2 * hkv * d * DT.itemsize
        layer = itertools.count()  # (a timed graph captures many calls: each reads the next layer)

        def plain(c=None, x=x, layer=layer):
            return A.decode_attention(
                x["q"], x["kc"], x["vc"], next(layer) % CASCADE_LAYERS, x["kv_indptr"], x["kv_indices"],
                d**-0.5, c,
            )  # fmt: skip

        def cas(c=None, sc=None, x=x, layer=layer):
            return A.decode_attention(
                x["q"], x["kc"], x["vc"], next(layer) % CASCADE_LAYERS, x["kv_indptr"], x["kv_indices"],
                d**-0.5, c, x["cascade_indptr"], x["shared_len"], sc,
            )  # fmt: skip

        torch.testing.assert_close(
            A.decode_attention(x["q"], x["kc"], x["vc"], 1, x["kv_indptr"], x["kv_indices"], d**-0.5, None,
                               x["cascade_indptr"], x["shared_len"]),
            A.decode_attention(x["q"], x["kc"], x["vc"], 1, x["kv_indptr"], x["kv_indices"], d**-0.5),
            atol=2e-2, rtol=2e-2,
        )  # fmt: skip
        tp, tc = seconds(plain), seconds(cas)
        row = (f"cascade {name}: plain {tp * 1e6:.1f} us ({x['read_all'] * per_key / tp / 1e9:.0f} GB/s), "
               f"cascade {tc * 1e6:.1f} us ({x['read_unique'] * per_key / tc / 1e9:.0f} GB/s of unique keys); "
               f"kernels: {_kernel_times(cas)}")  # fmt: skip
        if sweep:
            # (one named batch: the members and splits that can fill the machine at its size)
            members, splits = ((8, 16), (1, 2, 4)) if only else ((4, 8, 16), (1, 2, 4, 8, 16))
            space = [{"BLOCK_N": bn, "MEMBERS": m, "num_splits": sp, "num_warps": w, "num_stages": st}
                     for bn, m, sp, (w, st) in itertools.product(
                         (32, 64, 128), members, splits, ((4, 1), (4, 2), (4, 3), (8, 2)))]  # fmt: skip
            ts, cs = best(lambda c: cas(None, c), space)
            dspace = [{"BLOCK_N": bn, "num_splits": sp, "num_warps": w, "num_stages": st}
                      for bn, sp, (w, st) in itertools.product((32, 64, 128), (1, 2, 4, 8), ((4, 2),))]  # fmt: skip
            td, cd = best(lambda c, cs=cs: cas(c, cs), dspace)
            row += f" | best shared {ts * 1e6:.1f} us ({cs}), then best decode {td * 1e6:.1f} us ({cd})"
            row += f"; kernels: {_kernel_times(lambda cd=cd, cs=cs: cas(cd, cs))}"
            b = x["q"].shape[0]
            winners[
                A.autotune.entry_key("shared_prefix_attention", A.shared_prefix_key(b, 32, hkv, d, DT))
            ] = cs
            winners[A.autotune.entry_key("decode_attention", A.decode_attention_key(b, 32, hkv, d, DT))] = cd
        if flashinfer:
            b = x["q"].shape[0]  # (flashinfer reads one layer: its keys stay in L2, unlike the rows above)
            row += " | " + flashinfer_times(
                x["q"], x["kc"][:1], x["vc"][:1], list(range(b + 1)), x["kv_indptr"].tolist(), x["kv_indices"],
                True,
            )  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    if save_tuned:  # saved after the timings, which would otherwise read them
        os.environ["SGLC_CACHE_DIR"] = save_tuned  # where the runtime looks with SGLC_CACHE_DIR=save_tuned
        A.autotune.use_cache_file(None)
        rows.append(f"tuned configs saved to {A.autotune.save_entries(A.autotune.load_entries() | winners)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="all", choices=["decode", "extend", "cascade", "all"])
    ap.add_argument("--sweep", action="store_true", help="also time the candidate configs")
    ap.add_argument("--flashinfer", action="store_true", help="also time flashinfer on the same batches")
    ap.add_argument("--heads", default=None, help="HQ,HKV,D for decode and extend (default 32,8,128)")
    ap.add_argument("--scenario", default=None, help="cascade: only the batches whose name contains this")
    ap.add_argument("--save-tuned", default=None, help="cascade --sweep: write the winners to this cache dir")
    ap.add_argument("--shapes", default=None, help="decode: BxKEYS,... (e.g. 1x64,1x160,1x300)")
    ap.add_argument(
        "--rope", action="store_true", help="decode: rotate q and store the new key in the kernel"
    )
    args = ap.parse_args()
    if args.heads:
        global HQ, HKV, D
        HQ, HKV, D = map(int, args.heads.split(","))
    torch.manual_seed(0)
    rows = []
    if args.mode in ("decode", "all"):
        shapes = DECODE_SHAPES
        if args.shapes:
            shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
        rows += decode(args.sweep, args.flashinfer, shapes, args.rope)
    if args.mode in ("extend", "all"):
        rows += extend(args.sweep, args.flashinfer)
    if args.mode in ("cascade", "all"):
        rows += cascade(args.sweep, args.flashinfer, args.scenario, args.save_tuned)
    print(f"\n{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
