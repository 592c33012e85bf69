"""Batch-1 GEMV: the engine's one-wave kernel against a balanced stream-K kernel.

    python benchmarks/gemv_balance.py [--models llama-3.2-1b,llama-3.1-8b] [--quick] [--out FILE]

The question: the engine's GEMV reads the big MLP weights at ~2.9 TB/s and qkv / o at ~2.4-2.6,
while the LM head (thousands of programs, many waves) reads at 3.15. Its programs are one ragged
wave (e.g. 448 programs on 132 SMs: some SMs hold 4, some 3), so the last programs stream alone.
The stream-K kernel gives each of P = SMs x c persistent programs the same number of weight tiles
(a contiguous range over the row blocks' K tiles), so every SM streams until the end; a row block
split between two programs is summed from two partial slots in a fixed order by whichever arrives
second (deterministic).

Per shape: 16 launches on weight copies cycled past L2 (as 16 layers) in one CUDA graph with PDL,
median of 30 replays, µs a launch and GB/s; then the layer chain (qkv, o, gate/up, down x 16
layers) with the engine's kernel against the best stream-K config of each shape.

On the H100 (docs/benchmarks.md, 2026-12-07 sixth session) stream-K lost on every shape, and its best
configs were those with the most programs: the engine's GEMV is not losing to a ragged wave.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl

from benchmarks.pdl_chain import timed_us
from sgl_compile.codegen import norm_linear, pdl

DEV, DT = "cuda", torch.bfloat16
L2_BYTES = 256 << 20
SHAPES = {  # name: (N out, K, gated); gated N is the gate rows (up rows follow)
    "llama-3.2-1b": {"qkv": (3072, 2048, False), "o": (2048, 2048, False), "gate_up": (8192, 2048, True),
                     "down": (2048, 8192, False)},
    "llama-3.1-8b": {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (14336, 4096, True),
                     "down": (4096, 14336, False)},
}  # fmt: skip


@triton.jit
def _finish(Out, offs_n, mask_n, acc, acc_up, SILU_MUL: tl.constexpr):
    y = acc.to(Out.dtype.element_ty)
    if SILU_MUL:
        gate = y.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty)
        y = (silu.to(tl.float32) * acc_up.to(Out.dtype.element_ty).to(tl.float32)).to(Out.dtype.element_ty)
    tl.store(Out + offs_n, y, mask=mask_n)


@triton.jit
def _streamk_gemv_kernel(
    X, W, Out, Part, Counters, N, K, TILES_K, TOTAL, stride_wn,
    SILU_MUL: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    start = (pid.to(tl.int64) * TOTAL // nprog).to(tl.int32)
    end = ((pid.to(tl.int64) + 1) * TOTAL // nprog).to(tl.int32)
    pdl.wait_only(PDL)
    offs_bn = tl.arange(0, BN)
    offs_bk = tl.arange(0, BK)
    acc = tl.zeros([BN], dtype=tl.float32)
    acc_up = tl.zeros([BN], dtype=tl.float32)
    for t in range(start, end):
        rb = t // TILES_K
        kt = t - rb * TILES_K
        offs_n = rb * BN + offs_bn
        mask_n = offs_n < N
        offs_k = kt * BK + offs_bk
        mask_k = offs_k < K
        rows = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        wmask = mask_n[:, None] & mask_k[None, :]
        x = tl.load(X + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(rows, mask=wmask, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if SILU_MUL:
            w_up = tl.load(rows + N * stride_wn, mask=wmask, other=0.0)
            acc_up += tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
        row_end = kt == TILES_K - 1
        if row_end | (t == end - 1):
            head = start <= rb * TILES_K  # this program began the row block
            if head & row_end:
                _finish(Out, offs_n, mask_n, acc, acc_up, SILU_MUL)
            else:
                # Split at boundary b (the head program's end): the head writes slot 0, the tail slot 1;
                # the second to arrive sums slot 0 + slot 1, the same order whoever it is.
                b = tl.where(head, pid, pid - 1)
                slot = tl.where(head, 0, 1)
                base = Part + (b * 2 + slot) * (2 * BN)
                tl.store(base + offs_bn, acc)
                if SILU_MUL:
                    tl.store(base + BN + offs_bn, acc_up)
                tl.debug_barrier()
                if tl.atomic_add(Counters + b, 1, sem="acq_rel", scope="gpu") == 1:
                    tl.store(Counters + b, 0)
                    p0 = Part + b * 4 * BN
                    s = tl.load(p0 + offs_bn, cache_modifier=".cg") + tl.load(
                        p0 + 2 * BN + offs_bn, cache_modifier=".cg"
                    )
                    s_up = s
                    if SILU_MUL:
                        s_up = tl.load(p0 + BN + offs_bn, cache_modifier=".cg") + tl.load(
                            p0 + 3 * BN + offs_bn, cache_modifier=".cg"
                        )
                    _finish(Out, offs_n, mask_n, s, s_up, SILU_MUL)
            acc = tl.zeros([BN], dtype=tl.float32)
            acc_up = tl.zeros([BN], dtype=tl.float32)
    pdl.release_dependents(PDL)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_PARTS: dict[tuple, torch.Tensor] = {}


def streamk_gemv(
    x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, gated: bool, cfg: dict, sms: int
) -> None:
    n = w.shape[0] // 2 if gated else w.shape[0]
    k = w.shape[1]
    bn, bk = cfg["BN"], min(cfg["BK"], triton.next_power_of_2(k))
    tiles_k = triton.cdiv(k, bk)
    row_blocks = triton.cdiv(n, bn)
    progs = min(sms * cfg["c"], row_blocks)  # each range >= one row block: at most two programs a row block
    part = _PARTS.get((x.device, progs, bn))
    if part is None:
        part = _PARTS[(x.device, progs, bn)] = torch.empty(
            progs * 4 * bn, device=x.device, dtype=torch.float32
        )
    counters = _COUNTERS.setdefault(x.device, torch.zeros(4096, device=x.device, dtype=torch.int32))
    _streamk_gemv_kernel[(progs,)](
        x, w, out, part, counters, n, k, tiles_k, row_blocks * tiles_k, w.stride(0),
        SILU_MUL=gated, BN=bn, BK=bk, num_warps=cfg["warps"], num_stages=cfg["stages"],
        **pdl.launch_kwargs(x.device),
    )  # fmt: skip


def engine_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, gated: bool) -> None:
    norm_linear._fused(x, None, None, 0.0, w, None, "silu_and_mul" if gated else "none", None, out)


def configs(k: int, gated: bool, quick: bool) -> list[dict]:
    out = []
    for c in (1, 2, 4) if not quick else (2,):
        for tile in (4096, 8192, 16384):
            for bn in (1, 2, 4, 8, 16, 32):
                bk = tile // bn
                if bk < 128 or bk > k or (gated and bn < 4):
                    continue
                for stages in (1, 3) if not quick else (1,):
                    warps = 8 if tile >= 16384 else 4
                    out.append({"c": c, "BN": bn, "BK": bk, "warps": warps, "stages": stages})
    return out


def sweep_shape(model: str, name: str, quick: bool, sms: int) -> dict:
    """The engine's kernel and every stream-K config on one projection, 16 launches a graph."""
    n, k, gated = SHAPES[model][name]
    rows = 2 * n if gated else n
    nbytes = rows * k * 2
    copies = max(2, -(-L2_BYTES // nbytes))
    ws = [torch.randn(rows, k, device=DEV, dtype=DT) * 0.02 for _ in range(copies)]
    layers = [ws[i % copies] for i in range(16)]
    x = torch.randn(1, k, device=DEV, dtype=DT)
    ref, got = torch.empty(1, n, device=DEV, dtype=DT), torch.empty(1, n, device=DEV, dtype=DT)
    eng = timed_us([partial(engine_gemv, x, w, ref, gated) for w in layers])
    row = {"bytes": nbytes, "engine_us": eng, "engine_GBps": nbytes / eng / 1e3, "streamk": []}
    print(
        f"{model} {name} {nbytes / 1e6:.1f} MB: engine {eng:.2f} us {nbytes / eng / 1e3:.0f} GB/s", flush=True
    )
    for cfg in configs(k, gated, quick):
        try:
            t = timed_us([partial(streamk_gemv, x, w, got, gated, cfg, sms) for w in layers])
        except Exception as e:  # noqa: BLE001 - a config may not compile or fit
            print("  skipped", cfg, repr(e)[:120])
            continue
        engine_gemv(x, layers[-1], ref, gated)
        streamk_gemv(x, layers[-1], got, gated, cfg, sms)
        diff = (ref.float() - got.float()).abs().max().item()
        row["streamk"].append({**cfg, "us": t, "GBps": nbytes / t / 1e3, "max_diff": diff})
    row["streamk"].sort(key=lambda r: r["us"])
    for r in row["streamk"][:5]:
        print(f"  streamk {r}", flush=True)
    return row


def layer_chain(model: str, best: dict[str, dict], sms: int) -> dict[str, list[float]]:
    """16 layers of the four projections (no weight reused) in one graph: the engine's kernel against
    each shape's best stream-K config, twice each, alternating."""
    shapes = SHAPES[model]
    layer_ws = [
        {
            name: torch.randn(2 * n if g else n, k, device=DEV, dtype=DT) * 0.02
            for name, (n, k, g) in shapes.items()
        }
        for _ in range(16)
    ]
    xs = {k: torch.randn(1, k, device=DEV, dtype=DT) for (_, k, _) in shapes.values()}
    outs = {name: torch.empty(1, n, device=DEV, dtype=DT) for name, (n, _, _) in shapes.items()}
    launches: dict[str, list] = {"engine": [], "streamk": []}
    for lw in layer_ws:
        for name, (_, k, g) in shapes.items():
            launches["engine"].append(partial(engine_gemv, xs[k], lw[name], outs[name], g))
            cfg = {key: best[name][key] for key in ("c", "BN", "BK", "warps", "stages")}
            launches["streamk"].append(partial(streamk_gemv, xs[k], lw[name], outs[name], g, cfg, sms))
    nbytes = sum(v.numel() * 2 for lw in layer_ws for v in lw.values())
    times: dict[str, list[float]] = {"engine": [], "streamk": []}
    for _ in range(2):
        for label, fs in launches.items():
            t = timed_us(fs) * len(fs)
            times[label].append(t)
            print(
                f"{model} chain {label}: {t:.1f} us for {nbytes / 1e9:.2f} GB, {nbytes / t / 1e3:.0f} GB/s",
                flush=True,
            )
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "SMs", sms, "triton", triton.__version__, flush=True)
    results: dict = {}
    for model in args.models.split(","):
        best = {}
        for name in SHAPES[model]:
            row = results[f"{model}/{name}"] = sweep_shape(model, name, args.quick, sms)
            best[name] = row["streamk"][0]
            torch.cuda.empty_cache()
        results[f"{model}/chain"] = layer_chain(model, best, sms)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
