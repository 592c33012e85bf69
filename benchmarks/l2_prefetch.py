"""Does prefetching the next projections' weights into L2 while attention runs shorten a batch-1 decode
step? (docs/benchmarks.md, 2026-12-07 fourth session)

    python benchmarks/l2_prefetch.py [--model 1b|8b] [--context 160] [--out FILE]   (CUDA, sm_90; the repository
    root on PYTHONPATH, as benchmarks/device_env.sh sets it)

At batch 1 a layer's rope, attention split and merge take ~8 us (1B) to ~12 us (8B) on the H100 with
HBM idle: they read a few hundred KB. The layer's o projection (8.4 / 33.5 MB) and the start of
gate/up could stream into L2 (50 MB) in that window, so the GEMVs after it read part of their
weights from L2. This probe runs the engine's own decode kernels for a whole model's layer chain
(GEMV qkv with the norm, rope + KV store, decode attention, GEMV o, gate/up, down; then the LM head)
in one CUDA graph and compares:

- `base`: as the engine runs today;
- `side-line`: after each qkv GEMV, a side stream (forked and joined inside the graph) runs a kernel
  of `prefetch.global.L2` instructions over the layer's o weight and the first columns of every
  gate/up row, up to a byte budget; the main stream does not wait for it;
- `side-bulk`: the same with `cp.async.bulk.prefetch.L2` (one instruction per row prefix / chunk);
- `main-bulk`: the bulk prefetch kernel on the main stream between qkv and rope (PDL, releasing at
  once): if a program may exit before its bulk prefetches land, this costs one short kernel.

Each variant's output is checked against `base` (a prefetch must not change a result); median of 50
graph replays.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from benchmarks.pdl_chain import replay_us
from sgl_compile.codegen import attention, norm_linear, pdl, rope

SHAPES = {  # hidden, intermediate, layers, q heads, kv heads, head dim, vocab
    "1b": (2048, 8192, 16, 32, 8, 64, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128, 128256),
}
LINE = 128  # bytes per L2 line request


@triton.jit
def _prefetch_lines(Base, rows, row_stride, lines_per_row, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program p issues `prefetch.global.L2` for its share of the lines of `rows` row prefixes."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    Base = Base.to(tl.pointer_type(tl.uint8))  # strides are in bytes
    total = rows * lines_per_row
    per = tl.cdiv(total, tl.num_programs(0))
    lo = tl.program_id(0) * per
    for start in range(lo, tl.minimum(lo + per, total), BLOCK):
        i = start + tl.arange(0, BLOCK)
        row, col = i // lines_per_row, i % lines_per_row
        ptr = Base + row.to(tl.int64) * row_stride + col.to(tl.int64) * 128
        ptr = tl.where(i < tl.minimum(lo + per, total), ptr, Base)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptr], dtype=tl.int32, is_pure=False, pack=1
        )
    if PDL:  # on the main stream: complete only after the kernel before (the next one waits on this)
        tl.extra.cuda.gdc_wait()


@triton.jit
def _prefetch_bulk(Base, rows, row_stride, row_bytes, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One `cp.async.bulk.prefetch.L2` per row prefix (row_bytes: a multiple of 16, <= 2**20)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    Base = Base.to(tl.pointer_type(tl.uint8))  # strides are in bytes
    per = tl.cdiv(rows, tl.num_programs(0))
    lo = tl.program_id(0) * per
    for start in range(lo, tl.minimum(lo + per, rows), BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < tl.minimum(lo + per, rows)
        ptr = Base + tl.where(ok, r, 0).to(tl.int64) * row_stride
        size = tl.where(ok, row_bytes, 16).to(tl.int32)
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
            "=r,l,r",
            [ptr, size],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    if PDL:
        tl.extra.cuda.gdc_wait()


def regions(w_o: torch.Tensor, w_gu: torch.Tensor, budget: int) -> list[tuple[torch.Tensor, int, int, int]]:
    """(base, rows, row stride in bytes, bytes per row) to prefetch: all of o, then the first columns
    of every gate/up row while the budget lasts (the GEMV walks every row's K from 0 at once)."""
    o_bytes = w_o.numel() * w_o.element_size()
    out = []
    chunk = 1 << 16  # o as rows of 64 KB
    take = min(o_bytes, budget) // chunk * chunk
    if take:
        out.append((w_o, take // chunk, chunk, chunk))
    left = budget - take
    row_bytes = w_gu.shape[1] * w_gu.element_size()
    prefix = min(row_bytes, left // w_gu.shape[0]) // 512 * 512
    if prefix:
        out.append((w_gu, w_gu.shape[0], row_bytes, prefix))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--budgets-mb", default="", help="comma list; default: o only, then o + 8/16/24 MB")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    hidden, inter, layers, hq, hkv, hd, vocab = SHAPES[args.model]
    dev = torch.device("cuda")
    bf16 = {"device": dev, "dtype": torch.bfloat16}
    torch.manual_seed(0)
    w = [
        {
            "ln1": torch.rand(hidden, **bf16) + 0.5,
            "qkv": torch.randn((hq + 2 * hkv) * hd, hidden, **bf16) * 0.02,
            "o": torch.randn(hidden, hq * hd, **bf16) * 0.02,
            "ln2": torch.rand(hidden, **bf16) + 0.5,
            "gu": torch.randn(2 * inter, hidden, **bf16) * 0.02,
            "down": torch.randn(hidden, inter, **bf16) * 0.02,
        }
        for _ in range(layers)
    ]
    lm_head, final_ln = torch.randn(vocab, hidden, **bf16) * 0.02, torch.rand(hidden, **bf16) + 0.5
    ctx = args.context
    slots = ctx + 16
    k_cache = torch.randn(layers, slots, hkv, hd, **bf16) * 0.5
    v_cache = torch.randn(layers, slots, hkv, hd, **bf16) * 0.5
    i64 = {"device": dev, "dtype": torch.int64}
    positions = torch.tensor([ctx - 1], **i64)
    slot_mapping = torch.tensor([ctx - 1], **i64)
    kv_indptr = torch.tensor([0, ctx], **i64)
    kv_indices = torch.randperm(slots, **i64)[:ctx].contiguous()
    kv_indices[-1] = ctx - 1
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
    t = torch.arange(4096, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
    cos_sin = torch.cat([t.cos(), t.sin()], -1).to(torch.bfloat16)
    x0 = torch.randn(1, hidden, **bf16)
    side = torch.cuda.Stream()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def launch_prefetch(regs, kind: str, programs: int, on_main: bool = False) -> None:
        launch = pdl.launch_kwargs(dev) if on_main else {"PDL": False}
        for base, rows, stride, row_bytes in regs:
            if kind == "line":
                lines = row_bytes // LINE
                _prefetch_lines[(programs,)](base, rows, stride, lines, BLOCK=512, num_warps=4, **launch)
            else:
                _prefetch_bulk[(min(programs, rows),)](
                    base, rows, stride, row_bytes, BLOCK=128, num_warps=4, **launch
                )

    def forward(variant: str, budget: int, programs: int) -> torch.Tensor:
        x, res = x0, None
        joined = True
        for layer, lw in enumerate(w):
            if res is None:
                qkv, res = norm_linear._fused(x, None, lw["ln1"], 1e-5, lw["qkv"], None, "none", None)[0], x
            else:
                qkv, res = norm_linear._fused(x, res, lw["ln1"], 1e-5, lw["qkv"], None, "none", None)
            if variant != "base":
                regs = regions(lw["o"], lw["gu"], budget)
                if variant.startswith("side"):
                    if not joined:
                        torch.cuda.current_stream().wait_stream(side)
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        launch_prefetch(regs, variant.split("-")[1], programs)
                    joined = False
                else:
                    launch_prefetch(regs, "bulk", programs, on_main=True)
            q, k, v = qkv.split([hq * hd, hkv * hd, hkv * hd], -1)
            q = rope.rope_store_kv(
                q.view(1, hq, hd), k.view(1, hkv, hd), v.view(1, hkv, hd), positions, cos_sin,
                k_cache, v_cache, layer, slot_mapping,
            )  # fmt: skip
            a = attention.decode_attention(q, k_cache, v_cache, layer, kv_indptr, kv_indices, hd**-0.5)
            o = norm_linear._fused(a.view(1, hq * hd), None, None, 0.0, lw["o"], None, "none", None)[0]
            h, res = norm_linear._fused(o, res, lw["ln2"], 1e-5, lw["gu"], None, "silu_and_mul", None)
            x = norm_linear._fused(h, None, None, 0.0, lw["down"], None, "none", None)[0]
        if not joined:
            torch.cuda.current_stream().wait_stream(side)
        return norm_linear._fused(x + res, None, final_ln, 1e-5, lm_head, None, "none", None)[0]

    mb = 1 << 20
    o_bytes = w[0]["o"].numel() * 2
    budgets = (
        [int(float(b) * mb) for b in args.budgets_mb.split(",")]
        if args.budgets_mb
        else [o_bytes, o_bytes + 8 * mb, o_bytes + 16 * mb, o_bytes + 24 * mb]
    )
    variants = [("base", 0, 0)]
    for b in budgets:
        variants += [("side-line", b, 32), ("side-line", b, sms), ("side-bulk", b, 32), ("main-bulk", b, 32)]
    results, ref = {}, None
    print("pdl", pdl.enabled(dev), "sms", sms, "o MB", o_bytes / mb, flush=True)
    for variant, budget, programs in variants:
        name = f"{variant} {budget / mb:.1f}MB p{programs}"
        try:
            eager = forward(variant, budget, programs).clone()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(variant, budget, programs)
            graph.replay()
            torch.cuda.synchronize()
            ref = eager if ref is None else ref
            times = replay_us(graph)
            results[name] = {
                "us_median": times[len(times) // 2],
                "us_min": times[0],
                "eager_max_diff": (eager.float() - ref.float()).abs().max().item(),
                "graph_max_diff": (out.float() - ref.float()).abs().max().item(),
            }
        except Exception as e:  # a variant that does not compile or launch: say so, go on
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, results[name], flush=True)
    weight_bytes = sum(t.numel() * 2 for lw in w for t in lw.values()) + lm_head.numel() * 2
    print(f"weights {weight_bytes / 1e9:.3f} GB: {weight_bytes / 3011e9 * 1e6:.0f} us at 3011 GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
