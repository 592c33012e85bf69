"""Waves of the batch-1 GEMV grids on an H100, without a GPU: each projection's heuristic config is
compiled for sm_90, ptxas reports its registers, and the SM's limits give the programs resident at once.
"load steps" counts the dependent rounds of global loads in its SASS (`benchmarks/decode_chain.py`):
where ptxas fits a tile in few registers it loads the weight rows one after another.

    python -m benchmarks.gemv_waves [--models llama-3.2-1b,llama-3.1-8b] [--sms 132] [--maxnreg 64]

A grid of more programs than fit at once runs a second, partial wave after the first programs end;
with PDL, a kernel released at its start also takes slots from such a wave (docs/benchmarks.md, 2026-12-07
third and sixth sessions). Residency: `benchmarks/occupancy.py`.
"""

from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.decode_chain import chain, compiled_sass  # noqa: E402
from benchmarks.occupancy import resident_programs  # noqa: E402
from sgl_compile.codegen import norm_linear  # noqa: E402
from sgl_compile.models.loading.dummy import DUMMY_CONFIGS  # noqa: E402

POINTERS = ("X", "R", "NW", "W", "B", "Out", "S")
ALIGNED = (*POINTERS, "N", "K", "stride_xm", "stride_rm", "stride_wn", "stride_om", "stride_sm")


def projections(model: str) -> list[tuple[str, int, int, str]]:
    """(name, outputs, K, kind) of a decode step's GEMVs: kind is what the launcher fuses around it."""
    c = DUMMY_CONFIGS[model]
    h, inter = c.hidden_size, c.intermediate_size
    return [
        ("qkv", c.q_size + 2 * c.kv_size, h, "add_norm"),
        ("o", h, c.q_size, "plain"),
        ("gate_up", inter, h, "add_norm_gated"),
        ("down", h, inter, "plain"),
        ("lm_head", c.vocab_size, h, "norm"),
    ]


def waves(model: str, sms: int, maxnreg: int | None = None) -> list[dict]:
    fn = norm_linear._norm_gemv_kernel
    rows = []
    for name, n_out, k, kind in projections(model):
        gated = kind.endswith("gated")
        cfg = norm_linear._heuristic(n_out, k, torch.device("cpu"), gated)
        bn, bk, warps = cfg["BLOCK_N"], min(cfg["BLOCK_K"], triton.next_power_of_2(k)), cfg["num_warps"]
        consts = {
            "HAS_NORM": kind != "plain", "HAS_RESIDUAL": kind.startswith("add"), "HAS_BIAS": False,
            "SILU_MUL": gated, "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "PRECISION": "tf32", "PDL": True,
        }  # fmt: skip
        sig = {a: "constexpr" if a in consts else "*bf16" if a in POINTERS else "fp32" if a == "eps" else "i32"
               for a in fn.arg_names}  # fmt: skip
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED}
        src = ASTSource(fn, sig, {(fn.arg_names.index(a),): v for a, v in consts.items()}, attrs)
        options = {"num_warps": warps, "num_stages": 1, **({"maxnreg": maxnreg} if maxnreg else {})}
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        code, regs = compiled_sass(kernel)
        smem = kernel.metadata.shared
        resident = resident_programs(regs, warps, smem)
        grid = triton.cdiv(n_out, bn)
        rows.append({"model": model, "projection": name, "BLOCK_N": bn, "BLOCK_K": bk, "warps": warps,
                     "registers": regs, "smem": smem, "resident_per_sm": resident, "grid": grid,
                     "waves": grid / (sms * resident), "load_steps": len(chain(code))})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--maxnreg", type=int, default=None, help="compile with this register cap (ptxas)")
    args = ap.parse_args()
    print(
        "| model | projection | BLOCK_N x BLOCK_K, warps | registers | resident a SM | grid | waves | load steps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for r in waves(model, args.sms, args.maxnreg):
            print(f"| {r['model']} | {r['projection']} | {r['BLOCK_N']} x {r['BLOCK_K']}, {r['warps']} | "
                  f"{r['registers']} | {r['resident_per_sm']} | {r['grid']} | {r['waves']:.2f} | "
                  f"{r['load_steps']} |")  # fmt: skip


if __name__ == "__main__":
    main()
