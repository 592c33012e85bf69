"""The fused norm + GEMV kernel against the unfused kernels it replaces, at decode's few rows.

    python benchmarks/norm_linear.py [--models llama-3.2-1b,llama-3.1-8b] [--rows 1,8,16] [--sweep [--narrow]]
        [--maxnreg 48,64]
        [--out F]

Per model shape: the residual add + norm + qkv projection, the same + gate_up projection + SwiGLU
gate, and the final norm + LM head; unfused = the Triton norm, cuBLAS (F.linear), the Triton gate
(three launches, as the program ran before the fusion); fused = one launch with the heuristic config
(and, with --sweep, the best of the tuner's candidates). Each timing cycles through enough copies of
the weight to exceed L2, so every call streams its weight from HBM as a decode step does; the GB/s
are weight bytes over time. The plain projections (o_proj, down): cuBLAS against the same GEMV
kernel without its norm.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.testing as tt

from sgl_compile.codegen import activation, norm, norm_linear
from sgl_compile.models.loading.dummy import DUMMY_CONFIGS

DEV, DT = "cuda", torch.bfloat16
L2_BYTES = 256 << 20  # cycle through at least this many weight bytes per timing
SPACE = norm_linear.CONFIG_SPACE["norm_linear"]  # --narrow: the one-row blocks the heuristic picks among


def per_call_us(fn_for_copy, copies: int) -> float:
    def run():
        for i in range(copies):
            fn_for_copy(i)

    torch.cuda.synchronize()
    return tt.do_bench_cudagraph(run, rep=30) * 1e3 / copies


def weights(n: int, k: int) -> list[torch.Tensor]:
    copies = max(1, -(-L2_BYTES // (n * k * 2)))
    return [torch.randn(n, k, device=DEV, dtype=DT) * 0.02 for _ in range(copies)]


def sweep(fn_for_copy_and_config, copies: int, k: int, row: dict) -> str:
    """Time every tuner candidate (once per effective config: the launcher caps BLOCK_K at K), record
    them all in `row`, fastest first, return the fastest as the table's last column."""
    timed, seen = [], set()
    for cand in SPACE:
        eff = {**cand, "BLOCK_K": min(cand["BLOCK_K"], triton.next_power_of_2(k))}
        if tuple(eff.values()) in seen:
            continue
        seen.add(tuple(eff.values()))
        try:
            timed.append((per_call_us(lambda i, cand=cand: fn_for_copy_and_config(i, cand), copies), cand))
        except Exception as e:  # noqa: BLE001 - a candidate may exceed shared memory
            print("skipped", cand, repr(e)[:100])
    timed.sort(key=lambda t: t[0])
    t_best, c_best = timed[0]
    row.update(best_us=t_best, best=c_best, timed=timed)
    return f"{t_best:8.1f} {c_best}"


def capped(fn_for_copy_and_config, copies: int, cfg: dict, caps: list[int], row: dict) -> str:
    """The heuristic's config with each register cap in `caps` (ptxas's `maxnreg`), recorded in `row`."""
    parts = []
    for cap in caps:
        t = per_call_us(lambda i, c={**cfg, "maxnreg": cap}: fn_for_copy_and_config(i, c), copies)
        row[f"maxnreg_{cap}_us"] = t
        parts.append(f"maxnreg {cap}: {t:.1f}")
    return "  " + ", ".join(parts) if parts else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b,qwen3-0.6b")
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-ops", default="qkv,gate_up,o_proj,down", help="the ops --sweep sweeps")
    ap.add_argument(
        "--narrow", action="store_true", help="sweep BLOCK_N 4-16, BLOCK_K 512-2048, 1 stage only"
    )
    ap.add_argument(
        "--maxnreg", default="", help="also time the heuristic's config with these register caps (e.g. 48,64)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    caps = [int(c) for c in args.maxnreg.split(",") if c]
    if args.narrow:
        global SPACE
        SPACE = [
            c
            for c in SPACE
            if 4 <= c["BLOCK_N"] <= 16 and 512 <= c["BLOCK_K"] <= 2048 and c["num_stages"] == 1
        ]
    rows_list = [int(r) for r in args.rows.split(",")]
    sweep_ops = set(args.sweep_ops.split(","))
    results = []
    print(f"{'model':14} {'op':9} {'M':>3} {'MB':>7} {'unfused us':>10} {'fused us':>9} {'GB/s':>6} "
          f"{'best us':>8} best config")  # fmt: skip
    for name in args.models.split(","):
        c = DUMMY_CONFIGS[name]
        h = c.hidden_size
        cases = [
            ("qkv", (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, "none", True),
            ("gate_up", 2 * c.intermediate_size, "silu_and_mul", True),
            ("lm_head", c.vocab_size, "none", False),
        ]
        for op, n, act, has_res in cases:
            ws = weights(n, h)
            mb = n * h * 2 / 1e6
            for m in rows_list:
                x, r = torch.randn(m, h, device=DEV, dtype=DT), torch.randn(m, h, device=DEV, dtype=DT)
                nw = torch.randn(h, device=DEV, dtype=DT)

                def unfused(i, x=x, r=r, nw=nw, act=act, has_res=has_res, ws=ws):
                    hn = norm.fused_add_rms_norm(x, r, nw, 1e-5)[0] if has_res else norm.rms_norm(x, nw, 1e-5)
                    y = F.linear(hn, ws[i])
                    return activation.silu_and_mul(y) if act == "silu_and_mul" else y

                def fused(i, config=None, x=x, r=r, nw=nw, act=act, has_res=has_res, ws=ws):
                    if has_res:
                        return norm_linear.add_rms_norm_linear(x, r, nw, 1e-5, ws[i], None, act, config)
                    return norm_linear.rms_norm_linear(x, nw, 1e-5, ws[i], None, act, config)

                t_unfused = per_call_us(unfused, len(ws))
                gated = act == "silu_and_mul"
                cfg = norm_linear._heuristic(n // 2 if gated else n, h, torch.device(DEV), gated)
                t_fused = per_call_us(lambda i, cfg=cfg: fused(i, cfg), len(ws))
                row = {"model": name, "op": op, "m": m, "weight_mb": mb, "unfused_us": t_unfused,
                       "fused_us": t_fused, "heuristic": cfg}  # fmt: skip
                best = sweep(fused, len(ws), h, row) if args.sweep and op in sweep_ops else ""
                best += capped(fused, len(ws), cfg, caps, row)
                results.append(row)
                print(f"{name:14} {op:9} {m:3d} {mb:7.1f} {t_unfused:10.1f} {t_fused:9.1f} "
                      f"{mb * 1e3 / t_fused:6.0f} {best}")  # fmt: skip
        for op, n, k in (("o_proj", h, c.num_heads * c.head_dim), ("down", h, c.intermediate_size)):
            ws = weights(n, k)
            mb = n * k * 2 / 1e6
            for m in rows_list:
                x = torch.randn(m, k, device=DEV, dtype=DT)
                t = per_call_us(lambda i, x=x, ws=ws: F.linear(x, ws[i]), len(ws))
                gemv = lambda i, config, x=x, ws=ws: norm_linear.linear(x, ws[i], None, config)  # noqa: E731
                cfg = norm_linear._heuristic(n, k, torch.device(DEV))
                t_gemv = per_call_us(lambda i, cfg=cfg, gemv=gemv: gemv(i, cfg), len(ws))
                row = {"model": name, "op": op, "m": m, "weight_mb": mb, "cublas_us": t, "gemv_us": t_gemv,
                       "heuristic": cfg}  # fmt: skip
                best = sweep(gemv, len(ws), k, row) if args.sweep and op in sweep_ops else ""
                best += capped(gemv, len(ws), cfg, caps, row)
                results.append(row)
                print(f"{name:14} {op:9} {m:3d} {mb:7.1f} {t:10.1f} {t_gemv:9.1f} {mb * 1e3 / t_gemv:6.0f} {best}"
                      "  (unfused = cuBLAS, fused = the GEMV without a norm)")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
