"""Batch-1 o projection, MLP and their boundaries in one persistent kernel with grid barriers, against
the engine's three GEMV launches.

    python benchmarks/persistent_mlp.py [--models llama-3.2-1b,llama-3.1-8b] [--quick] [--out FILE]

The question: the engine's batch-1 GEMVs lose 2-3 µs each to the boundary with the previous kernel
(docs/benchmarks.md, 2026-12-07 sixth session: the 16-layer GEMV chain reads at 2.6-2.9 TB/s against
the LM head's 3.15), and neither configs, balance nor an early weight load removed it. Here the o
GEMV, the residual add + RMS norm + gate/up GEMV + SiLU, and the down GEMV run as three phases of one
kernel whose programs are all resident at once (a cooperative launch checks it). Between phases each
program arrives at a grid-wide counter and, before spinning on it, may issue its first weight tile
of the next phase (weights are constants) into registers or into L2, so HBM keeps streaming through
the boundary.
Each phase's tile is the engine GEMV's (norm_linear._norm_gemv_kernel): the same dot products in the
same order, so the results match the engine's launches bit for bit where the tiles match.

Measured: 16 layers (qkv GEMV, then o / gate-up / down, weights never reused) in one CUDA graph with
PDL, median of 30 replays, the engine's launches against the persistent kernel over a few phase
configs, with o fused or left as its own launch; each variant's last output is checked against the
engine's.

On the H100 (docs/benchmarks.md, 2026-12-07 seventh session) every variant lost: the best by 1.8 µs a
layer on the 1B (o apart, the down tile prefetched into L2) and 2.5 on the 8B (o apart, no preload). One register
budget for all phases (the gated phase's) leaves 4 programs a SM where the separate kernels keep
5-12, and a preload held in registers across the barrier halves that again.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.language as tl

from benchmarks.occupancy import resident_programs
from benchmarks.pdl_chain import replay_us
from sgl_compile.codegen import norm_linear, pdl

DT = torch.bfloat16
EPS = 1e-5
SHAPES = {"llama-3.2-1b": (2048, 8192, 3072), "llama-3.1-8b": (4096, 14336, 6144)}  # hidden, inter, qkv


@triton.jit
def _phase(
    X, R, NW, W, Out, S, N, K, stride_wn, eps, first, step, w0, w0_up,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, PRELOADED: tl.constexpr,
):  # fmt: skip
    """Row blocks first, first + step, ... of one GEMV (the engine's one-row tile); with PRELOADED, the
    first block's first K tile is w0 / w0_up, loaded before the barrier."""
    dtype = X.dtype.element_ty
    for t in range(first, tl.cdiv(N, BN), step):
        offs_n = t * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        rows = W + offs_n[:, None].to(tl.int64) * stride_wn
        squares = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([1, BN], dtype=tl.float32)
        acc_up = tl.zeros([1, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < K
            # .cg: another program wrote X this launch; L2 is where that write is seen
            xs = tl.load(X + offs_k[None, :], mask=mask_k[None, :], other=0.0, cache_modifier=".cg")
            if HAS_RESIDUAL:
                r = tl.load(R + offs_k[None, :], mask=mask_k[None, :], other=0.0, cache_modifier=".cg")
                xs = (xs.to(tl.float32) + r.to(tl.float32)).to(dtype)
                if t == 0:
                    tl.store(S + offs_k[None, :], xs, mask=mask_k[None, :])
            h = xs.to(tl.float32)
            if HAS_NORM:
                squares += tl.sum(h * h, axis=1)
                h = h * tl.load(NW + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            w_mask = mask_n[:, None] & mask_k[None, :]
            if PRELOADED:
                fresh = (t != first) | (k0 != 0)
                w = tl.where(fresh, tl.load(rows + offs_k[None, :], mask=w_mask & fresh, other=0.0), w0)
            else:
                w = tl.load(rows + offs_k[None, :], mask=w_mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * h, axis=1)[None, :]
            if SILU_MUL:
                up_rows = rows + N * stride_wn + offs_k[None, :]
                if PRELOADED:
                    w_up = tl.where(fresh, tl.load(up_rows, mask=w_mask & fresh, other=0.0), w0_up)
                else:
                    w_up = tl.load(up_rows, mask=w_mask, other=0.0)
                acc_up += tl.sum(w_up.to(tl.float32) * h, axis=1)[None, :]
        if HAS_NORM:
            rstd = tl.math.rsqrt(squares / K + eps)
            acc *= rstd[:, None]
            acc_up *= rstd[:, None]
        y = acc.to(dtype)
        if SILU_MUL:
            gate = y.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            y = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        tl.store(Out + offs_n[None, :], y, mask=mask_n[None, :])


@triton.jit
def _first_tile(W, N, K, stride_wn, pid, BN: tl.constexpr, BK: tl.constexpr, UP: tl.constexpr):
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if UP:
        rows += N * stride_wn
    return tl.load(rows, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)


@triton.jit
def _prefetch_tile(W, N, K, stride_wn, pid, BN: tl.constexpr, BK: tl.constexpr, UP: tl.constexpr):
    """`prefetch.global.L2` of every 128-byte line of the tile `_first_tile` would load: no registers
    held across the barrier."""
    LINE: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth  # elements in 128 bytes
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK // LINE) * LINE
    rows = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if UP:
        rows += N * stride_wn
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rows = tl.where(ok, rows, W)  # a line of the weight itself: harmless, and never out of bounds
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [rows], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _arrive(Counter):
    """Grid barrier, first half: every thread's stores of this program happen before its arrival (one
    thread of a program does a scalar atomic; Triton broadcasts its result)."""
    tl.debug_barrier()
    tl.atomic_add(Counter, 1, sem="release", scope="gpu")


@triton.jit
def _spin(Counter, target):
    """Grid barrier, second half: until `target` arrivals, then every thread of the program goes on."""
    seen = tl.atomic_add(Counter, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(Counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _o_mlp_kernel(
    A, Wo, Ob, R, NW, Wgu, Hb, Wd, Out, S, Counter, H, INTER, QO, eps,
    DO_O: tl.constexpr, DO_GU: tl.constexpr, DO_DOWN: tl.constexpr, BARRIERS: tl.constexpr,
    BN_O: tl.constexpr, BK_O: tl.constexpr, BN_GU: tl.constexpr, BK_GU: tl.constexpr,
    BN_D: tl.constexpr, BK_D: tl.constexpr, PRELOAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """o = Wo @ a; h = silu(gate) * up of rms_norm(o + residual) (program 0 stores the sum S);
    out = Wd @ h. BARRIERS: the grid barriers between the phases run (0: one phase a launch, as the
    interpreter needs, which runs programs one after another so a spinning program never returns)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pdl.wait_only(PDL)
    if DO_O:
        _phase(A, A, A, Wo, Ob, Ob, H, QO, QO, 0.0, pid, nprog, 0.0, 0.0,
               False, False, False, BN_O, BK_O, False)  # fmt: skip
    if DO_GU:
        g0 = 0.0
        u0 = 0.0
        if BARRIERS > 0 and DO_O:
            _arrive(Counter)
            if PRELOAD == 1:
                g0 = _first_tile(Wgu, INTER, H, H, pid, BN_GU, BK_GU, False)
                u0 = _first_tile(Wgu, INTER, H, H, pid, BN_GU, BK_GU, True)
            if PRELOAD == 2:
                _prefetch_tile(Wgu, INTER, H, H, pid, BN_GU, BK_GU, False)
                _prefetch_tile(Wgu, INTER, H, H, pid, BN_GU, BK_GU, True)
            _spin(Counter, nprog)
        _phase(Ob, R, NW, Wgu, Hb, S, INTER, H, H, eps, pid, nprog, g0, u0,
               True, True, True, BN_GU, BK_GU, PRELOAD == 1 and BARRIERS > 0 and DO_O)  # fmt: skip
    if DO_DOWN:
        d0 = 0.0
        if BARRIERS > 0 and DO_GU:
            _arrive(Counter)
            if PRELOAD == 1:
                d0 = _first_tile(Wd, H, INTER, INTER, pid, BN_D, BK_D, False)
            if PRELOAD == 2:
                _prefetch_tile(Wd, H, INTER, INTER, pid, BN_D, BK_D, False)
            _spin(Counter, BARRIERS * nprog)
        _phase(Hb, Hb, Hb, Wd, Out, Out, H, INTER, INTER, 0.0, pid, nprog, d0, d0,
               False, False, False, BN_D, BK_D, PRELOAD == 1 and BARRIERS > 0 and DO_GU)  # fmt: skip
    if BARRIERS > 0:  # noqa: SIM102 - a compile-time branch around a run-time one
        # the last program to leave zeroes the counter for the next launch
        if tl.atomic_add(Counter, 1, sem="relaxed", scope="gpu") == (BARRIERS + 1) * nprog - 1:
            tl.store(Counter, 0)
    pdl.release_dependents(PDL)


@dataclass(frozen=True)
class Config:
    fuse_o: bool
    warps: int
    bn_o: int
    bn_gu: int
    bk_gu: int
    bn_d: int
    bk: int = 2048  # o and down
    preload: int = 2  # the next phase's first tile before the barrier: 0 no, 1 into registers, 2 into L2

    def name(self) -> str:
        o = f"o {self.bn_o}x{self.bk}, " if self.fuse_o else "o apart, "
        pre = ("no preload", "preload to registers", "prefetch to L2")[self.preload]
        return f"{o}gu {self.bn_gu}x{self.bk_gu}, down {self.bn_d}x{self.bk}, {self.warps} warps, {pre}"


_COUNTERS: dict[torch.device, torch.Tensor] = {}


@dataclass
class Fused:
    """The persistent launch of a Config: every program resident at once (a cooperative launch where
    the driver takes it, else the grid computed from the compiled kernel's registers)."""

    cfg: Config
    h: int
    inter: int
    grid: int = 0
    regs: int = 0
    cooperative: bool = True

    def _consts(self) -> dict:
        c = self.cfg
        return dict(
            BN_O=c.bn_o, BK_O=min(c.bk, self.h), BN_GU=c.bn_gu, BK_GU=min(c.bk_gu, self.h),
            BN_D=c.bn_d, BK_D=min(c.bk, self.inter), PRELOAD=c.preload, num_warps=c.warps, num_stages=1,
        )  # fmt: skip

    def _args(self, a, wo, o, r, nw, wgu, hb, wd, out, s) -> tuple:
        counter = _COUNTERS.setdefault(a.device, torch.zeros(16, device=a.device, dtype=torch.int32))
        return (a, wo, o, r, nw, wgu, hb, wd, out, s, counter, self.h, self.inter, self.h, EPS)

    def phases(self, *bufs, grid: int) -> None:
        """One launch a phase, no barrier (the interpreter's way; the same tiles and sums)."""
        phases = ("o", "gu", "down") if self.cfg.fuse_o else ("gu", "down")
        for do in phases:
            _o_mlp_kernel[(grid,)](
                *self._args(*bufs), DO_O=do == "o", DO_GU=do == "gu", DO_DOWN=do == "down", BARRIERS=0,
                **self._consts(), **pdl.launch_kwargs(bufs[0].device),
            )  # fmt: skip

    def launch(self, *bufs) -> None:
        a = bufs[0]
        flags = dict(
            DO_O=self.cfg.fuse_o, DO_GU=True, DO_DOWN=True, BARRIERS=2 if self.cfg.fuse_o else 1,
            **self._consts(), **pdl.launch_kwargs(a.device),
        )  # fmt: skip
        extra = {"launch_cooperative_grid": True} if self.cooperative else {}
        args = self._args(*bufs)
        if not self.grid:
            kernel = _o_mlp_kernel.warmup(*args, grid=(1,), **flags, **extra)
            kernel._init_handles()
            self.regs = kernel.n_regs
            sms = torch.cuda.get_device_properties(a.device).multi_processor_count
            self.grid = sms * resident_programs(kernel.n_regs, self.cfg.warps, kernel.metadata.shared)
        _o_mlp_kernel[(self.grid,)](*args, **flags, **extra)


def layer_chain(model: str, configs: list[Config], reps: int, cooperative: bool = True) -> dict:
    h, inter, nqkv = SHAPES[model]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, device=dev, dtype=DT, generator=g) * scale

    layers = [
        {"qkv": rnd(nqkv, h), "o": rnd(h, h), "gu": rnd(2 * inter, h), "down": rnd(h, inter),
         "n1": 1 + rnd(h, scale=0.1), "n2": 1 + rnd(h, scale=0.1)}
        for _ in range(16)
    ]  # fmt: skip
    x0, r0 = rnd(1, h, scale=1.0), rnd(1, h, scale=1.0)
    qkv = torch.empty(1, nqkv, device=dev, dtype=DT)
    o = torch.empty(1, h, device=dev, dtype=DT)
    hb = torch.empty(1, inter, device=dev, dtype=DT)
    outs = [torch.empty(1, h, device=dev, dtype=DT) for _ in range(2)]  # a layer's input is the last's output

    def engine() -> None:
        x, r = x0, r0
        for i, lw in enumerate(layers):
            _, s1 = norm_linear._fused(x, r, lw["n1"], EPS, lw["qkv"], None, "none", None, qkv)
            norm_linear._fused(qkv[:, :h], None, None, 0.0, lw["o"], None, "none", None, o)
            _, s2 = norm_linear._fused(o, s1, lw["n2"], EPS, lw["gu"], None, "silu_and_mul", None, hb)
            x, r = norm_linear._fused(hb, None, None, 0.0, lw["down"], None, "none", None, outs[i % 2])[0], s2

    def fused(f: Fused) -> None:
        x, r = x0, r0
        for i, lw in enumerate(layers):
            _, s1 = norm_linear._fused(x, r, lw["n1"], EPS, lw["qkv"], None, "none", None, qkv)
            if not f.cfg.fuse_o:
                norm_linear._fused(qkv[:, :h], None, None, 0.0, lw["o"], None, "none", None, o)
            s2 = torch.empty_like(s1)
            f.launch(qkv[:, :h], lw["o"], o, s1, lw["n2"], lw["gu"], hb, lw["down"], outs[i % 2], s2)
            x, r = outs[i % 2], s2

    def timed(run) -> tuple[float, torch.Tensor]:
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        for b in outs:
            b.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        result = outs[(len(layers) - 1) % 2].clone()
        times = replay_us(graph, warmup=5, reps=reps)
        return times[len(times) // 2], result

    nbytes = sum(v.numel() * 2 for lw in layers for k, v in lw.items() if k in ("qkv", "o", "gu", "down"))
    base_us, ref = timed(engine)
    rows = [{"variant": "engine", "us": base_us, "GBps": nbytes / base_us / 1e3}]
    print(f"{model}: 16 layers, {nbytes / 1e9:.2f} GB; engine {base_us:.1f} us ({nbytes / base_us / 1e3:.0f} GB/s)",
          flush=True)  # fmt: skip
    for cfg in configs:
        f = Fused(cfg, h, inter, cooperative=cooperative)
        try:
            try:
                us, got = timed(partial(fused, f))
            except Exception as e:  # noqa: BLE001 - the driver may refuse a cooperative launch with PDL or in a graph
                if not f.cooperative:
                    raise
                print(f"  cooperative launch failed ({repr(e)[:160]}); the computed grid instead", flush=True)
                f.cooperative = False
                us, got = timed(partial(fused, f))
        except Exception as e:  # noqa: BLE001 - a config may not compile or fit
            print(f"  {cfg.name()}: failed {repr(e)[:200]}", flush=True)
            continue
        diff = (got.float() - ref.float()).abs().max().item()
        rows.append({"variant": cfg.name(), "us": us, "GBps": nbytes / us / 1e3, "grid": f.grid, "regs": f.regs,
                     "cooperative": f.cooperative, "max_diff": diff, "saved_us_a_layer": (base_us - us) / 16})  # fmt: skip
        print(f"  {cfg.name()}: {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s), grid {f.grid}, {f.regs} regs, "
              f"coop {f.cooperative}, max diff {diff:.3g}, {(base_us - us) / 16:+.2f} us a layer", flush=True)  # fmt: skip
    again, _ = timed(engine)
    rows.append({"variant": "engine (again)", "us": again, "GBps": nbytes / again / 1e3})
    print(f"  engine again {again:.1f} us", flush=True)
    return {"bytes": nbytes, "rows": rows}


def configs(model: str, quick: bool) -> list[Config]:
    """The engine's tiles (its heuristic's) with each preload mode, o fused or apart; then other tiles."""
    small = model == "llama-3.2-1b"
    bn, gu, warps = (2, (16, 512), 4) if small else (4, (32, 256), 8)
    out = [Config(fuse_o, warps, bn, *gu, bn, preload=p) for fuse_o in (True, False) for p in (0, 1, 2)]
    if quick:
        return out
    gus = [(16, 512), (8, 1024)] if small else [(32, 256), (16, 512)]
    for w in (4, 8):
        for b in (2, 4, 8):
            for g in gus:
                cfg = Config(True, w, b, *g, b)
                if cfg not in out:
                    out.append(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument(
        "--no-cooperative", action="store_true", help="launch the computed grid without the check"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    results = {
        m: layer_chain(m, configs(m, args.quick), args.reps, not args.no_cooperative)
        for m in args.models.split(",")
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
