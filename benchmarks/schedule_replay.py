"""A whole workload through the scheduler with a free stand-in model (any machine): the steps it takes,
the prompt tokens it computes, the decode batches' sizes and cascade groups, and the host time.

    python -m benchmarks.schedule_replay [--dataset generated-shared-prefix | random | fixed-1000]
        [--max-running-requests 256] [--max-total-tokens N] [--cascade-attention on|off]
        [--disable-radix-cache] [--chunked-prefill-size 8192] [--schedule-conservativeness 1.0]
        [--cost-model llama-3.1-8b] [--show-steps 0,300,600,900] [--out FILE]

What the GPU runs is decided here, so a change to scheduling can be judged without one: bar 4's workload
(the default: 64 groups x 16 prompts, 2048 shared tokens + 128 of their own, 256 out; the chunk the H200
gets) is a number of extend steps over the prompt tokens computed, then decode steps whose batch size
and grouping set the attention kernels' work. `random` is bar 2's workload (Qwen3-0.6B shape:
256 requests, 100-1024 tokens in and out), `fixed-1000` bar 3's (512 requests of 1000 in, 1000 out).
The model's logits are one constant block (as in host_overhead.py) and the KV pool holds one byte-sized
value per slot, so the host time is the scheduler's own, without the CPU reference of the decode-inputs
kernel (one launch on CUDA). With --cost-model, each step is also charged its time at the H100's
ceilings for that model shape (as benchmarks/floors.py counts them): the floor of this schedule, where
floors.py assumes the best one.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from benchmarks.floors import DEVICES, Shape
from benchmarks.host_overhead import ConstantLogits
from sgl_compile.bench.datasets import random_dataset, shared_prefix_dataset
from sgl_compile.driver import compile_model
from sgl_compile.runtime import model_runner
from sgl_compile.runtime.launch import freeze_gc, thaw_gc
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class StepCost:
    """A step's time at the H100's ceilings, as benchmarks/floors.py counts them: the GEMMs take the
    longer of the weights read once and their FLOPs at the matmul ceiling; decode reads every request's
    keys at the copy ceiling; an extend's attention runs its FLOPs at the matmul ceiling."""

    shape: Shape

    @staticmethod
    def of(model: str) -> StepCost:
        return StepCost(Shape.of(model))

    def seconds(self, batch) -> float:
        dev, s = DEVICES["h100"], self.shape
        tokens = sum(r.length for r in batch)
        flops = 2 * s.body * tokens + 2 * s.head * sum(len(r.logit_positions) for r in batch)
        gemm = max(s.weight_bytes / dev.bandwidth, flops / dev.matmul)
        pairs = sum(r.length * r.start + r.length * (r.length + 1) // 2 for r in batch)  # causal (query, key)
        if tokens == len(batch):  # decode
            return gemm + pairs * s.kv_bytes_per_token / dev.bandwidth
        return gemm + pairs * s.attn_flops_per_pair / dev.matmul


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--dataset",
        choices=("generated-shared-prefix", "random", "fixed-1000"),
        default="generated-shared-prefix",
    )
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--max-total-tokens", type=int, default=2_000_000)
    ap.add_argument("--chunked-prefill-size", type=int, default=8192)
    ap.add_argument(
        "--cascade-attention", default="on", choices=["on", "off"], help="on: as serving on a GPU"
    )
    ap.add_argument("--disable-radix-cache", action="store_true")
    ap.add_argument("--show-steps", default="0,300,600,900", help="decode steps whose grouping is printed")
    ap.add_argument("--schedule-conservativeness", type=float, default=1.0)
    ap.add_argument(
        "--cost-model",
        default=None,
        help="a dummy model shape (e.g. llama-3.1-8b): the schedule's time at the H100's ceilings (floors.py)",
    )
    ap.add_argument("--out", default=None)
    return ap


def replay(args: argparse.Namespace) -> dict:
    """Run the workload `args` name through the scheduler; the summary main prints."""
    reference = model_runner.decode_inputs_reference
    model_runner.decode_inputs_reference = lambda *_: None  # the stand-in reads none of them
    try:
        return _replay(args)
    finally:
        model_runner.decode_inputs_reference = reference
        thaw_gc()


def _replay(args: argparse.Namespace) -> dict:
    compiled = compile_model(model="dummy:smollm2-135m")
    compiled.program = ConstantLogits()
    # One layer, head and value a slot: the pool's bookkeeping is the real one, its memory next to none.
    compiled.config = replace(compiled.config, num_layers=1, num_kv_heads=1, head_dim=1)
    compiled.dtype = torch.int8
    tok = compiled.tokenizer
    if args.dataset == "random":
        data = random_dataset(tok, 256, 1024, 1024, 0.09765625)
    elif args.dataset == "fixed-1000":
        data = random_dataset(tok, 512, 1000, 1000)
    else:
        data = shared_prefix_dataset(tok, 64, 16, 2048, 128, 256)
    cfg = SchedulerConfig(
        max_total_tokens=args.max_total_tokens, context_length=4096, chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=args.max_running_requests, disable_radix_cache=args.disable_radix_cache,
        enable_cascade_attention=args.cascade_attention == "on",
        schedule_conservativeness=args.schedule_conservativeness,
    )  # fmt: skip
    sched = Scheduler(compiled, cfg)
    freeze_gc()  # as the engine does once it serves
    for i, r in enumerate(data):
        sched.add(
            Req(
                str(i),
                r.input_ids,
                SamplingParams(max_new_tokens=r.output_len, temperature=0, ignore_eos=True),
                tok,
            )
        )
    show = {int(s) for s in args.show_steps.split(",") if s}
    extend = {"steps": 0, "tokens": 0}
    decode_sizes: Counter[int] = Counter()
    groupings: dict[int, str] = {}
    run = sched.runner.run
    cost = StepCost.of(args.cost_model) if args.cost_model else None
    modeled = Counter()

    def recorded(batch):
        if cost is not None:
            modeled["extend" if any(s.length > 1 for s in batch) else "decode"] += cost.seconds(batch)
        if any(s.length > 1 for s in batch):
            extend["steps"] += 1
            extend["tokens"] += sum(s.length for s in batch)
        else:
            step = sum(decode_sizes.values())
            decode_sizes[len(batch)] += 1
            if step in show:
                members = Counter(id(s.shared[0]) if s.shared is not None else id(s) for s in batch)
                groups = Counter(n for n in members.values() if n > 1)  # size -> how many
                runs = ", ".join(
                    f"{n} x{k}" if k > 1 else str(n) for n, k in sorted(groups.items(), reverse=True)
                )
                alone = sum(n == 1 for n in members.values())
                groupings[step] = f"{len(batch)} requests: groups of {runs or '-'}; {alone} alone"
        return run(batch)

    sched.runner.run = recorded
    host = Counter()  # seconds of scheduler steps by the kind of batch they launched
    collections: Counter[int] = Counter()
    collecting = {"s": 0.0, "started": 0.0, "longest": 0.0}

    def timed(phase: str, info: dict) -> None:  # the cycle collector's pauses (the GPU waits through them)
        if phase == "start":
            collecting["started"] = time.perf_counter()
            return
        pause = time.perf_counter() - collecting["started"]
        collections[info["generation"]] += 1
        collecting["s"] += pause
        collecting["longest"] = max(collecting["longest"], pause)

    gc.callbacks.append(timed)
    start = time.perf_counter()
    try:
        while sched.has_work():
            t, before = time.perf_counter(), extend["steps"]
            sched.step()
            host["extend" if extend["steps"] > before else "decode"] += time.perf_counter() - t
    finally:
        gc.callbacks.remove(timed)
    wall = time.perf_counter() - start
    stats = sched.stats()
    decode_steps = sum(decode_sizes.values())
    result = {
        "dataset": args.dataset, "max_running_requests": args.max_running_requests,
        "extend_steps": extend["steps"], "prompt_tokens_computed": extend["tokens"],
        "decode_steps": decode_steps, "decode_batch_sizes": dict(sorted(decode_sizes.items(), reverse=True)),
        "cascade_steps": stats["cascade_steps"], "cascade_shared_tokens": stats["cascade_shared_tokens"],
        "groupings": groupings, "num_retractions": stats["num_retractions"],
        "host_s": wall, "host_ms_per_decode_step": host["decode"] / max(1, decode_steps) * 1e3,
        "host_ms_per_extend_step": host["extend"] / max(1, extend["steps"]) * 1e3,
        "gc_collections_by_generation": dict(sorted(collections.items())), "gc_s": collecting["s"],
        "gc_longest_ms": collecting["longest"] * 1e3,
    }  # fmt: skip
    if cost is not None:
        result.update(modeled_extend_s=modeled["extend"], modeled_decode_s=modeled["decode"],
                      modeled_s=modeled["extend"] + modeled["decode"])  # fmt: skip
    return result


def main() -> None:
    args = parser().parse_args()
    result = replay(args)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
