"""Programmatic dependent launch on a chain of GEMVs: does `launch_pdl` work with this Triton inside a
CUDA graph, and what does it save per kernel boundary (docs/benchmarks.md, 2026-12-07 third session).

    python benchmarks/pdl_chain.py [--out FILE]      (CUDA, compute capability >= 9.0)

64 one-row GEMVs of the llama-3.2-1b layer shapes (qkv, o, gate/up, down x 16 layers, 1.95 GB of
weights, 646 us at 3011 GB/s) in one graph, median of 50 replays, four variants: plain, PDL (wait,
then release, at each program's start), a weight tile loaded one loop iteration ahead, and both.
Each variant's last output is checked against the plain variant's, run eagerly and replayed.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

HIDDEN, INTER, QKV, LAYERS = 2048, 8192, 3072, 16
SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]  # (N, K)


@triton.jit
def _gemv(X, W, Out, N, K, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr, AHEAD: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = W + offs_n[:, None].to(tl.int64) * K
    offs_k = tl.arange(0, BK)
    if AHEAD:  # the first tile before the wait: weights are constants
        w = tl.load(rows + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ok = k0 + offs_k
        if not AHEAD:
            w = tl.load(rows + ok[None, :], mask=(offs_n[:, None] < N) & (ok[None, :] < K), other=0.0)
        x = tl.load(X + ok, mask=ok < K, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if AHEAD:
            nk = ok + BK
            w = tl.load(rows + nk[None, :], mask=(offs_n[:, None] < N) & (nk[None, :] < K), other=0.0)
    tl.store(Out + offs_n, (acc * 0.001).to(Out.dtype.element_ty), mask=offs_n < N)


def replay_us(graph: torch.cuda.CUDAGraph, warmup: int = 20, reps: int = 50) -> list[float]:
    """µs of `reps` replays of `graph`, each between two CUDA events, after `warmup` untimed ones; sorted."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)


def timed_us(launches, reps: int = 30) -> float:
    """Median µs of one replay of a graph of `launches` (callables), divided by their count."""
    for f in launches:  # compile and warm outside the capture
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in launches:
            f()
    times = replay_us(g, warmup=5, reps=reps)
    return times[len(times) // 2] / len(launches)


def _config(n: int, k: int) -> tuple[int, int, int]:
    """The engine's one-row heuristic of the time (norm_linear._heuristic, plain, 132 SMs)."""
    bn = 1
    while bn < 16 and triton.cdiv(n, bn * 2) >= 4 * 132:
        bn *= 2
    bk = min(512 if bn == 16 else 2048, k)
    return bn, bk, 8 if bn * bk >= 8192 and bn < 16 else 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print("triton", triton.__version__, "torch", torch.__version__, torch.version.cuda)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    weights = [[torch.randn(n, k, **bf16) * 0.02 for n, k in SHAPES] for _ in range(LAYERS)]
    inputs = {HIDDEN: torch.randn(HIDDEN, **bf16), INTER: torch.randn(INTER, **bf16)}
    outputs = {n: torch.empty(n, **bf16) for n, _ in SHAPES}

    def chain(pdl: bool, ahead: bool) -> None:
        for layer in weights:
            for (n, k), w in zip(SHAPES, layer, strict=True):
                bn, bk, warps = _config(n, k)
                launch = {"launch_pdl": True} if pdl else {}
                _gemv[(triton.cdiv(n, bn),)](
                    inputs[k],
                    w,
                    outputs[n],
                    n,
                    k,
                    BN=bn,
                    BK=bk,
                    PDL=pdl,
                    AHEAD=ahead,
                    num_warps=warps,
                    **launch,
                )

    def poisoned_run(run) -> torch.Tensor:
        for b in outputs.values():
            b.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        return outputs[HIDDEN].clone()

    results, ref = {}, None
    for pdl, ahead in [(False, False), (True, False), (False, True), (True, True)]:
        name = f"pdl={pdl} ahead={ahead}"
        eager = poisoned_run(lambda p=pdl, a=ahead: chain(p, a))
        ref = eager if ref is None else ref
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(pdl, ahead)
        graphed = poisoned_run(graph.replay)
        times = replay_us(graph)
        results[name] = {
            "graph_us_median": times[len(times) // 2],
            "graph_us_min": times[0],
            "eager_max_diff": (eager.float() - ref.float()).abs().max().item(),
            "graph_max_diff": (graphed.float() - ref.float()).abs().max().item(),
        }
        print(name, results[name], flush=True)
    nbytes = sum(n * k * 2 for n, k in SHAPES) * LAYERS
    print(
        f"weights {nbytes / 1e9:.2f} GB: {nbytes / 3011e9 * 1e6:.0f} us at 3011 GB/s; {LAYERS * len(SHAPES)} kernels"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
