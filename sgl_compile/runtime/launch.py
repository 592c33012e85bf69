"""Engine options and what they build: the compiled model, the scheduler over its KV pool.

Shared by the in-process `Engine` and the server's scheduler process.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sgl_compile.codegen.builds import record_builds
from sgl_compile.driver import CompiledModel, CompileOptions, compile_model, validate
from sgl_compile.errors import SglcError
from sgl_compile.ir.capture import input_names
from sgl_compile.models.loading import DEFAULT_MODEL
from sgl_compile.passes.lower_attention import prefill_inputs
from sgl_compile.runtime.cuda_graphs import batch_size_buckets
from sgl_compile.runtime.kv_pool import KVPool
from sgl_compile.runtime.request import Req
from sgl_compile.runtime.sampling_params import SamplingParams
from sgl_compile.runtime.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

CPU_KV_BUDGET = 1 << 30  # bytes of KV cache on CPU when max_total_tokens is not given


@dataclass(frozen=True)
class EngineArgs:
    """The engine's options, named like the CLI flags (`--max-total-tokens` -> max_total_tokens)."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str | None = None  # int8 | int4 | fp8 (weights)
    attention_backend: str | None = None  # torch (CPU) | triton | flashinfer (CUDA); None picks by device
    prefill_attention_backend: str | None = None  # extend steps' backend, if not attention_backend's
    decode_attention_backend: str | None = None  # decode steps' backend, if not attention_backend's
    compiled: str | None = None  # an artifact directory from `sglc compile --out`; replaces the above
    # but the attention backends, which it takes as given
    max_total_tokens: int | None = None  # KV pool slots; default from a memory budget
    mem_fraction_static: float = 0.85  # of free GPU memory, for the KV pool
    context_length: int | None = None
    chunked_prefill_size: int | None = None  # tokens of one extend batch; None: by device (chunk_size)
    max_running_requests: int | None = None  # None: by device (default_max_running_requests)
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    cuda_graph_max_bs: int | None = None  # decode batches up to this size replay CUDA graphs
    # (None: every batch, up to max_running_requests)
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False  # read step N's tokens before launching step N + 1
    jump_forward: str = "auto"  # structured outputs: on | off | auto (see jump_forward_enabled)
    enable_mixed_chunk: bool = False  # decode joins the steps that extend other requests
    schedule_conservativeness: float = 1.0  # scales the KV admission reserves for output to come
    cascade_attention: str = "auto"  # decode reads a shared prefix once: on | off | auto (cascade_enabled)


@dataclass
class Launched:
    compiled: CompiledModel
    scheduler: Scheduler
    context_length: int
    eos_ids: frozenset[int]


def activation_peak_bytes(compiled: CompiledModel, tokens: int) -> int:
    """Peak memory of one forward over `tokens` new tokens, beyond the weights and its (temporary) KV."""
    c, device = compiled.config, compiled.device
    inputs = prefill_inputs(
        [[0] * tokens], (c.num_layers, c.num_kv_heads, c.head_dim), compiled.dtype, device
    )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        compiled.run(**{name: inputs[name] for name in input_names(compiled.program)})
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del inputs
    torch.cuda.empty_cache()
    return peak


def graph_logits_bytes(compiled: CompiledModel, args: EngineArgs) -> int:
    """What the decode graphs keep after capture beside their pool (intermediates, no larger than the
    activation peak): the logits buffer they share, the largest bucket's rows x vocab (263 MB at 1024
    rows of a 128k vocab in bf16; when each graph kept its own, 3.2 GB, twice that with cascade)."""
    if compiled.device.type != "cuda" or args.disable_cuda_graph or not args.cuda_graph_max_bs:
        return 0
    max_bs = batch_size_buckets(min(args.cuda_graph_max_bs, args.max_running_requests))[-1]
    return max_bs * compiled.config.vocab_size * compiled.dtype.itemsize


def default_max_total_tokens(compiled: CompiledModel, args: EngineArgs) -> int:
    """KV pool slots: on a GPU, mem_fraction_static of the memory left beside the weights, the activation
    peak of the largest chunk and the decode graphs' logits."""
    c = compiled.config
    per_token = KVPool.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, compiled.dtype)
    if compiled.device.type == "cuda":
        peak = activation_peak_bytes(compiled, max(args.chunked_prefill_size, 1))
        graphs = graph_logits_bytes(compiled, args)
        free, total = torch.cuda.mem_get_info(compiled.device)
        budget = int((free - peak - graphs) * args.mem_fraction_static)
        log.info(
            "GPU memory: weights %.2f GiB, activation peak %.2f GiB (%d tokens), CUDA-graph logits %.2f GiB, "
            "free %.2f of %.2f GiB",
            torch.cuda.memory_allocated(compiled.device) / 2**30, peak / 2**30, args.chunked_prefill_size,
            graphs / 2**30, free / 2**30, total / 2**30,
        )  # fmt: skip
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = min(CPU_KV_BUDGET, available // 4)
    return max(budget // per_token, 1)


def chunk_size(args: EngineArgs, device: torch.device) -> int:
    """The prefill chunk: 2048 tokens on the CPU; on a GPU, 8192 with >= 60 GiB (else 4096), as SGLang
    sizes it: an eager prefill step pays a fixed host cost per layer, so larger chunks amortise it."""
    if args.chunked_prefill_size is not None:
        return args.chunked_prefill_size
    if device.type != "cuda":
        return 2048
    return 8192 if torch.cuda.get_device_properties(device).total_memory >= 60 * 2**30 else 4096


# Bytes of the request-to-token table (int64, a row of context_length slots per running request) that the
# default running-request limit may take; the decode graphs' key index buffer is as large again.
TABLE_BUDGET = 256 << 20


def default_max_running_requests(args: EngineArgs, device: torch.device, context: int) -> int:
    """How many requests may run at once: 256 on the CPU; on a GPU up to 1024, as many rows as the table
    holds in TABLE_BUDGET (1024 below a 32k context, 256 at 128k), and in practice as many as KV
    admission lets in (SGLang too leaves it to the pool). A larger decode batch reads the weights once
    for more tokens: on the H100 the shared-prefix workload ran 255 decode steps of 64 groups x 16
    instead of 1020 of 16 x 16, +12% (+25% with cascade attention), and without the cache, bound by
    its prefill, the same (docs/benchmarks.md, 2026-12-06)."""
    if args.max_running_requests is not None:
        return args.max_running_requests
    if device.type != "cuda":
        return 256
    return min(1024, max(256, TABLE_BUDGET // (8 * (context + 1))))


SWITCH = ("auto", "on", "off")


def check_switch(what: str, value: object) -> None:
    """An auto / on / off option: anything else (True, "ON") is refused, not read as off."""
    if value not in SWITCH:
        raise SglcError(f"unknown {what} {value!r}; valid: {', '.join(SWITCH)}")


def jump_forward_enabled(args: EngineArgs, device: torch.device) -> bool:
    """auto: on unless decode replays CUDA graphs. The tokens a jump appends are computed in an eager
    extend step, which on a GPU costs several graph-replayed decode steps: on the H200 a 50-request
    JSON workload took 7.5 s with jump-forward against 1.2 s without (docs/benchmarks.md); on the CPU,
    where every step is eager, it saved a third of the time."""
    check_switch("jump forward", args.jump_forward)  # Engine(...) callers skip check_args
    if args.jump_forward != "auto":
        return args.jump_forward == "on"
    return device.type != "cuda" or args.disable_cuda_graph


def cascade_enabled(args: EngineArgs, compiled: CompiledModel) -> bool:
    """auto: on where decode attention is the Triton kernels on a GPU (flashinfer has no cascade path;
    on the CPU it is not measured). A step still runs plain decode unless its groups save >= 75% of
    its KV reads, so where nothing is shared it costs only the graphs captured beside the plain ones
    (qwen3-0.6b's random workload on the H100: 17.5k / 19.4k tok/s with it, 18.1k-19.2k without). On
    bar 4's shared-prefix workload it reads 60.3k tok/s against 40.6k (docs/benchmarks.md)."""
    check_switch("cascade attention", args.cascade_attention)  # Engine(...) callers skip check_args
    if args.cascade_attention != "auto":
        return args.cascade_attention == "on"
    return compiled.device.type == "cuda" and compiled.options.decode_attention_backend == "triton"


def compile_options(args: EngineArgs) -> CompileOptions:
    return CompileOptions(
        args.model, args.dtype, args.device, args.quantization, args.attention_backend,
        args.prefill_attention_backend, args.decode_attention_backend,
    )  # fmt: skip


ATTENTION_FLAGS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


def artifact_options(options: CompileOptions, args: EngineArgs) -> CompileOptions:
    """An artifact's options with the attention backends the engine flags name: the program is the
    same for every backend (they bind its `sglc::paged_attention`), so they are a runtime choice.
    A new --attention-backend also resets the phases it would choose; the rest come from the artifact."""
    override = {f: getattr(args, f) for f in ATTENTION_FLAGS if getattr(args, f) is not None}
    if not override:
        return options
    if "attention_backend" in override:
        override = {"prefill_attention_backend": None, "decode_attention_backend": None} | override
    return validate(replace(options, **override))


def load_program(args: EngineArgs) -> CompiledModel:
    if args.compiled:
        from sgl_compile.artifact import load_artifact

        compiled = load_artifact(args.compiled)
        compiled.options = artifact_options(compiled.options, args)
        return compiled
    return compile_model(compile_options(args))


def check_args(args: EngineArgs) -> None:
    """Refuse bad option values up front (before a scheduler process or any loading starts)."""
    check_switch("jump forward", args.jump_forward)
    check_switch("cascade attention", args.cascade_attention)
    if args.compiled:
        from sgl_compile.artifact import read_manifest

        artifact_options(CompileOptions(**read_manifest(Path(args.compiled))["options"]), args)
    else:
        validate(compile_options(args))


def launch(args: EngineArgs, compiled: CompiledModel | None = None) -> Launched:
    """Load (or take) the program, plan memory, build the scheduler (capturing CUDA graphs). Triton
    kernels compiled on the way (seconds each; a compiled artifact should carry them) are logged."""
    with record_builds() as builds:
        launched = _launch(args, compiled)
    if compiled_kernels := builds.compiled():
        log.info(
            "start-up compiled %d Triton kernels in %.1fs (not in the kernel cache)",
            len(compiled_kernels), sum(t for _, t, _ in compiled_kernels),
        )  # fmt: skip
        for name, seconds, spec in compiled_kernels:
            log.info("  %s %.2fs: %s", name, seconds, spec)
    return launched


def _launch(args: EngineArgs, compiled: CompiledModel | None) -> Launched:
    compiled = compiled or load_program(args)
    cfg = compiled.config
    context = min(args.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
    running = default_max_running_requests(args, compiled.device, context)
    args = replace(
        args,
        chunked_prefill_size=chunk_size(args, compiled.device),
        max_running_requests=running,
        cuda_graph_max_bs=running if args.cuda_graph_max_bs is None else args.cuda_graph_max_bs,
    )
    slots = args.max_total_tokens or default_max_total_tokens(compiled, args)
    scheduler = Scheduler(
        compiled,
        SchedulerConfig(
            slots,
            context,
            args.chunked_prefill_size,
            args.max_running_requests,
            args.schedule_policy,
            args.disable_radix_cache,
            args.cuda_graph_max_bs,
            args.disable_cuda_graph,
            overlap=not args.disable_overlap_schedule,
            jump_forward=jump_forward_enabled(args, compiled.device),
            enable_mixed_chunk=args.enable_mixed_chunk,
            schedule_conservativeness=args.schedule_conservativeness,
            enable_cascade_attention=cascade_enabled(args, compiled),
        ),
    )
    mib = 2 * scheduler.kv.k.nbytes / (1 << 20)
    log.info("KV pool: %d tokens (%.1f MiB), context length %d", slots, mib, context)
    eos = frozenset(cfg.eos_token_ids) | frozenset(compiled.tokenizer.eos_token_ids)
    return Launched(compiled, scheduler, context, eos)


_freezes = 0  # serving engines of this process that froze it (freeze_gc, thaw_gc)


def freeze_gc() -> None:
    """Exempt what is alive now from the cycle collector, for a process about to serve. After start-up
    the process holds ~350k objects the collector tracks (torch's, triton's and the program's
    functions, dicts and tuples), none of them garbage; each full collection walked them all, a
    ~200 ms pause that the GPU waits through (`python -m benchmarks.schedule_replay`, gc_longest_ms:
    188 ms on bar 4's workload without this). Frozen objects are still freed by reference counting,
    but cycles among them wait for `thaw_gc`, which each freeze_gc's engine calls when it shuts down."""
    global _freezes
    gc.collect()
    gc.freeze()
    if _freezes == 0:
        atexit.register(gc.unfreeze)  # (so that the collection at exit sees everything, as extensions expect)
    _freezes += 1
    log.info("froze %d objects out of the cycle collector's generations", gc.get_freeze_count())


def thaw_gc() -> None:
    """One freeze_gc's engine is done; the last one hands everything back to the collector (an engine
    shut down while a later one started is collected then) and collects."""
    global _freezes
    _freezes = max(0, _freezes - 1)
    if _freezes == 0:
        gc.unfreeze()
        gc.collect()


def warm_up(compiled: CompiledModel, args: EngineArgs) -> None:
    """Run once what serving runs first, so that every kernel it launches is compiled: the memory
    plan's forward, the CUDA-graph capture, then prefills without and with a cached prefix, decode
    and retirement. `sglc compile` runs this on the GPU to fill the Triton cache its artifact ships."""
    start = time.perf_counter()
    launched = launch(args, compiled)
    sched = launched.scheduler
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    prompt = [min(1000, compiled.config.vocab_size - 1)] * 300
    for rid, ids in (("short", prompt[:8]), ("long", prompt), ("cached", prompt + prompt[:20])):
        sched.add(Req(f"warm-up-{rid}", ids, params, compiled.tokenizer))
        while sched.has_work():
            sched.step()
    del launched, sched
    gc.collect()
    if compiled.device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("warm-up ran in %.1fs", time.perf_counter() - start)
