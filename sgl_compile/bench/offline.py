"""`sglc bench offline` (engine throughput on a dataset) and `sglc bench latency` (one static batch)."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from sgl_compile.bench.datasets import BenchRequest
from sgl_compile.codegen.builds import record_builds
from sgl_compile.runtime.engine import Engine
from sgl_compile.runtime.launch import EngineArgs, load_program
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig


def offline_throughput(engine: Engine, requests: list[BenchRequest]) -> dict[str, Any]:
    """All requests at once through the Engine, each generating exactly its output length.

    First a warm-up compiles the kernels the run will launch (Triton compiles each new specialization
    on first use, seconds on a fresh machine, which a timed run of ~10 s would otherwise include): a
    few of the requests batched, then again over their cached prefixes; then the cache is flushed so
    the timed run starts from an empty one."""
    warm = [r.input_ids for r in requests[:8]]
    for _ in range(2):
        engine.generate(input_ids=warm, sampling_params={"max_new_tokens": 4})
    engine.flush_cache()
    params = [{"max_new_tokens": r.output_len, "temperature": 0, "ignore_eos": True} for r in requests]
    before = engine.get_stats()
    with record_builds() as builds:  # kernels the warm-up missed, built inside the timed run
        start = time.perf_counter()
        outs = engine.generate(input_ids=[r.input_ids for r in requests], sampling_params=params)
        duration = time.perf_counter() - start
    after = engine.get_stats()
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    in_tokens = sum(len(r.input_ids) for r in requests)
    return {
        "num_requests": len(requests),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(requests) / duration,
        "input_throughput": in_tokens / duration,
        "output_throughput": out_tokens / duration,
        "total_throughput": (in_tokens + out_tokens) / duration,
        "forward_steps": after["forward_steps"] - before["forward_steps"],
        "num_retractions": after["num_retractions"] - before["num_retractions"],
        "cascade_steps": after["cascade_steps"] - before["cascade_steps"],
        "max_total_tokens": engine.scheduler.kv.size,
        **builds.summary(),
    }


def static_batch_latency(
    args: EngineArgs, batch_size: int, input_len: int, output_len: int, seed: int = 0
) -> dict[str, Any]:
    """One batch, stepped by hand: prefill latency, median decode step, tokens/s."""
    compiled = load_program(args)
    device = str(compiled.device)
    need = batch_size * (input_len + output_len)
    cfg = SchedulerConfig(
        max_total_tokens=need + 16,
        context_length=compiled.config.max_position_embeddings,
        chunked_prefill_size=batch_size * input_len,
        max_running_requests=batch_size,
        disable_radix_cache=True,
        cuda_graph_max_bs=batch_size
        if args.cuda_graph_max_bs is None
        else min(args.cuda_graph_max_bs, batch_size),
        disable_cuda_graph=args.disable_cuda_graph,
        overlap=not args.disable_overlap_schedule,
    )
    sched = Scheduler(compiled, cfg)
    rng = random.Random(seed)
    vocab = compiled.config.vocab_size
    params = SamplingParams(max_new_tokens=output_len, temperature=0, ignore_eos=True)
    tok = compiled.tokenizer

    def batch() -> list[Req]:
        return [
            Req(str(i), [rng.randrange(vocab) for _ in range(input_len)], params, tok)
            for i in range(batch_size)
        ]

    _run_batch(sched, batch()[:1], device)  # warm-up
    reqs = batch()
    with record_builds() as builds:
        prefill, steps = _run_batch(sched, reqs, device)
    total = prefill + sum(steps)
    return {
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_latency_s": prefill,
        "prefill_throughput": batch_size * input_len / prefill,
        "median_decode_step_s": statistics.median(steps) if steps else 0.0,
        "decode_throughput": batch_size / statistics.median(steps) if steps else 0.0,
        "total_latency_s": total,
        "overall_throughput": batch_size * output_len / total,
        **builds.summary(),
    }


def _run_batch(sched: Scheduler, reqs: list[Req], device: str) -> tuple[float, list[float]]:
    """Prefill time (until every request's first token is read back) and the decode steps' durations.
    Steps are not synchronised one by one: with overlap, a step returns when the previous one's tokens
    are back, so in steady state its duration is the device's step time plus any host time not hidden."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for r in reqs:
        sched.add(r)
    sync()
    start = time.perf_counter()
    while any(len(r.output_ids) - r.pending < 1 for r in reqs):
        sched.step()
    prefill = time.perf_counter() - start
    steps = []
    while sched.has_work():
        t = time.perf_counter()
        sched.step()
        steps.append(time.perf_counter() - t)
    sync()
    return prefill, steps
