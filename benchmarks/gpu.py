"""The GPU benchmark: every measurement of the performance bar in one run, then a table.

    python benchmarks/gpu.py [--steps a,b,...] [--out DIR]

Each step is a `sglc bench ...` command (or the correctness script) in its own process, so
each model gets a clean GPU; results go to DIR/<step>.json and the table to DIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "sgl_compile.cli"]
GPU = ["--device", "cuda", "--dtype", "bfloat16"]
# name -> (command, the number the bar is about, the bar)
STEPS: dict[str, tuple[list[str], str, float | None]] = {
    "correctness": ([sys.executable, "benchmarks/gpu_correctness.py"], "fp32_greedy_identical_requests", None),
    "latency-llama-3.2-1b": (
        CLI + ["bench", "latency", "--model", "dummy:llama-3.2-1b", *GPU, "--batch-size", "1",
               "--input-len", "32", "--output-len", "256", "--context-length", "4096"],
        "decode_throughput", 1000.0,
    ),
    "latency-llama-3.1-8b": (
        CLI + ["bench", "latency", "--model", "dummy:llama-3.1-8b", *GPU, "--batch-size", "1",
               "--input-len", "32", "--output-len", "256", "--context-length", "4096"],
        "decode_throughput", 185.0,
    ),
    "offline-qwen3-0.6b": (
        CLI + ["bench", "offline", "--model", "dummy:qwen3-0.6b", *GPU, "--dataset", "random",
               "--num-prompts", "256", "--random-input-len", "1024", "--random-output-len", "1024",
               "--random-range-ratio", "0.09765625", "--context-length", "4096"],
        "output_throughput", 20000.0,
    ),
    "offline-llama-3.1-8b": (
        CLI + ["bench", "offline", "--model", "dummy:llama-3.1-8b", *GPU, "--dataset", "random",
               "--num-prompts", "512", "--random-input-len", "1000", "--random-output-len", "1000",
               "--context-length", "4096"],
        "output_throughput", 10000.0,
    ),
    "shared-prefix-cache": (
        CLI + ["bench", "offline", "--model", "dummy:llama-3.2-1b", *GPU, "--dataset", "generated-shared-prefix",
               "--gsp-num-groups", "64", "--gsp-prompts-per-group", "16", "--gsp-system-prompt-len", "2048",
               "--gsp-question-len", "128", "--gsp-output-len", "256", "--context-length", "4096"],
        "output_throughput", None,
    ),
}  # fmt: skip
STEPS["latency-llama-3.2-1b-no-overlap"] = (
    STEPS["latency-llama-3.2-1b"][0] + ["--disable-overlap-schedule"],
    "decode_throughput",
    None,
)
STEPS["startup-llama-3.1-8b"] = (
    [sys.executable, "benchmarks/startup.py", "--model", "dummy:llama-3.1-8b"],
    "startup_s",
    30.0,
)
STEPS["shared-prefix-no-cache"] = (
    STEPS["shared-prefix-cache"][0] + ["--disable-radix-cache"],
    "output_throughput",
    None,
)
BAR_STEPS = list(STEPS)  # the default run; the variants below are named with --steps
# Variants: without cascade attention (on by default on a GPU since 2026-12-07: the cache's gain
# without it, and its cost where nothing is shared), and 1024 running requests, named (the GPU
# default since 2026-12-06) so that trees before it run the same.
STEPS["shared-prefix-no-cascade"] = (
    STEPS["shared-prefix-cache"][0] + ["--cascade-attention", "off"],
    "output_throughput",
    None,
)
STEPS["offline-qwen3-0.6b-no-cascade"] = (
    STEPS["offline-qwen3-0.6b"][0] + ["--cascade-attention", "off"],
    "output_throughput",
    20000.0,
)
for _name in ("shared-prefix-cache", "shared-prefix-no-cache", "offline-llama-3.1-8b"):
    _cmd, _metric, _bar = STEPS[_name]
    STEPS[f"{_name}-r1024"] = (_cmd + ["--max-running-requests", "1024"], _metric, _bar)


def run_step(name: str, out: Path, timeout: float, extra: list[str]) -> dict:
    cmd, _, _ = STEPS[name]
    target = out / f"{name}.json"
    cmd = cmd + (["--out", str(target)] if name == "correctness" else ["--output-file", str(target)]) + extra
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        (out / f"{name}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            print(r.stderr[-3000:], flush=True)
            return {"error": f"exit {r.returncode}", "wall_s": time.perf_counter() - start}
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s", "wall_s": time.perf_counter() - start}
    result = json.loads(target.read_text())
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default=",".join(BAR_STEPS), help=f"of: {', '.join(STEPS)}")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--extra", default="", help="extra flags for every sglc bench step")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run_step(name, out, args.timeout, args.extra.split()) for name in args.steps.split(",")}
    # builds: Triton kernels first built inside the timed part (their seconds count as serving time)
    lines = ["| step | metric | value | bar | wall s | kernel builds (s) |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        _, metric, bar = STEPS[name]
        value = res.get("error") or res.get(metric)
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        builds = f"{res['kernel_builds']} ({res['kernel_build_s']:.1f})" if "kernel_builds" in res else ""
        lines.append(f"| {name} | {metric} | {shown} | {bar or ''} | {res['wall_s']:.0f} | {builds} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table)


if __name__ == "__main__":
    main()
