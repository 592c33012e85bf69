"""Where a decode step's time goes on the GPU: device time vs wall time per step, and the top kernels.

    python benchmarks/decode_profile.py --model dummy:qwen3-0.6b --batch 256 --context 900 [--out FILE]

Runs `batch` requests with `context`-token prompts through the scheduler (overlap on unless
--disable-overlap-schedule), then times `steps` decode steps: the wall time of each `Scheduler.step`
and, from CUDA events around each launched step's device work, the device time. Device time close to
wall time means the GPU is busy; wall time above it is host time the overlap did not hide. Then a
torch profiler over a few steps lists the kernels by total time, and the KV and weight bytes a step
must read give the floor.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from sgl_compile.runtime.launch import EngineArgs, load_program
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:qwen3-0.6b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=900)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--disable-overlap-schedule", action="store_true")
    ap.add_argument("--kernels", type=int, default=15, help="rows of the kernel table")
    ap.add_argument("--trace", default=None, help="write the profiled steps' Chrome trace here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    compiled = load_program(EngineArgs(model=args.model, dtype=args.dtype, device="cuda"))
    c = compiled.config
    total = args.batch * (args.context + args.steps + 20)
    sched = Scheduler(
        compiled,
        SchedulerConfig(
            max_total_tokens=total, context_length=args.context + args.steps + 64,
            chunked_prefill_size=8192, max_running_requests=args.batch, cuda_graph_max_bs=args.batch,
            overlap=not args.disable_overlap_schedule,
        ),
    )  # fmt: skip
    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=args.steps + 15, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        ids = [rng.randrange(c.vocab_size) for _ in range(args.context)]
        sched.add(Req(str(i), ids, params, compiled.tokenizer))
    while any(r.kv_len < args.context for r in sched.running) or sched.waiting:
        sched.step()
    for _ in range(5):  # settle into decode
        sched.step()

    # A launched step's device work: from its forward's first kernel to its sampler's last.
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    forward, sample = sched._forward, sched._sample

    def timed_forward(batch):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        events.append((start, torch.cuda.Event(enable_timing=True)))
        return forward(batch)

    def timed_sample(queued):
        out = sample(queued)
        events[-1][1].record()
        return out

    sched._forward, sched._sample = timed_forward, timed_sample
    walls = []
    for _ in range(args.steps // 2):
        t = time.perf_counter()
        sched.step()
        walls.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    device_ms = [s.elapsed_time(e) for s, e in events]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            sched.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=args.kernels, max_name_column_width=60
    )
    if args.trace:
        prof.export_chrome_trace(args.trace)
    # Kernels per step and their summed time: against the step's device time, the rest is gaps.
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us_per_step = sum(e.device_time for e in kernels) / 10
    sched._forward, sched._sample = forward, sample
    while sched.has_work():
        sched.step()

    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * compiled.dtype.itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in compiled.program.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in compiled.program.buffers())
    floor_ms = (args.batch * (args.context + args.steps) * kv_bytes + weight_bytes) / 3011e9 * 1e3
    result = {
        "model": args.model, "batch": args.batch, "context": args.context,
        "overlap": not args.disable_overlap_schedule,
        "wall_ms_median": 1e3 * statistics.median(walls),
        "device_ms_median": statistics.median(device_ms),
        "floor_ms (kv + weights at 3011 GB/s)": floor_ms,
        "tok_per_s_at_wall": args.batch / statistics.median(walls),
        "kernels_per_step": len(kernels) / 10,
        "kernel_ms_per_step": kernel_us_per_step / 1e3,
    }  # fmt: skip
    print(table)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "kernels": table}, f, indent=1)


if __name__ == "__main__":
    main()
