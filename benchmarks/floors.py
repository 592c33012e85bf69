"""Lower bounds on an offline workload's time on one GPU, from its bytes and FLOPs (no GPU needed).

    python benchmarks/floors.py                       # bars 2 and 3 on the H100 and the H200
    python benchmarks/floors.py --model llama-3.1-8b --num-prompts 512 --input-len 1000 --output-len 1000

A step's kernels run one after another on one stream, so the bound adds up what cannot overlap:
- prefill: its GEMM and attention FLOPs at the matmul ceiling (compute-bound at any chunk size);
- decode GEMMs: per step the larger of the weights read at the copy ceiling and the step's FLOPs at the
  matmul ceiling, over the steps the running-request limit forces;
- decode attention: every generated token reads its request's whole KV at the copy ceiling.
The running requests are bounded by the KV that fits (all free memory beside the weights, no activations,
no graphs, staggered requests at their average length: a generous bound) and by the limit.
Ceilings are the ones measured on the machines (copy bandwidth, 8192^3 bf16 matmul).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from sgl_compile.models.loading.dummy import DUMMY_CONFIGS
from sgl_compile.runtime.kv_pool import KVPool


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes/s, device-to-device copy
    matmul: float  # FLOP/s, bf16
    memory: float  # bytes usable


DEVICES = {
    "h100": Device("H100 80GB HBM3", 3011e9, 781e12, 79.6 * 2**30),
    "h200": Device("H200", 4.3e12, 788e12, 139 * 2**30),
}


@dataclass(frozen=True)
class Workload:
    model: str
    num_prompts: int
    input_len: tuple[int, int]  # uniform in [lo, hi]
    output_len: tuple[int, int]
    max_running: int = 1024


BARS = {
    "bar 2 (qwen3-0.6b, 256 x [100, 1024] / [100, 1024])": Workload(
        "qwen3-0.6b", 256, (100, 1024), (100, 1024)
    ),
    "bar 3 (llama-3.1-8b, 512 x 1000 / 1000)": Workload("llama-3.1-8b", 512, (1000, 1000), (1000, 1000)),
}


def _mean(r: tuple[int, int]) -> float:
    return (r[0] + r[1]) / 2


def _mean_sq(r: tuple[int, int]) -> float:
    lo, hi = r
    return sum(x * x for x in range(lo, hi + 1)) / (hi - lo + 1)


@dataclass(frozen=True)
class Shape:
    """What a model shape costs: parameters of the layers' GEMMs and of the LM head, the weight bytes
    a step reads, the KV bytes of a token, and attention's FLOPs per (query, key) pair."""

    body: int
    head: int
    weight_bytes: int
    kv_bytes_per_token: int
    attn_flops_per_pair: int

    @staticmethod
    def of(model: str, dtype: torch.dtype = torch.bfloat16) -> Shape:
        c = DUMMY_CONFIGS[model]
        h, layers = c.hidden_size, c.num_layers
        body = layers * (h * (c.q_size + 2 * c.kv_size) + c.q_size * h + 3 * h * c.intermediate_size)
        head = c.vocab_size * h
        weights = (body + head + (0 if c.tie_word_embeddings else head)) * dtype.itemsize
        kv = KVPool.bytes_per_token(layers, c.num_kv_heads, c.head_dim, dtype)
        return Shape(body, head, weights, kv, 4 * layers * c.q_size)  # QK^T and PV


def floor(w: Workload, dev: Device, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    s = Shape.of(w.model, dtype)
    body, head, weights, kv_per_token, attn = (
        s.body, s.head, s.weight_bytes, s.kv_bytes_per_token, s.attn_flops_per_pair
    )  # fmt: skip
    n, mean_in, mean_out = w.num_prompts, _mean(w.input_len), _mean(w.output_len)
    out_tokens = n * mean_out
    # Prefill: every prompt token through the body, causal attention, one logits row per request.
    prefill_flops = n * (2 * body * mean_in + attn * (_mean_sq(w.input_len) + mean_in) / 2 + 2 * head)
    # Decode: a token at context length L (prompt + tokens so far) reads L keys.
    mean_ctx = mean_in + (mean_out - 1) / 2
    kv_bytes = out_tokens * mean_ctx * kv_per_token
    decode_flops = out_tokens * (2 * (body + head) + attn * mean_ctx)
    fits = (dev.memory - weights) / (kv_per_token * (mean_in + mean_out / 2))
    running = min(n, w.max_running, fits)
    steps = out_tokens / running
    step_gemm = max(weights / dev.bandwidth, 2 * (body + head) * running / dev.matmul)
    t = {
        "prefill_s": prefill_flops / dev.matmul,
        "decode_gemm_s": steps * step_gemm,
        "decode_kv_s": kv_bytes / dev.bandwidth,
    }
    total = sum(t.values())
    return {
        **t, "total_s": total, "output_tok_s": out_tokens / total, "running": running,
        "kv_TB": kv_bytes / 1e12, "prefill_PFLOP": prefill_flops / 1e15, "decode_PFLOP": decode_flops / 1e15,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help=f"one of {', '.join(DUMMY_CONFIGS)} (default: the bars)")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=1000)
    ap.add_argument("--range-ratio", type=float, default=1.0)
    args = ap.parse_args()
    if args.model:
        lo = lambda n: max(int(n * args.range_ratio), 1)  # noqa: E731 - as bench offline draws lengths
        workloads = {args.model: Workload(args.model, args.num_prompts, (lo(args.input_len), args.input_len),
                                          (lo(args.output_len), args.output_len))}  # fmt: skip
    else:
        workloads = BARS
    print(
        "| workload | device | running | prefill s | decode GEMM s | decode KV s | floor s | output tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, w in workloads.items():
        for dev in DEVICES.values():
            f = floor(w, dev)
            print(f"| {name} | {dev.name} | {f['running']:.0f} | {f['prefill_s']:.1f} | {f['decode_gemm_s']:.1f} | "
                  f"{f['decode_kv_s']:.1f} | {f['total_s']:.1f} | {f['output_tok_s']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
