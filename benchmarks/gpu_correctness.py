"""GPU vs CPU on the same random weights (SmolLM2 shape): greedy tokens in float32 (also with cascade
attention over a shared prefix on the GPU), logits in bfloat16.

Run on a CUDA machine: python benchmarks/gpu_correctness.py [--batch 32] [--tokens 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from sgl_compile.ir.capture import input_names
from sgl_compile.passes.lower_attention import prefill_inputs
from sgl_compile.runtime.engine import Engine
from sgl_compile.runtime.launch import EngineArgs, load_program

MODEL = "dummy:smollm2-135m"


def greedy(device: str, prompts: list[list[int]], tokens: int, **options) -> tuple[list[list[int]], dict]:
    """The outputs, and the scheduler's stats after the run."""
    params = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    with Engine(
        model=MODEL, dtype="float32", device=device, max_total_tokens=32768, context_length=2048, **options
    ) as e:
        outs = e.generate(input_ids=prompts, sampling_params=params)
        return [o["output_ids"] for o in outs], e.get_stats()


def last_logits(dtype: str, device: str, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, straight through the compiled program."""
    compiled = load_program(EngineArgs(model=MODEL, dtype=dtype, device=device))
    c = compiled.config
    inputs = prefill_inputs([ids], (c.num_layers, c.num_kv_heads, c.head_dim), compiled.dtype, device, True)
    with torch.no_grad():
        return compiled.program(**{n: inputs[n] for n in input_names(compiled.program)}).float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(49152) for _ in range(rng.randint(8, 200))] for _ in range(args.batch)]
    gpu, cpu = greedy("cuda", prompts, args.tokens)[0], greedy("cpu", prompts, args.tokens)[0]
    same = sum(g == c for g, c in zip(gpu, cpu, strict=True))
    first_diff = [next((i for i, (a, b) in enumerate(zip(g, c, strict=True)) if a != b), None)
                  for g, c in zip(gpu, cpu, strict=True)]  # fmt: skip
    shared = [rng.randrange(49152) for _ in range(600)]
    grouped = [shared + [rng.randrange(49152) for _ in range(rng.randint(1, 60))] for _ in range(args.batch)]
    cascade, stats = greedy("cuda", grouped, args.tokens, cascade_attention="on")
    cascade_same = sum(g == c for g, c in zip(cascade, greedy("cpu", grouped, args.tokens)[0], strict=True))
    ids = prompts[0][:128]
    ref = last_logits("float32", "cpu", ids)
    bf16 = last_logits("bfloat16", "cuda", ids)
    fp32_gpu = last_logits("float32", "cuda", ids)
    result = {
        "fp32_greedy_identical_requests": f"{same}/{len(prompts)}",
        "fp32_first_divergence": first_diff,
        "fp32_cascade_greedy_identical_requests": f"{cascade_same}/{len(grouped)}",
        "cascade_steps": stats["cascade_steps"],  # decode steps that ran the cascade graphs
        "fp32_logits_max_abs_diff": (fp32_gpu - ref).abs().max().item(),
        "bf16_logits_max_abs_diff": (bf16 - ref).abs().max().item(),
        "logits_max_abs": ref.abs().max().item(),
        "bf16_argmax_agreement": (bf16.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
