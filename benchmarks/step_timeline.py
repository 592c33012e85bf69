"""An offline workload through the scheduler, step by step: where the time of a whole run goes.

    python benchmarks/step_timeline.py --model dummy:qwen3-0.6b --num-prompts 256 \
        --input-len 1024 --output-len 1024 --range-ratio 0.09765625 [--out FILE]
    python benchmarks/step_timeline.py --model dummy:llama-3.2-1b --dataset generated-shared-prefix \
        [--cascade-attention off | --disable-radix-cache]   # bar 4's workload (64 x 16, 2048 + 128, 256 out)

Records each step's kind (extend / decode / decode-cascade), requests, tokens and wall time (with
overlap, a step's wall time is the device time of the step before it plus any host time not hidden),
and the KV + weight bytes the decode steps must read (their floor at 3011 GB/s; for decode-cascade
steps it counts every key, not the unique ones). Prints totals per kind and per decode batch size.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from collections import defaultdict
from pathlib import Path

import torch

from sgl_compile.bench.datasets import random_dataset, shared_prefix_dataset
from sgl_compile.runtime.launch import EngineArgs, launch
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams

BANDWIDTH = 3011e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:qwen3-0.6b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--range-ratio", type=float, default=0.09765625)
    ap.add_argument("--dataset", choices=("random", "generated-shared-prefix"), default="random")
    ap.add_argument("--chunked-prefill-size", type=int, default=None)
    ap.add_argument("--disable-overlap-schedule", action="store_true")
    ap.add_argument("--disable-radix-cache", action="store_true")
    ap.add_argument("--cascade-attention", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--max-running-requests", type=int, default=None, help="default: the engine's")
    ap.add_argument("--profile-steps", default=None, help="a:b: profile steps a..b-1 (kernels, host time)")
    ap.add_argument(
        "--host-profile-steps", default=None, help="a:b: cProfile steps a..b-1 (Python functions)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    launched = launch(
        EngineArgs(
            model=args.model, dtype=args.dtype, device=args.device, context_length=4096,
            chunked_prefill_size=args.chunked_prefill_size,
            disable_overlap_schedule=args.disable_overlap_schedule, disable_radix_cache=args.disable_radix_cache,
            cascade_attention=args.cascade_attention, max_running_requests=args.max_running_requests,
        )
    )  # fmt: skip
    sched, compiled = launched.scheduler, launched.compiled
    c = compiled.config
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * compiled.dtype.itemsize
    weight_bytes = sum(t.numel() * t.element_size() for t in compiled.program.state_dict().values())
    if args.dataset == "random":
        data = random_dataset(
            compiled.tokenizer, args.num_prompts, args.input_len, args.output_len, args.range_ratio
        )
    else:
        data = shared_prefix_dataset(compiled.tokenizer, 64, 16, 2048, 128, 256)
    for i, r in enumerate(data):
        params = SamplingParams(max_new_tokens=r.output_len, temperature=0, ignore_eos=True)
        sched.add(Req(str(i), r.input_ids, params, compiled.tokenizer))
    hook = "_forward" if hasattr(sched, "_forward") else "_launch"  # the phase that takes the batch
    launch_step = getattr(sched, hook)
    log: list[dict] = []

    def recorded(batch):
        kind = "extend"
        if all(s.length == 1 for s in batch):  # (a decode step with cascade groups is told apart)
            kind = "decode-cascade" if any(s.shared is not None for s in batch) else "decode"
        log.append({
            "kind": kind, "reqs": len(batch), "tokens": sum(s.length for s in batch),
            "kv_tokens": sum(s.start + s.length for s in batch),
        })  # fmt: skip
        return launch_step(batch)

    setattr(sched, hook, recorded)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    walls = []
    profile_from, profile_to = map(int, (args.profile_steps or "-1:-1").split(":"))
    profiler = None
    host_from, host_to = map(int, (args.host_profile_steps or "-1:-1").split(":"))
    host_profiler = cProfile.Profile()
    while sched.has_work():
        if len(walls) == host_from:
            host_profiler.enable()
        if len(walls) == profile_from:
            profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            profiler.__enter__()
        t = time.perf_counter()
        sched.step()
        walls.append(time.perf_counter() - t)
        if len(walls) == host_to:
            host_profiler.disable()
            text = io.StringIO()
            pstats.Stats(host_profiler, stream=text).sort_stats("tottime").print_stats(30)
            print(f"steps {host_from}..{host_to - 1}: {sum(walls[host_from:]) * 1e3:.1f} ms of wall time")
            print(text.getvalue())
            if args.out:
                Path(args.out).with_suffix(".host.txt").write_text(text.getvalue())
        if profiler is not None and len(walls) == profile_to:
            torch.cuda.synchronize()
            profiler.__exit__(None, None, None)
            averages = profiler.key_averages()
            tables = "\n".join([
                averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50),
                averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50),
            ])  # fmt: skip
            print(tables)
            if args.out:
                Path(args.out).with_suffix(".profile.txt").write_text(tables)
            profiler = None
    if args.device == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    # With overlap, step i's wall time mostly waits for step i - 1's device work: attribute it there.
    shift = 0 if args.disable_overlap_schedule else 1
    for i, entry in enumerate(log):
        entry["wall"] = walls[i + shift] if i + shift < len(walls) else 0.0
    kinds: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    buckets: dict[int, dict] = defaultdict(lambda: defaultdict(float))
    for e in log:
        k = kinds[e["kind"]]
        k["steps"] += 1
        k["wall_s"] += e["wall"]
        k["tokens"] += e["tokens"]
        if e["kind"].startswith("decode"):
            floor = (e["kv_tokens"] * kv_bytes + weight_bytes) / BANDWIDTH
            k["floor_s"] += floor
            b = buckets[min(256, 32 * (1 + (e["reqs"] - 1) // 32))]
            b["steps"] += 1
            b["wall_s"] += e["wall"]
            b["floor_s"] += floor
    out_tokens = sum(r.output_len for r in data)
    result = {
        "total_s": total, "output_tok_per_s": out_tokens / total, "steps": len(log),
        "by_kind": {k: dict(v) for k, v in kinds.items()},
        "decode_by_batch (<= size)": {b: dict(v) for b, v in sorted(buckets.items())},
        "scheduler": sched.stats(),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
