"""Triton paged attention on the GPU: decode bandwidth and extend TFLOP/s, heuristic config vs a sweep.

    python benchmarks/attention_kernels.py [decode|extend|all] [--sweep]

Llama-3.1-8B head shape (32 q / 8 kv heads, D 128), bf16, slots randomly permuted (a paged pool).
Decode is memory-bound: KV bytes read over time, against the 3011 GB/s copy ceiling.
"""

from __future__ import annotations

import argparse
import itertools

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


def decode(sweep: bool) -> list[str]:
    rows = []
    for b, ctx in [(1, 1024), (1, 8192), (8, 2048), (32, 1024), (32, 4096), (128, 2048)]:
        kc, vc = pool(b * ctx + 16)
        kv_indices = torch.randperm(b * ctx, device=DEV)
        kv_indptr = torch.arange(b + 1, device=DEV) * ctx
        q = torch.randn(b, HQ, D, device=DEV, dtype=DT)
        nbytes = 2 * b * ctx * HKV * D * DT.itemsize

        def run(c, q=q, kc=kc, vc=vc, kv_indptr=kv_indptr, kv_indices=kv_indices):
            return A.decode_attention(q, kc, vc, 0, kv_indptr, kv_indices, D**-0.5, c)

        heur = A.decode_attention_heuristic(b, HKV, D)()
        t = seconds(lambda h=heur: run(h))
        row = f"decode B={b:4d} ctx={ctx:5d} {t * 1e6:8.1f} us {nbytes / t / 1e9:6.0f} GB/s ({heur})"
        if sweep:
            splits = sorted({1, 4, 16, heur["num_splits"]})
            space = [{"BLOCK_N": bn, "num_splits": s, "num_warps": w, "num_stages": st}
                     for bn, s, w, st in itertools.product((32, 64, 128), splits, (4, 8), (1, 2, 3))]  # fmt: skip
            tb, cb = best(run, space)
            row += f" | best {nbytes / tb / 1e9:6.0f} GB/s ({cb})"
        rows.append(row)
        print(row, flush=True)
    return rows


def extend(sweep: bool) -> list[str]:
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

        heur = A.extend_attention_heuristic(nreq * new, nreq, D)()
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
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="all", choices=["decode", "extend", "all"])
    ap.add_argument("--sweep", action="store_true", help="also time the candidate configs")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = (decode(args.sweep) if args.mode != "extend" else []) + (
        extend(args.sweep) if args.mode != "decode" else []
    )
    print(f"\n{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
