"""The batch-1 decode attention kernel's chain of dependent memory round trips, read from its SASS
without a GPU: `_decode_split_kernel` is compiled for sm_90a at a model's batch-1 launch (the
heuristic's config, rope inside, in-kernel merge, PDL), and its SASS is walked in code order.

    python -m benchmarks.decode_chain [--models llama-3.2-1b,llama-3.1-8b] [--ref GIT_REV]

At batch 1 the kernel moves a few hundred KB, so its time is latency: each load whose address or
use waits on an earlier load's value costs a round trip to L2 or HBM. The walk starts a new step each
time an instruction reads a register that a pending global load (LDG, ATOMG) writes, or a DEPBAR
waits for pending cp.async copies (LDGSTS), and prints the global operations issued in each step.
A walk in code order is an approximation (both sides of a branch are walked), but the prologue up to
the first key tile is straight-line code. --ref compiles the same kernel from another revision's
`codegen/attention.py` for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import ModuleType

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sgl_compile.codegen import attention  # noqa: E402
from sgl_compile.models.loading.dummy import DUMMY_CONFIGS  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
GLOBAL_OPS = ("LDG", "STG", "ATOMG", "RED", "LDGSTS")
POINTER_TYPES = {
    "MidO": "*fp32", "MidLse": "*fp32", "KvIndptr": "*i64", "KvIndices": "*i64", "SharedLen": "*i64",
    "Counters": "*i32", "Positions": "*i64", "CosSin": "*fp32", "Slots": "*i64",
}  # fmt: skip
BF16_POINTERS = ("Q", "K", "V", "Out", "KNew", "VNew")


def _module_at(rev: str) -> ModuleType:
    """codegen/attention.py as of git revision `rev`, imported beside the current package."""
    src = subprocess.run(
        ["git", "show", f"{rev}:sgl_compile/codegen/attention.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "attention_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("sgl_compile.codegen.attention_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sass(module: ModuleType, model: str) -> tuple[str, int]:
    """SASS of the model's batch-1 decode attention launch and its register count."""
    c = DUMMY_CONFIGS[model]
    group, d = c.num_heads // c.num_kv_heads, c.head_dim
    cfg = module.decode_attention_heuristic(1, c.num_kv_heads, d, torch.bfloat16)()
    fn = module._decode_split_kernel
    consts = {
        "GROUP": group, "HEAD_DIM": d, "NUM_SPLITS": cfg["num_splits"], "BLOCK_H": max(16, group),
        "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": d, "BLOCK_G": triton.next_power_of_2(group),
        "BLOCK_S": triton.next_power_of_2(cfg["num_splits"]), "DOT_PRECISION": "ieee", "SKIP_SHARED": False,
        "FUSED_MERGE": True, "ROPE": True, "PDL": True,
    }  # fmt: skip
    sig = {
        a: "constexpr" if a in consts else "*bf16" if a in BF16_POINTERS else POINTER_TYPES.get(a, "i32")
        for a in fn.arg_names
    }
    sig["sm_scale_log2"] = "fp32"
    # (as the launcher's JIT specializes them: pointers and strides divisible by 16)
    attrs = {
        (fn.arg_names.index(a),): [["tt.divisibility", 16]]
        for a, t in sig.items()
        if t not in ("constexpr", "fp32")
    }
    src = ASTSource(fn, sig, {(fn.arg_names.index(a),): v for a, v in consts.items()}, attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    return compiled_sass(kernel)


def compiled_sass(kernel) -> tuple[str, int]:
    """A compiled kernel's SASS for sm_90a (the bundled ptxas over its PTX) and its register count."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        for name in ("ptxas-blackwell", "ptxas"):  # the one that reads this Triton's PTX version
            run = subprocess.run(
                [str(BIN / name), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(cubin)],
                capture_output=True,
                text=True,
            )
            if run.returncode == 0:
                break
        else:
            raise RuntimeError(f"no ptxas under {BIN} compiled the kernel: {run.stderr[-300:]}")
        regs = int(re.search(r"Used (\d+) registers", run.stderr).group(1))
        out = subprocess.run(
            [str(BIN / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True
        )
    return out.stdout, regs


def _registers(operand: str) -> list[int]:
    """Registers an operand names; a .64 / .128 access spans 2 / 4 consecutive ones."""
    return [int(r) for r in re.findall(r"\bR(\d+)\b", operand)]


def chain(code: str) -> list[list[str]]:
    """Steps of global operations, each ending where an instruction waits for a pending global load."""
    steps: list[list[str]] = [[]]
    pending: set[int] = set()  # registers pending global loads write
    copies = False  # cp.async copies in flight
    for line in code.splitlines():
        m = re.search(r"\*/\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if m is None:
            continue
        op, args = m.group(2), m.group(3)
        base = op.split(".")[0]
        operands = [a.strip() for a in args.split(",")] if args.strip() else []
        stores = base in ("STG", "STS", "ST", "STL", "RED")
        sources = operands if stores else operands[1:]
        waits = (base == "DEPBAR" and copies) or any(r in pending for s in sources for r in _registers(s))
        if waits:
            steps.append([])
            pending.clear()
            copies = False
        if base in GLOBAL_OPS:
            steps[-1].append(op)
            if base == "LDGSTS":
                copies = True
            elif base in ("LDG", "ATOMG") and operands:
                width = 4 if ".128" in op else 2 if ".64" in op else 1
                first = _registers(operands[0])
                pending.update(first[0] + i for i in range(width) if first)
    return [s for s in steps if s]


def summary(steps: list[list[str]]) -> str:
    """One line a step: its global operations counted by opcode, in the order they first appear."""
    lines = []
    for i, s in enumerate(steps):
        counts = Counter(op.split(".")[0] for op in s)
        lines.append(f"  {i + 1:2d}. " + " ".join(f"{k} x{v}" for k, v in counts.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--ref", default=None, help="also compile this git revision's kernel")
    args = ap.parse_args()
    trees = [("this tree", attention)] + ([(args.ref, _module_at(args.ref))] if args.ref else [])
    print(f"triton {triton.__version__}, sm_90a", file=sys.stderr)
    for model in args.models.split(","):
        for name, module in trees:
            code, regs = sass(module, model)
            steps = chain(code)
            print(f"{model}, {name}: {regs} registers, {len(steps)} steps of global operations")
            print(summary(steps))


if __name__ == "__main__":
    main()
