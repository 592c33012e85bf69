"""Decode-batch GEMMs (2 < M <= 256): cuBLAS as F.linear runs it, cuBLASLt, and the Triton GEMM of
`codegen.quant_gemm` on bf16 weights, against the floor; then each projection with what the engine
runs around it at these M (the Triton add + RMS norm before qkv and gate/up, the SiLU gate after
gate/up, cuBLAS between) against `codegen.norm_linear`'s kernel doing all of it in one launch, over
row tiles of BLOCK_M.

    python benchmarks/decode_gemm.py [--models qwen3-0.6b,llama-3.1-8b] [--rows 64,256] [--out FILE]

The question: at batch 256 a Qwen3-0.6B layer's four GEMMs took 30 µs, 38% of their floor
(docs/benchmarks.md, 2026-12-07 fourth session). Their grids are small: N x M / (128 x 128) is 16-96
output tiles on 132 SMs, so cuBLAS may leave SMs idle where a split-K or narrower-tile kernel would
not. And between cuBLAS and the norm / gate kernels each boundary drains the GPU (cuBLAS has no
programmatic dependent launch), so fusing them may win even where the GEMM alone does not. Per shape:
16 launches (or launch sequences) on weight copies cycled past L2 in one CUDA graph, median of 30
replays, µs a launch; the floor is max(bytes / 3011 GB/s, FLOPs / 781 TFLOP/s) (the H100's ceilings).
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.pdl_chain import timed_us
from sgl_compile.codegen import norm_linear, quant_gemm
from sgl_compile.models.loading.dummy import DUMMY_CONFIGS

DT = torch.bfloat16
L2_BYTES = 256 << 20
COPY_GBPS, PEAK_TFLOPS = 3011, 781


# What the engine fuses around each projection (the IR after fuse_norm_linear): add + norm before
# qkv and gate/up, the SiLU gate after gate/up, nothing around o and down.
KINDS = {
    "qkv": (True, "none"),
    "o": (False, "none"),
    "gate_up": (True, "silu_and_mul"),
    "down": (False, "none"),
}


def shapes(model: str) -> dict[str, tuple[int, int]]:
    c = DUMMY_CONFIGS[model]
    h, inter = c.hidden_size, c.intermediate_size
    return {
        "qkv": (c.q_size + 2 * c.kv_size, h),
        "o": (h, c.q_size),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
    }


def configs() -> list[dict]:
    out = []
    for bm, bn, bk, split, (warps, stages) in itertools.product(
        (64, 128), (64, 128), (64, 128), (1, 2, 4), ((4, 4), (8, 3))
    ):
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 8,
                    "num_warps": warps, "num_stages": stages})  # fmt: skip
    return out


def fused_configs() -> list[dict]:
    out = []
    for bm, bn, bk, (warps, stages) in itertools.product((16, 64), (64, 128), (64, 128), ((4, 3), (8, 3))):
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages})
    return out


def triton_linear(x, w, ones, cfg) -> torch.Tensor:
    return quant_gemm._gemm(x, x.dtype, w, ones, None, None, w.shape[1], cfg)


def projection(x, r, nw, w, normed: bool, act: str, cfg: dict | None = None) -> torch.Tensor:
    """The projection with what the engine fuses around it, through the engine's own entry points:
    with cfg None as it dispatches at M > 1 (the Triton add + norm, cuBLAS, the Triton gate), with a
    cfg forced onto norm_linear's kernel in one launch."""
    if normed:
        return norm_linear.add_rms_norm_linear(x, r, nw, 1e-6, w, None, act, cfg)[0]
    return norm_linear.linear(x, w, None, cfg)


def best_of(launch, layers, cfgs) -> tuple[float, dict] | None:
    """The fastest config of `launch(w, cfg=cfg)` over the layers' weights (None if none compiles)."""
    best = None
    for cfg in cfgs:
        try:
            t = timed_us([partial(launch, w, cfg=cfg) for w in layers], reps=20)
        except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
            print("  skipped", cfg, repr(e)[:100])
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    return best


def measure(model: str, rows: list[int]) -> list[dict]:
    out = []
    for name, (n, k) in shapes(model).items():
        nbytes = n * k * 2
        copies = max(2, -(-L2_BYTES // nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=DT) * 0.02 for _ in range(copies)]
        layers = [ws[i % copies] for i in range(16)]
        ones = torch.ones(n, device="cuda", dtype=torch.float32)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=DT)
            floor = max((nbytes + 2 * m * (n + k)) / COPY_GBPS / 1e3, 2 * m * n * k / PEAK_TFLOPS / 1e6)
            ref = F.linear(x, layers[-1])
            row = {"model": model, "gemm": name, "M": m, "N": n, "K": k, "floor_us": floor}
            row["cublas_us"] = timed_us([partial(F.linear, x, w) for w in layers])
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                row["cublaslt_us"] = timed_us([partial(F.linear, x, w) for w in layers])
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            cfgs = [c for c in configs() if c["BLOCK_M"] <= max(64, m)]
            best = best_of(partial(triton_linear, x, ones=ones), layers, cfgs)
            got = triton_linear(x, layers[-1], ones, best[1])
            row.update(triton_us=best[0], triton_cfg=best[1],
                       triton_max_diff=(got.float() - ref.float()).abs().max().item())  # fmt: skip
            # The projection with the engine's launches around it, against one fused launch.
            normed, act = KINDS[name]
            r, nw = torch.randn(m, k, device="cuda", dtype=DT), torch.rand(k, device="cuda", dtype=DT) + 0.5
            row["engine_us"] = timed_us([partial(projection, x, r, nw, w, normed, act) for w in layers])
            fused = best_of(partial(projection, x, r, nw, normed=normed, act=act), layers, fused_configs())
            want = projection(x, r, nw, layers[-1], normed, act)
            got = projection(x, r, nw, layers[-1], normed, act, fused[1])
            row.update(fused_us=fused[0], fused_cfg=fused[1],
                       fused_max_diff=(got.float() - want.float()).abs().max().item())  # fmt: skip
            out.append(row)
            print(f"{model} {name} M={m} N={n} K={k}: floor {floor:.1f} us, cublas {row['cublas_us']:.1f}, "
                  f"cublaslt {row['cublaslt_us']:.1f}, triton {best[0]:.1f} {best[1]} "
                  f"(diff {row['triton_max_diff']:.3g}); with norm/gate: engine {row['engine_us']:.1f}, "
                  f"fused {fused[0]:.1f} {fused[1]} (diff {row['fused_max_diff']:.3g})", flush=True)  # fmt: skip
        del ws, layers
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3-0.6b,llama-3.1-8b")
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    rows = [int(r) for r in args.rows.split(",")]
    results = [r for m in args.models.split(",") for r in measure(m, rows)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
